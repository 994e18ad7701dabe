"""The compiler without BPF: port ranges to prefixes, rules to tuple-space masks and entries,
and the whole image. The strongest check replays the datapath's search (masks in order, one
exact lookup each, early exit on rank) over the compiled classifier and compares it with a
plain first-match-by-priority reading of the rules, on many random packets."""
import ctypes as ct
import ipaddress
import random

import pytest

from agent import abi, compiler, model

pytestmark = pytest.mark.unit


def rule(**kw):
    base = {"id": 1, "tenant": "blue", "priority": 100, "action": "allow"}
    base.update(kw)
    return model.Rule.from_dict(base)


@pytest.mark.parametrize("lo,hi", [(0, 65535), (22, 22), (1000, 1999), (1024, 65535),
                                   (0, 0), (1, 65534), (5000, 5010), (32768, 32768)])
def test_range_to_prefixes_covers_exactly(lo, hi):
    prefixes = compiler.range_to_prefixes(lo, hi)
    covered = set()
    for value, mask in prefixes:
        assert value & ~mask & 0xFFFF == 0, "value has bits outside its mask"
        size = (~mask & 0xFFFF) + 1
        block = set(range(value, value + size))
        assert not covered & block, "prefixes overlap"
        covered |= block
    assert covered == set(range(lo, hi + 1))


def test_range_to_prefixes_is_minimal_for_known_ranges():
    assert compiler.range_to_prefixes(0, 65535) == [(0, 0)]
    assert compiler.range_to_prefixes(22, 22) == [(22, 0xFFFF)]
    # 1024-65535 = /6 + /5 + /4 + /3 + /2 + /1 blocks
    assert len(compiler.range_to_prefixes(1024, 65535)) == 6
    assert len(compiler.range_to_prefixes(1, 65534)) == 30


def test_prefix_mask_maps_ipv4_and_keeps_any_for_both_families():
    addr, mask = compiler.prefix_mask(ipaddress.ip_network("10.1.0.0/16"))
    assert addr == b"\0" * 10 + b"\xff\xff" + bytes([10, 1, 0, 0])
    assert mask == b"\xff" * 14 + b"\0\0"
    addr, mask = compiler.prefix_mask(model.ANY)
    assert mask == b"\0" * 16


def test_ranks_follow_priority_then_lower_id():
    rules = [rule(id=5, priority=10), rule(id=3, priority=10), rule(id=9, priority=200)]
    ranks = compiler.rank_rules(rules)
    assert ranks[9] > ranks[3] > ranks[5]
    assert len(set(ranks.values())) == 3


def test_port_range_rule_makes_one_mask_per_prefix_length():
    cls = compiler.compile_rules("blue", [rule(proto="tcp", dport="1024-65535")], {}, 32)
    assert len(cls.masks) == 6
    assert len(cls.entries) == 6


def test_rules_sharing_a_shape_share_a_mask():
    rules = [rule(id=i, src=f"10.0.{i}.0/24", proto="udp", dport="53") for i in range(1, 50)]
    cls = compiler.compile_rules("blue", rules, {}, 32)
    assert len(cls.masks) == 1
    assert len(cls.entries) == 49


def test_identical_masked_keys_keep_the_winner():
    rules = [rule(id=1, priority=10, action="deny", src="10.0.0.0/24"),
             rule(id=2, priority=20, action="allow", src="10.0.0.0/24")]
    cls = compiler.compile_rules("blue", rules, {}, 32)
    assert len(cls.entries) == 1
    (_, rid, action), = cls.entries.values()
    assert rid == 2 and action == abi.A_ALLOW


def test_masks_are_ordered_by_their_best_rank():
    rules = [rule(id=1, priority=1, src="10.0.0.0/8"), rule(id=2, priority=50, src="10.1.0.0/16"),
             rule(id=3, priority=900, src="10.1.1.0/24")]
    cls = compiler.compile_rules("blue", rules, {}, 32)
    ranks = [r for _, r in cls.masks]
    assert ranks == sorted(ranks, reverse=True)


def test_too_many_masks_is_refused_naming_the_tenant():
    rules = [rule(id=i, src=f"10.0.0.0/{8 + i}") for i in range(1, 10)]
    with pytest.raises(compiler.CompileError) as e:
        compiler.compile_rules("blue", rules, {}, 4)
    assert "tenant blue" in str(e.value) and "9 distinct masks" in str(e.value)


def test_icmp_type_and_code_use_dport_field():
    cls = compiler.compile_rules("blue", [rule(proto="icmp", icmp_type=8)], {}, 32)
    (mask, _), = cls.masks
    assert mask[3] == 0xFF00
    (key,) = cls.entries
    assert key[6] == 8 << 8


