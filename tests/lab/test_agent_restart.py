"""Hitless restarts: a numbered UDP stream goes through the XDP redirect between two VMs
while the agent is killed (-9), stopped (SIGTERM) or upgraded to a different program build,
and started again. Not one datagram may be lost; the rules and the very same flow entry
(its counters and creation time) survive."""
from __future__ import annotations

import signal
import time

import pytest

from netns_lab.traffic import Stream, ping

pytestmark = pytest.mark.lab

PORT = 6000
RULES = [
    {"id": 1, "tenant": "blue", "priority": 100, "src": "10.0.0.1/32", "dst": "10.0.0.2/32",
     "proto": "udp", "dport": str(PORT), "action": "allow", "comment": "the stream"},
    {"id": 7, "tenant": "blue", "priority": 50, "proto": "icmp", "action": "allow"},
]


@pytest.fixture(scope="module")
def node(module_lab):
    lab = module_lab
    lab.add_vm("blue", 1)
    lab.add_vm("blue", 2)
    state = lab.base_state()
    state["rules"] = RULES
    lab.write_config(state=state)     # seeded from the config this time
    lab.start_agent()
    return lab


@pytest.fixture
def agent(node):
    """The module's agent, running (an earlier test may have left it stopped)."""
    if node.proc is None or node.proc.poll() is not None:
        node.start_agent()
    return node


def the_flow(lab, sport):
    rows = [r for r in lab.ok("flow", "dump", "--tenant", "blue")
            if r["proto"] == "udp" and r["sport"] == sport and r["dport"] == PORT
            and r["src"] == "10.0.0.1"]
    assert len(rows) == 1, rows
    return rows[0]


def without_hits(rules):
    # Counters (hits, and the packets and bytes each rule decided) move on with traffic.
    return [{k: v for k, v in r.items() if k not in ("hits", "packets", "bytes")} for r in rules]


def restart_under_load(lab, sport, how, env=None):
    """Stream, then stop the agent `how`, start it again (with `env`), keep streaming.
    Returns (stream result, flow before, flow right after, flow later, status before,
    status after)."""
    rules_before = lab.ok("rule", "list")
    status_before = lab.ok("status")
    with Stream(lab.vm("blue", 1), lab.vm("blue", 2), PORT, sport, rate=2000) as stream:
        time.sleep(1.0)
        f0 = the_flow(lab, sport)
        t0 = time.monotonic()
        if how == "kill":
            lab.proc.send_signal(signal.SIGKILL)
            lab.proc.wait(10)
        else:
            assert lab.stop_agent(signal.SIGTERM) == 0, "SIGTERM should end the agent with 0"
        # No agent now: the program stays attached and keeps forwarding.
        assert lab.xdp_prog("bvm1").get("id") == status_before["program_id"]
        time.sleep(0.5)
        lab.start_agent(env=env)
        f1 = the_flow(lab, sport)
        elapsed = time.monotonic() - t0
        time.sleep(1.0)
        f2 = the_flow(lab, sport)
        result = stream.stop()
    status_after = lab.ok("status")
    # The rules as they were (their hit counters aside, which may have moved on).
    assert without_hits(lab.ok("rule", "list")) == without_hits(rules_before)
    assert [r["id"] for r in rules_before] == [1, 7]
    return result, (f0, f1, f2, elapsed), status_before, status_after


def check_hitless(result, flows):
    f0, f1, f2, elapsed = flows
    assert result["errors"] == 0, result
    assert result["sent"] > 2000, result          # the stream ran across the restart
    assert result["missing_count"] == 0 and result["received"] == result["sent"], result
    assert result["dups"] == 0, result
    # The same flow entry: created before the restart, counters carried on, still counting.
    assert f1["packets"] > f0["packets"], f"flow counters reset by the restart: {f0} -> {f1}"
    assert f2["packets"] > f1["packets"], (f1, f2)
    assert f1["age_s"] >= f0["age_s"] + elapsed - 1.0, \
        f"a new flow entry after the restart ({elapsed:.1f}s): {f0} -> {f1}"
    assert (f2["verdict"], f2["rule"], f2["out_port"]) == ("redirect", 1, "bvm2"), f2


def check_adopted(lab, status_before, status_after, how="adopted"):
    # The new agent reused every pinned map; a warm start (same build) took the pinned
    # program as it was, compiling nothing; an upgrade put its own on the ports.
    actions = {m["map"]: m["action"] for m in status_after["maps"]}
    assert set(actions.values()) == {"reuse"}, actions
    assert status_after["pid"] != status_before["pid"]
    assert status_after["program"]["how"] == how, status_after["program"]
    # Whether it compiled or not, the running agent holds no compiler (LLVM, ~80 MiB).
    with open(f"/proc/{status_after['pid']}/maps") as f:
        assert not [line for line in f if "libLLVM" in line or "libclang" in line]
    if how == "adopted":
        assert status_after["program_id"] == status_before["program_id"]
        assert "datapath adopted" in lab.log_text().rsplit("===== agent start", 1)[1]
        # The store and the maps as the pinned digest says: nothing compiled or compared.
        assert status_after["startup"]["reconcile"] == "skipped: the pinned digest matches"
    else:
        assert status_after["startup"]["reconcile"].startswith("reconciled"), status_after
        assert status_after["program_id"] != status_before["program_id"]
        assert status_after["program"]["build_id"] != status_before["program"]["build_id"]
    for port in ("bvm1", "bvm2"):
        assert lab.xdp_prog(port).get("id") == status_after["program_id"], port
    assert all(p["attached"] for p in status_after["ports"]), status_after["ports"]
    # The tenants' generations were not bumped by the restart (flows would go stale).
    gens = lambda s: {t["name"]: t["generation"] for t in s["tenants"]}  # noqa: E731
    assert gens(status_after) == gens(status_before)


def test_kill9_and_restart_loses_nothing(agent):
    result, flows, before, after = restart_under_load(agent, 46001, "kill")
    check_hitless(result, flows)
    check_adopted(agent, before, after)


def test_sigterm_and_restart_loses_nothing(agent):
    result, flows, before, after = restart_under_load(agent, 46002, "term")
    check_hitless(result, flows)
    check_adopted(agent, before, after)


def test_upgrade_to_another_build_loses_nothing(agent):
    tag_before = agent.xdp_prog("bvm1").get("tag")
    result, flows, before, after = restart_under_load(
        agent, 46003, "term", env={"XDPFLOW_CFLAGS": "-DXF_BUILD_ID=2"})
    check_hitless(result, flows)
    check_adopted(agent, before, after, how="compiled")
    # A different program, not the same one loaded again.
    tag_after = agent.xdp_prog("bvm1").get("tag")
    environ = open(f"/proc/{agent.proc.pid}/environ", "rb").read().split(b"\0")
    assert b"XDPFLOW_CFLAGS=-DXF_BUILD_ID=2" in environ
    assert tag_before and tag_after and tag_after != tag_before, (tag_before, tag_after)
    # And traffic after the swap still follows the rules (ICMP allowed by rule 7).
    assert ping(agent.vm("blue", 1), "10.0.0.2")
