"""The flow table at its default size holds 1,000,000 flows; when it is full, an insert
fails (E2BIG) and the datapath still decides every new flow correctly, counting the failed
inserts."""
from __future__ import annotations

import ctypes as ct
import errno
import time

import pytest
from scapy.all import raw

from agent import abi
from agent.bpfsys import BpfError
from agent.datapath import DEFAULT_DEFINES

from . import cases
from .conftest import SLOT, Bench, loaded

pytestmark = pytest.mark.bpf

FLOWS = 1_000_000
FILL_TENANT = 999          # no such tenant: the filler entries are never hit


def filler_keys(n):
    """n distinct flow keys (tenant 999, UDP, 10.x.y.z -> 10.255.0.1, counter as ports)."""
    head = FILL_TENANT.to_bytes(2, "little") + bytes([17, 0]) + \
        b"\0" * 10 + b"\xff\xff" + b"\x0a"
    tail = b"\0" * 10 + b"\xff\xff" + bytes([10, 255, 0, 1])
    return [head + i.to_bytes(3, "big") + tail + (i & 0xffff).to_bytes(2, "little") +
            b"\x35\x00" for i in range(n)]


@pytest.fixture(scope="module")
def full_dp(lab):
    assert DEFAULT_DEFINES["XF_FLOW_TABLE_SIZE"] == FLOWS
    with loaded({"XF_MAX_RULE_ENTRIES": 4096, "XF_MAX_ENDPOINTS": 1024,
                 "XF_MAX_ROUTES": 1024, "XF_MAX_PORTS": 64}) as d:
        yield d


def test_flow_table_holds_a_million_flows(in_node, full_dp):
    t0 = time.monotonic()
    flows = full_dp.maps["xf_flows"]
    assert flows.max_entries == FLOWS
    assert flows.key_size == ct.sizeof(abi.FlowKey) == 40
    value = bytes(abi.Flow(generation=1, verdict=abi.V_DROP))
    keys = filler_keys(FLOWS)
    assert len(set(keys[:1000] + keys[-1000:])) == 2000 and len(keys[0]) == 40
    flows.update_many([(k, value) for k in keys])
    del keys
    assert flows.count() == FLOWS

    new_key = bytes(abi.FlowKey(tenant=FILL_TENANT, proto=6, sport=1, dport=2))
    with pytest.raises(BpfError) as e:
        flows.put(new_key, value)
    assert e.value.errno == errno.E2BIG

    # The datapath, with its table full: the verdict of a new flow is what the rules say,
    # every packet is classified again, and both failed inserts (forward, reverse) count.
    bench = Bench(in_node, full_dp)
    bench.sync(cases.GEN1)
    pkt = raw(cases.udp4())
    for n in (1, 2):
        before = bench.snapshot()
        rc, out = bench.run(pkt, "p1")
        assert rc == cases.XDP_REDIRECT
        assert out == cases.routed(cases.udp4(), "p2")
        assert bench.snapshot() - before == {
            (SLOT["p1"], "redirect", "rule_allow"): (1, len(pkt)),
            (SLOT["p1"], "none", "insert_failed"): (2, 0)}, f"packet {n}"
    denied = raw(cases.udp4(dport=6000))
    before = bench.snapshot()
    assert bench.run(denied, "p1")[0] == cases.XDP_DROP
    assert bench.snapshot() - before == {(SLOT["p1"], "drop", "default"): (1, len(denied))}
    assert flows.count() == FLOWS
    assert time.monotonic() - t0 < 60
