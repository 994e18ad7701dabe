"""The kernel-path renderer (netns_lab/render.py), the lab file (netns_lab/labfile.py) and
the pure parts of the comparison (netns_lab/compare.py): their output, checked as text."""
from __future__ import annotations

import copy
import struct

import pytest

from agent.model import replace
from netns_lab import compare, labfile, render, scenarios
from netns_lab.scenarios import Expect, Send

pytestmark = pytest.mark.unit


def _rules_of(text: str, chain: str):
    return [l for l in text.splitlines() if l.startswith(f"-A {chain} ")]


# -- the lab file -----------------------------------------------------------------------

def test_vms_take_addresses_and_mac_from_their_ports_endpoints(spec):
    blue1 = spec.vm("blue1")
    assert blue1.addrs == ("10.0.0.1", "fd00::1") and blue1.mac == "02:00:00:00:00:01"
    assert blue1.tenant == "blue" and blue1.ip6 == "fd00::1"
    assert spec.vm("blue3").ip6 is None
    # Same addresses and MAC in red, different gateway MACs.
    red1 = spec.vm("red1")
    assert (red1.addrs, red1.mac) == (blue1.addrs, blue1.mac)
    assert len({v.port_mac for v in spec.vms}) == len(spec.vms)


def test_the_apply_part_is_the_state_without_lab_or_vms(spec):
    d = spec.apply_dict()
    assert set(d) == {"tenants", "ports", "endpoints", "routes", "rules", "fips", "snats"}
    assert all(None not in r.values() for r in d["rules"])


@pytest.mark.parametrize("change, message", [
    (lambda d: d["lab"].update(prefix="Bad-Prefix"), "lab prefix"),
    (lambda d: d["lab"].update(prefix="waytoolongprefix"), "lab prefix"),
    (lambda d: d.update(vms=[]), "at least one [[vms]]"),
    (lambda d: d["vms"].append({"name": "x1", "port": "nope"}), "unknown port 'nope'"),
    (lambda d: d["vms"].append({"name": "blue1", "port": "bvm2"}), "defined twice"),
    (lambda d: d["vms"].append({"name": "dup", "port": "bvm1"}), "already has a VM"),
    (lambda d: d["vms"][0].update(ip="1.2.3.4"), "exactly the fields"),
    (lambda d: d.update(extra={}), "unknown section"),
    (lambda d: d["rules"][0].update(priority="high"), "rule 1: priority"),
    (lambda d: d["endpoints"].append({"tenant": "blue", "ip": "10.0.0.7", "port": "bvm1",
                                      "mac": "02:00:00:00:00:77"}), "different MACs"),
])
def test_a_bad_lab_file_is_refused_naming_what_is_wrong(raw, change, message):
    d = copy.deepcopy(raw)
    change(d)
    with pytest.raises(labfile.LabFileError) as e:
        labfile.parse(d, source="lab.toml")
    assert message in str(e.value) and str(e.value).startswith("lab.toml: ")


def test_a_port_without_endpoint_has_no_vm(raw):
    d = copy.deepcopy(raw)
    d["ports"].append({"name": "bvm9", "tenant": "blue"})
    d["vms"].append({"name": "blue9", "port": "bvm9"})
    with pytest.raises(labfile.LabFileError, match="port bvm9 has no endpoint"):
        labfile.parse(d)


# -- the router namespace -----------------------------------------------------------------

def test_iptables_walks_the_rules_in_the_datapaths_order(spec):
    text = render.iptables(spec, "blue", 4, "drop")
    rules = _rules_of(text, "xf-sg-blue")
    ids = [int(l.split('"rule ')[1].split(":")[0]) for l in rules]
    # priority 400 (8), 300 (4), 200 (3), 160 (10), 150 (5, 6: lower id first), 100 (1, 7)
    assert ids == [8, 4, 3, 10, 5, 6, 1, 7, 9]
    assert "-p tcp --dport 5050 " in rules[1] and rules[1].endswith("-j DROP")
    assert "-p tcp --dport 5000:5099 " in rules[2] and rules[2].endswith("-j ACCEPT")
    assert "-p udp --dport 7700 " in rules[3] and rules[3].endswith("-j ACCEPT")
    assert "-s 10.0.0.1/32 -p udp --dport 7000:7999" in rules[4]
    assert "-s 10.0.0.2/32 -d 10.0.0.3/32 " in rules[0] and "-p" not in rules[0]
    assert rules[-1].startswith("-A xf-sg-blue -i bvm2 -p tcp --dport 9000 ")


