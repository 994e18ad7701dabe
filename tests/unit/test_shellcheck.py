"""The project's shell scripts are shellcheck clean (setup.sh is the front door: a quoting
slip there breaks a new user's first command)."""
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

CHECKOUT = Path(__file__).resolve().parents[2]
SCRIPTS = ["setup.sh", "systemd/install.sh", ".ci/run", ".ci/tiers"]


@pytest.fixture
def shellcheck(tool):
    return tool("shellcheck", "shellcheck")


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_shellcheck_clean(shellcheck, script):
    p = subprocess.run([shellcheck, "--shell=bash", "--external-sources", script],
                       cwd=CHECKOUT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"shellcheck {script}:\n{p.stdout}{p.stderr}"


def test_shellcheck_finds_what_it_is_for(shellcheck, tmp_path):
    """The check can fail: the slip the issue was about (a glob through ls, an unquoted
    expansion) is reported."""
    bad = tmp_path / "bad.sh"
    bad.write_text('#!/bin/bash\nfor f in $(ls /usr/src/linux-headers-*); do echo $f; done\n')
    p = subprocess.run([shellcheck, str(bad)], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert "SC2045" in p.stdout or "SC2086" in p.stdout, p.stdout


def test_setup_installs_shellcheck():
    text = (CHECKOUT / "setup.sh").read_text()
    pkgs = re.search(r"^pkgs=\((.*?)\)", text, re.S | re.M)
    assert pkgs and "shellcheck" in pkgs.group(1).split()
