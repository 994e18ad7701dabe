"""The two-node lab file (netns_lab/labs/overlay.toml) and the pure parts of its rendering
(netns_lab/nodes.py): each node's derived state, the kernel path's overlay routes and
underlay VTEP/VNI filter, a VM that moved, and the overlay scenarios."""
from __future__ import annotations

import copy
import os

import pytest

from netns_lab import compare, labfile, nodes, scenarios
from netns_lab.scenarios import Move

pytestmark = pytest.mark.unit

OVERLAY = os.path.join(os.path.dirname(labfile.DEMO_LAB), "overlay.toml")


@pytest.fixture(scope="module")
def raw():
    from ctl.cli import load_state_file
    return load_state_file(OVERLAY)


@pytest.fixture(scope="module")
def spec(raw):
    return labfile.parse(copy.deepcopy(raw), source="overlay.toml")


def _eps(state, tenant):
    return {e["ip"]: e for e in state["endpoints"] if e["tenant"] == tenant}


def test_each_node_gets_its_vms_local_the_others_remote_and_its_uplink(spec):
    from agent.model import State
    a, b = spec.node_state("a"), spec.node_state("b")
    assert [p["name"] for p in a["ports"]] == ["bvm1", "bvm3", "rvm1", "ula"]
    assert a["ports"][-1] == {"name": "ula", "uplink": True, "local_ip": "192.0.2.1"}
    blue_a, blue_b = _eps(a, "blue"), _eps(b, "blue")
    assert blue_a["10.0.0.1"]["port"] == "bvm1" and "vtep" not in blue_a["10.0.0.1"]
    assert blue_a["10.0.0.2"]["vtep"] == "192.0.2.2" and "port" not in blue_a["10.0.0.2"]
    assert blue_b["10.0.0.1"]["vtep"] == "192.0.2.1" and blue_b["10.0.0.4"]["port"] == "bvm4"
    assert a["rules"] == b["rules"] == spec.apply_dict()["rules"]   # the rules at both ends
    for st in (a, b):
        State.from_dict(st).validate()          # what `xdpflowctl apply` takes


def test_a_moved_vm_changes_both_nodes_and_nothing_else(spec):
    moved = spec.with_vm_on("blue4", "a")
    assert spec.vm("blue4").node == "b" and moved.vm("blue4").node == "a"
    assert _eps(moved.node_state("a"), "blue")["10.0.0.4"]["port"] == "bvm4"
    assert _eps(moved.node_state("b"), "blue")["10.0.0.4"]["vtep"] == "192.0.2.1"
    assert "bvm4" in [p["name"] for p in moved.node_state("a")["ports"]]
    assert "bvm4" not in [p["name"] for p in moved.node_state("b")["ports"]]
    with pytest.raises(KeyError, match="no node named 'c'"):
        spec.with_vm_on("blue4", "c")


def test_kernel_path_routes_remote_endpoints_into_the_vxlan_device(spec):
    lines = nodes.overlay_routes(spec, "a", "blue")
    assert lines == ["route replace 10.0.0.2/32 dev vxblue",
                     "neigh replace 10.0.0.2 lladdr 02:cc:00:00:0a:02 dev vxblue nud permanent",
                     "route replace 10.0.0.4/32 dev vxblue",
                     "neigh replace 10.0.0.4 lladdr 02:cc:00:00:0a:02 dev vxblue nud permanent"]
    local = nodes.local_spec(spec, "a")
    assert [v.name for v in local.vms] == ["blue1", "blue3", "red1"]
    assert all(e.port for e in local.state.endpoints)