def test_iptables_state_first_then_rules_then_default_drop(spec):
    text = render.iptables(spec, "blue", 4, "drop")
    fwd = [l for l in text.splitlines() if l.startswith("-A FORWARD")]
    # Rate limits first (established packets are charged too), then conntrack's shortcut.
    assert fwd[0] == "-A FORWARD -j xf-rl-blue"
    assert "--ctstate ESTABLISHED,RELATED -j ACCEPT" in fwd[1]
    assert fwd[2] == "-A FORWARD -j xf-sg-blue"
    assert fwd[-1].endswith("-j DROP")
    assert ":FORWARD DROP [0:0]" in text and ":INPUT DROP [0:0]" in text
    assert text.count("COMMIT") == 2


def test_each_family_gets_only_its_rules(spec):
    v4 = "\n".join(_rules_of(render.iptables(spec, "blue", 4, "drop"), "xf-sg-blue"))
    v6 = "\n".join(_rules_of(render.iptables(spec, "blue", 6, "drop"), "xf-sg-blue"))
    assert "rule 1:" in v4 and "rule 1:" not in v6          # icmp, 10.0.0.0/24
    assert "rule 2:" in v6 and "rule 2:" not in v4          # icmpv6, fd00::/64
    assert "-p ipv6-icmp" in v6 and "-p icmp " in v4
    for rid in (3, 4, 6):                                    # no address: both families
        assert f"rule {rid}:" in v4 and f"rule {rid}:" in v6
    assert "rule 7:" not in v6 and "rule 8:" not in v6


def test_anti_spoofing_per_vm_port_and_expiring_ttl_in_raw(spec):
    v4 = render.iptables(spec, "blue", 4, "drop")
    raw4 = v4.split("*filter")[0]
    assert "-A PREROUTING -m ttl --ttl-lt 2" in raw4
    assert "-A xf-ports -i bvm1 -m mac ! --mac-source 02:00:00:00:00:01" in raw4
    assert "-A xf-ports -i bvm1 -s 10.0.0.1/32 -j RETURN" in raw4
    assert "-A xf-ports -i bvm2 -s 10.0.0.1/32" not in raw4
    assert "-A xf-ports -i bvm3 -s 192.168.50.0/24 -j RETURN" in raw4   # its `allow`
    assert "rvm1" not in v4                                  # another tenant's router
    v6 = render.iptables(spec, "blue", 6, "drop")
    assert "-m hl --hl-lt 2" in v6
    assert "-A xf-ports -i bvm1 -s fe80::/64 -j RETURN" in v6
    assert "--icmpv6-type 135 -m hl --hl-eq 255 -j ACCEPT" in v6


def test_routes_neighbours_and_proxies(spec):
    s = render.router_setup(spec, "blue", "iptables")
    b = s.ip_batch
    assert "route add 10.0.0.2/32 dev bvm2" in b
    assert "neigh replace 10.0.0.2 lladdr 02:00:00:00:00:02 dev bvm2 nud permanent" in b
    assert "route add 192.168.50.0/24 via 10.0.0.3 dev bvm3" in b
    assert "neigh add proxy fd00::2 dev bvm1" in b and "neigh add proxy fd00::2 dev bvm2" not in b
    assert b[-2:] == ["route add blackhole default", "route add blackhole ::/0"]
    assert ("net.ipv4.conf.bvm1.proxy_arp", "1") in s.late_sysctls
    assert ("net.ipv4.neigh.bvm1.proxy_delay", "0") in s.late_sysctls
    assert ("net.ipv4.ip_forward", "1") in s.sysctls
    assert s.name == "xfdemo-i-rblue"
    assert [a for a, _ in s.firewall] == [["iptables-restore"], ["ip6tables-restore"],
                                          ["arptables-restore"]]
    arp = s.firewall[2][1]
    assert "-A INPUT -i bvm1 ! --source-mac 02:00:00:00:00:01 -j DROP" in arp
    assert arp.index("-i bvm1 -s 10.0.0.1/32 -j ACCEPT") < arp.index("-A INPUT -i bvm1 -j DROP")
    assert "-i bvm1 -s 0.0.0.0/32 -j ACCEPT" in arp          # a probe claims no address


