"""`xdpflow-lab demo --keep` as a user runs it (what `bash setup.sh demo` runs, plus --keep):
every section prints, the lab stays up and answers as it says, and `down` removes it."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from netns_lab import render, topology
from netns_lab.lab import CREATED_NAMESPACES, CREATED_PINS
from netns_lab.netns import unique

pytestmark = pytest.mark.lab

LAB_CLI = str(Path(sys.executable).parent / "xdpflow-lab")


def test_demo_keep_then_down():
    if os.geteuid() != 0:
        pytest.skip("the lab tier needs root")
    prefix = unique("xd", 8)
    CREATED_PINS.append(topology.pin_dir(prefix))
    CREATED_NAMESPACES.append(render.ns_name(prefix, "offload", "node"))
    try:
        p = subprocess.run([LAB_CLI, "demo", "--prefix", prefix, "--keep", "--seconds", "0.3"],
                           capture_output=True, text=True, timeout=400)
        out = p.stdout
        # Mismatches outside the scenarios waiting on the datapath would make it exit 1.
        assert p.returncode == 0, out[-6000:] + p.stderr[-3000:]
        for what in ("building the lab", "the same real traffic on every path",
                     "scenarios through the offloaded path and both kernel variants",
                     "speed on the same traffic (indicative)", "$ xdpflowctl flow dump",
                     "$ xdpflowctl stats", "$ xdpflowctl trace", "xdpflow_packets_total{",
                     "the lab stays up (--keep)", f"xdpflow-lab down --prefix {prefix}"):
            assert what in out, what
        assert out.count("the same bytes") == 3 and "DIFFERENT" not in out
        m = re.search(r"(\d+) packets compared: \d+ match, (\d+) mismatch \((\d+) of them "
                      r"waiting on the datapath\)", out)
        assert m and int(m.group(1)) >= 300 and m.group(2) == m.group(3), out[-3000:]
        assert re.search(r"offload +\d+\.\d{3} +\d+ ns", out), out
        assert "rule:      4" in out                     # the trace names the deny rule
        # It is up, as it says: the agent answers and a VM reaches another.
        doc = json.loads((topology.rundir(prefix) / "lab.json").read_text())
        assert os.path.exists(f"/proc/{doc['agent_pid']}")
        ping = subprocess.run(["ip", "netns", "exec", f"{prefix}-o-blue1", "ping", "-c", "1",
                               "-W", "2", "10.0.0.2"], capture_output=True, text=True)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        ctl = subprocess.run([str(Path(sys.executable).parent / "xdpflowctl"), "--socket",
                              doc["socket"], "--json", "status"], capture_output=True,
                             text=True)
        assert ctl.returncode == 0 and json.loads(ctl.stdout)["pid"] == doc["agent_pid"]
    finally:
        d = subprocess.run([LAB_CLI, "down", "--prefix", prefix], capture_output=True,
                           text=True, timeout=60)
    assert d.returncode == 0 and topology.namespaces_of(prefix) == []
    assert not os.path.exists(topology.pin_dir(prefix))
