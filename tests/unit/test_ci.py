"""`.ci/run` and the front of `setup.sh`, without root: CI runs the README's test command
and fails when pytest tested nothing; setup refuses a wrong command before touching the
machine."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

CHECKOUT = Path(__file__).resolve().parents[2]


def ci_run_with_setup_exiting(tmp_path: Path, code: int) -> subprocess.CompletedProcess:
    """.ci/run in a copy whose setup.sh records how it was called and exits `code`."""
    (tmp_path / ".ci").mkdir()
    shutil.copy(CHECKOUT / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "setup.sh").write_text(
        f'echo "args=$* CI=$CI" > called\nread -r line && echo "stdin: $line" >> called\n'
        f"exit {code}\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    return subprocess.run(["bash", str(tmp_path / ".ci" / "run")], input="not for CI\n",
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("code", [0, 1, 2])
def test_ci_runs_the_readme_test_command(tmp_path, code):
    p = ci_run_with_setup_exiting(tmp_path, code)
    assert p.returncode == code, p.stderr
    # `bash setup.sh test`, with CI=true and no stdin (a prompt would hang CI).
    assert (tmp_path / "called").read_text() == "args=test CI=true\n"


def test_ci_fails_when_pytest_collected_nothing(tmp_path):
    p = ci_run_with_setup_exiting(tmp_path, 5)
    assert p.returncode == 1
    assert "collected no tests" in p.stderr


def test_readme_names_the_ci_command():
    assert "bash setup.sh test" in (CHECKOUT / "README.md").read_text()
    assert "bash setup.sh test" in (CHECKOUT / ".ci" / "run").read_text()


def test_setup_refuses_an_unknown_command_first():
    p = subprocess.run(["bash", str(CHECKOUT / "setup.sh"), "tset"], capture_output=True,
                       text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 1
    assert p.stdout == ""      # nothing was done: no package check, no venv
    assert p.stderr == ("setup: error: step \"start\": unknown command 'tset' "
                        "(use: demo, test, or nothing)\n")


def tiers_with_groups_exiting(tmp_path: Path, lab: int, rest: int) -> subprocess.CompletedProcess:
    """.ci/tiers with a stand-in python that records its arguments and exits `lab` for
    the lab group's pytest, `rest` for the other one's."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/bash\necho "$*" >> "$(dirname "$0")/calls"\n'
                    f'case "$*" in *"-m lab "*) exit {lab};; *) exit {rest};; esac\n')
    fake.chmod(0o755)
    return subprocess.run(["bash", str(CHECKOUT / ".ci" / "tiers"), str(fake), "-x"],
                          capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("lab,rest,want", [(0, 0, 0), (1, 0, 1), (0, 1, 1), (0, 5, 5),
                                           (5, 0, 5), (2, 1, 2)])
def test_tiers_fail_when_either_group_fails_or_tests_nothing(tmp_path, lab, rest, want):
    p = tiers_with_groups_exiting(tmp_path, lab, rest)
    assert p.returncode == want, p.stdout + p.stderr
    assert f"lab tier exit {lab}; bpf, setup and unit tiers exit {rest}" in p.stdout


def test_tiers_run_every_test_once_in_two_groups(tmp_path):
    """The two pytest runs select by marker, lab and not lab: together every test, none
    twice; extra arguments reach both."""
    tiers_with_groups_exiting(tmp_path, 0, 0)
    calls = sorted((tmp_path / "calls").read_text().splitlines())
    assert calls == ["-m pytest -m lab --durations=25 -x",
                     "-m pytest -m not lab --durations=25 -x"]


def test_setup_test_without_arguments_runs_the_tiers():
    text = (CHECKOUT / "setup.sh").read_text()
    assert 'exec bash "$here/.ci/tiers" "$venv/bin/python"' in text
