"""The tenant boundary beyond the fixture table (issue 7): the three packets of the issue
through the trace build and the program, a full flow table that never keeps a forward
entry without its reply path, and old generations removed only after a grace period."""
from __future__ import annotations

import pytest
from scapy.all import UDP, Dot1Q, Ether, raw

from agent import abi, datapath

from . import cases
from .cases import (ISSUE7, PORT_MAC, SPOOF_MAC, XDP_DROP, XDP_REDIRECT, eth, tcp4, udp4,
                    v4)
from .conftest import SLOT
from .test_capacity import FILL_TENANT, filler_keys

pytestmark = pytest.mark.bpf

# The issue's node: blue allows UDP 5000, red denies TCP (but port 80).
ISSUE_PACKETS = [
    ("blue vm spoofing source address and mac", "p1",
     Ether(src=SPOOF_MAC, dst=PORT_MAC["p1"]) / v4(src="10.0.0.7") /
     UDP(sport=4000, dport=5000), "spoof"),
    ("blue vm sending as the other blue vm (10.0.0.2)", "p1", udp4(src="10.0.0.2"), "spoof"),
    ("red vm tcp/22 with ttl 1", "p3", tcp4(dport=22, port="p3", ttl=1), "rule_deny"),
    ("blue vm sending an 802.1q-tagged frame", "p1",
     eth() / Dot1Q(vlan=100) / v4() / UDP(sport=4000, dport=5000) / b"tag", "vlan"),
]


@pytest.mark.parametrize("desc,port,pkt,reason", ISSUE_PACKETS,
                         ids=[p[0] for p in ISSUE_PACKETS])
def test_trace_of_the_issue_packets(bench, desc, port, pkt, reason):
    bench.apply(ISSUE7)
    rc, out, t = bench.trace(raw(pkt), port)
    assert (rc, abi.VERDICTS[t.verdict], abi.REASONS[t.reason]) == (XDP_DROP, "drop", reason)
    assert out == raw(pkt) and t.out_ifindex == 0 and t.in_port == SLOT[port]
    before = bench.snapshot()
    assert bench.run(raw(pkt), port) == (XDP_DROP, raw(pkt))
    assert bench.snapshot() - before == {(SLOT[port], "drop", reason): (1, len(pkt))}
    assert bench.flows() == []


def test_a_full_table_keeps_no_forward_entry_without_its_reply(bench):
    """One free slot: the reply entry takes it (installed first), the forward entry does
    not fit; the replies of the connection are forwarded, its forward packets classified
    each time. Installed the other way round, the forward entry would sit alone."""
    bench.apply(cases.GEN1)
    flows = bench.dp.maps["xf_flows"]
    filler = bytes(abi.Flow(generation=1, verdict=abi.V_DROP))
    flows.update_many([(k, filler) for k in filler_keys(flows.max_entries - 1)])
    try:
        before = bench.snapshot()
        assert bench.run(raw(udp4()), "p1")[0] == XDP_REDIRECT
        assert bench.snapshot() - before == {
            (SLOT["p1"], "redirect", "rule_allow"): (1, len(udp4())),
            (SLOT["p1"], "none", "insert_failed"): (1, 0)}
        ours = [(k, f) for k, f in bench.dp.flows() if k.tenant != FILL_TENANT]
        assert [bool(f.flags & abi.FLOW_REVERSE) for _, f in ours] == [True]
        reply = udp4(5000, 4000, port="p2", src="10.0.0.2", dst="10.0.0.1")
        before = bench.snapshot()
        assert bench.run(raw(reply), "p2")[0] == XDP_REDIRECT
        assert bench.snapshot() - before == {(SLOT["p2"], "redirect", "flow"): (1, len(reply))}
    finally:
        bench.dp.flush_flows()


def test_old_generation_is_removed_only_after_a_grace_period(bench, monkeypatch):
    """Between the flip and the removal of the old classifier entries the agent waits
    until no packet can still hold the old generation number (an RCU grace period)."""
    bench.apply(cases.GEN1)
    rules = bench.dp.maps["xf_rules"]
    seen = []

    def tenant():
        return abi.Tenant.from_buffer_copy(
            bench.dp.maps["xf_tenants"].get(bytes(abi.u32(cases.BLUE))))
    old_gen = tenant().cls_generation     # what the classifier entries are keyed by

    def watching_wait():
        t = tenant()
        old_left = [k for k in rules.keys()
                    if abi.RuleKey.from_buffer_copy(k).generation == old_gen]
        seen.append((t.cls_generation, t.generation, len(old_left)))
        return datapath.wait_for_readers()

    monkeypatch.setattr(bench.dp, "wait_for_readers", watching_wait)
    summary = bench.sync(cases.GEN2_DENY)
    new_gen = tenant().cls_generation
    assert new_gen != old_gen
    # At the wait the flip (classifier, then flows) had happened and the old entries
    # were all still there ...
    assert seen == [(new_gen, bench.dp.generation(cases.BLUE), 1)]
    assert summary["grace"] == "rcu"
    # ... and after it they are gone.
    assert not [k for k in rules.keys() if abi.RuleKey.from_buffer_copy(k).generation == old_gen]
    # No flip, no wait.
    seen.clear()
    bench.sync(cases.GEN2_DENY)
    assert seen == []


def test_the_grace_period_is_an_rcu_grace_period_here():
    assert datapath.wait_for_readers() == "rcu"