def test_nftables_variant_sets_and_one_chain_per_tenant(spec):
    s = render.router_setup(spec, "blue", "nftables")
    assert [a for a, _ in s.firewall] == [["nft", "-f", "-"]]
    text = s.firewall[0][1]
    assert text.count("table inet xdpflow") == 1 and "chain sg_blue {" in text
    assert 'set vm_src4 { type ifname . ether_addr . ipv4_addr; flags interval; elements = ' \
           '{ "bvm1" . 02:00:00:00:00:01 . 10.0.0.1/32' in text
    assert "iifname . ether saddr . ip saddr != @vm_src4 drop" in text
    assert "ct state established,related accept" in text
    body = text.split("chain sg_blue {")[1].split("\n  }")[0].splitlines()
    ids = [int(l.split('"rule ')[1].split(":")[0]) for l in body if '"rule ' in l]
    assert ids == [8, 4, 4, 3, 3, 10, 10, 5, 6, 6, 1, 2, 7, 9, 9]   # both families: 4, 3, 10, 6, 9
    assert any('iifname "bvm2" meta nfproto ipv4 meta l4proto tcp tcp dport 9000' in l
               for l in body)
    assert any("tcp dport 5000-5099 counter accept" in l for l in body)
    assert body[-1].strip().startswith("counter drop")
    assert "red" not in text.replace("rule ", "")
    assert "table arp xdpflow" in text
    assert "iifname . arp saddr ether . arp saddr ip != @vm_arp drop" in text


def test_rules_the_kernel_cannot_route_become_blackholes_and_unknown_variant(spec):
    with pytest.raises(render.RenderError, match="unknown kernel variant"):
        render.router_setup(spec, "blue", "ebtables")
    st = copy.deepcopy(spec)
    from agent.model import Route
    import ipaddress
    st.state.routes.append(Route("blue", ipaddress.ip_network("10.9.0.0/16"), "drop"))
    assert "route add blackhole 10.9.0.0/16" in render.router_setup(st, "blue", "iptables").ip_batch


def test_vm_setup_is_the_same_on_every_path_but_its_name(spec):
    vm = spec.vm("blue1")
    a, b = render.vm_setup(spec, vm, "offload"), render.vm_setup(spec, vm, "nftables")
    assert (a.name, b.name) == ("xfdemo-o-blue1", "xfdemo-n-blue1")
    assert a.ip_batch == b.ip_batch and a.sysctls == b.sysctls
    assert "addr add fd00::1/64 dev eth0 nodad" in a.ip_batch
    assert "neigh replace 10.0.0.2 lladdr 02:aa:00:0a:00:01 dev eth0 nud permanent" in a.ip_batch
    assert not any("10.0.0.1 " in l and "neigh" in l for l in a.ip_batch)   # not itself
    assert "route add 192.168.50.0/24 via 10.0.0.3 dev eth0" in a.ip_batch
    assert not any("192.168.50.0/24" in l for l in render.vm_setup(
        spec, spec.vm("blue3"), "offload").ip_batch)                        # its own route
    assert not any("192.168.50.0/24" in l for l in render.vm_setup(
        spec, spec.vm("red1"), "offload").ip_batch)                         # blue's route
    assert ("net.ipv4.icmp_ratelimit", "0") in a.sysctls


def _with_port(spec, name, **fields):
    """The spec with one port given port-security fields (the model may not have them)."""
    import types
    st = copy.deepcopy(spec)
    st.state.ports = [types.SimpleNamespace(**{**p.to_dict(), **fields}) if p.name == name
                      else p for p in st.state.ports]
    return st


def test_allowed_prefixes_and_ports_without_security(spec):
    import ipaddress
    st = _with_port(spec, "bvm1", allow=(ipaddress.ip_network("192.168.7.0/24"),
                                         ipaddress.ip_network("fd00:7::/64")))
    v4 = render.iptables(st, "blue", 4, "drop")
    assert "-A xf-ports -i bvm1 -s 192.168.7.0/24 -j RETURN" in v4
    assert "fd00:7::/64" in render.iptables(st, "blue", 6, "drop")
    nft = render.nftables(st, "blue", "drop")
    assert '"bvm1" . 02:00:00:00:00:01 . 192.168.7.0/24' in nft
    off = _with_port(spec, "bvm2", port_security=False)
    v4 = render.iptables(off, "blue", 4, "drop")
    assert "-i bvm2" not in v4.split("*filter")[0] and "-i bvm1 -m mac" in v4
    nft = render.nftables(off, "blue", "drop")
    assert '"bvm2"' not in nft.split("chain prerouting")[0]
    with pytest.raises(render.RenderError, match="port bvm3: allow_vlan"):
        render.router_setup(_with_port(spec, "bvm3", allow_vlan=True), "blue", "iptables")