def test_the_underlay_accepts_a_vni_only_from_its_tenants_vteps(spec):
    argv, text = nodes.underlay_firewall(spec, "b", "iptables")
    assert argv == ["iptables-restore"]
    accept = [l for l in text.splitlines() if l.endswith("-j ACCEPT")]
    assert accept == [
        '-A INPUT -p udp --dport 4789 -s 192.0.2.1/32 -m u32 --u32 "0>>22&0x3C@12>>8=5010" '
        '-j ACCEPT',
        '-A INPUT -p udp --dport 4789 -s 192.0.2.1/32 -m u32 --u32 "0>>22&0x3C@12>>8=5020" '
        '-j ACCEPT']
    assert text.splitlines()[-2].endswith("-j DROP")
    argv, text = nodes.underlay_firewall(spec, "b", "nftables")
    assert argv == ["nft", "-f", "-"] and text.startswith("flush ruleset")
    assert "udp dport 4789 @th,96,24 5010 ip saddr { 192.0.2.1 } accept" in text
    # Every red VM on node a: node b no longer takes red's VNI from anywhere.
    gone = spec.with_vm_on("red1", "b")
    assert "5020" not in nodes.underlay_firewall(gone, "b", "nftables")[1]


@pytest.mark.parametrize("change, message", [
    (lambda d: d["nodes"].pop(), "needs two nodes"),
    (lambda d: d["nodes"][1].update(local_ip="192.0.2.1"), "must differ"),
    (lambda d: d["nodes"][1].update(local_ip="fd00::1"), "not an IPv4 address"),
    (lambda d: d["nodes"][1].update(name="Bad"), "name 'Bad'"),
    (lambda d: d["nodes"][0].update(extra=1), "exactly the fields name, uplink, local_ip"),
    (lambda d: d["vms"][0].update(node="c"), "node 'c' is not one of [[nodes]]"),
    (lambda d: d["vms"][0].pop("node"), "node None is not one of [[nodes]]"),
    (lambda d: d["vms"][0].update(mtu=100), "mtu 100 must be 1280-9000"),
    (lambda d: d.pop("nodes"), "`node` needs [[nodes]]"),
    (lambda d: d["ports"].append({"name": "ula", "uplink": True, "local_ip": "192.0.2.1"}),
     "uplink ula is derived"),
    (lambda d: d["lab"].update(scenarios="Bad/x"), "[lab] scenarios"),
])
def test_a_bad_two_node_lab_file_is_refused_naming_what_is_wrong(raw, change, message):
    d = copy.deepcopy(raw)
    change(d)
    with pytest.raises(labfile.LabFileError) as e:
        labfile.parse(d, source="overlay.toml")
    assert message in str(e.value) and str(e.value).startswith("overlay.toml: ")


def test_every_overlay_scenario_builds_and_the_sets_stay_apart(spec):
    chosen = scenarios.load(package="overlay")
    assert {s.name for s in chosen} == set(scenarios.names("overlay"))
    assert not set(scenarios.names("overlay")) & {"overlay"} and \
        "overlay" not in scenarios.names()          # a package is a set, not a scenario
    for sc in chosen:
        for i, s in enumerate(sc.sends):
            frames = compare.build_frames(spec, sc.name, i, s)
            assert frames and all(isinstance(f, bytes) for f in frames)
    move = next(s for s in chosen if s.name == "move")
    assert [m for m in move.steps if isinstance(m, Move)] == [Move("blue4", "a"),
                                                              Move("blue4", "b")]
    # The underlay sender: node a's uplink MAC and VTEP to node b's.
    from scapy.all import IP, Ether
    under = next(s for s in chosen if s.name == "underlay")
    f = Ether(compare.build_frames(spec, "underlay", 0, under.sends[0])[0])
    assert (f.src, f.dst, f[IP].src, f[IP].dst) == ("02:ee:00:00:00:01", "02:ee:00:00:00:02",
                                                     "192.0.2.1", "192.0.2.2")
    with pytest.raises(ValueError, match="unknown scenario set 'nope'"):
        scenarios.load(package="nope")


def test_a_one_node_lab_has_no_underlay_sender_and_cannot_move(raw):
    from netns_lab import topology
    demo = labfile.load(labfile.DEMO_LAB)
    assert topology.topology_for(demo) is topology.Topology
    with pytest.raises(compare.ScenarioError, match="no VM named 'a.uplink'"):
        compare.build_frames(demo, "x", 0, scenarios.Send("a.uplink", "Ether()"))
    with pytest.raises(topology.LabError, match="cannot move"):
        topology.Topology(demo).change("offload", Move("blue1", "b"))
    assert topology.topology_for(labfile.load(OVERLAY)) is nodes.Nodes
