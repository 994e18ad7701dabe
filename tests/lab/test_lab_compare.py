"""The lab from a file, both datapaths, compared: every shipped scenario matches on both
kernel variants; a real 10 MB TCP transfer carries the same bytes on every path; a rule
present in one path only is caught (exit 1); `down` after a killed `up` leaves nothing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netns_lab import render, scenarios, topology
from netns_lab.traffic import tcp_transfer

pytestmark = pytest.mark.lab

LAB_CLI = str(Path(sys.executable).parent / "xdpflow-lab")
# Scenarios that name the datapath work they need (port security: spoofed sources, VLAN
# tags); they may mismatch until it lands.
WAITING = {s.name for s in scenarios.load() if s.waiting_on}


@pytest.fixture(scope="module")
def up_lab(demo_lab):
    return demo_lab


def _compare(prefix: str, tmp_path: Path, *extra: str):
    out = tmp_path / f"compare-{prefix}.json"
    p = subprocess.run([LAB_CLI, "compare", "--prefix", prefix, "--json", str(out), *extra],
                       capture_output=True, text=True, timeout=300)
    doc = json.loads(out.read_text()) if out.exists() else None
    return p, doc


def test_every_scenario_matches_on_both_kernel_variants(up_lab, tmp_path):
    p, doc = _compare(up_lab.prefix, tmp_path)
    assert set(doc["variants"]) == {"iptables", "nftables"}
    shipped = set(scenarios.names())
    waiting_mismatches = 0
    for variant, v in doc["variants"].items():
        assert set(v["scenarios"]) == shipped
        assert v["total"]["packets_compared"] >= 150, (variant, v["total"])
        assert (v["total"]["matches"] + v["total"]["expected"] + v["total"]["mismatches"]
                == v["total"]["sends"])
        for name, s in v["scenarios"].items():
            # Every expected difference carries its reason; every send has its row.
            assert all(len(e["reason"]) > 30 for e in s["expected"]), name
            assert len(s["per_send"]) == s["sends"]
            assert sum(r["result"] == "match" and r["same_bytes"] for r in s["per_send"]) \
                == s["matches"]
            if name in WAITING:
                waiting_mismatches += len(s["mismatches"])
            else:
                assert s["mismatches"] == [], (variant, name, s["mismatches"])
    # 0 mismatches but in scenarios that say what datapath work they wait on (and once it
    # has landed, none at all): the exit code says so.
    assert doc["total"]["mismatches"] == waiting_mismatches
    assert p.returncode == (1 if waiting_mismatches else 0), p.stdout + p.stderr
    assert doc["total"]["packets_compared"] >= 300
    assert "nftables" in p.stdout and "packets compared" in p.stdout


def test_a_10mb_tcp_transfer_carries_the_same_bytes_on_every_path(up_lab):
    spec = up_lab.spec
    a, b = spec.vm("blue1"), spec.vm("blue2")
    got = {}
    for path in up_lab.paths:
        r = tcp_transfer(up_lab.vm_ns(path, a), up_lab.vm_ns(path, b), b.ip, 5001,
                         10 * 1000 * 1000)
        assert r["received"] == {k: r["sent"][k] for k in ("bytes", "sha256")}, (path, r)
        assert r["peer"] == a.ip, (path, r)
        got[path] = r["received"]["sha256"]
    assert len(set(got.values())) == 1 and len(got) == 3, got
    # The offloaded path carried it: the flow is in the agent's table.
    flows = up_lab.lab.ok("flow", "dump", "--tenant", "blue")
    assert any(f.get("dport") == 5001 or f.get("sport") == 5001 for f in flows), flows


def test_a_rule_present_in_one_path_only_is_reported_and_exits_1(up_lab, tmp_path):
    lab = up_lab.lab
    lab.ok("rule", "add", "--tenant", "blue", "--id", "990", "--priority", "1000",
           "--proto", "udp", "--dport", "7100", "--action", "deny",
           "--comment", "injected into the offloaded path only")
    try:
        p, doc = _compare(up_lab.prefix, tmp_path, "--scenario", "same_tenant")
    finally:
        lab.ok("rule", "del", "990")
    assert p.returncode == 1, p.stdout + p.stderr
    for variant in ("iptables", "nftables"):
        bad = doc["variants"][variant]["scenarios"]["same_tenant"]["mismatches"]
        assert bad and all("7100" in m["packet"] for m in bad), bad
        for m in bad:
            assert m["offload"] == [] and any(f["vm"] == "blue2" for f in m["kernel"])
            assert "nobody" in m["why"] and m["frames"]
            # What the offloaded datapath said it did with that packet (its monitor).
            evs = m["offload_events"]
            assert evs and all((e["verdict"], e["reason"], e["rule"], e["dport"]) ==
                               ("drop", "rule_deny", 990, 7100) for e in evs), evs
    assert doc["total"]["mismatches"] == 8      # 4 udp/7100 sends x 2 variants
    assert "MISMATCH iptables / same_tenant" in p.stdout
    assert "datapath: " in p.stdout and "drop rule_deny rule 990" in p.stdout
    assert doc["monitor"]["events"] > 0 and not doc["monitor"]["error"]


def test_a_rule_present_in_one_kernel_variant_only_is_reported_for_it(up_lab, tmp_path):
    router = render.router_ns(up_lab.prefix, "iptables", "blue")
    rule = ["-p", "udp", "--dport", "7100", "-j", "DROP"]
    subprocess.run(["nsenter", f"--net=/run/netns/{router}", "iptables", "-I", "xf-sg-blue",
                    "1", *rule], check=True)
    try:
        p, doc = _compare(up_lab.prefix, tmp_path, "--scenario", "same_tenant")
    finally:
        subprocess.run(["nsenter", f"--net=/run/netns/{router}", "iptables", "-D",
                        "xf-sg-blue", *rule], check=True)
    assert p.returncode == 1, p.stdout + p.stderr
    bad = doc["variants"]["iptables"]["scenarios"]["same_tenant"]["mismatches"]
    assert len(bad) == 4 and all(m["kernel"] == [] and m["offload"] for m in bad), bad
    assert doc["variants"]["nftables"]["total"]["mismatches"] == 0


def _alive(pid: int, wait: float = 5.0) -> bool:
    """Running (a zombie waiting for its new parent to reap it is not)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        if state in ("Z", "X"):
            return False
        time.sleep(0.1)
    return True