# -- the comparison's pure parts ------------------------------------------------------------

def _ipv4(ident: int, payload: bytes) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0, 64, 17, 0x1234,
                      bytes(4), bytes(4))
    return b"\x02" * 12 + b"\x08\x00" + hdr + payload


def test_only_kernel_made_frames_lose_their_ipv4_identification():
    sent = [_ipv4(1, b"scenario")]
    assert compare.canonical(_ipv4(1, b"scenario"), sent) == _ipv4(1, b"scenario")
    # A forwarded frame whose identification changed is not masked: it would mismatch.
    assert compare.canonical(_ipv4(7, b"scenario"), sent) == _ipv4(7, b"scenario")
    a, b = compare.canonical(_ipv4(7, b"reply"), sent), compare.canonical(_ipv4(9, b"reply"), sent)
    assert a == b and a != _ipv4(7, b"reply")


def _result(outcome, expect=None, frames=(b"x",)):
    return compare.SendResult("s", 0, Send("blue1", "X()", "w", expect), list(frames), outcome)


def test_outcomes_compare_by_vm_and_bytes_and_expected_differences_need_their_reason():
    same = compare.compare_results([_result([("b", b"1")])], [_result([("b", b"1")])])["s"]
    assert same["matches"] == 1 and not same["mismatches"]
    assert same["per_send"] == [{"index": 0, "from": "blue1", "what": "w", "offload_to": ["b"],
                                 "kernel_to": ["b"], "same_vms": True, "same_bytes": True,
                                 "result": "match"}]
    diff = compare.compare_results([_result([("b", b"1")])], [_result([("b", b"2")])])["s"]
    assert diff["per_send"][0]["same_vms"] and not diff["per_send"][0]["same_bytes"]
    assert diff["mismatches"][0]["why"] == "delivered to the same VMs, different bytes"
    other_vm = compare.compare_results([_result([("b", b"1")])], [_result([("c", b"1")])])["s"]
    assert "delivered to ['b'] (offload) vs ['c'] (kernel)" == other_vm["mismatches"][0]["why"]
    nothing = compare.compare_results([_result([])], [_result([("c", b"1")])])["s"]
    assert "nobody" in nothing["mismatches"][0]["why"]
    exp = Expect("because")
    ok = compare.compare_results([_result([("b", b"1")], exp)], [_result([("b", b"2")], exp)])
    assert ok["s"]["expected"][0]["reason"] == "because" and not ok["s"]["mismatches"]
    wrong = compare.compare_results([_result([("b", b"1")], exp)], [_result([], exp)])["s"]
    assert "expected only the bytes to differ" in wrong["mismatches"][0]["why"]
    stale = compare.compare_results([_result([("b", b"1")], exp)], [_result([("b", b"1")], exp)])
    assert "scenario is out of date" in stale["s"]["mismatches"][0]["why"]


def test_a_vlan_tag_taken_out_by_the_receive_path_is_put_back():
    frame = b"\x02" * 12 + b"\x08\x00" + b"payload"
    aux = struct.pack("=IIIHHHH", compare.TP_STATUS_VLAN_VALID, 0, 0, 0, 0, 100, 0)
    tagged = compare.with_vlan_tag(frame, [(compare.SOL_PACKET, compare.PACKET_AUXDATA, aux)])
    assert tagged == b"\x02" * 12 + b"\x81\x00\x00\x64" + b"\x08\x00" + b"payload"
    plain = struct.pack("=IIIHHHH", 0, 0, 0, 0, 0, 0, 0)
    assert compare.with_vlan_tag(frame, [(263, 8, plain)]) == frame


