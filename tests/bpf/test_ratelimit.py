"""Rate limits in the datapath (issue 11): a tenant's and a rule's token bucket, over-limit
packets dropped with reason ratelimit, one bucket shared by every CPU."""
from __future__ import annotations

import copy
import os
import threading
import time

import pytest
from scapy.all import raw

from agent import abi, compiler

from . import cases
from .cases import XDP_DROP, XDP_PASS, XDP_REDIRECT
from .conftest import SLOT

pytestmark = pytest.mark.bpf

# Rates slow enough that nothing refills during a test's few milliseconds.
SLOW = "1pps"


def limited(state: dict, tenant: dict = None, rules: dict = None) -> dict:
    """A copy of a state with rate/burst fields on its tenants and rules (by name / id)."""
    s = copy.deepcopy(state)
    for t in s["tenants"]:
        t.update((tenant or {}).get(t["name"], {}))
    for r in s["rules"]:
        r.update((rules or {}).get(r["id"], {}))
    return s


def send(bench, pkt, n, port="p1"):
    return [bench.run(raw(pkt), port)[0] for _ in range(n)]


def test_rule_limit_passes_the_burst_then_drops_counted_as_ratelimit(bench):
    bench.apply(limited(cases.GEN1, rules={1: {"rate": SLOW, "burst": 3}}))
    pkt = cases.udp4()
    before = bench.snapshot()
    assert send(bench, pkt, 10) == [XDP_REDIRECT] * 3 + [XDP_DROP] * 7
    n = len(pkt)
    assert bench.snapshot() - before == {
        (SLOT["p1"], "redirect", "rule_allow"): (1, n),
        (SLOT["p1"], "redirect", "flow"): (2, 2 * n),
        (SLOT["p1"], "drop", "ratelimit"): (7, 7 * n)}
    pol = bench.dp.policers()[compiler.rule_policer(1)]
    assert pol.dropped == 7
    # The flow is charged to its rule's bucket; its reply direction is not.
    f = bench.flow(cases.BLUE, 17, "10.0.0.1", 4000, "10.0.0.2", 5000)
    r = bench.flow(cases.BLUE, 17, "10.0.0.2", 5000, "10.0.0.1", 4000)
    assert (f.flags & abi.FLOW_POLICED, r.flags & abi.FLOW_POLICED) == (abi.FLOW_POLICED, 0)


def test_replies_are_not_charged_to_the_rule(bench):
    bench.apply(limited(cases.GEN1, rules={1: {"rate": SLOW, "burst": 1}}))
    assert send(bench, cases.udp4(), 1) == [XDP_REDIRECT]
    reply = cases.udp4(sport=5000, dport=4000, port="p2", src="10.0.0.2", dst="10.0.0.1")
    assert send(bench, reply, 5, port="p2") == [XDP_REDIRECT] * 5
    assert send(bench, cases.udp4(), 1) == [XDP_DROP]


def test_icmp_errors_about_a_flow_are_not_charged_to_its_rule(bench):
    """An error the allowed side's kernel sends about a reply (port unreachable) takes
    the forward entry's path: it is the connection's, so only the tenant's limit counts."""
    from scapy.all import ICMP, IP, UDP
    bench.apply(limited(cases.GEN1, rules={1: {"rate": SLOW, "burst": 1}}))
    assert send(bench, cases.udp4(), 2) == [XDP_REDIRECT, XDP_DROP]
    reply = cases.udp4(sport=5000, dport=4000, port="p2", src="10.0.0.2", dst="10.0.0.1")
    assert send(bench, reply, 1, port="p2") == [XDP_REDIRECT]
    err = (cases.eth() / cases.v4() / ICMP(type=3, code=3) /
           IP(src="10.0.0.2", dst="10.0.0.1") / UDP(sport=5000, dport=4000))
    before = bench.snapshot()
    assert send(bench, err, 3) == [XDP_REDIRECT] * 3
    assert (SLOT["p1"], "redirect", "related") in bench.snapshot() - before


def test_rule_limit_leaves_other_rules_alone(bench):
    bench.apply(limited(cases.GEN1_PLUS, rules={1: {"rate": SLOW, "burst": 1}}))
    assert send(bench, cases.udp4(), 3) == [XDP_REDIRECT, XDP_DROP, XDP_DROP]
    assert send(bench, cases.tcp4(dport=443, flags="A"), 3) == [XDP_REDIRECT] * 3


def test_tenant_limit_is_one_bucket_for_all_its_flows_and_ports(bench):
    bench.apply(limited(cases.GEN1_PLUS, tenant={"blue": {"rate": SLOW, "burst": 4}}))
    got = send(bench, cases.udp4(), 2) + send(bench, cases.tcp4(dport=443, flags="A"), 1)
    reply = cases.udp4(sport=5000, dport=4000, port="p2", src="10.0.0.2", dst="10.0.0.1")
    got += send(bench, reply, 3, port="p2")
    assert got == [XDP_REDIRECT] * 4 + [XDP_DROP] * 2
    assert bench.dp.policers()[cases.BLUE].dropped == 2