def test_down_after_a_killed_up_leaves_nothing_behind(lab_prefix):
    prefix = lab_prefix
    up = subprocess.Popen([LAB_CLI, "up", "--prefix", prefix], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    try:
        # Kill it once the agent is being started: namespaces, veths, pins and a child
        # process all exist by then.
        deadline = time.monotonic() + 120
        while not os.path.exists(topology.pin_dir(prefix)):
            assert up.poll() is None, up.stdout.read()
            assert time.monotonic() < deadline, "up never started the agent"
            time.sleep(0.05)
        os.kill(up.pid, signal.SIGKILL)
        up.wait(10)
        assert topology.namespaces_of(prefix)
        agent_pids = [int(x) for ns in topology.namespaces_of(prefix) for x in subprocess.run(
            ["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()]
    finally:
        if up.poll() is None:
            up.kill()
    p = subprocess.run([LAB_CLI, "down", "--prefix", prefix], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    assert topology.namespaces_of(prefix) == []
    assert not os.path.exists(topology.pin_dir(prefix))
    assert not topology.rundir(prefix).exists()
    for pid in agent_pids:
        assert not _alive(pid), f"process {pid} of the lab survived down"
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert prefix not in links
    # And down again is harmless.
    p = subprocess.run([LAB_CLI, "down", "--prefix", prefix], capture_output=True, text=True)
    assert p.returncode == 0 and "removed 0 namespaces" in p.stdout
