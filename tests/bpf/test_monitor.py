"""The datapath's monitor hook through the real program: nothing without a listener, the
datapath-side filter (verdicts, reasons, tenant, port), the event's fields and bytes, the
per-CPU token bucket and its lost count, and a trace build that has no monitor at all."""
from __future__ import annotations

import ctypes as ct
import os

import pytest

from agent import abi, bpfsys
from agent.monitor import ALL_REASONS, Filter, bucket, datapath_filter

from .cases import BLUE, TWO_TENANTS, XDP_DROP, XDP_REDIRECT, blue, rule, tcp4, udp4
from .conftest import SLOT

pytestmark = pytest.mark.bpf

DENY_22 = blue([rule(1, priority=10), rule(5, "deny", priority=50, proto="tcp", dport="22")])


@pytest.fixture
def mon(bench):
    """The session datapath's monitor maps and a reader of its ring; off again after."""
    ring_fd, switch, cpu = bench.dp.monitor_maps()
    got = []
    ring = bpfsys.RingBuffer(ring_fd, lambda data: got.append(abi.Event.from_buffer_copy(data)))

    class Mon:
        events = got

        def set(self, filters, rate=1000):
            switch.put(bytes(4), bytes(abi.MonCfg(**datapath_filter(filters), **bucket(rate))))

        def read(self):
            ring.consume()
            out = list(got)
            got.clear()
            return out

        def counts(self):
            rows = [abi.MonCpu.from_buffer_copy(c) for c in cpu.per_cpu(cpu.get(bytes(4)))]
            return {k: sum(getattr(r, k) for r in rows) for k in ("sent", "lost_rate",
                                                                   "lost_ring")}
    m = Mon()
    m.set([])
    ring.consume()
    got.clear()
    try:
        yield m
    finally:
        m.set([])
        ring.consume()
        ring.close()


def drops_only():
    return Filter(verdicts=1 << abi.V_DROP)


def test_no_listener_no_event(bench, mon):
    bench.apply(DENY_22)
    before = mon.counts()
    assert bench.run(tcp4(dport=22), "p1")[0] == XDP_DROP
    assert mon.read() == [] and mon.counts() == before


def test_a_denied_packet_makes_one_event_with_its_rule_reason_and_bytes(bench, mon):
    bench.apply(DENY_22)
    mon.set([drops_only()])
    pkt = bytes(tcp4(dport=22))
    assert bench.run(pkt, "p1")[0] == XDP_DROP
    (ev,) = mon.read()
    assert (ev.tenant, ev.port, ev.verdict, ev.reason, ev.rule_id, ev.len) == \
        (BLUE, SLOT["p1"], abi.V_DROP, abi.REASON_IDS["rule_deny"], 5, len(pkt))
    assert bytes(ev.data[:ev.cap_len]) == pkt[:abi.EVENT_BYTES]
    assert ev.ts_ns > 0


def test_the_datapath_filter_keeps_out_what_no_listener_wants(bench, mon):
    bench.apply(DENY_22)
    mon.set([drops_only()])
    assert bench.run(udp4(), "p1")[0] == XDP_REDIRECT            # allowed: not a drop
    assert mon.read() == []
    mon.set([Filter(reasons=1 << abi.REASON_IDS["default"])])     # rule_deny is not wanted
    bench.run(tcp4(dport=22), "p1")
    assert mon.read() == []
    mon.set([Filter(port=SLOT["p2"])])                            # another port
    bench.run(tcp4(dport=22), "p1")
    assert mon.read() == []
    # Two listeners: the union lets both kinds through.
    mon.set([drops_only(), Filter(verdicts=1 << abi.V_REDIRECT)])
    bench.run(tcp4(dport=22), "p1")
    bench.run(udp4(sport=4001), "p1")
    assert sorted(e.verdict for e in mon.read()) == [abi.V_DROP, abi.V_REDIRECT]


def test_tenant_filter(bench, mon):
    bench.apply(TWO_TENANTS)
    mon.set([Filter(tenant=BLUE, reasons=ALL_REASONS)])
    bench.run(udp4(port="p3"), "p3")                              # red
    assert mon.read() == []
    bench.run(udp4(), "p1")                                       # blue
    assert [e.tenant for e in mon.read()] == [BLUE]


def test_the_rate_cap_sends_a_burst_then_counts_the_rest_as_lost(bench, mon):
    bench.apply(DENY_22)
    rate = 100                     # a burst of a tenth of a second: 10 events
    mon.set([drops_only()], rate=rate)
    before = mon.counts()
    rc, _, _ = bench.dp.run(bytes(tcp4(dport=22)), bench.lab.ifindex["p1"], repeat=5000)
    assert rc == XDP_DROP
    got = mon.read()
    after = mon.counts()
    sent = after["sent"] - before["sent"]
    lost = after["lost_rate"] - before["lost_rate"] + after["lost_ring"] - before["lost_ring"]
    assert sent == len(got) and sent + lost == 5000
    # The burst, and whatever the clock refilled while the 5,000 ran (well under a second).
    assert rate // 10 <= sent <= rate // 10 + rate, sent


def test_the_trace_build_has_no_monitor(bench, mon):
    bench.apply(DENY_22)
    mon.set([Filter()])
    names = set()
    for map_id in bpfsys.prog_map_ids(bench.dp.load_trace()):
        fd = bpfsys.map_fd_by_id(map_id)
        names.add(bpfsys.map_info(fd).name.decode())
        os.close(fd)
    assert "xf_trace_rec" in names and "xf_flows" in names
    assert not names & {"xf_mon", "xf_mon_cpu", "xf_events"}, names
    rc, _, rec = bench.trace(bytes(tcp4(dport=22)), "p1")
    assert rc == XDP_DROP and rec.reason == abi.REASON_IDS["rule_deny"]
    assert mon.read() == []


def test_event_layout_matches_the_c(bcc_build):
    from .test_abi import assert_same_layout, bcc_types
    for name, mirror in (("xf_mon", abi.MonCfg), ("xf_mon_cpu", abi.MonCpu)):
        _, leaf = bcc_types(bcc_build[False][name.encode()])
        assert_same_layout(mirror, leaf, f"{name} value")
    # The ring has no value type: the event is checked by size and by the field the C
    # writes last (its bytes), read back in the tests above.
    assert ct.sizeof(abi.Event) == 32 + abi.EVENT_BYTES
