"""Fixtures of the bpf tier: one node namespace with veth ports for the whole session (this
process's main thread runs inside it, so BPF_PROG_TEST_RUN can name an ingress ifindex),
one loaded datapath, and a per-test bench that programs a model state and measures what a
packet did to the counters. Everything made here is removed at the end, whatever happened."""
from __future__ import annotations

import contextlib
import os
import secrets
import socket
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import pytest

from agent import abi, compiler, model
from agent.datapath import BPF_DIR, Datapath
from netns_lab.netns import Namespaces, entered

# Node-side ports: fixed names inside the namespace, fixed MACs, fixed counter slots.
PORTS = ("p1", "p2", "p3", "p4", "p5", "p6")
PORT_MAC = {p: f"02:aa:00:00:00:0{i}" for i, p in enumerate(PORTS, 1)}
VM_MAC = {p: f"02:00:00:00:00:0{i}" for i, p in enumerate(PORTS, 1)}
SLOT = {p: i for i, p in enumerate(PORTS, 1)}
# p6 is never part of any state: the "unknown ingress port".
CONFIGURABLE = ("p1", "p2", "p3", "p4", "p5")

SMALL_SIZES = {"XF_FLOW_TABLE_SIZE": 65536, "XF_MAX_RULE_ENTRIES": 8192,
               "XF_MAX_ENDPOINTS": 1024, "XF_MAX_ROUTES": 1024, "XF_MAX_PORTS": 64}


def pin_dir() -> str:
    return f"/sys/fs/bpf/xdpflow-test-{os.getpid()}-{secrets.token_hex(4)}"


@dataclass
class Lab:
    node: str
    vm: str
    ifindex: Dict[str, int]


@pytest.fixture(scope="session")
def lab():
    """The namespaces and veths, made once per session. Tests that run packets enter the
    node namespace through `in_node` (per test, so other tests of the session never find
    themselves in it)."""
    if os.geteuid() != 0:
        pytest.skip("the bpf tier needs root")
    nss = Namespaces()
    try:
        node = nss.add("xfb")
        vm = nss.add("xfb")
        for i, p in enumerate(PORTS, 1):
            nss.veth(p, node, f"v{i}", vm, a_mac=PORT_MAC[p], b_mac=VM_MAC[p])
        with entered(node):
            ifindex = {p: socket.if_nametoindex(p) for p in PORTS}
        yield Lab(node, vm, ifindex)
    finally:
        nss.close()


@pytest.fixture
def in_node(lab):
    """The calling (main) thread inside the node namespace for one test: test-run's
    ingress ifindex names a device of the current namespace."""
    with entered(lab.node):
        yield lab


@contextlib.contextmanager
def loaded(defines):
    """A datapath built with these sizes in a fresh pin dir, closed and unpinned after."""
    d = Datapath(pin_dir(), defines)
    try:
        d.load()
        yield d
    finally:
        try:
            d.close()
        finally:
            d.unpin()


@pytest.fixture(scope="session")
def dp():
    """One datapath for the session (a BCC compile costs seconds): test-run only, never
    attached. Built before the namespaces: a compiler abort (LLVM exits the process)
    then leaves no namespace behind."""
    if os.geteuid() != 0:
        pytest.skip("the bpf tier needs root")
    with loaded(SMALL_SIZES) as d:
        yield d


@pytest.fixture(scope="session")
def bcc_build(dp):
    """BCC's own view of the program (its tables' ctypes, built from the C), normal build
    (False) and trace build (True), for the layout tests: the datapath keeps only fds, its
    BCC module is freed after the compile. Compiled here once more, loading no program."""
    from bcc import BPF
    builds = {}
    try:
        for trace in (False, True):
            builds[trace] = BPF(src_file=str(BPF_DIR / "xdpflow.c").encode(),
                                cflags=dp.cflags(trace=trace))
        yield builds
    finally:
        for b in builds.values():
            b.cleanup()


@dataclass
class Snapshot:
    rows: Dict[Tuple[int, str, str], Tuple[int, int]]

    def __sub__(self, before: "Snapshot") -> Dict[Tuple[int, str, str], Tuple[int, int]]:
        out = {}
        for k in set(self.rows) | set(before.rows):
            a = self.rows.get(k, (0, 0))
            b = before.rows.get(k, (0, 0))
            d = (a[0] - b[0], a[1] - b[1])
            if d != (0, 0):
                out[k] = d
        return out