def test_background_is_only_mld_and_router_solicitation():
    from scapy.layers.inet6 import (ICMPv6EchoRequest, ICMPv6MLReport2, ICMPv6ND_RS, IPv6,
                                    IPv6ExtHdrHopByHop, RouterAlert)
    from scapy.layers.l2 import Ether
    mld = Ether() / IPv6(dst="ff02::16") / IPv6ExtHdrHopByHop(options=[RouterAlert()]) / \
        ICMPv6MLReport2()
    assert compare.is_background(bytes(mld))
    assert compare.is_background(bytes(Ether() / IPv6() / ICMPv6ND_RS()))
    assert not compare.is_background(bytes(Ether() / IPv6() / ICMPv6EchoRequest()))


def test_every_shipped_scenario_builds_and_names_unique_nonces(spec):
    seen = set()
    for sc in scenarios.load():
        assert sc.description and sc.sends
        for i, s in enumerate(sc.sends):
            frames = compare.build_frames(spec, sc.name, i, s)
            assert frames and all(isinstance(f, bytes) for f in frames)
            seen.add(compare.nonce(sc.name, i))
            if s.expect is not None:
                assert len(s.expect.reason) > 30, (sc.name, i)
    assert len(seen) == sum(len(sc.sends) for sc in scenarios.load())
    with pytest.raises(ValueError, match="unknown scenario 'nope'"):
        scenarios.load(["nope"])
    with pytest.raises(compare.ScenarioError, match="no VM named 'ghost'"):
        compare.build_frames(spec, "x", 0, Send("ghost", "Ether()"))
    with pytest.raises(compare.ScenarioError, match="NameError"):
        compare.build_frames(spec, "x", 0, Send("blue1", "Bogus()"))


# -- the lab CLI refuses bad input before it touches anything --------------------------------

