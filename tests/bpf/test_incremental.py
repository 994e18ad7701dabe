"""One-rule changes written in place (issue 12): after a random sequence of adds, deletes
and updates through the real controller, the maps hold entry for entry what a
from-scratch compile of the final state writes, and the datapath's verdicts (the trace
build, BPF_PROG_TEST_RUN) agree with a plain reading of the rules; a change is never
half visible to a packet; only the touched tenant's flows go stale; and a change that
dies at any map write (a crash before the store commits) is repaired by the next start's
reconcile, the store being the truth."""
from __future__ import annotations

import ipaddress
import random
from typing import Dict, List, Tuple

import pytest
from scapy.all import ICMP, IP, TCP, UDP, Ether, raw

from agent import abi, compiler, model
from agent.compiler import CompileError

from .conftest import PORT_MAC, SLOT, VM_MAC
from .test_transactions import _Watched

pytestmark = pytest.mark.bpf

BLUE, RED = 10, 20
BASE = {"tenants": [{"name": "blue", "id": BLUE}, {"name": "red", "id": RED}],
        "ports": [{"name": "p1", "tenant": "blue", "port_security": False},
                  {"name": "p2", "tenant": "blue"}, {"name": "p3", "tenant": "red"}],
        "endpoints": [{"tenant": "blue", "ip": "10.0.0.2", "port": "p2", "mac": VM_MAC["p2"]},
                      {"tenant": "red", "ip": "10.0.0.2", "port": "p3", "mac": VM_MAC["p3"]}],
        "rules": [{"id": 1, "tenant": "red", "priority": 5, "action": "allow"}]}


def random_rule(rng: random.Random, rid: int) -> Dict[str, object]:
    """A blue rule from a small pool of shapes (masks stay near, sometimes past, 32)."""
    d: Dict[str, object] = {"id": rid, "tenant": "blue", "priority": rng.choice([10, 50, 100, 500]),
                            "action": rng.choice(["allow", "deny", "pass"])}
    if rng.random() < 0.7:
        plen = rng.choice([8, 16, 24, 32])
        d["src"] = str(ipaddress.ip_network(f"10.{rng.randrange(3)}.{rng.randrange(4)}.{rng.randrange(4)}/{plen}",
                                            strict=False))
    if rng.random() < 0.3:
        d["dst"] = "10.0.0.2/32"
    p = rng.choice([None, "tcp", "udp", "icmp"])
    if p:
        d["proto"] = p
    if p in ("tcp", "udp") and rng.random() < 0.6:
        d["dport"] = rng.choice(["22", "53", "1000-1999", "80"])
    if p == "icmp" and rng.random() < 0.5:
        d["icmp_type"] = 8
    if rng.random() < 0.1:
        d["in_port"] = rng.choice(["p1", "p2"])
    return d


# (proto, source, sport, dport or ICMP type << 8): the packets every check sends from p1
PACKETS = [(proto, f"10.{a}.{b}.{c}", 4000, dport)
           for proto, dport in ((6, 22), (6, 1500), (17, 53), (17, 80), (1, 8 << 8))
           for a, b, c in ((0, 0, 0), (0, 1, 3), (1, 2, 1), (2, 3, 2), (9, 9, 9))]


def frame(proto: int, src: str, sport: int, dport: int) -> bytes:
    ip = IP(src=src, dst="10.0.0.2", ttl=64)
    l4 = TCP(sport=sport, dport=dport, flags="S") if proto == 6 else \
        UDP(sport=sport, dport=dport) if proto == 17 else ICMP(type=dport >> 8, code=0)
    return raw(Ether(src=VM_MAC["p1"], dst=PORT_MAC["p1"]) / ip / l4 / (b"x" * 18))