class Bench:
    """Programs a state into the session datapath and runs packets through it."""

    def __init__(self, lab: Lab, dp: Datapath):
        self.lab = lab
        self.dp = dp
        self.neighbours: Dict[str, str] = {}    # VTEP -> underlay MAC (the overlay's)

    def links(self, addrs: Optional[Dict[str, Iterable[str]]] = None) -> Dict[str, compiler.PortLink]:
        addrs = addrs or {}
        return {p: compiler.PortLink(p, self.lab.ifindex[p], PORT_MAC[p], SLOT[p],
                                     tuple(addrs.get(p, ())))
                for p in CONFIGURABLE}

    def sync(self, state: dict, addrs: Optional[Dict[str, Iterable[str]]] = None):
        img = compiler.compile_state(model.State.from_dict(state), self.links(addrs),
                                     neighbours=self.neighbours)
        return self.dp.sync(img)

    def apply(self, state: dict, addrs: Optional[Dict[str, Iterable[str]]] = None):
        """A fresh start for one case: the state synced, no flows, no fragment state."""
        self.sync(state, addrs)
        self.dp.flush_flows()
        frags = self.dp.maps["xf_frags"]
        frags.delete_many(list(frags.keys()))
        # Rate limits start full (a sync leaves an unchanged bucket as it is).
        pols = self.dp.maps["xf_policers"]
        full = []
        for k, v in pols.items():
            p = abi.Policer.from_buffer_copy(v)
            p.tat_ns = p.dropped = 0
            full.append((k, bytes(p)))
        if full:
            pols.update_many(full)

    def run(self, pkt: bytes, port: str) -> Tuple[int, bytes]:
        rc, out, _ = self.dp.run(bytes(pkt), self.lab.ifindex[port])
        return rc, out

    def trace(self, pkt: bytes, port: str):
        return self.dp.trace(bytes(pkt), self.lab.ifindex[port])

    def snapshot(self) -> Snapshot:
        return Snapshot({(slot, abi.VERDICTS[v], abi.REASONS.get(r, str(r))): (pk, by)
                         for slot, v, r, pk, by in self.dp.counters()})

    def flows(self) -> List[Tuple[abi.FlowKey, abi.Flow]]:
        return list(self.dp.flows())

    def _find(self, tenant: int, proto: int, src: str, sport: int, dst: str, dport: int):
        import ipaddress
        for k, f in self.dp.flows():
            if (k.tenant, k.proto, k.sport, k.dport) == (tenant, proto, sport, dport) and \
                    abi.get_addr(k.src) == ipaddress.ip_address(src) and \
                    abi.get_addr(k.dst) == ipaddress.ip_address(dst):
                return k, f
        return None, None

    def flow(self, tenant: int, proto: int, src: str, sport: int, dst: str, dport: int):
        """The flow entry of one direction, or None."""
        return self._find(tenant, proto, src, sport, dst, dport)[1]

    def evict(self, tenant: int, proto: int, src: str, sport: int, dst: str, dport: int) -> bool:
        """Remove one direction's flow entry, as an eviction would."""
        k, _ = self._find(tenant, proto, src, sport, dst, dport)
        return k is not None and self.dp.maps["xf_flows"].delete_many([bytes(k)]) == 1


@pytest.fixture
def bench(dp, in_node):
    return Bench(in_node, dp)


@pytest.fixture
def node_controller(dp, in_node, tmp_path):
    """The real Controller over the session datapath, with the node namespace's
    interfaces as its links (it attaches to the ports it is given), a fresh store; its
    ports detached and the datapath emptied afterwards, as the bench expects it."""
    from agent import config
    from agent.control import Controller
    from agent.links import Links
    from agent.store import Store

    keys = {"flow_table_size": "XF_FLOW_TABLE_SIZE", "max_rule_entries": "XF_MAX_RULE_ENTRIES",
            "max_endpoints": "XF_MAX_ENDPOINTS", "max_routes": "XF_MAX_ROUTES",
            "max_ports": "XF_MAX_PORTS"}
    cfg = config.parse("[datapath]\n" + "".join(f"{k} = {SMALL_SIZES[d]}\n"
                                                 for k, d in keys.items()))
    assert cfg.datapath_defines() == dp.defines
    store = Store.open(str(tmp_path / "state.db"))
    links = Links()
    dp.flush_flows()
    try:
        yield Controller(cfg, store, dp, links)
    finally:
        for name in PORTS:
            link = links.get(name)
            if link is not None:
                links.detach(link)
        links.close()
        dp.sync(compiler.Image())
        dp.flush_flows()
        store.close()
