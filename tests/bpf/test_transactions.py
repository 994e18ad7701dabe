"""All-or-nothing writes against real maps: a batch write that fails partway (a full map)
is rolled back entry for entry, and a change the datapath cannot hold leaves the maps as
they were, not half written."""
from __future__ import annotations

import ctypes as ct
import os

import pytest

from agent import abi, config
from agent.bpfsys import BpfError, RawMap, _lib
from agent.control import Controller
from agent.store import Store

from .conftest import loaded

pytestmark = pytest.mark.bpf

BPF_MAP_TYPE_HASH = 1


@pytest.fixture
def small_hash():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    _lib.bpf_map_create.argtypes = [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32,
                                    ct.c_uint32, ct.c_void_p]
    fd = _lib.bpf_map_create(BPF_MAP_TYPE_HASH, b"xf_test_rb", 4, 4, 4, None)
    assert fd >= 0, os.strerror(ct.get_errno())
    m = RawMap(fd, "xf_test_rb", owned=True)
    try:
        yield m
    finally:
        m.close()


def u32(n: int) -> bytes:
    return n.to_bytes(4, "little")


@pytest.mark.parametrize("known", [False, True], ids=["looked-up", "previous-given"])
def test_a_batch_that_fails_partway_is_rolled_back(small_hash, known):
    m = small_hash
    m.update_many([(u32(1), u32(10)), (u32(2), u32(20))])
    before = dict(m.items())
    # One overwrite and three new keys into a map of 4 holding 2: the third new key
    # does not fit, after the overwrite and two inserts were made.
    batch = [(u32(1), u32(11)), (u32(3), u32(30)), (u32(4), u32(40)), (u32(5), u32(50))]
    with pytest.raises(BpfError):
        if known:
            m.update_many(batch, previous=before)
        else:
            m.update_many(batch)
    assert dict(m.items()) == before


def test_a_change_the_datapath_cannot_hold_leaves_its_maps_as_they_were(tmp_path):
    cfg = config.parse("[datapath]\nflow_table_size = 1024\nmax_rule_entries = 1024\n"
                       "max_endpoints = 64\nmax_routes = 16\nmax_ports = 16\n")
    store = Store.open(str(tmp_path / "state.db"))

    def routes(n):
        return [{"tenant": "blue", "prefix": f"10.{i}.0.0/16", "action": "drop"}
                for i in range(n)]

    try:
        with loaded(cfg.datapath_defines()) as dp:
            c = Controller(cfg, store, dp, links=None)
            c.apply({"tenants": [{"name": "blue", "id": 10}], "routes": routes(10)},
                    dry_run=False)
            before = dict(dp.maps["xf_routes"].items())
            assert len(before) == 10
            with pytest.raises(BpfError):
                c.apply({"tenants": [{"name": "blue", "id": 10}], "routes": routes(20)},
                        dry_run=False)
            assert dict(dp.maps["xf_routes"].items()) == before
            assert len(c.state.routes) == 10 and len(store.load().routes) == 10
            # ...and the next change that fits goes through.
            c.apply({"tenants": [{"name": "blue", "id": 10}], "routes": routes(12)},
                    dry_run=False)
            assert len(dict(dp.maps["xf_routes"].items())) == 12
    finally:
        store.close()


def test_an_in_port_rule_for_a_port_without_interface_breaks_nothing(tmp_path):
    """Rules name ports by their stored slots: a rule for a VM that is stopped (no
    interface on the node) compiles, and later commits and a restart's reconcile work."""
    cfg = config.parse("[datapath]\nflow_table_size = 1024\nmax_rule_entries = 1024\n"
                       "max_endpoints = 64\nmax_routes = 16\nmax_ports = 16\n")
    store = Store.open(str(tmp_path / "state.db"))
    state = {"tenants": [{"name": "blue", "id": 10}],
             "ports": [{"name": "vm1", "tenant": "blue"}, {"name": "vm2", "tenant": "blue"}],
             "rules": [{"id": 1, "tenant": "blue", "priority": 10, "action": "allow",
                        "in_port": "vm2"}]}
    try:
        with loaded(cfg.datapath_defines()) as dp:
            c = Controller(cfg, store, dp, links=None)      # no interface exists
            c.apply(state, dry_run=False)
            gen = dp.generation(10)
            c.add("rules", {"id": 2, "tenant": "blue", "priority": 5, "action": "deny"})
            assert dp.generation(10) != gen
            again = Controller(cfg, store, dp, links=None)  # a restart
            again.reconcile("start")
            rules = dict(dp.maps["xf_rules"].items())
            slot = store.port_slots()["vm2"]
            in_ports = {abi.RuleKey.from_buffer_copy(k).in_port for k in rules}
            assert in_ports == {0, slot}
    finally:
        store.close()