def test_in_port_match_uses_the_port_slot():
    cls = compiler.compile_rules("blue", [rule(in_port="p1")], {"p1": 7}, 32)
    (key,) = cls.entries
    assert key[2] == 7
    (mask, _), = cls.masks
    assert mask[5] == 0xFFFF


# --- the datapath's search, replayed ------------------------------------------------------

def search(cls: compiler.Classifier, proto, src, dst, sport, dport, in_port):
    """What bpf/xdpflow.c xf_classify() does, over the compiled classifier."""
    best = None
    for idx, ((srcm, dstm, spm, dpm, protom, inpm), max_rank) in enumerate(cls.masks):
        if best and best[0] >= max_rank:
            break
        key = (idx, proto & protom, in_port & inpm, compiler._and(src, srcm),
               compiler._and(dst, dstm), sport & spm, dport & dpm)
        hit = cls.entries.get(key)
        if hit and (best is None or hit[0] > best[0]):
            best = hit
    return best


def reference(rules, proto, src_ip, dst_ip, sport, dport, in_port_name):
    """Plain reading of the rules: the highest priority, then the lowest id, that matches."""
    return model.matching_rule(rules, proto, src_ip, dst_ip, sport, dport, in_port_name)


def random_rules(rng, n):
    rules = []
    for i in range(1, n + 1):
        d = {"id": i, "tenant": "blue", "priority": rng.choice([10, 50, 100, 500]),
             "action": rng.choice(["allow", "deny", "pass"])}
        if rng.random() < 0.7:
            d["src"] = f"10.{rng.choice([0, 1])}.{rng.randrange(4)}.0/{rng.choice([8, 16, 24, 30])}"
            d["src"] = str(ipaddress.ip_network(d["src"], strict=False))
        if rng.random() < 0.5:
            d["dst"] = str(ipaddress.ip_network(f"10.0.0.{rng.randrange(256)}/{rng.choice([24, 28, 32])}",
                                                strict=False))
        p = rng.choice([None, "tcp", "udp", "icmp"])
        if p:
            d["proto"] = p
        if p in ("tcp", "udp") and rng.random() < 0.7:
            lo = rng.randrange(0, 2000)
            d["dport"] = f"{lo}-{lo + rng.randrange(0, 300)}"
        if p == "icmp" and rng.random() < 0.5:
            d["icmp_type"] = rng.choice([0, 8])
        if rng.random() < 0.1:
            d["in_port"] = rng.choice(["p1", "p2"])
        rules.append(model.Rule.from_dict(d))
    return rules


@pytest.mark.parametrize("seed", range(6))
def test_compiled_search_agrees_with_plain_reading(seed):
    rng = random.Random(seed)
    rules = random_rules(rng, 12)
    slots = {"p1": 1, "p2": 2}
    cls = compiler.compile_rules("blue", rules, slots, 64)
    for _ in range(3000):
        proto = rng.choice([6, 17, 1])
        src = ipaddress.ip_address(f"10.{rng.choice([0, 1])}.{rng.randrange(4)}.{rng.randrange(256)}")
        dst = ipaddress.ip_address(f"10.0.0.{rng.randrange(256)}")
        in_port = rng.choice(["p1", "p2"])
        if proto == 1:
            sport, dport = 0, (rng.choice([0, 8, 3]) << 8)
        else:
            sport, dport = rng.randrange(65536), rng.randrange(0, 2400)
        got = search(cls, proto, abi.addr16(src), abi.addr16(dst), sport, dport, slots[in_port])
        want = reference(rules, proto, src, dst, sport, dport, in_port)
        assert (got[1] if got else None) == (want.id if want else None), \
            (proto, src, dst, sport, dport, in_port)


