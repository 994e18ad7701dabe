"""Fixtures of the lab tier (netns_lab/lab.py is the lab itself): a lab per test or per
module, always torn down, and a final check that nothing of ours is left behind."""
from __future__ import annotations

import json as jsonlib
import os
import shutil
import subprocess

import pytest

from netns_lab.lab import CREATED_NAMESPACES, CREATED_PINS, Lab
from netns_lab.netns import unique


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


def _recorded_prefix() -> str:
    """A new lab file lab's prefix (short, lower-case: [lab] prefix rules; the pid+random
    tail keeps runs apart), its names (node, gateway and external host namespaces on every
    path, its pins) recorded for the session check below."""
    from netns_lab import render, topology
    prefix = unique("xt", 8)
    CREATED_PINS.append(topology.pin_dir(prefix))
    for path in render.PATHS:
        for what in ("node", "gw", "inet"):
            CREATED_NAMESPACES.append(render.ns_name(prefix, path, what))
    return prefix


@pytest.fixture
def lab_prefix():
    """A prefix for a lab a test builds itself (e.g. with `xdpflow-lab up`)."""
    _require_root()
    return _recorded_prefix()


@pytest.fixture(scope="session")
def demo_lab():
    """The demo lab (netns_lab/labs/demo.toml) up on every path, built once for the
    session (three paths, an agent's compile, two kernel variants: a minute or more on a
    busy machine) and shared by the modules that compare on it; each of them undoes what
    it changes. Always removed (after the last module, before the check below); the
    agent's log shown at the end."""
    from netns_lab import labfile, topology
    _require_root()
    spec = labfile.load(labfile.DEMO_LAB, prefix=_recorded_prefix())
    topo = topology.Topology(spec)
    try:
        topo.up()
        yield topo
    finally:
        log = topo.lab.log_text() if topo.lab is not None else ""
        topo.close()
        print(f"----- agent log -----\n{log[-4000:]}")
    assert not topology.namespaces_of(spec.prefix)


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
