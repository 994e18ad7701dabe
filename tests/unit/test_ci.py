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