def test_image_holds_ports_endpoints_routes_and_tenants():
    st = model.State.from_dict({
        "tenants": [{"name": "blue", "id": 10}, {"name": "red", "id": 20, "default": "pass"}],
        "ports": [{"name": "p1", "tenant": "blue"}, {"name": "p2", "tenant": "red"},
                  {"name": "p3", "tenant": "red"}],
        "endpoints": [{"tenant": "blue", "ip": "10.0.0.1", "port": "p1", "mac": "02:00:00:00:00:01"},
                      {"tenant": "red", "ip": "10.0.0.1", "port": "p2", "mac": "02:00:00:00:00:01"},
                      {"tenant": "red", "ip": "10.0.0.9", "port": "p3", "mac": "02:00:00:00:00:09"}],
        "routes": [{"tenant": "red", "prefix": "0.0.0.0/0", "via": "10.0.0.1"}],
        "rules": [{"id": 1, "tenant": "blue", "priority": 1, "action": "allow"}]})
    links = {"p1": compiler.PortLink("p1", 11, "02:aa:00:00:00:01", 1, ("192.168.9.1",)),
             "p2": compiler.PortLink("p2", 12, "02:aa:00:00:00:02", 2)}   # p3 has no interface
    img = compiler.compile_state(st, links)
    assert len(img.ports) == 2
    port = abi.Port.from_buffer_copy(img.ports[bytes(ct.c_uint32(12))])
    assert port.tenant == 20 and port.slot == 2
    # the same address in two tenants: two keys; p3's endpoint is left out (no interface);
    # p1's own address is a local endpoint of blue
    keys = [abi.EpKey.from_buffer_copy(k) for k in img.endpoints]
    assert sorted((k.tenant, str(abi.get_addr(k.addr))) for k in keys) == \
        [(10, "10.0.0.1"), (10, "192.168.9.1"), (20, "10.0.0.1")]
    (rk, rv), = img.routes.items()
    assert abi.RouteKey.from_buffer_copy(rk).prefixlen == 32 + 96
    assert abi.Route.from_buffer_copy(rv).action == abi.RT_VIA
    assert img.tenants[20].default_verdict == abi.V_PASS


def test_rule_counter_slots_are_kept_reused_only_when_freed_and_bounded():
    slots, fresh = compiler.assign_stat_slots([5, 3, 9], {})
    assert slots == {3: 1, 5: 2, 9: 3} and fresh == [1, 2, 3]
    # 5 goes, 7 comes: 3 and 9 keep theirs, 7 takes the freed slot and starts from zero.
    slots, fresh = compiler.assign_stat_slots([3, 9, 7], slots)
    assert slots == {3: 1, 9: 3, 7: 2} and fresh == [2]
    slots, fresh = compiler.assign_stat_slots([1, 2, 3], {}, capacity=3)
    assert slots == {1: 1, 2: 2, 3: 0} and fresh == [1, 2]      # slot 0 counts nothing
    cls = compiler.compile_rules("blue", [rule(id=4)], {}, 8)
    (k, v), = cls.rule_items(10, 1, {4: 7})
    assert abi.Rule.from_buffer_copy(v).stat == 7


def test_whole_classifier_items_are_the_entries_one_by_one():
    """rule_items (a whole write, packed inline for speed) writes each entry exactly as
    entry_item (a one-rule change) does: keys, ranks, actions, counter slots, buckets."""
    rules = [rule(id=4, src="10.0.0.0/8", proto="tcp", dport="20-30"),
             rule(id=5, dst="fd00::/64", proto="udp", action="deny", priority=9),
             rule(id=6, proto="icmp", icmp_type=8, in_port="p1"),
             rule(id=7, src="10.1.0.0/16", rate="100pps")]
    cls = compiler.compile_rules("blue", rules, {"p1": 3}, 8)
    stat = {4: 7, 6: 9}
    whole = dict(cls.rule_items(10, 5, stat))
    one = dict(cls.entry_item(mask, key, 10, 5, stat)
               for mask, ents in cls.by_mask.items() for key in ents)
    assert whole == one and len(whole) == cls.size > len(rules)
    values = [abi.Rule.from_buffer_copy(v) for v in whole.values()]
    assert {(v.stat, v.policer != 0) for v in values} >= {(7, False), (9, False), (0, True)}


def test_rule_by_rule_changes_hold_what_a_fresh_compile_holds():
    """A classifier changed one rule at a time (adds, removes, replacements, rules whose
    entries coincide) holds, mask for mask and entry for entry, what compiling the final
    rules from scratch holds; only the key index a mask carries may differ."""
    rng = random.Random(7)
    slots = {"p1": 1, "p2": 2}
    cls = compiler.Classifier()
    live = {}
    for step in range(600):
        if live and rng.random() < 0.45:
            rid = rng.choice(sorted(live))
            cls.remove_rule(live.pop(rid), slots)
            if rng.random() < 0.5:          # replaced: the same id, another rule
                r = random_rules(rng, 1)[0]
                live[rid] = r = model.replace(r, id=rid)
                cls.add_rule(r, slots)
        else:
            rid = max(live, default=0) + 1
            live[rid] = r = model.replace(random_rules(rng, 1)[0], id=rid)
            cls.add_rule(r, slots)
        assert len(set(cls.key_idx.values())) == len(cls.key_idx)
    want = compiler.compile_rules("blue", list(live.values()), slots, 10_000)

    def view(c):
        return c.masks, {(m,) + k: v for m, ents in c.by_mask.items() for k, v in ents.items()}
    assert view(cls) == view(want)
    assert cls.size == want.size and len(live) > 50
