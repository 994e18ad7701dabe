"""Per-tenant flow quotas through the real program: a tenant at its quota gets the verdict
its rules give, uncached and counted (flow_quota); another tenant's flows are cached as
before; replacing a stale entry costs no quota; the sweeper re-bases the count, so a
tenant whose flows aged out caches again. And the flood the issue saw: one tenant offers
twice the table's capacity in new flows while another runs steady traffic; the steady
tenant's flows stay cached, every verdict is the one its rules give, and what was not
cached is counted. XDPFLOW_LONG=1 floods a 262,144-entry table (the issue's) instead of a
4,096-entry one."""
from __future__ import annotations

import ctypes as ct
import os

import pytest
from scapy.all import raw

from agent import abi, config
from agent.store import Store
from agent.sweeper import Evictions, Sweeper

from netns_lab import bench_flood

from .cases import BLUE, RED, TWO_TENANTS, XDP_DROP, XDP_REDIRECT, rule, tcp4, udp4
from .conftest import PORT_MAC, SLOT, VM_MAC, Bench, loaded

pytestmark = pytest.mark.bpf

LONG = os.environ.get("XDPFLOW_LONG") == "1"


def with_quota(state, **quotas):
    """`state` with tenants' max_flows set ({name: N})."""
    return dict(state, tenants=[dict(t, **({"max_flows": quotas[t["name"]]}
                                           if t["name"] in quotas else {}))
                                for t in state["tenants"]])


def tenant_entry(dp, tid) -> abi.Tenant:
    return abi.Tenant.from_buffer_copy(dp.maps["xf_tenants"].get(bytes(ct.c_uint32(tid))))


def entries_of(dp, tid) -> int:
    return sum(1 for k, _ in dp.maps["xf_flows"].items() if k[:2] == tid.to_bytes(2, "little"))


def red_tcp(sport, dport=80):
    """Red's VM on p3 (red allows tcp/80, denies udp)."""
    return tcp4(sport, dport, port="p3")


def test_a_tenant_at_its_quota_is_judged_but_not_cached(bench):
    bench.apply(with_quota(TWO_TENANTS, blue=4))
    assert tenant_entry(bench.dp, BLUE).max_flows == 4
    assert tenant_entry(bench.dp, RED).max_flows == 0
    before = bench.snapshot()
    for sport in (1000, 1001):                       # two flows: forward + reply each
        rc, _ = bench.run(raw(udp4(sport)), "p1")
        assert rc == XDP_REDIRECT
    assert entries_of(bench.dp, BLUE) == 4
    assert tenant_entry(bench.dp, BLUE).flows == 4
    for sport in (1002, 1003, 1004):                 # over the quota: forwarded, not cached
        rc, _ = bench.run(raw(udp4(sport)), "p1")
        assert rc == XDP_REDIRECT
        assert bench.flow(BLUE, 17, "10.0.0.1", sport, "10.0.0.2", 5000) is None
    # Its cached flows still hit; another tenant caches as before.
    rc, _ = bench.run(raw(udp4(1000)), "p1")
    assert rc == XDP_REDIRECT
    for sport in range(2000, 2010):
        rc, _ = bench.run(raw(red_tcp(sport)), "p3")
        assert rc == XDP_REDIRECT
    assert entries_of(bench.dp, RED) == 20
    d = bench.snapshot() - before
    assert d[(SLOT["p1"], "none", "flow_quota")] == (3, 0)
    assert d[(SLOT["p1"], "redirect", "rule_allow")][0] == 5      # every new flow, judged
    assert d[(SLOT["p1"], "redirect", "flow")][0] == 1
    assert (SLOT["p3"], "none", "flow_quota") not in d
    assert (SLOT["p1"], "none", "insert_failed") not in d


def test_the_quota_cannot_be_dodged_by_a_denied_or_stale_flow(bench):
    """Replacing its own stale entry (after a rule change) costs a tenant no quota, and
    a denied packet never caches; the quota is what it holds, not what it tried."""
    bench.apply(with_quota(TWO_TENANTS, blue=2))
    rc, _ = bench.run(raw(udp4(1000)), "p1")
    assert rc == XDP_REDIRECT
    assert tenant_entry(bench.dp, BLUE).flows == 2
    changed = with_quota(dict(TWO_TENANTS, rules=TWO_TENANTS["rules"] + [
        rule(4, priority=50, proto="tcp", dport=443)]), blue=2)
    bench.sync(changed)                                   # blue's flows are stale now
    rc, _ = bench.run(raw(udp4(1000)), "p1")              # judged again, entry replaced
    assert rc == XDP_REDIRECT
    f = bench.flow(BLUE, 17, "10.0.0.1", 1000, "10.0.0.2", 5000)
    assert f is not None and f.generation == bench.dp.generation(BLUE)
    assert tenant_entry(bench.dp, BLUE).flows == 2        # no new entry, no new count
    rc, _ = bench.run(raw(udp4(3000, port="p3")), "p3")
    assert rc == XDP_DROP                                 # red denies udp: nothing cached
    assert entries_of(bench.dp, RED) == 0


