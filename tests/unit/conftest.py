"""Fixtures of the unit tier."""
import os
import shutil

import pytest

from agent import config
from agent.control import Controller
from agent.store import Store


@pytest.fixture
def tool():
    """tool(NAME, PACKAGE) -> the path of a command the test runs. Absent, the test is
    skipped on a developer's machine; in CI (`bash setup.sh test`, which installs PACKAGE)
    an absent tool is a failure, never a skip."""
    def find(name: str, package: str) -> str:
        found = shutil.which(name)
        if found is None:
            assert not os.environ.get("CI"), f"{name} is missing in CI (setup.sh installs {package})"
            pytest.skip(f"{name} not installed (bash setup.sh installs package {package})")
        return found
    return find


@pytest.fixture
def ctl(tmp_path):
    """A controller with a fresh store and no datapath or links: a dry run must need
    neither."""
    store = Store.open(str(tmp_path / "state.db"))
    try:
        yield Controller(config.Config(), store, datapath=None, links=None)
    finally:
        store.close()


# The demo lab (netns_lab/labs/demo.toml): its parsed TOML, and its LabSpec.
@pytest.fixture(scope="module")
def raw():
    from ctl.cli import load_state_file
    from netns_lab import labfile
    return load_state_file(labfile.DEMO_LAB)


@pytest.fixture(scope="module")
def spec(raw):
    import copy
    from netns_lab import labfile
    return labfile.parse(copy.deepcopy(raw), source="demo.toml")
