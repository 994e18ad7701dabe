"""The datapath through BPF_PROG_TEST_RUN: every case of the fixture table (cases.py) run
through the real program (action, output bytes, counter rows, rule hits) and through the
trace build (the same answer, nothing written)."""
from __future__ import annotations

import random

import pytest
from scapy.all import Ether, Padding, raw

from agent import abi, compiler, model

from . import cases
from .cases import (CASES, CLASSIFIED, XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_REDIRECT, Evict,
                    Sync)
from .conftest import SLOT

pytestmark = pytest.mark.bpf

IDS = [c.desc for c in CASES]


def describe(data: bytes) -> str:
    try:
        return f"{Ether(data).summary()} [{len(data)} bytes] {data.hex()}"
    except Exception:  # a malformed frame may not even dissect
        return f"[{len(data)} bytes] {data.hex()}"


def assert_bytes(got: bytes, want: bytes):
    assert got == want, f"\n got: {describe(got)}\nwant: {describe(want)}"


def prepare(bench, case):
    bench.apply(case.state, case.addrs)
    for step in case.pre:
        if isinstance(step, Sync):
            bench.sync(step.state, step.addrs)
        elif isinstance(step, Evict):
            assert bench.evict(step.tenant, step.proto, step.src, step.sport, step.dst,
                               step.dport), f"pre-step {step}: no such flow"
        else:
            rc, _ = bench.run(raw(step.pkt), step.port)
            if step.action is not None:
                assert rc == step.action, f"pre-step {describe(raw(step.pkt))}: action {rc}"


def expected_rule_hits(case):
    _, _, reason = case.main_row()
    if case.rule is not None and reason in CLASSIFIED:
        return {case.rule: 1}
    return {}


def hits_delta(before, after):
    return {k: after.get(k, 0) - before.get(k, 0) for k in after
            if after.get(k, 0) != before.get(k, 0)}


def test_table_is_big_enough():
    assert len(CASES) >= 40
    assert len(set(IDS)) == len(IDS), "case descriptions must be unique"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_case(bench, case):
    run_case(bench, case)


def run_case(bench, case):
    """One case through the program: action, bytes, counters, rule hits, its check."""
    prepare(bench, case)
    before, hits0 = bench.snapshot(), bench.dp.rule_hits()
    rc, out = bench.run(case.input, case.port)
    delta = bench.snapshot() - before
    assert rc != XDP_ABORTED
    assert rc == case.action, f"action {rc}, want {case.action}; counters {delta}"
    assert_bytes(out, case.expected)
    assert delta == case.counter_rows()
    if case.rule is not None:
        assert hits_delta(hits0, bench.dp.rule_hits()) == expected_rule_hits(case)
    if case.check:
        case.check(bench, out)


def flow_items(bench):
    return sorted(bench.dp.maps["xf_flows"].items())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_trace(bench, case):
    trace_case(bench, case)


def trace_case(bench, case):
    """The trace build answers as the program would and writes nothing."""
    prepare(bench, case)
    before, hits0 = bench.snapshot(), bench.dp.rule_hits()
    flows0 = flow_items(bench)
    frags0 = sorted(bench.dp.maps["xf_frags"].items())
    rc, out, t = bench.trace(case.input, case.port)
    assert rc == case.action
    assert_bytes(out, case.expected)
    port, verdict, reason = case.main_row()
    assert (abi.VERDICTS[t.verdict], abi.REASONS.get(t.reason)) == (verdict, reason)
    assert t.flow_hit == (reason in ("flow", "related"))   # related uses the reply entry
    assert t.stale == any(r == "flow_stale" for _, _, r in case.counters)
    assert t.in_port == (0 if port == "-" else SLOT[port])
    if case.out_port:
        assert t.out_ifindex == bench.lab.ifindex[case.out_port]
        assert t.out_port == SLOT[case.out_port]
    elif reason != "flow":
        assert t.out_ifindex == 0
    if case.rule is not None:
        assert t.rule_id == (case.rule if reason in CLASSIFIED | {"flow", "related"} else 0)
    assert bench.snapshot() - before == {}, "trace counted"
    assert flow_items(bench) == flows0, "trace changed the flow table"
    assert sorted(bench.dp.maps["xf_frags"].items()) == frags0, "trace changed fragment state"
    assert bench.dp.rule_hits() == hits0, "trace counted a rule hit"
    # What the trace said is what the program then does.
    rc2, out2 = bench.run(case.input, case.port)
    assert (rc2, out2) == (rc, out)


