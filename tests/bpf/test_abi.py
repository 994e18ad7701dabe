"""agent/abi.py against the C: every map's key and value layout as BCC builds it from
bpf/xf_structs.h (names, order, offsets, sizes, nested), every shared constant against
bpf/xf_consts.h, and each loaded map's type and sizes against abi.map_spec."""
from __future__ import annotations

import ctypes as ct
import re
from pathlib import Path

import pytest

from agent import abi, config
from agent.datapath import BPF_DIR, DEFAULT_DEFINES

pytestmark = pytest.mark.bpf

CONSTS_H = Path(BPF_DIR) / "xf_consts.h"
# Defines of the C alone: parser bounds and the fragment state of a packet.
C_ONLY = {"XF_MAX_VLAN_DEPTH", "XF_MAX_IPV6_EXT", "XF_MAX_IPV6_EXT_BYTES", "XF_FRAG_NONE", "XF_FRAG_FIRST",
          "XF_FRAG_LATER",
          "XF_BUILD_ID"}   # a -D build setting that only tells builds apart


def layout(t):
    """A comparable description of a ctypes type: structs by (name, offset, type) of their
    fields (BCC's explicit __pad fields left out), arrays by length and element, scalars by
    size and signedness."""
    if hasattr(t, "_fields_"):
        fields = [(name, getattr(t, name).offset, layout(ft)) for name, ft, *_ in t._fields_
                  if not name.startswith("__pad")]
        return ("struct", ct.sizeof(t), fields)
    if hasattr(t, "_length_"):
        return ("array", ct.sizeof(t), t._length_, layout(t._type_))
    return ("scalar", ct.sizeof(t), t._type_.islower())


def first_difference(a, b, path="") -> str:
    if a[0] != b[0] or a[1] != b[1]:
        return f"{path or 'type'}: {a[:2]} vs {b[:2]}"
    if a[0] == "struct":
        na, nb = [f[0] for f in a[2]], [f[0] for f in b[2]]
        if na != nb:
            return f"{path or 'struct'}: fields {na} vs {nb}"
        for (n, oa, ta), (_, ob, tb) in zip(a[2], b[2]):
            if oa != ob:
                return f"{path}.{n}: offset {oa} vs {ob}"
            d = first_difference(ta, tb, f"{path}.{n}")
            if d:
                return d
    elif a[0] == "array":
        if a[2] != b[2]:
            return f"{path}: length {a[2]} vs {b[2]}"
        return first_difference(a[3], b[3], f"{path}[]")
    elif a != b:
        return f"{path}: {a} vs {b}"
    return ""


def assert_same_layout(mirror, bcc, what):
    a, b = layout(mirror), layout(bcc)
    assert a == b, f"{what}: abi mirror differs from the C: {first_difference(a, b)}"


def bcc_types(table):
    """(key type, single-CPU value type) of a BCC table."""
    return table.Key, getattr(table, "sLeaf", table.Leaf)


def mirror_types(name, dp):
    _, k, v, _ = abi.MAPS[name]
    if v is None:
        v = abi.mask_set_type(dp.max_masks)
    return k, v


@pytest.mark.parametrize("name", list(abi.MAPS))
def test_map_key_and_value_layout(dp, bcc_build, name):
    key, value = bcc_types(bcc_build[False][name.encode()])
    mk, mv = mirror_types(name, dp)
    assert_same_layout(mk, key, f"{name} key")
    assert_same_layout(mv, value, f"{name} value")


@pytest.mark.parametrize("name", list(abi.MAPS))
def test_loaded_map_matches_spec(dp, name):
    m = dp.maps[name]
    assert (m.type, m.key_size, m.value_size, m.max_entries) == abi.map_spec(name, dp.defines)


def test_mask_set_follows_max_masks(dp):
    assert dp.max_masks == abi.DEFAULT_MAX_MASKS
    ms = abi.mask_set_type(dp.max_masks)
    assert ms.masks.size == ct.sizeof(abi.Mask) * dp.max_masks
    assert abi.mask_set_type(8) is abi.mask_set_type(8)
    assert ct.sizeof(abi.mask_set_type(8)) == 8 + 8 * ct.sizeof(abi.Mask)


def test_trace_record_layout(bcc_build):
    _, leaf = bcc_types(bcc_build[True][b"xf_trace_rec"])
    assert_same_layout(abi.Trace, leaf, "xf_trace_rec value")


def test_flow_entry_fits_two_cache_lines_budget():
    assert ct.sizeof(abi.FlowKey) + ct.sizeof(abi.Flow) <= 128
    # 64 bytes until port security: the source MAC a flow's packets carry (6) and padding;
    # 88 with the overlay's outer headers (16).
    assert ct.sizeof(abi.Flow) == 88


# --- constants ------------------------------------------------------------------------

def header_defines():
    out = {}
    for line in CONSTS_H.read_text().splitlines():
        m = re.match(r"\s*#\s*define\s+(XF_\w+)\s+(\S+)", line)
        if m:
            try:
                out[m.group(1)] = int(m.group(2), 0)
            except ValueError:
                pass          # strings (XF_PIN_DIR) and expressions
    return out


def test_constants_match_header():
    h = header_defines()
    missing = sorted(set(abi.CONSTANTS) - set(h))
    assert not missing, f"abi.CONSTANTS names no #define: {missing}"
    wrong = {n: (v, h[n]) for n, v in abi.CONSTANTS.items() if h[n] != v}
    assert not wrong, f"abi value vs header value: {wrong}"


def test_every_shared_header_constant_is_mirrored():
    h = header_defines()
    unmirrored = set(h) - set(abi.CONSTANTS) - set(DEFAULT_DEFINES) - C_ONLY
    assert not unmirrored, f"defines with no mirror in abi.CONSTANTS: {sorted(unmirrored)}"


def test_reasons_cover_exactly_the_reason_defines():
    h = header_defines()
    defined = {n: v for n, v in h.items() if n.startswith("XF_R_")
               and n not in ("XF_R_MAX", "XF_R_ROWS")}
    mirrored = {"XF_R_" + name.upper(): rid for rid, name in abi.REASONS.items()}
    assert mirrored == defined
    assert abi.R_MAX == h["XF_R_MAX"] == max(defined.values()) + 1
    assert abi.R_MAX <= abi.R_ROWS
    assert {abi.REASON_IDS[r] for r in abi.EVENT_REASONS} <= set(abi.REASONS)


def test_verdicts_cover_exactly_the_verdict_defines():
    h = header_defines()
    defined = {v: n[len("XF_V_"):].lower() for n, v in h.items()
               if n.startswith("XF_V_") and n != "XF_V_MAX"}
    assert abi.VERDICTS == defined
    assert abi.V_MAX == h["XF_V_MAX"] == len(defined)


def test_size_defaults_have_one_home():
    # The config's [datapath] defaults are the sizes; the header keeps no copy (it refuses
    # a build without them) and the datapath layer derives its defines from the config.
    h = header_defines()
    assert not set(DEFAULT_DEFINES) & set(h)
    assert "#error" in CONSTS_H.read_text()
    assert DEFAULT_DEFINES == config.Config().datapath_defines()
    assert abi.DEFAULT_MAX_MASKS == DEFAULT_DEFINES["XF_MAX_MASKS"]


def test_stats_index_round_trips():
    for slot, verdict, reason in ((0, 0, 0), (1, abi.V_DROP, 5), (63, abi.V_TX, abi.R_MAX - 1)):
        i = abi.stats_index(slot, verdict, reason)
        assert abi.stats_row(i) == (slot, verdict, reason)
