"""The flood the issue saw, through the real program (BPF_PROG_TEST_RUN): one tenant (red)
offers twice the flow table's capacity in new flows while another (blue) runs steady
traffic. Run against the flow table as it is (a hash aged by the sweeper, with and
without a quota on red) and as an LRU hash (-DXF_FLOW_LRU), it measures what the issue
asks of a full table: blue's flows stay cached (its packets are flow-table hits), its
cost per packet holds (ns per packet quiet and during the flood, the kernel's own
test-run timing), every verdict is the one the rules give (red's flood mixes allowed
tcp/80 with denied udp), and what was not cached is counted (insert failures, quota
events, evictions by reason).

Used by tests/bpf/test_quota.py (bounded: a 4,096-entry table; XDPFLOW_LONG=1: 262,144,
the issue's) and by `xdpflow-lab bench flood`."""
from __future__ import annotations

import time
from typing import Callable, Dict, List

from agent import abi

XDP_DROP, XDP_REDIRECT = 1, 4
# Idle timeouts far beyond a run: what leaves the table is the watermark's (or the LRU's)
# doing, never aging (a quiet steady tenant on a loaded machine idles past udp's 60 s).
AGING = "[aging]\nudp = 86400\ntcp_established = 86400\n"
STEADY_FLOWS = 64
RED_NET = "10.9.0.0/16"          # red's flood goes to addresses behind this route


def flood_state(ep_mac: Dict[str, str], red_quota=None) -> dict:
    """Blue (p1, p2) allows everything; red (p3, p4, the same addresses) allows tcp/80 and
    denies udp, and routes RED_NET to its VM on p4."""
    def ep(t, ip, port):
        return {"tenant": t, "ip": ip, "port": port, "mac": ep_mac[port]}
    red = {"name": "red", "id": 30}
    if red_quota is not None:
        red["max_flows"] = red_quota
    return {
        "tenants": [{"name": "blue", "id": 10}, red],
        "ports": [{"name": "p1", "tenant": "blue"}, {"name": "p2", "tenant": "blue"},
                  {"name": "p3", "tenant": "red"}, {"name": "p4", "tenant": "red"}],
        "endpoints": [ep("blue", "10.0.0.1", "p1"), ep("blue", "10.0.0.2", "p2"),
                      ep("red", "10.0.0.1", "p3"), ep("red", "10.0.0.2", "p4")],
        "routes": [{"tenant": "red", "prefix": RED_NET, "via": "10.0.0.2"}],
        "rules": [{"id": 1, "tenant": "blue", "priority": 10, "action": "allow"},
                  {"id": 2, "tenant": "red", "priority": 100, "action": "allow",
                   "proto": "tcp", "dport": 80},
                  {"id": 3, "tenant": "red", "priority": 20, "action": "deny",
                   "proto": "udp"}],
    }


def _frames(port_mac: Dict[str, str], vm_mac: Dict[str, str]):
    from scapy.all import IP, TCP, UDP, Ether, raw
    blue = [raw(Ether(src=vm_mac["p1"], dst=port_mac["p1"]) / IP(src="10.0.0.1", dst="10.0.0.2")
                / UDP(sport=7000 + s, dport=5000) / (b"s" * 18)) for s in range(STEADY_FLOWS)]
    tcp = raw(Ether(src=vm_mac["p3"], dst=port_mac["p3"]) / IP(src="10.0.0.1", dst="10.9.0.0")
              / TCP(sport=1024, dport=80, flags="S"))
    udp = raw(Ether(src=vm_mac["p3"], dst=port_mac["p3"]) / IP(src="10.0.0.1", dst="10.9.0.0")
              / UDP(sport=1024, dport=53) / (b"d" * 18))
    return blue, tcp, udp


