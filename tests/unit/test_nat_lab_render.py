"""The lab's external network and its kernel-path NAT (netns_lab/external.py), as text:
the lab file's [[external]] checks, the gateway's iptables and nftables, the routers'
default routes, and the SNAT port labels the comparison uses."""
from __future__ import annotations

import copy

import pytest

from netns_lab import external, labfile, render

pytestmark = pytest.mark.unit


def test_the_demo_lab_has_one_external_host_behind_the_uplink(spec):
    (inet,) = spec.external
    assert (inet.name, inet.port, inet.ip, inet.local_ip) == ("inet", "upl", "198.51.100.2",
                                                               "198.51.100.1")
    assert spec.vm("inet") is inet and inet.port_mac != inet.mac
    assert external.nat_tenants(spec) == ["green", "gold"]


@pytest.mark.parametrize("change, message", [
    (lambda d: d["external"][0].update(port="bvm1"), "not an uplink port"),
    (lambda d: d["external"][0].update(addrs=["10.9.9.2/24"]), "must be another address"),
    (lambda d: d["external"][0].update(addrs=["198.51.100.1/24"]), "must be another address"),
    (lambda d: d["external"][0].update(addrs=["nonsense"]), "addrs"),
    (lambda d: d["external"][0].update(name="blue1"), "already a VM"),
    (lambda d: d["external"][0].update(mac="02:00:00:00:00:09"), "exactly the fields"),
    (lambda d: d["external"].append(dict(d["external"][0], name="inet2")), "already has a host"),
    (lambda d: d.pop("external"), "need an external network"),
])
def test_a_bad_external_section_is_refused_by_name(raw, change, message):
    d = copy.deepcopy(raw)
    change(d)
    with pytest.raises(labfile.LabFileError, match=message):
        labfile.parse(d, source="lab.toml")


def test_a_nat_tenants_router_routes_to_the_gateway_the_others_nowhere(spec):
    for variant in render.VARIANTS:
        green = render.router_setup(spec, "green", variant).ip_batch
        blue = render.router_setup(spec, "blue", variant).ip_batch
        assert "route add default via 169.254.1.2 dev xgw" in green
        assert not any(l.startswith("route add blackhole default") for l in green)
        assert "route add blackhole default" in blue and not any("xgw" in l for l in blue)
        gold = render.router_setup(spec, "gold", variant).ip_batch
        assert "route add default via 169.254.2.2 dev xgw" in gold
    # Their VMs route everything else to their port, through a permanent neighbour.
    green1 = render.vm_setup(spec, spec.vm("green1"), "offload").ip_batch
    assert "route add default via 169.254.0.1 dev eth0 onlink" in green1
    assert not any("default" in l for l in render.vm_setup(spec, spec.vm("blue1"),
                                                           "offload").ip_batch)


def test_the_gateway_is_set_up_after_the_routers_whose_links_it_uses(spec):
    for variant in render.VARIANTS:
        setups = render.kernel_setups(spec, variant)
        assert setups[-1].name == render.ns_name(spec.prefix, variant, "gw")
        gw = setups[-1].ip_batch
        assert "addr add 198.51.100.1/24 dev upl" in gw
        assert "rule add iif upl fwmark 30 lookup 30 pref 100" in gw
        assert "route add default via 169.254.2.1 dev ggold table 40" in gw
        # ARP for floating IPs is answered on the uplink, at once.
        assert "neigh add proxy 203.0.113.10 dev upl" in gw
        assert ("net.ipv4.neigh.upl.proxy_delay", "0") in setups[-1].late_sysctls