def test_another_tenant_with_the_same_addresses_is_not_limited(bench):
    bench.apply(limited(cases.TWO_TENANTS, tenant={"blue": {"rate": SLOW, "burst": 1}}))
    assert send(bench, cases.tcp4(dport=80, flags="A", port="p1"), 3) == \
        [XDP_REDIRECT, XDP_DROP, XDP_DROP]
    assert send(bench, cases.tcp4(dport=80, flags="A", port="p3"), 3, port="p3") == \
        [XDP_REDIRECT] * 3


def test_denied_traffic_costs_no_tokens(bench):
    state = limited(cases.GEN1_PLUS, tenant={"blue": {"rate": SLOW, "burst": 1}})
    state["rules"].append(cases.rule(5, action="deny", priority=200, proto="tcp", dport=22))
    bench.apply(state)
    assert send(bench, cases.tcp4(dport=22), 5) == [XDP_DROP] * 5
    assert send(bench, cases.udp4(), 2) == [XDP_REDIRECT, XDP_DROP]


def test_bit_rate_charges_bytes(bench):
    # 8000 bit/s = 1000 bytes/s; a burst of 200 bytes takes three 60-byte frames, not four.
    bench.apply(limited(cases.GEN1, rules={1: {"rate": "8000bit", "burst": 200}}))
    pkt = cases.udp4()
    assert len(pkt) == 60
    assert send(bench, pkt, 5) == [XDP_REDIRECT] * 3 + [XDP_DROP] * 2
    # A frame of 30 bytes' cost still fits the 20 left? No: a big one never does.
    bench.apply(limited(cases.GEN1, rules={1: {"rate": "8000bit", "burst": 200}}))
    big = cases.udp4(payload=b"z" * 300)
    assert send(bench, big, 2) == [XDP_DROP, XDP_DROP]
    assert send(bench, pkt, 3) == [XDP_REDIRECT] * 3


def test_bucket_refills_at_the_rate(bench):
    bench.apply(limited(cases.GEN1, rules={1: {"rate": "200pps", "burst": 1}}))
    pkt = cases.udp4()
    assert send(bench, pkt, 2) == [XDP_REDIRECT, XDP_DROP]
    time.sleep(0.02)        # 5 ms a token: one is back, not more than the burst of one
    assert send(bench, pkt, 2) == [XDP_REDIRECT, XDP_DROP]


def test_resync_keeps_the_bucket_and_a_new_rate_starts_full(bench):
    state = limited(cases.GEN1, rules={1: {"rate": SLOW, "burst": 2}})
    bench.apply(state)
    assert send(bench, cases.udp4(), 3) == [XDP_REDIRECT, XDP_REDIRECT, XDP_DROP]
    bench.sync(state)           # nothing changed: an empty bucket stays empty
    assert send(bench, cases.udp4(), 1) == [XDP_DROP]
    bench.sync(limited(cases.GEN1, rules={1: {"rate": SLOW, "burst": 3}}))
    assert send(bench, cases.udp4(), 4) == [XDP_REDIRECT] * 3 + [XDP_DROP]


def test_removing_the_limit_removes_the_bucket_and_its_flows_obey(bench):
    bench.apply(limited(cases.GEN1, rules={1: {"rate": SLOW, "burst": 1}}))
    assert send(bench, cases.udp4(), 2) == [XDP_REDIRECT, XDP_DROP]
    bench.sync(cases.GEN1)
    assert bench.dp.policers() == {}
    assert send(bench, cases.udp4(), 3) == [XDP_REDIRECT] * 3


def test_trace_shows_the_bucket_and_charges_nothing(bench):
    bench.apply(limited(cases.GEN1, rules={1: {"rate": SLOW, "burst": 2}},
                        tenant={"blue": {"rate": "8000bit", "burst": 1000}}))
    pkt = raw(cases.udp4())
    rc, _, t = bench.trace(pkt, "p1")
    assert rc == XDP_REDIRECT
    assert list(t.pol_key) == [compiler.rule_policer(1), cases.BLUE]
    assert list(t.pol_ok) == [1, 1]
    assert t.pol_cost_ns[0] == 10**9 and t.pol_credit_ns[0] == 2 * 10**9
    assert t.pol_cost_ns[1] == 60 * 10**6      # 60 bytes at 1000 bytes/s
    before = {k: (p.tat_ns, p.dropped) for k, p in bench.dp.policers().items()}
    assert all(tat == 0 for tat, _ in before.values())
    assert send(bench, pkt, 2) == [XDP_REDIRECT] * 2
    rc, _, t = bench.trace(pkt, "p1")
    assert rc == XDP_DROP and t.reason == abi.REASON_IDS["ratelimit"]
    assert list(t.pol_ok)[:1] == [0] and t.pol_credit_ns[0] < 10**9
    assert bench.dp.policers()[compiler.rule_policer(1)].dropped == 0