def _red_flow(template: bytes, i: int) -> bytes:
    """Red's i-th distinct flow: source port and the low 16 bits of the destination."""
    pkt = bytearray(template)
    pkt[32:34] = (i // 64000).to_bytes(2, "big")          # IPv4 dst, last two bytes
    pkt[34:36] = (1024 + i % 64000).to_bytes(2, "big")     # L4 source port
    return bytes(pkt)


def _rows(dp, slot: int) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for s, v, r, pk, _ in dp.counters():
        if s == slot:
            out[f"{abi.VERDICTS[v]}/{abi.REASONS.get(r, r)}"] = pk
    return out


def flood(dp, ifindex: Dict[str, int], slots: Dict[str, int], sweep: Callable[[], Dict],
          capacity: int, macs, offered_factor: int = 2,
          steady_period: int = 0) -> Dict[str, object]:
    """Blue's steady flows are set up and measured quiet; red then offers
    `offered_factor` x `capacity` new flows (every 16th a denied udp one), blue sending
    one packet per flow every `steady_period` of red's (default capacity/4: half the
    table's entries turn over in between), the sweeper running every capacity/4. The
    table is assumed empty and the state programmed."""
    blue, red_tcp, red_udp = _frames(*macs)
    p1, p3 = ifindex["p1"], ifindex["p3"]
    wrong = 0

    def blue_round() -> List[int]:
        nonlocal wrong
        ns = []
        for pkt in blue:
            rc, _, dur = dp.run(pkt, p1)
            wrong += rc != XDP_REDIRECT
            ns.append(dur)
        return ns

    blue_round()                                      # sets blue's flows up
    quiet = blue_round() + blue_round()
    b0, r0 = _rows(dp, slots["p1"]), _rows(dp, slots["p3"])
    offered = offered_factor * capacity
    every = max(1, capacity // 4)
    steady_period = steady_period or every
    during: List[int] = []
    sweeps, sweep_s, t0 = 0, 0.0, time.monotonic()
    for i in range(offered):
        denied = i % 16 == 15
        rc, _, _ = dp.run(_red_flow(red_udp if denied else red_tcp, i), p3)
        wrong += rc != (XDP_DROP if denied else XDP_REDIRECT)
        if i % steady_period == steady_period - 1:
            during += blue_round()
        if i % every == every - 1:
            s0 = time.monotonic()
            sweep()
            sweep_s += time.monotonic() - s0
            sweeps += 1
    flood_s = time.monotonic() - t0
    b1, r1 = _rows(dp, slots["p1"]), _rows(dp, slots["p3"])

    def delta(a, b, k):
        return a.get(k, 0) - b.get(k, 0)

    entries: Dict[int, int] = {}
    for k, _ in dp.flows():
        entries[k.tenant] = entries.get(k.tenant, 0) + 1
    blue_pkts = len(during)
    return {
        "capacity": capacity, "offered_flows": offered, "steady_period": steady_period,
        "sweeps": sweeps,
        "flood_seconds": round(flood_s, 2), "sweep_seconds": round(sweep_s, 2),
        "wrong_verdicts": wrong,
        "blue_packets": blue_pkts,
        "blue_hits": delta(b1, b0, "redirect/flow"),
        "blue_hit_ratio": round(delta(b1, b0, "redirect/flow") / max(1, blue_pkts), 4),
        "blue_ns_quiet": _median(quiet), "blue_ns_flood": _median(during),
        "red_quota_events": delta(r1, r0, "none/flow_quota"),
        "red_insert_failed": delta(r1, r0, "none/insert_failed"),
        "red_denied": delta(r1, r0, "drop/rule_deny"),
        "entries_blue": entries.get(10, 0), "entries_red": entries.get(30, 0),
    }


def _median(xs: List[int]) -> float:
    s = sorted(xs)
    return float(s[len(s) // 2]) if s else 0.0


# -- `xdpflow-lab bench flood` ------------------------------------------------------------

PORTS = ("p1", "p2", "p3", "p4")
# Variants: the table as built (hash + sweeper) with and without a quota on red, and the
# LRU hash the issue asks to weigh (no quota: an LRU evicts by itself); each with blue
# busy (a packet per flow every quarter table of red's new flows) and quiet (every table).
VARIANTS = (("hash+quota", False, True), ("hash", False, False), ("lru_hash", True, False))
CADENCES = (("busy", 4), ("quiet", 1))


def run_flood(quick: bool, say) -> Dict[str, object]:
    import secrets
    import socket

    from agent import compiler, config, model
    from agent.datapath import Datapath
    from agent.store import Store
    from agent.sweeper import Evictions, Sweeper

    from . import benchlib
    from .netns import Namespaces, entered

    capacity = 16384 if quick else 262_144
    port_mac = {p: f"02:aa:00:00:00:0{i}" for i, p in enumerate(PORTS, 1)}
    vm_mac = {p: f"02:00:00:00:00:0{i}" for i, p in enumerate(PORTS, 1)}
    slots = {p: i for i, p in enumerate(PORTS, 1)}
    sizes = {"XF_FLOW_TABLE_SIZE": capacity, "XF_MAX_RULE_ENTRIES": 1024,
             "XF_MAX_ENDPOINTS": 1024, "XF_MAX_ROUTES": 1024, "XF_MAX_PORTS": 64}
    cfg = config.parse(f"[datapath]\nflow_table_size = {capacity}\n" + AGING)
    doc: Dict[str, object] = {"suite": "flood", "machine": benchlib.machine(),
                              "capacity": capacity, "variants": {}}
    nss = Namespaces()
    tag = secrets.token_hex(3)
    try:
        node, vm = nss.add("xfl"), nss.add("xfl")
        for i, p in enumerate(PORTS, 1):
            nss.veth(p, node, f"v{i}", vm, a_mac=port_mac[p], b_mac=vm_mac[p])
        with entered(node):
            ifindex = {p: socket.if_nametoindex(p) for p in PORTS}
            links = {p: compiler.PortLink(p, ifindex[p], port_mac[p], slots[p], ())
                     for p in PORTS}
            for name, lru, quota in VARIANTS:
                say(f"flood: {name}, {2 * capacity:,} new flows into {capacity:,} entries")
                d = Datapath(f"/sys/fs/bpf/xdpflow-flood-{tag}-{name.replace('+', '-')}",
                             dict(sizes, **({"XF_FLOW_LRU": 1} if lru else {})))
                with tempfile_store() as path:
                    store = Store.open(path)
                    try:
                        d.load()
                        state = flood_state(vm_mac, capacity // 2 if quota else None)
                        d.sync(compiler.compile_state(model.State.from_dict(state), links))
                        sweeper = Sweeper(cfg, d, Evictions(store))
                        for cadence, per_table in CADENCES:
                            d.flush_flows()
                            ev0 = sweeper.evictions.as_dict()
                            r = flood(d, ifindex, slots, sweeper.sweep, capacity,
                                      (port_mac, vm_mac), steady_period=capacity // per_table)
                            r["evictions"] = {k: n - ev0[k] for k, n in
                                              sweeper.evictions.as_dict().items()}
                            doc["variants"][f"{name} {cadence}"] = r
                            say("  " + ", ".join(f"{k} {v}" for k, v in r.items()))
                    finally:
                        store.close()
                        d.close()
                        d.unpin()
    finally:
        nss.close()
    doc.setdefault("machine", {})["commit"] = benchlib.git_commit()
    return doc


class tempfile_store:
    """A state database in a temporary directory, removed after."""

    def __enter__(self) -> str:
        import tempfile
        self._dir = tempfile.TemporaryDirectory(prefix="xdpflow-flood-")
        return self._dir.name + "/state.db"

    def __exit__(self, *exc):
        self._dir.cleanup()


FLOOD_COLUMNS = (("blue hit ratio", "blue_hit_ratio"), ("blue ns quiet", "blue_ns_quiet"),
                 ("blue ns flood", "blue_ns_flood"), ("wrong verdicts", "wrong_verdicts"),
                 ("red quota events", "red_quota_events"),
                 ("red insert failed", "red_insert_failed"),
                 ("entries blue", "entries_blue"), ("entries red", "entries_red"),
                 ("sweep s", "sweep_seconds"))


def flood_table(doc: Dict[str, object]) -> str:
    names = list(doc["variants"])
    lines = [f"flood: {2 * doc['capacity']:,} new flows from red into a "
             f"{doc['capacity']:,}-entry table; blue steady ({STEADY_FLOWS} flows)",
             f"{'':22}" + "".join(f"{n:>18}" for n in names)]
    for label, key in FLOOD_COLUMNS:
        lines.append(f"{label:22}" + "".join(f"{doc['variants'][n][key]:>18}" for n in names))
    lines.append(f"{'evicted (table_full)':22}" + "".join(
        f"{doc['variants'][n]['evictions']['table_full']:>18}" for n in names))
    return "\n".join(lines)


def flood_plots(doc: Dict[str, object], outdir: str) -> List[str]:
    return []