def test_iptables_gateway_zones_marks_and_translations(spec):
    text = external.gw_iptables(spec)
    lines = text.splitlines()
    # Each tenant's original direction in its zone, the replies in the shared one.
    assert "-A PREROUTING -i ggreen -j CT --zone-orig 30" in lines
    assert "-A PREROUTING -i ggold -j CT --zone-orig 40" in lines
    assert "-A PREROUTING -i upl -d 203.0.113.20/32 -j DNAT --to-destination 10.0.0.1" in lines
    fip = lines.index("-A POSTROUTING -o upl -m mark --mark 30 -s 10.0.0.1/32 "
                      "-j SNAT --to-source 203.0.113.10")
    tenant = lines.index("-A POSTROUTING -o upl -m mark --mark 30 -p udp "
                         "-j SNAT --to-source 198.51.100.1:20000-60000")
    assert fip < tenant          # a floating IP wins over the tenant's SNAT
    # The mark is restored after it is set, before the TTL the gateway gives back.
    restore = lines.index("-A PREROUTING -j CONNMARK --restore-mark")
    assert max(i for i, l in enumerate(lines) if "--set-mark" in l) < restore
    assert min(i for i, l in enumerate(lines) if "TTL --ttl-inc" in l) > restore
    # A floating IP's new traffic gets its TTL back by address, replies by direction
    # (once: a reply to a floating IP's own connection matches both).
    assert ("-A PREROUTING -i upl -d 203.0.113.10/32 -m conntrack --ctdir ORIGINAL "
            "-j TTL --ttl-inc 1") in lines
    assert "-A PREROUTING -i upl -m conntrack --ctdir REPLY -j TTL --ttl-inc 1" in lines
    assert ":FORWARD DROP [0:0]" in lines
    assert "-A FORWARD -i upl -m conntrack --ctstate DNAT -j ACCEPT" in lines


def test_nftables_gateway_is_the_same_in_one_table(spec):
    text = external.gw_nftables(spec)
    assert 'iifname "ggreen" ct original zone set 30' in text
    assert 'iifname "upl" ip daddr 203.0.113.10 dnat to 10.0.0.1' in text
    assert ('oifname "upl" meta mark 40 meta l4proto { tcp, udp } '
            'snat to 198.51.100.1:20000-60000') in text
    assert text.index("snat to 203.0.113.20") < text.index("meta mark 40 meta l4proto")
    # One statement per TTL value (nft has no arithmetic on fields), 1..254, once each.
    ttl = [l for l in text.splitlines() if "ip ttl set" in l]
    assert len(ttl) == 254 and len(set(ttl)) == 254
    assert "ip ttl 63 ip ttl set 64 return" in ttl[0]


def _udp(src: str, sport: int, dst: str = "192.0.2.80", dport: int = 7000,
         fix=None) -> bytes:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    p = Ether(src="02:ee:00:00:01:01", dst="02:ee:00:00:01:02") / IP(src=src, dst=dst) / \
        UDP(sport=sport, dport=dport) / b"x"
    b = bytearray(bytes(p))
    if fix:
        fix(b)
    return bytes(b)


def test_snat_ports_become_labels_per_flow_checked_for_range_and_checksum(spec):
    norm = external.snat_normaliser(spec, ["inet"])
    a, b = norm("inet", _udp("198.51.100.1", 31000)), norm("inet", _udp("198.51.100.1", 45000))
    assert a.endswith(b"|snat port P1, checksum ok") and b.endswith(b"P2, checksum ok")
    assert a[:-30] == b[:-30]            # the port and checksum are out of the bytes
    assert norm("inet", _udp("198.51.100.1", 31000)).endswith(b"P1, checksum ok")
    # The same port to another remote port is another flow.
    assert norm("inet", _udp("198.51.100.1", 31000, dport=7001)).endswith(b"P3, checksum ok")
    # Out of the range: left as it is (and so unlike the other path's label).
    low = _udp("198.51.100.1", 1000)
    assert norm("inet", low) == low
    # A wrong checksum is said.
    bad = _udp("198.51.100.1", 32000, fix=lambda b: b.__setitem__(40, b[40] ^ 0xFF))
    assert norm("inet", bad).endswith(b"checksum BAD")
    # Not from a SNAT address, or not to an external host: untouched.
    other = _udp("203.0.113.10", 31000)
    assert norm("inet", other) == other
    assert norm("green2", _udp("198.51.100.1", 31000)) == _udp("198.51.100.1", 31000)


def test_the_offloaded_node_forwards_only_for_the_datapaths_fib_lookups(spec):
    node = external.node_setup(spec)
    assert node.name == render.ns_name(spec.prefix, "offload", "node")
    assert "route add default via 198.51.100.2 dev upl" in node.ip_batch
    fwd = {k for k, v in node.late_sysctls if v == "1"}
    assert fwd == {f"net.ipv4.conf.{p}.forwarding" for p in ("gvm1", "gvm2", "ovm1", "ovm2")}
    ((argv, text),) = node.firewall
    assert argv == ["nft", "-f", "-"]
    assert 'iifname { "gvm1", "gvm2", "ovm1", "ovm2" } drop' in text
    assert "priority raw" in text