def check_verdicts(c, in_node, note: str) -> None:
    """Every packet's rule as the datapath decides it (trace build) = the plain reading."""
    rules = [r for r in c.state.rules if r.tenant == "blue"]
    dst = ipaddress.ip_address("10.0.0.2")
    for proto, src, sport, dport in PACKETS:
        _, _, rec = c.dp.trace(frame(proto, src, sport, dport), in_node.ifindex["p1"])
        want = model.matching_rule(rules, proto, ipaddress.ip_address(src), dst, sport, dport, "p1")
        assert (rec.rule_id or None) == (want.id if want else None), \
            f"{note}: {proto} {src}:{sport} -> :{dport}: datapath rule {rec.rule_id}, the " \
            f"rules say {want}"


def canonical(dp, tid: int) -> Tuple[List[Tuple], Dict[Tuple, bytes]]:
    """What the maps hold for a tenant's current classifier generation, with each mask
    named by its bits rather than its key index: (masks in search order with their
    best rank, {(mask, masked key): value}). Fails on entries of any other generation."""
    t = abi.Tenant.from_buffer_copy(dp.maps["xf_tenants"].get(bytes(ct_u32(tid))))
    gen = t.cls_generation or t.generation
    ms = abi.mask_set_type(dp.max_masks).from_buffer_copy(
        dp.maps["xf_masks"].get(bytes(abi.MaskKey(tenant=tid, generation=gen))))
    masks, by_idx = [], {}
    for m in ms.masks[:ms.count]:
        tup = (bytes(m.src), bytes(m.dst), m.sport, m.dport, m.proto, m.in_port)
        masks.append((tup, m.max_rank))
        by_idx[m.key_idx] = tup
    entries = {}
    for k, v in dp.maps["xf_rules"].items():
        rk = abi.RuleKey.from_buffer_copy(k)
        if rk.tenant != tid:
            continue
        assert rk.generation == gen, f"tenant {tid}: an entry of generation {rk.generation} " \
                                     f"beside the current {gen}"
        entries[(by_idx[rk.mask_idx], rk.proto, rk.in_port, bytes(rk.src), bytes(rk.dst),
                 rk.sport, rk.dport)] = v
    return masks, entries


def fresh(c, tid: int) -> Tuple[List[Tuple], Dict[Tuple, bytes]]:
    """The same view of a from-scratch compile of the stored state."""
    st = c.store.load()
    tenant = next(t.name for t in st.tenants if t.id == tid)
    cls = compiler.compile_rules(tenant, [r for r in st.rules if r.tenant == tenant],
                                 c.store.port_slots(), c.dp.max_masks)
    tups = {m: i for i, (m, _) in enumerate(cls.masks)}
    assert tups == cls.key_idx
    entries = {(mask,) + key: cls.value_bytes(v, c.dp._rule_slots)
               for mask, ents in cls.by_mask.items() for key, v in ents.items()}
    return [(m, r) for m, r in cls.masks], entries


def ct_u32(n: int):
    import ctypes
    return ctypes.c_uint32(n)


def test_a_thousand_random_one_rule_changes_write_what_a_fresh_compile_writes(
        node_controller, in_node):
    c = node_controller
    dp = c.dp
    dp.load_trace()
    c.apply(BASE, dry_run=False)
    rng = random.Random(12)
    live: Dict[int, Dict[str, object]] = {}
    next_id, refused, in_place = 100, 0, 0
    red_gen = dp.generation(RED)
    for step in range(1000):
        gen_before = dp._cls_gens[BLUE]
        op = rng.random()
        try:
            if op < 0.5 or len(live) < 5:
                d = random_rule(rng, next_id)
                next_id += 1
                c.add("rules", dict(d))
                live[d["id"]] = d
            elif op < 0.8:
                rid = rng.choice(sorted(live))
                c.delete("rules", (rid,))
                del live[rid]
            else:
                rid = rng.choice(sorted(live))
                d = random_rule(rng, rid)          # same id: the rule replaced
                c.apply({"rules": [dict(d)]}, dry_run=False)
                live[rid] = d
        except CompileError as e:
            assert "masks" in str(e) and "tenant blue" in str(e)
            refused += 1
        in_place += dp._cls_gens[BLUE] == gen_before
        if step % 100 == 99:
            check_verdicts(c, in_node, f"after step {step}")
            assert canonical(dp, BLUE) == fresh(c, BLUE), f"after step {step}"
    assert sorted(r.id for r in c.state.rules if r.tenant == "blue") == sorted(live)
    assert canonical(dp, BLUE) == fresh(c, BLUE)
    assert canonical(dp, RED) == fresh(c, RED)
    check_verdicts(c, in_node, "at the end")
    # Written in place (the classifier generation kept), and red never touched.
    assert in_place == 1000, f"{1000 - in_place} of 1000 changes rewrote the tenant"
    assert dp.generation(RED) == red_gen
    assert 0 < refused < 250     # some went past max_masks: refused, nothing changed


