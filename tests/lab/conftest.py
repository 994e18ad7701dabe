"""Fixtures of the lab tier (netns_lab/lab.py is the lab itself): a lab per test or per
module, always torn down, and a final check that nothing of ours is left behind."""
from __future__ import annotations

import json as jsonlib
import os
import shutil
import subprocess

import pytest

from netns_lab.lab import CREATED_NAMESPACES, CREATED_PINS, Lab


def _require_root():
    if os.geteuid() != 0:
        pytest.skip("the lab tier needs root")
    for tool in ("nsenter", "ip"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


def _a_lab():
    """A fresh, empty lab (just the node namespace), closed with its agent's log shown."""
    _require_root()
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close(show_log=True)


@pytest.fixture
def lab():
    """A lab for one test."""
    yield from _a_lab()


@pytest.fixture(scope="module")
def module_lab():
    """A lab shared by the tests of one module."""
    yield from _a_lab()


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    """After the lab tests: none of our namespaces or pin dirs left, and no XDP program
    attached to any interface of the root namespace."""
    yield
    if os.geteuid() != 0:
        return
    listed = {line.split()[0] for line in subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines() if line}
    left = sorted(listed & set(CREATED_NAMESPACES))
    pins = [p for p in CREATED_PINS if os.path.exists(p)]
    links = jsonlib.loads(subprocess.run(["ip", "-j", "link", "show"], capture_output=True,
                                         text=True).stdout or "[]")
    xdp_root = [link["ifname"] for link in links if link.get("xdp")]
    assert not left, f"namespaces left behind: {left}"
    assert not pins, f"pin dirs left behind: {pins}"
    assert not xdp_root, f"XDP programs attached in the root namespace: {xdp_root}"
