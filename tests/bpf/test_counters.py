"""Per-rule and per-egress-port counters (issue 16 item 1): packets and bytes each rule
decided, flow-table hits included, as `iptables -L -v` shows them; a rule id given again
starts from zero; deleted rules are not listed; what each port transmitted on redirect."""
from __future__ import annotations

import pytest
from scapy.all import raw

from . import cases
from .cases import XDP_DROP, XDP_REDIRECT, udp4
from .conftest import SLOT

pytestmark = pytest.mark.bpf

REPLY = udp4(5000, 4000, port="p2", src="10.0.0.2", dst="10.0.0.1")


def send(bench, pkt, port="p1", n=1, action=XDP_REDIRECT):
    for _ in range(n):
        assert bench.run(raw(pkt), port)[0] == action


def test_a_rule_counts_every_packet_it_decided_flow_hits_included(bench):
    bench.apply(cases.GEN1)
    before = bench.dp.rule_counters().get(1, (0, 0))
    send(bench, udp4(), n=3)                     # one miss, two flow-table hits
    send(bench, REPLY, "p2", n=2)                # replies are the connection's, not the rule's
    p, b = bench.dp.rule_counters()[1]
    assert (p - before[0], b - before[1]) == (3, 3 * len(udp4()))


def test_a_deny_rule_counts_the_packets_it_dropped(bench):
    bench.apply(cases.GEN2_DENY)
    before = bench.dp.rule_counters().get(2, (0, 0))
    send(bench, udp4(), n=2, action=XDP_DROP)
    assert bench.dp.rule_counters()[2] == (before[0] + 2, before[1] + 2 * len(udp4()))


def test_a_rule_id_given_again_starts_from_zero_and_a_deleted_one_is_not_listed(bench):
    bench.apply(cases.GEN1)
    send(bench, udp4())
    assert bench.dp.rule_counters()[1][0] >= 1 and bench.dp.rule_hits()[1] >= 1
    bench.sync(cases.NO_RULES)                   # rule 1 deleted
    assert 1 not in bench.dp.rule_counters() and 1 not in bench.dp.rule_hits()
    bench.sync(cases.blue([cases.rule(1, proto="tcp", dport=22)]))   # a new rule 1
    assert bench.dp.rule_counters()[1] == (0, 0)
    assert bench.dp.rule_hits().get(1, 0) == 0


def test_the_trace_build_counts_no_rule(bench):
    bench.apply(cases.GEN1)
    send(bench, udp4())
    before = bench.dp.rule_counters()
    bench.trace(raw(udp4()), "p1")
    bench.trace(raw(udp4(sport=4001)), "p1")
    assert bench.dp.rule_counters() == before


def test_each_port_counts_what_it_transmitted_on_redirect(bench):
    bench.apply(cases.GEN1)
    slots = {SLOT["p1"], SLOT["p2"]}
    before = bench.dp.port_tx(slots)
    send(bench, udp4(), n=2)
    send(bench, REPLY, "p2")
    send(bench, udp4(dport=6000), action=XDP_DROP)     # not transmitted
    after = bench.dp.port_tx(slots)
    delta = {s: (after[s][0] - before[s][0], after[s][1] - before[s][1]) for s in slots}
    assert delta == {SLOT["p2"]: (2, 2 * len(udp4())), SLOT["p1"]: (1, len(REPLY))}


def _scrape(controller):
    """The metrics families a scrape of this controller exports, by name."""
    from agent.metrics import AgentSource, DatapathCollector
    return {f.name: f for f in DatapathCollector(AgentSource(controller)).collect()}


def _value(family, **labels):
    found = [s.value for s in family.samples
             if s.name.endswith("_total") and all(s.labels.get(k) == v
                                                  for k, v in labels.items())]
    assert len(found) == 1, f"{family.name} {labels}: {found}"
    return found[0]


def test_metrics_export_what_each_port_sent_and_per_rule_counters_when_asked(
        node_controller, in_node):
    import dataclasses

    from agent import commands
    from .test_contract import FRAME, STATE

    c = node_controller
    for name, args in STATE:
        commands.dispatch(c, name, args)
    rule = c.list("rules")[0]["id"]
    fams = _scrape(c)
    # Every configured port has its transmit series from the first scrape.
    assert _value(fams["xdpflow_port_tx_packets"], tenant="blue", port="p2") == 0
    assert _value(fams["xdpflow_port_tx_packets"], tenant="blue", port="p1") == 0
    # Per-rule series are opt-in: a series per rule is the operator's choice.
    assert not fams["xdpflow_rule_packets"].samples
    frame = bytes.fromhex(FRAME)
    for _ in range(3):
        assert c.dp.run(frame, in_node.ifindex["p1"])[0] == XDP_REDIRECT
    c.use_config(dataclasses.replace(c.cfg, metrics=dataclasses.replace(
        c.cfg.metrics, rule_counters=True)))
    fams = _scrape(c)
    assert _value(fams["xdpflow_port_tx_packets"], tenant="blue", port="p2") == 3
    assert _value(fams["xdpflow_port_tx_bytes"], tenant="blue", port="p2") == 3 * len(frame)
    assert _value(fams["xdpflow_port_tx_packets"], tenant="blue", port="p1") == 0
    assert _value(fams["xdpflow_rule_packets"], tenant="blue", rule=str(rule)) == 3
    assert _value(fams["xdpflow_rule_bytes"], tenant="blue", rule=str(rule)) == 3 * len(frame)
