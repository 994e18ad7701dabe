"""The tuple-space search through the real program: masks are searched in the order of the
best rank they hold, and the search stops as soon as no remaining mask can beat the match
found (Open vSwitch's priority-sorted subtables). Verdicts must be those of a plain reading
of the rules wherever the winner is: first mask, last mask, ties across masks."""
from __future__ import annotations

import pytest
from scapy.all import raw

from agent import abi

from .cases import BLUE, XDP_DROP, XDP_REDIRECT, blue, rule, udp4

pytestmark = pytest.mark.bpf


def decide(bench, state, pkt=None):
    """(the rule that decided the packet, XDP action) for a fresh first packet."""
    bench.apply(state)
    before = bench.dp.rule_hits()
    rc, _ = bench.run(raw(pkt or udp4()), "p1")
    after = bench.dp.rule_hits()
    hit = [rid for rid in after if after[rid] != before.get(rid, 0)]
    assert len(hit) <= 1, hit
    return (hit[0] if hit else None), rc


def masks(bench):
    cls_gen = bench.dp.generation(BLUE)
    key = bytes(abi.MaskKey(tenant=BLUE, generation=cls_gen))
    ms = abi.mask_set_type(bench.dp.max_masks).from_buffer_copy(bench.dp.maps["xf_masks"].get(key))
    return key, ms


def lower_matches(first_id=10, priority=50, action="allow"):
    """15 rules of 15 masks (src 10.0.0.0/17 .. /31, udp) that all match 10.0.0.1."""
    return [rule(first_id + i, action=action, priority=priority, proto="udp",
                 src=f"10.0.0.0/{plen}") for i, plen in enumerate(range(17, 32))]


def test_best_match_in_the_first_mask_beats_lower_masks_that_match(bench):
    state = blue([rule(1, action="deny", priority=900, proto="udp", src="10.0.0.1/32")] +
                 lower_matches())
    rid, rc = decide(bench, state)
    assert (rid, rc) == (1, XDP_DROP)
    _, ms = masks(bench)
    assert ms.count == 16 and ms.masks[0].max_rank > ms.masks[1].max_rank


def test_best_match_in_the_last_mask_is_found(bench):
    # Higher-priority masks that do not match this packet come first (172.16/17.. /31);
    # the only match is the lowest-priority rule, in the last mask.
    rules = [rule(20 + i, action="deny", priority=900 - i, proto="udp",
                  src=f"172.16.0.0/{plen}") for i, plen in enumerate(range(17, 32))]
    rules.append(rule(3, priority=1, proto="udp", dport=5000))
    rid, rc = decide(bench, blue(rules))
    assert (rid, rc) == (3, XDP_REDIRECT)
    _, ms = masks(bench)
    assert ms.count == 16 and ms.masks[15].max_rank == min(m.max_rank for m in
                                                           ms.masks[:ms.count])


@pytest.mark.parametrize("ids", [(3, 5), (5, 3)])
def test_a_tie_across_masks_goes_to_the_lower_id(bench, ids):
    a, b = ids
    state = blue([rule(a, action="deny", proto="udp", src="10.0.0.0/24"),
                  rule(b, action="allow", proto="udp", dst="10.0.0.2/32")] + lower_matches())
    rid, rc = decide(bench, state)
    assert rid == 3 and rc == (XDP_DROP if a == 3 else XDP_REDIRECT)


def test_a_port_range_rule_in_many_masks_beats_a_lower_rule_after_them(bench):
    # 5000-5007 is one /13 prefix; 4990-5010 spans several masks, each holding rank of 7.
    state = blue([rule(7, action="deny", priority=200, proto="udp", dport="4990-5010"),
                  rule(8, priority=100, proto="udp", dport=5000)] + lower_matches())
    assert decide(bench, state) == (7, XDP_DROP)


def test_the_search_stops_at_a_mask_that_cannot_win(bench):
    """White box: mask 1 says its best rank is that of the match found in mask 0, but (by
    hand) holds an entry that would win. The program trusts max_rank and never looks."""
    state = blue([rule(1, action="deny", priority=900, proto="udp", src="10.0.0.1/32"),
                  rule(2, action="allow", priority=50, proto="udp", src="10.0.0.0/24")])
    assert decide(bench, state) == (1, XDP_DROP)
    key, ms = masks(bench)
    ms_was = bytes(ms)
    rules = bench.dp.maps["xf_rules"]
    (k2, v2), = [(k, v) for k, v in rules.items()
                 if abi.Rule.from_buffer_copy(v).rule_id == 2 and
                 abi.RuleKey.from_buffer_copy(k).tenant == BLUE]
    r2 = abi.Rule.from_buffer_copy(v2)
    try:
        top = ms.masks[0].max_rank                       # rule 1's (64-bit) rank
        r2.rank = top + 1                                # would beat rule 1 if seen
        rules.put(k2, bytes(r2))
        ms.masks[1].max_rank = ms.masks[0].max_rank      # "nothing here beats mask 0's best"
        bench.dp.maps["xf_masks"].put(key, bytes(ms))
        bench.dp.flush_flows()
        rc, _ = bench.run(raw(udp4()), "p1")
        assert rc == XDP_DROP, "mask 1 was searched although it could not win"
        ms.masks[1].max_rank = top + 1                   # now it can: it is searched
        bench.dp.maps["xf_masks"].put(key, bytes(ms))
        rc, _ = bench.run(raw(udp4()), "p1")
        assert rc == XDP_REDIRECT
    finally:      # as the datapath's mirror says they are
        rules.put(k2, v2)
        bench.dp.maps["xf_masks"].put(key, ms_was)
        bench.dp.flush_flows()