def test_trace_of_flow_hit_records_rule_and_output(bench, lab):
    bench.apply(cases.GEN1)
    pkt = raw(cases.udp4())
    assert bench.run(pkt, "p1")[0] == XDP_REDIRECT
    flows0 = flow_items(bench)
    rc, out, t = bench.trace(pkt, "p1")
    assert rc == XDP_REDIRECT
    assert_bytes(out, cases.routed(cases.udp4(), "p2"))
    assert (t.flow_hit, t.rule_id, t.out_ifindex, t.tenant) == (1, 1, lab.ifindex["p2"],
                                                                cases.BLUE)
    assert flow_items(bench) == flows0
    f = bench.flow(cases.BLUE, 17, "10.0.0.1", 4000, "10.0.0.2", 5000)
    assert f.packets == 1


def test_trace_of_a_miss_installs_no_flow(bench):
    bench.apply(cases.GEN1)
    rc, _, t = bench.trace(raw(cases.udp4()), "p1")
    assert rc == XDP_REDIRECT and t.reason == abi.REASON_IDS["rule_allow"] and not t.flow_hit
    assert bench.flows() == []
    # ...so the real first packet is still a miss.
    before = bench.snapshot()
    bench.run(raw(cases.udp4()), "p1")
    assert bench.snapshot() - before == {(SLOT["p1"], "redirect", "rule_allow"):
                                         (1, len(cases.udp4()))}


def test_flows_and_counters_accumulate(bench):
    bench.apply(cases.GEN1)
    pkt = raw(cases.udp4())
    before = bench.snapshot()
    for _ in range(5):
        assert bench.run(pkt, "p1")[0] == XDP_REDIRECT
    assert bench.snapshot() - before == {
        (SLOT["p1"], "redirect", "rule_allow"): (1, len(pkt)),
        (SLOT["p1"], "redirect", "flow"): (4, 4 * len(pkt))}
    f = bench.flow(cases.BLUE, 17, "10.0.0.1", 4000, "10.0.0.2", 5000)
    assert (f.packets, f.bytes, f.rule_id, f.verdict) == (5, 5 * len(pkt), 1, abi.V_REDIRECT)
    assert f.out_port == SLOT["p2"] and f.in_port == SLOT["p1"]
    assert abi.mac_str(f.dmac) == cases.VM_MAC["p2"]
    assert abi.mac_str(f.smac) == cases.PORT_MAC["p2"]
    assert f.last_seen_ns >= f.created_ns > 0
    r = bench.flow(cases.BLUE, 17, "10.0.0.2", 5000, "10.0.0.1", 4000)
    assert (r.packets, r.flags & abi.FLOW_REVERSE, r.in_port, r.out_port) == \
        (0, abi.FLOW_REVERSE, SLOT["p2"], SLOT["p1"])
    assert bench.dp.flush_flows() == 2 and bench.flows() == []


def test_flush_makes_the_next_packet_a_miss(bench):
    bench.apply(cases.GEN1)
    pkt = raw(cases.udp4())
    bench.run(pkt, "p1")
    bench.dp.flush_flows()
    before = bench.snapshot()
    bench.run(pkt, "p1")
    assert (SLOT["p1"], "redirect", "rule_allow") in bench.snapshot() - before


def test_removed_tenant_port_is_no_tenant_or_no_port(bench, lab):
    """A port whose tenant disappeared from the state is no longer a port."""
    bench.apply(cases.TWO_TENANTS)
    bench.apply(cases.ALLOW_ALL)
    before = bench.snapshot()
    rc, out = bench.run(raw(cases.tcp4(port="p3")), "p3")
    assert rc == XDP_PASS
    assert bench.snapshot() - before == {(0, "pass", "no_port"): (1, len(cases.tcp4()))}


# --- robustness: never XDP_ABORTED, never a changed byte on drop/pass ------------------

def _valid_packets():
    """(description, bytes, length without Ethernet padding) of the table's packets."""
    seen = set()
    for c in CASES:
        data = c.input
        if len(data) > 34 and data not in seen:
            seen.add(data)
            pad = Ether(data).getlayer(Padding)
            yield c.desc, data, len(data) - (len(raw(pad)) if pad else 0)


def test_every_truncation_is_dropped_or_passed_untouched(bench):
    bench.apply(cases.ALLOW_ALL, cases.LOCAL_ADDRS)
    bad = []
    for desc, data, end in _valid_packets():
        for n in range(14, end):
            cut = data[:n]
            rc, out = bench.run(cut, "p1")
            if rc not in (XDP_DROP, XDP_PASS) or out != cut:
                bad.append((desc, n, rc))
    assert not bad, f"{len(bad)} truncations were acted on: {bad[:10]}"