@pytest.mark.parametrize("argv, message", [
    (["compare", "--scenario", "nope"], "unknown scenario 'nope'"),
    (["compare", "--exclude", "rules", "--exclude", "nope"], "unknown scenario 'nope'"),
    (["up", "--lab", "/nonexistent/lab.toml"], "cannot read /nonexistent/lab.toml"),
    (["up", "--prefix", "Bad"], "lab prefix 'Bad'"),
    (["down", "--prefix", "x;rm -rf"], "lab prefix 'x;rm -rf'"),
])
def test_lab_cli_bad_input_exits_2_naming_it(argv, message, capsys, monkeypatch):
    from netns_lab import cli, topology
    monkeypatch.setattr(topology, "down", lambda *a, **k: pytest.fail("down was called"))
    monkeypatch.setattr(topology.Topology, "up", lambda *a, **k: pytest.fail("up was called"))
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_lab_cli_bad_toml_names_the_line(tmp_path, capsys):
    from netns_lab import cli
    bad = tmp_path / "lab.toml"
    bad.write_text("[lab]\nprefix = \n")
    assert cli.main(["compare", "--lab", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "line 2" in err


def test_the_speed_frame_is_60_bytes_from_the_vm_to_its_gateway(spec):
    import re
    from netns_lab import speed
    conf = speed.trafgen_config(spec.vm("blue1"), spec.vm("blue2"))
    body = conf.strip()[1:-1]
    body = re.sub(r"csumip\(\d+, \d+\)", "CS, CS", body)
    body = re.sub(r"fill\(0x41, (\d+)\)", lambda m: ", ".join(["F"] * int(m.group(1))), body)
    tokens = [t.strip() for t in body.replace("\n", " ").split(",") if t.strip()]
    assert len(tokens) == 60
    assert tokens[:12] == ["0x02", "0xaa", "0x00", "0x0a", "0x00", "0x01",
                           "0x02", "0x00", "0x00", "0x00", "0x00", "0x01"]
    assert tokens[26:34] == ["10", "0", "0", "1", "10", "0", "0", "2"]
    assert tokens[35] == "drnd(1)" and tokens[36:38] == ["0x1b", "0x61"]   # dport 7009


def test_nft_sets_fold_only_runs_alike_but_for_the_source():
    from agent.model import Rule
    import ipaddress

    def r(id_, src, dport=(9, 9), prio=200, action="allow"):
        return Rule(id=id_, tenant="t", priority=prio, action=action, proto=17, dport=dport,
                    src=ipaddress.ip_network(src))
    rules = [r(2, "10.64.0.1/32"), r(3, "10.64.0.2/32"),
             r(4, "10.64.0.3/32", action="deny"),        # another verdict: ends the run
             r(5, "10.64.0.4/32"), r(6, "10.64.0.5/32", dport=(10, 10)),  # another port
             r(7, "fd00::1/128"), r(8, "fd00::2/128")]
    out = render.nft_rule_runs(rules)
    assert out[0].startswith("ip saddr { 10.64.0.1/32, 10.64.0.2/32 } ") and \
        '"rules 2..3: 2 sources as a set"' in out[0] and out[0].count("accept") == 1
    assert out[1].startswith("ip saddr 10.64.0.3/32 ") and "drop" in out[1]
    assert out[2].startswith("ip saddr 10.64.0.4/32 ") and out[3].startswith("ip saddr 10.64.0.5/32 ")
    assert out[4].startswith("ip6 saddr { fd00::1/128, fd00::2/128 } ")
    assert len(out) == 5
    # unfolded, as the lab's comparison renders it: one statement per rule
    assert len([s for r_ in rules for s in render.nft_rule(r_)]) == 7


def test_nft_sets_is_opt_in(spec):
    t = spec.state.tenants[0].name
    assert render.nftables(spec, t, "drop") == render.nftables(spec, t, "drop", False)
    assert render.router_setup(spec, t, "nftables").firewall == \
        render.router_setup(spec, t, "nftables", nft_sets=False).firewall


def test_a_mismatch_carries_the_datapath_events_of_its_send():
    a = _result([])
    a.events = [{"port": "blue1", "verdict": "drop", "reason": "rule_deny", "rule": 990,
                 "out_port": ""}]
    per = compare.compare_results([a], [_result([("b", b"1")])])
    (m,) = per["s"]["mismatches"]
    assert m["offload_events"] == a.events
    assert compare._events_brief(m["offload_events"]) == "blue1 drop rule_deny rule 990"
    assert compare._events_brief([]) == "no monitor event"


def test_rate_limits_are_charged_before_conntrack_in_the_datapath_order(spec):
    """The kernel path charges what the datapath charges: a reply goes to the tenant's
    limit only, an original-direction packet to the first rule it matches in the
    datapath's order (a deny: nothing), then to the tenant's."""
    spec = copy.deepcopy(spec)
    spec.state.tenants[0] = replace(spec.state.tenants[0], rate="10000pps", burst=50)
    text = render.iptables(spec, "blue", 4, "drop")
    rl = [l for l in text.splitlines() if l.startswith("-A xf-rl-blue ")]
    assert rl[0] == "-A xf-rl-blue -m conntrack --ctdir REPLY -g xf-rlt-blue"
    assert rl[1] == "-A xf-rl-blue -m conntrack --ctstate RELATED -g xf-rlt-blue"
    assert rl[2].endswith("-d 10.0.0.3/32 -j RETURN")           # rule 8, a deny
    limit = next(i for i, l in enumerate(rl) if "xf4-r10" in l)
    assert rl[limit] == ("-A xf-rl-blue -p udp --dport 7700 -m hashlimit --hashlimit-above "
                         "1/second --hashlimit-burst 3 --hashlimit-name xf4-r10 -m comment "
                         "--comment \"rate limit of rule 10\" -j DROP")
    assert rl[limit + 1] == "-A xf-rl-blue -p udp --dport 7700 -g xf-rlt-blue"
    assert "-A xf-rlt-blue -m hashlimit --hashlimit-above 10000/second --hashlimit-burst 50 " \
           "--hashlimit-name xf4-t10" in text
    nft = render.nftables(spec, "blue", "drop")
    assert "limit rule10 { rate over 1/second burst 3 packets }" in nft
    assert "limit tenant10 { rate over 10000/second burst 50 packets }" in nft
    fwd = nft.split("chain forward {")[1].split("}")[0]
    assert fwd.index("jump rl_blue") < fwd.index("ct state established,related accept")
    # Both families' statements name the one limit object: one bucket, as in the datapath.
    assert nft.count('limit name "rule10" counter drop') == 2


def test_no_limits_no_rate_limit_chains(spec):
    spec = copy.deepcopy(spec)
    spec.state.rules = [r for r in spec.state.rules if r.rate is None]
    assert "xf-rl" not in render.iptables(spec, "blue", 4, "drop")
    assert "rl_blue" not in render.nftables(spec, "blue", "drop")