def test_the_sweeper_rebases_the_count_so_an_idle_tenant_caches_again(bench, tmp_path):
    bench.apply(with_quota(TWO_TENANTS, blue=2))
    bench.run(raw(udp4(1000)), "p1")
    bench.run(raw(udp4(1001)), "p1")
    assert bench.flow(BLUE, 17, "10.0.0.1", 1001, "10.0.0.2", 5000) is None
    # A write of the tenant entry (a rule change flips it) keeps the datapath's count.
    bench.sync(with_quota(dict(TWO_TENANTS, rules=TWO_TENANTS["rules"] + [
        rule(4, priority=50, proto="tcp", dport=443)]), blue=2))
    assert tenant_entry(bench.dp, BLUE).flows == 2
    bench.evict(BLUE, 17, "10.0.0.1", 1000, "10.0.0.2", 5000)
    bench.evict(BLUE, 17, "10.0.0.2", 5000, "10.0.0.1", 1000)
    assert tenant_entry(bench.dp, BLUE).flows == 2        # the datapath cannot know
    store = Store.open(str(tmp_path / "state.db"))
    try:
        Sweeper(config.parse(""), bench.dp, Evictions(store)).sweep()
    finally:
        store.close()
    assert tenant_entry(bench.dp, BLUE).flows == 0
    rc, _ = bench.run(raw(udp4(1001)), "p1")
    assert rc == XDP_REDIRECT
    assert bench.flow(BLUE, 17, "10.0.0.1", 1001, "10.0.0.2", 5000) is not None


# --- the flood -------------------------------------------------------------------------

CAPACITY = 262_144 if LONG else 4096


@pytest.fixture(scope="module")
def flood_dp(lab):
    with loaded({"XF_FLOW_TABLE_SIZE": CAPACITY, "XF_MAX_RULE_ENTRIES": 1024,
                 "XF_MAX_ENDPOINTS": 1024, "XF_MAX_ROUTES": 1024, "XF_MAX_PORTS": 64}) as d:
        yield d


@pytest.mark.parametrize("quota", [CAPACITY // 2, None], ids=["red_quota", "no_quota"])
def test_a_flood_of_new_flows_leaves_the_steady_tenant_cached(flood_dp, in_node, tmp_path,
                                                              quota):
    """Red offers twice the table's capacity in new flows; blue's steady flows stay cached
    (every packet of blue during the flood is a flow-table hit), every verdict is the
    rules', and what red could not cache is counted: quota events with a quota, insert
    failures and watermark evictions (all red's) without. Without the quota the table
    fills and the sweeper takes the excess from the biggest holder: red."""
    bench = Bench(in_node, flood_dp)
    bench.apply(bench_flood.flood_state(VM_MAC, red_quota=quota))
    cfg = config.parse(f"[datapath]\nflow_table_size = {CAPACITY}\n" + bench_flood.AGING)
    store = Store.open(str(tmp_path / "state.db"))
    try:
        sweeper = Sweeper(cfg, flood_dp, Evictions(store))
        r = bench_flood.flood(flood_dp, in_node.ifindex, SLOT, sweeper.sweep, CAPACITY,
                              (PORT_MAC, VM_MAC))
        evicted = sweeper.evictions.as_dict()
    finally:
        store.close()
    print(f"\nflood ({'LONG ' if LONG else ''}quota={quota}): {r}, evictions {evicted}")
    assert r["wrong_verdicts"] == 0
    assert r["blue_packets"] >= 8 * bench_flood.STEADY_FLOWS
    assert r["blue_hits"] == r["blue_packets"]            # blue never lost a flow
    assert r["entries_blue"] == 2 * bench_flood.STEADY_FLOWS
    assert r["red_denied"] == r["offered_flows"] // 16
    if quota:
        assert r["red_quota_events"] > 0
        assert r["entries_red"] <= quota + 2
        assert r["red_insert_failed"] == 0
    else:
        assert r["red_insert_failed"] > 0
        assert evicted["table_full"] > 0
        assert r["entries_red"] <= CAPACITY