def test_a_one_rule_change_is_never_half_visible(node_controller, in_node):
    """After every single map write of one-rule changes (one that makes a new mask at
    the top of the search order, one that moves a mask, a replacement, a delete that
    empties a mask), every packet's rule is the one the old rules or the new rules say."""
    c = node_controller
    dp = c.dp
    dp.load_trace()
    rules = [{"id": i, "tenant": "blue", "priority": 100, "action": "allow",
              "src": f"10.0.{i}.0/24", "proto": "tcp"} for i in range(1, 4)]
    c.apply(dict(BASE, rules=BASE["rules"] + rules), dry_run=False)
    dst = ipaddress.ip_address("10.0.0.2")
    states: List[List[model.Rule]] = []
    seen = []

    def check(write):
        allowed = [{r.id for r in rs if r.tenant == "blue"} for rs in states]
        for proto, src, sport, dport in PACKETS:
            _, _, rec = dp.trace(frame(proto, src, sport, dport), in_node.ifindex["p1"])
            wants = [model.matching_rule([r for r in rs if r.tenant == "blue"], proto,
                                         ipaddress.ip_address(src), dst, sport, dport, "p1")
                     for rs in states]
            ids = [w.id if w else None for w in wants]
            assert (rec.rule_id or None) in ids, \
                f"after {write}: {proto} {src} -> :{dport} got rule {rec.rule_id}, the old " \
                f"rules say {ids[0]}, the new {ids[1]} (of {allowed})"
        seen.append(write)

    changes = [
        ("add", {"id": 50, "tenant": "blue", "priority": 900, "action": "deny",
                 "src": "10.0.1.3/32", "proto": "tcp", "dport": "22"}),
        ("add", {"id": 51, "tenant": "blue", "priority": 1000, "action": "pass",
                 "src": "10.0.0.0/24", "proto": "tcp"}),
        ("update", {"id": 50, "tenant": "blue", "priority": 20, "action": "deny",
                    "src": "10.0.0.0/8"}),
        ("del", 51), ("del", 50),
    ]
    real = dict(dp.maps)
    try:
        for name in ("xf_rules", "xf_masks", "xf_tenants"):
            dp.maps[name] = _Watched(real[name], check)
        for what, arg in changes:
            before = list(c.state.rules)
            if what == "add":
                after = before + [model.Rule.from_dict(arg)]
            elif what == "update":
                after = [r for r in before if r.id != arg["id"]] + [model.Rule.from_dict(arg)]
            else:
                after = [r for r in before if r.id != arg]
            states[:] = [before, after]
            gen = dp._cls_gens[BLUE]
            if what == "add":
                c.add("rules", arg)
            elif what == "update":
                c.apply({"rules": [arg]}, dry_run=False)
            else:
                c.delete("rules", (arg,))
            assert dp._cls_gens[BLUE] == gen, f"{what} {arg}: not written in place"
            states[:] = [after, after]
            check(f"{what} done")
    finally:
        dp.maps.update(real)
    assert any(w.startswith("xf_masks") for w in seen) and \
        any(w.startswith("xf_rules.delete") for w in seen)
    assert canonical(dp, BLUE) == fresh(c, BLUE)


