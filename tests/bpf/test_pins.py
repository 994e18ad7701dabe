"""Pinned maps across loads: a restarted agent reuses maps whose layout matches (flows
intact), migrates a map that only changed size (entries copied), and rebuilds one whose
layout changed (saying so) — BPF_TABLE_PINNED alone would reuse any of them blindly."""
import ctypes as ct
import os

import pytest

from agent import abi, bpfsys
from agent.datapath import Datapath

from .conftest import pin_dir

pytestmark = pytest.mark.bpf

SIZES = {"XF_FLOW_TABLE_SIZE": 4096, "XF_MAX_RULE_ENTRIES": 1024, "XF_MAX_ENDPOINTS": 256,
         "XF_MAX_ROUTES": 256, "XF_MAX_PORTS": 16}


def flow_items(n):
    out = []
    for i in range(n):
        k = abi.FlowKey(tenant=7, proto=17, sport=1000 + i, dport=53)
        f = abi.Flow(packets=i + 1, bytes=100 * (i + 1), generation=1, verdict=abi.V_PASS)
        out.append((bytes(k), bytes(f)))
    return out


def actions(report):
    return {s.name: s.action for s in report}


@pytest.fixture
def pins():
    path = pin_dir()
    yield path
    Datapath(path).unpin()


def load(path, **override):
    d = Datapath(path, {**SIZES, **override})
    report = d.load()
    return d, report


def test_second_load_reuses_every_map_and_keeps_flows(pins):
    a, report = load(pins)
    assert set(actions(report).values()) == {"create"}
    a.maps["xf_flows"].update_many(flow_items(50))
    a.close()
    b, report = load(pins)
    try:
        assert set(actions(report).values()) == {"reuse"}
        assert dict(b.maps["xf_flows"].items()) == dict(flow_items(50))
    finally:
        b.close()


def test_resized_flow_table_is_migrated_with_its_entries(pins):
    a, _ = load(pins)
    a.maps["xf_flows"].update_many(flow_items(300))
    old_id = a.maps["xf_flows"].id
    a.close()
    b, report = load(pins, XF_FLOW_TABLE_SIZE=8192)
    try:
        st = {s.name: s for s in report}
        assert st["xf_flows"].action == "migrate"
        assert "4096 -> 8192" in st["xf_flows"].detail and "300 entries copied" in st["xf_flows"].detail
        assert st["xf_tenants"].action == "reuse"
        assert b.maps["xf_flows"].max_entries == 8192 and b.maps["xf_flows"].id != old_id
        assert dict(b.maps["xf_flows"].items()) == dict(flow_items(300))
    finally:
        b.close()


def test_shrunk_flow_table_keeps_what_fits_and_says_so(pins):
    a, _ = load(pins, XF_FLOW_TABLE_SIZE=2048)
    a.maps["xf_flows"].update_many(flow_items(1500))
    a.close()
    b, report = load(pins, XF_FLOW_TABLE_SIZE=1024)
    try:
        detail = {s.name: s.detail for s in report}["xf_flows"]
        assert "1024 entries copied, 476 did not fit" in detail
        assert b.maps["xf_flows"].count() == 1024
    finally:
        b.close()


def test_changed_layout_fingerprint_rebuilds_and_drops_flows(pins):
    a, _ = load(pins)
    a.maps["xf_flows"].update_many(flow_items(10))
    meta = abi.Meta(abi_version=abi.ABI_VERSION, layout_hash=12345)   # "an older layout"
    a.maps["xf_meta"].put(bytes(ct.c_uint32(0)), bytes(meta))
    a.close()
    b, report = load(pins)
    try:
        st = {s.name: s for s in report}
        assert st["xf_flows"].action == "rebuild"
        assert "dropped" in st["xf_flows"].detail
        assert b.maps["xf_flows"].count() == 0
        # and the new fingerprint is written: the next load reuses
    finally:
        b.close()
    c, report = load(pins)
    try:
        assert set(actions(report).values()) == {"reuse"}
    finally:
        c.close()


def test_pinned_map_of_another_shape_is_rebuilt_naming_the_sizes(pins):
    a, _ = load(pins)
    a.close()
    path = f"{pins}/xf_flows"
    os.unlink(path)
    lib = bpfsys._lib
    lib.bpf_map_create.argtypes = [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32,
                                   ct.c_uint32, ct.c_void_p]
    fd = lib.bpf_map_create(1, b"impostor", 8, 8, 16, None)
    assert fd >= 0
    assert lib.bpf_obj_pin(fd, path.encode()) == 0
    os.close(fd)
    b, report = load(pins)
    try:
        st = {s.name: s for s in report}
        assert st["xf_flows"].action == "rebuild"
        assert "8/8" in st["xf_flows"].detail
        spec = abi.map_spec("xf_flows", {**SIZES})
        assert (b.maps["xf_flows"].key_size, b.maps["xf_flows"].value_size) == spec[1:3]
    finally:
        b.close()