def test_a_resize_builds_beside_the_running_program_and_commits_all_or_nothing(in_node):
    """A reload that resizes a configuration map (max_rule_entries) builds the new program
    with all-new configuration maps: while it is programmed (a new generation of blue's
    rules), the running program still judges by its own, whole, older rule set. Discarded,
    the live pins are untouched; committed, they are the new program's maps."""
    from .conftest import Bench, SMALL_SIZES, pin_dir
    from .cases import XDP_DROP, XDP_REDIRECT, blue, rule, udp4
    from agent.datapath import Datapath
    from scapy.all import raw

    allow = blue([rule(1, proto="udp", dport=5000)])
    deny = blue([rule(2, action="deny", proto="udp", dport=5000)])
    pkt = raw(udp4())
    d = pin_dir()
    old = Datapath(d, SMALL_SIZES)
    bigger = dict(SMALL_SIZES, XF_MAX_RULE_ENTRIES=SMALL_SIZES["XF_MAX_RULE_ENTRIES"] * 2)
    try:
        old.load()
        running = Bench(in_node, old)
        running.apply(allow)
        assert running.run(pkt, "p1")[0] == XDP_REDIRECT
        live_ids = {n: RawMap.pinned(f"{d}/{n}") for n in ("xf_tenants", "xf_rules")}
        ids = {n: m.id for n, m in live_ids.items()}
        for m in live_ids.values():
            m.close()

        for commit in (False, True):
            new = Datapath(d, bigger)
            try:
                report = {st.name: st.action for st in new.load(beside=True)}
                assert report["xf_rules"] == "migrate" and report["xf_tenants"] == "rebuild"
                Bench(in_node, new).sync(deny)              # a new generation, new maps
                running.dp.flush_flows()
                # The running program still sees its own whole generation: allowed.
                assert running.run(pkt, "p1")[0] == XDP_REDIRECT
                assert Bench(in_node, new).run(pkt, "p1")[0] == XDP_DROP
                if commit:
                    new.commit_pins()
                    assert new.pin_dir == d
                    for n in ids:
                        m = RawMap.pinned(f"{d}/{n}")
                        assert m.id == new.maps[n].id and m.id != ids[n]
                        m.close()
            finally:
                new.close()
                if not commit:
                    new.discard_staged()
                    for n, i in ids.items():                # live pins untouched
                        m = RawMap.pinned(f"{d}/{n}")
                        assert m.id == i
                        m.close()
    finally:
        old.close()
        old.unpin()


class _Watched:
    """A map whose every write is followed by a check of what a packet would meet."""

    def __init__(self, m, check):
        self._m, self._check = m, check

    def __getattr__(self, name):
        attr = getattr(self._m, name)
        if name not in ("put", "update_many", "delete", "delete_many"):
            return attr

        def write(*a, **kw):
            out = attr(*a, **kw)
            self._check(f"{self._m.name}.{name}")
            return out
        return write


def test_no_packet_meets_a_port_without_tenant_or_our_program_without_its_port(
        node_controller, in_node):
    """Adding a tenant with its port, and removing them, through the real controller on
    the node's p1: after every single map write, a packet from p1 (traced through the
    real program) never finds a port whose tenant the datapath does not know, and never
    finds our program attached to p1 without p1's port entry. Either would hand the VM's
    traffic to the kernel (reasons no_tenant / no_port) where the tenant says drop."""
    from .cases import udp4
    from .conftest import VM_MAC
    from scapy.all import raw

    c = node_controller
    dp = c.dp
    pkt = raw(udp4())
    seen = []

    def check(write):
        rc, _, rec = dp.trace(pkt, in_node.ifindex["p1"])
        reason = abi.REASONS.get(rec.reason, "")
        attached = (c.links.get("p1").xdp_prog_id or 0) == c.prog_id()
        seen.append((write, reason, attached))
        assert reason != "no_tenant", f"after {write}: a port whose tenant is unknown"
        assert not (attached and reason == "no_port"), \
            f"after {write}: our program on p1 without p1's port entry"

    real = dict(dp.maps)
    dp.load_trace()
    try:
        for name in ("xf_port_index", "xf_ports", "xf_tenants", "xf_endpoints", "xf_rules",
                     "xf_masks"):
            dp.maps[name] = _Watched(real[name], check)
        c.apply({"tenants": [{"name": "blue", "id": 10, "default": "drop"}],
                 "ports": [{"name": "p1", "tenant": "blue"}],
                 "endpoints": [{"tenant": "blue", "ip": "10.0.0.1", "port": "p1",
                                "mac": VM_MAC["p1"]}]}, dry_run=False)
        assert ("default" in {r for _, r, _ in seen}) and c.port_rows()[0]["attached"]
        c.apply({}, dry_run=False, prune=True)       # the empty state, whole
        assert seen[-1][1:] == ("no_port", False)
    finally:
        dp.maps.update(real)


@pytest.mark.parametrize("chunk", [3, 4096])
def test_reading_an_array_without_its_empty_rows(chunk):
    """skip_zero (how a starting agent reads 65,536 tenant rows) leaves out exactly the
    all-zero rows, inside a batch and across whole empty batches."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    fd = _lib.bpf_map_create(2, b"xf_test_arr", 4, 8, 64, None)     # array
    assert fd >= 0, os.strerror(ct.get_errno())
    m = RawMap(fd, "xf_test_arr", owned=True)
    try:
        rows = {u32(i): (i * 7 + 1).to_bytes(8, "little") for i in (0, 5, 6, 40, 63)}
        rows[u32(41)] = b"\x00" * 7 + b"\x01"                          # one bit set
        m.update_many(list(rows.items()))
        assert dict(m.items(chunk, skip_zero=True)) == rows
        assert len(dict(m.items(chunk))) == 64
    finally:
        m.close()
