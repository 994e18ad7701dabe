"""`xdpflow-lab bench forward --quick` as CI runs it: the document has every path and cell,
positive rates and costs that can be said, every raw sample, the machine and commit, a
readable PNG, and nothing of the run is left behind. Speed itself is never asserted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from netns_lab import bench_traffic

pytestmark = pytest.mark.lab

LAB_CLI = str(Path(sys.executable).parent / "xdpflow-lab")


def test_bench_forward_quick(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the lab tier needs root")
    out, plots = tmp_path / "forward.json", tmp_path / "plots"
    p = subprocess.run([LAB_CLI, "bench", "forward", "--quick", "--json", str(out),
                        "--plot", str(plots)], capture_output=True, text=True, timeout=420)
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads(out.read_text())
    plan = bench_traffic.ForwardPlan.quick()
    assert doc["suite"] == "forward" and doc["quick"] is True
    assert doc["machine"]["kernel"] and doc["machine"]["commit"]
    cells = {(c["path"], c["flows"], c["rules"]) for c in doc["cases"]}
    want = {(p_, f, r) for p_ in ("offload", "iptables", "nftables") for f in plan.flows
            for r in plan.rules} | {("plain", f, 0) for f in plan.flows}
    assert cells == want
    for c in doc["cases"]:
        assert len(c["samples_pps"]) == len(c["generator_samples_pps"]) == plan.rounds
        assert all(x > 0 for x in c["samples_pps"]), c          # every path delivered
        assert all(x > 0 for x in c["generator_samples_pps"]), c
        assert c["pps"] > 0 and c["ns_per_packet"] is not None
    names = {g["name"] for g in doc["goals"]}
    assert "iptables/offload cost, 100 rules, 1 flows" in names
    assert all(g["met"] in (True, False) for g in doc["goals"])
    assert "iptables/offload cost" in p.stdout           # the table was printed
    png = plots / "forward.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [line for line in left.splitlines() if line.startswith(doc["prefix"])]
    assert not os.path.exists(f"/sys/fs/bpf/{doc['prefix']}-lab")