def test_random_frames_never_abort(bench):
    bench.apply(cases.ALLOW_ALL, cases.LOCAL_ADDRS)
    rnd = random.Random(20261)
    heads = [bytes.fromhex(h) for h in ("0800", "86dd", "8100", "88a8", "0806", "9999")]
    before = bench.snapshot()
    n = 3000
    for i in range(n):
        eth = bytes.fromhex("02aa00000001" "020000000001") + rnd.choice(heads)
        body = bytearray(rnd.randbytes(rnd.randrange(0, 120)))
        if body and eth[-2:] == b"\x08\x00":
            body[0] = 0x40 | (body[0] & 0x0f)          # mostly version 4
        if body and eth[-2:] == b"\x86\xdd":
            body[0] = 0x60 | (body[0] & 0x0f)
        data = eth + bytes(body)
        rc, out = bench.run(data, "p1")
        assert rc != XDP_ABORTED, data.hex()
        assert rc in (XDP_DROP, XDP_PASS, 3, XDP_REDIRECT), data.hex()
        if rc in (XDP_DROP, XDP_PASS):
            assert out == data, data.hex()
    delta = bench.snapshot() - before
    assert sum(p for (s, v, r), (p, b) in delta.items() if v != "none") == n
    assert all(r in abi.REASON_IDS for (_, _, r) in delta)


# --- single-purpose tests ------------------------------------------------------------------

@pytest.mark.parametrize("default, rc, verdict", [("drop", XDP_DROP, "drop"),
                                                    ("pass", XDP_PASS, "pass")])
def test_port_of_an_unconfigured_tenant_is_no_tenant(bench, lab, default, rc, verdict):
    """A port whose tenant has no generation (an image with the port but not its tenant,
    as a crash between writes could leave the maps) fails closed where the tenant's
    default is drop (the port entry carries it), and goes to the kernel where it is pass;
    counted as no_tenant either way."""
    state = dict(cases.ALLOW_ALL)
    state["tenants"] = state["tenants"] + [{"name": "green", "id": 77, "default": default}]
    state["ports"] = state["ports"] + [{"name": "p5", "tenant": "green"}]
    bench.apply(cases.ALLOW_ALL)
    img = compiler.compile_state(model.State.from_dict(state), bench.links())
    del img.tenants[77]
    bench.dp.sync(img)
    pkt = raw(cases.udp4(port="p5"))
    before = bench.snapshot()
    got, out = bench.run(pkt, "p5")
    assert (got, out) == (rc, pkt)
    assert bench.snapshot() - before == {(SLOT["p5"], verdict, "no_tenant"): (1, len(pkt))}


def _csum(words: bytes) -> int:
    s = sum(int.from_bytes(words[i:i + 2], "big") for i in range(0, len(words), 2))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff


def test_ttl_decrement_checksum_for_every_checksum_value(bench):
    """The incremental IPv4 checksum update equals a full recomputation for all 65536
    header checksums (the IP id walks every value, so the checksum does too)."""
    bench.apply(cases.ALLOW_ALL)
    base = bytearray(raw(cases.udp4()))
    l3 = 14
    seen = set()
    bad = []
    for ident in range(65536):
        base[l3 + 4:l3 + 6] = ident.to_bytes(2, "big")
        base[l3 + 10:l3 + 12] = b"\0\0"
        base[l3 + 10:l3 + 12] = _csum(bytes(base[l3:l3 + 20])).to_bytes(2, "big")
        rc, out = bench.run(bytes(base), "p1")
        hdr = out[l3:l3 + 20]
        got = int.from_bytes(hdr[10:12], "big")
        want = _csum(hdr[:10] + b"\0\0" + hdr[12:])
        seen.add(got)
        if rc != XDP_REDIRECT or hdr[8] != 63 or got != want:
            bad.append((ident, rc, hex(got), hex(want)))
    assert not bad, f"{len(bad)} wrong: {bad[:5]}"
    assert len(seen) == 65535          # every value but 0xffff (-0 is never computed)


@pytest.mark.parametrize("what", ["arp", "nd"])
def test_neighbour_request_for_a_node_address_reaches_the_kernel(bench, what):
    """The node's own addresses on a tenant port are the kernel's (EP_LOCAL: 'hand to the
    kernel'; IP to them passes before any rule). The kernel can only answer ARP/ND for them
    if the request reaches it: in a drop-default tenant it must not be dropped."""
    bench.apply(cases.ALLOW_ALL, cases.LOCAL_ADDRS)
    if what == "arp":
        pkt = raw(cases.arp_req("10.0.0.1", "10.0.0.254"))
    else:
        pkt = raw(cases.solicit("fd00::fe"))
    before = bench.snapshot()
    rc, out = bench.run(pkt, "p1")
    delta = bench.snapshot() - before
    assert (rc, out) == (XDP_PASS, pkt), f"action {rc}; counters {delta}"
    assert [v for (_, v, _) in delta] == ["pass"]