def _run_pinned(bench, pkt, cpu, repeat, out):
    os.sched_setaffinity(0, {cpu})
    from netns_lab.netns import entered
    with entered(bench.lab.node):
        bench.dp.run(pkt, bench.lab.ifindex["p1"], repeat=repeat)
    out[cpu] = True


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_two_cpus_share_one_bucket(bench):
    """Both CPUs flood one flow through a 20,000 pps limit: together they never pass more
    than the limit allows over the time they ran (per-CPU buckets would pass twice it).
    Only the upper bound is asserted: how much is offered depends on the machine. (The
    flow goes to the kernel: a repeated test run reuses its buffer, and a redirect's MAC
    rewrite would make the next round a spoof.)"""
    rate, burst = 20000, 100
    bench.apply(limited(cases.ROUTES, rules={1: {"rate": f"{rate}pps", "burst": burst}}))
    pkt = raw(cases.udp4(dst="10.2.0.5"))
    assert bench.run(pkt, "p1")[0] == XDP_PASS
    before = bench.snapshot()
    done = {}
    threads = [threading.Thread(target=_run_pinned, args=(bench, pkt, cpu, 300000, done))
               for cpu in sorted(os.sched_getaffinity(0))[:2]]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    assert len(done) == 2
    d = bench.snapshot() - before
    passed = d.get((SLOT["p1"], "pass", "flow"), (0, 0))[0]
    dropped = d.get((SLOT["p1"], "drop", "ratelimit"), (0, 0))[0]
    assert passed + dropped == 600000, d
    assert dropped > 0
    # The first packet spent one token before t0; the bucket started full.
    assert passed <= rate * elapsed + burst, (passed, elapsed)
    print(f"two CPUs, {rate} pps limit: passed {passed} in {elapsed:.3f} s = "
          f"{passed / elapsed:.0f} pps ({passed / (rate * elapsed + burst):.3f} of the bound)")



def test_agent_end_to_end_limits_metrics_by_tenant_and_trace(node_controller, in_node):
    """Through the command table: limits given as the CLI sends them, drops counted by
    tenant in the metrics, and trace naming each bucket with its tokens."""
    from agent import commands
    from .test_contract import FRAME, STATE
    from .test_counters import _scrape, _value

    c = node_controller
    for name, args in STATE:
        if name == "rule add":
            args = dict(args, rate="5pps", burst=2)
        if name == "tenant add":
            args = dict(args, rate="8000bit", burst=3000)
        commands.dispatch(c, name, args)
    assert [t.get("rate") for t in c.list("tenants")] == ["8000bit"]
    frame = bytes.fromhex(FRAME)
    tr = commands.dispatch(c, "trace", {"port": "p1", "hex": FRAME})
    rule = c.list("rules")[0]["id"]
    assert tr["rate_limits"] == [
        {"bucket": f"rule {rule}", "rate": "5pps", "burst": 2, "unit": "packets",
         "tokens": 2, "cost": 1, "conformed": True},
        {"bucket": "tenant blue", "rate": "8000bit", "burst": 3000, "unit": "bytes",
         "tokens": 3000, "cost": len(frame), "conformed": True}]
    got = [c.dp.run(frame, in_node.ifindex["p1"])[0] for _ in range(5)]
    assert got == [XDP_REDIRECT] * 2 + [XDP_DROP] * 3
    fams = _scrape(c)
    assert _value(fams["xdpflow_packets"], tenant="blue", verdict="drop",
                  reason="ratelimit") == 3
    tr = commands.dispatch(c, "trace", {"port": "p1", "hex": FRAME})
    assert (tr["verdict"], tr["reason"]) == ("drop", "ratelimit")
    assert tr["rate_limits"][0]["tokens"] == 0 and not tr["rate_limits"][0]["conformed"]
    assert len(tr["rate_limits"]) == 1          # the rule refused it: the tenant not asked


def test_ipv6_flows_share_their_tenants_bucket_with_ipv4(bench):
    bench.apply(limited(cases.GEN1, tenant={"blue": {"rate": SLOW, "burst": 2}}))
    assert send(bench, cases.udp6(), 1) + send(bench, cases.udp4(), 1) + \
        send(bench, cases.udp6(), 1) == [XDP_REDIRECT, XDP_REDIRECT, XDP_DROP]