def test_a_one_rule_change_makes_the_tenants_flows_stale_and_no_others(node_controller, in_node):
    """A flow judged before a deny of its tuple is added is a miss right after (the
    packet meets the deny), while the other tenant's generation is not moved."""
    c = node_controller
    dp = c.dp
    st = dict(BASE, rules=BASE["rules"] + [{"id": 2, "tenant": "blue", "priority": 10,
                                             "action": "allow", "proto": "udp"}])
    c.apply(st, dry_run=False)
    pkt = frame(17, "10.0.0.9", 4000, 53)
    rc, _, _ = dp.run(pkt, in_node.ifindex["p1"])
    assert rc == 4    # XDP_REDIRECT: allowed, flow installed
    dp.load_trace()
    _, _, rec = dp.trace(pkt, in_node.ifindex["p1"])
    assert rec.flow_hit
    red = dp.generation(RED)
    c.add("rules", {"id": 3, "tenant": "blue", "priority": 20, "action": "deny", "proto": "udp",
                    "dport": "53"})
    _, _, rec = dp.trace(pkt, in_node.ifindex["p1"])
    assert not rec.flow_hit and rec.rule_id == 3 and abi.REASONS[rec.reason] == "rule_deny"
    rc, _, _ = dp.run(pkt, in_node.ifindex["p1"])
    assert rc == 1    # XDP_DROP
    assert dp.generation(RED) == red


class Crash(BaseException):
    """Stands in for kill -9: nothing in the controller catches it, so nothing is put
    back; the store's open transaction rolls back as a dead process's would."""


class _CrashAt:
    def __init__(self, m, write: str, countdown: int):
        self._m, self._write, self._n = m, write, countdown

    def __getattr__(self, name):
        attr = getattr(self._m, name)
        if name != self._write:
            return attr

        def write(*a, **kw):
            self._n -= 1
            if self._n < 0:
                raise Crash(f"{self._m.name}.{name}")
            return attr(*a, **kw)
        return write


@pytest.mark.parametrize("where", [("xf_rules", "update_many", 0), ("xf_masks", "put", 0),
                                   ("xf_rules", "delete_many", 0), ("xf_tenants", "put", 0)])
def test_a_change_that_dies_at_any_write_is_repaired_from_the_store(node_controller, in_node,
                                                                    where):
    """Write-ahead order: maps first, the store's commit last. A one-rule replacement
    (a new mask, an old one emptied: every kind of write) dies at one map write; the
    store still has the old rule; a restarted agent (its mirror read from the maps)
    reconciles, and the maps hold what a fresh compile of the store writes."""
    from agent.control import Controller
    c = node_controller
    dp = c.dp
    c.apply(dict(BASE, rules=BASE["rules"] + [
        {"id": 2, "tenant": "blue", "priority": 10, "action": "allow", "src": "10.1.0.0/16"},
        {"id": 3, "tenant": "blue", "priority": 30, "action": "deny", "src": "10.1.2.0/24"}]),
        dry_run=False)
    name, write, n = where
    real = dp.maps[name]
    dp.maps[name] = _CrashAt(real, write, n)
    try:
        with pytest.raises(Crash):
            c.apply({"rules": [{"id": 3, "tenant": "blue", "priority": 700, "action": "deny",
                                "proto": "tcp", "dport": "22"}]}, dry_run=False)
    finally:
        dp.maps[name] = real
    stored = {r.id: r for r in c.store.load().rules}
    assert stored[3].priority == 30, "the store committed a change that did not finish"
    dp._read_mirror()                     # what a new process knows: the maps as they are
    again = Controller(c.cfg, c.store, dp, c.links)
    again.reconcile("start")
    assert canonical(dp, BLUE) == fresh(again, BLUE)
    dp.load_trace()
    check_verdicts(again, in_node, f"after a crash at {name}.{write}")
