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


# -- warm starts: the pinned program adopted, nothing compiled -------------------------------

def test_warm_start_adopts_the_pinned_program_and_compiles_nothing(pins, monkeypatch):
    a, _ = load(pins)
    assert a.how == "compiled"
    a.maps["xf_flows"].update_many(flow_items(20))
    prog_id = bpfsys.prog_info_id(a.prog_fd)
    ring_id = bpfsys.map_info(a.monitor_maps()[0]).id
    a.close()
    import bcc
    compiles = []
    real = bcc.BPF
    monkeypatch.setattr(bcc, "BPF", lambda *x, **kw: compiles.append(kw) or real(*x, **kw))
    b, report = load(pins)
    try:
        assert compiles == []
        assert b.how == "adopted" and set(actions(report).values()) == {"reuse"}
        assert bpfsys.prog_info_id(b.prog_fd) == prog_id
        assert dict(b.maps["xf_flows"].items()) == dict(flow_items(20))
        # The program's own (unpinned) maps are found again: the monitor reads its ring.
        ring_fd, switch, cpu = b.monitor_maps()
        assert bpfsys.map_info(ring_fd).id == ring_id
        assert switch.name == "xf_mon" and cpu.name == "xf_mon_cpu"
        # And it runs packets on the pinned maps.
        rc, _, _ = b.run(bytes(60), ifindex=0)
        assert rc in (1, 2)      # XDP_DROP / XDP_PASS: a frame of zeros, no port
        # The trace build is compiled only when asked.
        assert b.trace_fd < 0 and compiles == []
    finally:
        b.close()


def test_changed_flags_or_sizes_compile_and_the_next_start_adopts_that_build(pins, monkeypatch):
    a, _ = load(pins)
    old = a.build_id()
    a.close()
    monkeypatch.setenv("XDPFLOW_CFLAGS", "-DXF_BUILD_ID=2")     # an upgrade
    b, report = load(pins)
    try:
        assert b.how == "compiled" and b.build_id() != old
        assert set(actions(report).values()) == {"reuse"}       # the maps stay
    finally:
        b.close()
    c, _ = load(pins)
    try:
        assert c.how == "adopted" and c.build_id() == b.build_id()
    finally:
        c.close()
    d, report = load(pins, XF_FLOW_TABLE_SIZE=8192)              # a size change
    try:
        assert d.how == "compiled" and actions(report)["xf_flows"] == "migrate"
    finally:
        d.close()


def test_changed_source_compiles(pins, monkeypatch, tmp_path):
    from agent import datapath
    a, _ = load(pins)
    a.close()
    extra = tmp_path / "xf_new.h"
    extra.write_text("/* a new header */\n")
    real = datapath.source_files
    monkeypatch.setattr(datapath, "source_files", lambda: real() + [extra])
    b, _ = load(pins)
    try:
        assert b.how == "compiled"
        # An edit changes the build id as an added file does.
        before = b.build_id()
        extra.write_text("/* the header, edited */\n")
        assert b.build_id() != before
    finally:
        b.close()


def test_meta_naming_no_build_is_not_adopted(pins):
    """A crash while the program pin changes leaves build id 0: the next start compiles."""
    a, _ = load(pins)
    a.maps["xf_meta"].put(bytes(ct.c_uint32(0)), bytes(abi.Meta(
        abi_version=abi.ABI_VERSION, layout_hash=a._combined_layout(), build_id=0)))
    a.close()
    b, _ = load(pins)
    try:
        assert b.how == "compiled"
    finally:
        b.close()


def test_a_pinned_program_on_other_maps_is_not_adopted(pins, caplog):
    """Someone pins another datapath's program in our dir (its maps are not ours): it is
    refused, and compiled over."""
    other_dir = pin_dir()
    a, _ = load(pins)
    a.close()
    o, _ = load(other_dir)
    try:
        os.unlink(f"{pins}/xf_prog")
        bpfsys.obj_pin(o.prog_fd, f"{pins}/xf_prog")
        foreign = bpfsys.prog_info_id(o.prog_fd)
    finally:
        o.close()
        Datapath(other_dir).unpin()
    b, _ = load(pins)
    try:
        assert b.how == "compiled" and bpfsys.prog_info_id(b.prog_fd) != foreign
        assert "not adopted" in caplog.text and "is not the pinned one" in caplog.text
    finally:
        b.close()
    c, _ = load(pins)
    try:
        assert c.how == "adopted" and bpfsys.prog_info_id(c.prog_fd) != foreign
    finally:
        c.close()
