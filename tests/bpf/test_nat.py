"""NAT in the datapath (issue 11): floating IPs (1:1) and SNAT, IPv4, through
BPF_PROG_TEST_RUN. Expected packets are built by Scapy, which computes every checksum
anew (IPv4 header, TCP/UDP with its pseudo-header, ICMP over the quoted packet), so a byte
compare is the check that the datapath's incremental updates are right. The external
network is behind uplink p5: the node namespace gets an address there, a gateway
neighbour and a route (what bpf_fib_lookup reads), removed afterwards. Each rule NAT
enforces has a case that tries to get around it."""
from __future__ import annotations

import ipaddress
import time

import pytest
from scapy.all import ARP, ICMP, IP, TCP, UDP, Dot1Q, Ether, fragment, raw
from scapy.layers.vxlan import VXLAN

from agent import abi, config
from agent.flows import pair_key
from agent.store import Store
from agent.sweeper import Evictions, Sweeper

from . import cases
from .cases import (BLUE, RED, RED_MAC, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, ep, rule)
from .conftest import PORT_MAC, VM_MAC
from .test_datapath import assert_bytes

pytestmark = pytest.mark.bpf

UPLINK, LOCAL = "p5", "192.0.2.1"
GW, GW_MAC = "192.0.2.254", "02:ee:00:00:00:fe"      # the external network's router
EXT = "198.18.0.7"                                   # a host out there
ROUTER = "198.18.0.1"                                # a router that sends ICMP errors
FIP, SNAT_IP = "203.0.113.10", "198.51.100.1"
VM1, VM2 = "10.0.0.1", "10.0.0.2"      # blue: VM1 (p1) has the floating IP; VM2 (p2) not
PORTS = (20000, 20009)


def nat_state(ports="20000-20009", red_snat=True, blue_rules=None) -> dict:
    """Blue (VM1 with FIP, SNAT for the rest) and red, whose VM behind p3 has blue VM2's
    address, both SNAT to the same address; uplink p5."""
    st = cases.blue([rule(1, priority=10)] if blue_rules is None else blue_rules)
    st["tenants"].append({"name": "red", "id": RED})
    st["ports"] += [{"name": "p3", "tenant": "red"},
                    {"name": UPLINK, "uplink": True, "local_ip": LOCAL}]
    st["endpoints"].append(ep("red", VM2, "p3", mac=RED_MAC["p3"]))
    st["rules"].append(rule(2, tenant="red", priority=10))
    st["fips"] = [{"tenant": "blue", "ip": FIP, "to": VM1}]
    st["snats"] = [{"tenant": "blue", "to": SNAT_IP, "ports": ports}]
    if red_snat:
        st["snats"].append({"tenant": "red", "to": SNAT_IP, "ports": ports})
    return st


@pytest.fixture
def nat(bench, lab):
    """The bench, with the node namespace routing the external network out of p5."""
    from pyroute2 import IPRoute
    idx = lab.ifindex[UPLINK]
    fwd = "/proc/sys/net/ipv4/conf/all/forwarding"
    with open(fwd) as f:
        was = f.read().strip()
    ipr = IPRoute()
    try:
        ipr.link("set", index=idx, state="up")
        ipr.addr("add", index=idx, address=LOCAL, prefixlen=24)
        ipr.neigh("add", dst=GW, lladdr=GW_MAC, ifindex=idx, state=0x80)   # permanent
        ipr.route("add", dst="198.18.0.0", dst_len=15, gateway=GW, oif=idx)
        with open(fwd, "w") as f:        # bpf_fib_lookup forwards only where the node does
            f.write("1")
        bench.apply(nat_state())
        stats = bench.dp.maps["xf_nat_stats"]        # translations counted from zero
        stats.delete_many(list(stats.keys()))
        yield bench
    finally:
        with open(fwd, "w") as f:
            f.write(was)
        for call in (lambda: ipr.route("del", dst="198.18.0.0", dst_len=15, gateway=GW),
                     lambda: ipr.neigh("del", dst=GW, ifindex=idx),
                     lambda: ipr.addr("del", index=idx, address=LOCAL, prefixlen=24)):
            try:
                call()
            except Exception:
                pass
        ipr.close()


# -- packets ------------------------------------------------------------------------------

def from_vm(l4, src=VM2, port="p2", dst=EXT, **ipkw):
    return Ether(src=RED_MAC.get(port) or VM_MAC[port], dst=PORT_MAC[port]) / \
        IP(src=src, dst=dst, ttl=64, id=ipkw.pop("id", 1), **ipkw) / l4


def from_ext(l4, dst=SNAT_IP, src=EXT, **ipkw):
    return Ether(src=GW_MAC, dst=PORT_MAC[UPLINK]) / \
        IP(src=src, dst=dst, ttl=64, id=ipkw.pop("id", 2), **ipkw) / l4


def rebuilt(pkt, dmac, smac, **ip) -> bytes:
    """pkt as it should leave: MACs, TTL one less, IP fields changed, and every checksum
    computed anew by Scapy (IP, and TCP/UDP/ICMP unless its checksum is 0: none)."""
    p = Ether(raw(pkt))
    p.dst, p.src = dmac, smac
    p[IP].ttl -= 1
    for k, v in ip.items():
        setattr(p[IP], k, v)
    del p[IP].chksum
    for layer in (TCP, UDP, ICMP):
        if layer in p and not (layer is UDP and p[UDP].chksum == 0):
            del p[layer].chksum
    return raw(p)


def l4_ports(p, **ports):
    p = p.copy()
    for k, v in ports.items():
        setattr(p, k, v)
    return p


def out_ok(rc, out, want_port):
    assert rc == XDP_REDIRECT
    return Ether(out)


def snat_port(out: bytes) -> int:
    p = Ether(out)
    return p[ICMP].id if ICMP in p else p.getlayer(2).sport


def counters(bench, fn):
    before = bench.snapshot()
    r = fn()
    return r, bench.snapshot() - before


def slot(port):
    return cases.SLOT[port]


def nat_stats(bench):
    out = {}
    for k, v in bench.dp.maps["xf_nat_stats"].items():
        key = int.from_bytes(k, "little")
        n = sum(abi.Counter.from_buffer_copy(v, i * 16).packets for i in range(len(v) // 16))
        out[(key >> 8, key & 0xff)] = n
    return out


# -- floating IPs ---------------------------------------------------------------------------

def test_fip_tcp_in_and_the_reply_out(nat):
    syn = from_ext(TCP(sport=5555, dport=22, flags="S", seq=7), dst=FIP)
    (rc, out), delta = counters(nat, lambda: nat.run(raw(syn), UPLINK))
    assert rc == XDP_REDIRECT
    assert_bytes(out, rebuilt(syn, VM_MAC["p1"], PORT_MAC["p1"], dst=VM1))
    assert delta == {(slot(UPLINK), "redirect", "rule_allow"): (1, len(syn))}
    # Both directions are flows: the external side keyed apart from every tenant.
    fin = nat.flow(abi.TENANT_EXTERNAL, 6, EXT, 5555, FIP, 22)
    assert fin is not None and fin.flags & abi.FLOW_DNAT and fin.vni == BLUE
    out_f = nat.flow(BLUE, 6, VM1, 22, EXT, 5555)
    assert out_f is not None and out_f.flags & (abi.FLOW_SNAT | abi.FLOW_FIP) == \
        abi.FLOW_SNAT | abi.FLOW_FIP
    synack = from_vm(TCP(sport=22, dport=5555, flags="SA", seq=9, ack=8), src=VM1, port="p1")
    (rc, out), delta = counters(nat, lambda: nat.run(raw(synack), "p1"))
    assert rc == XDP_REDIRECT
    # Back to the MAC the flow came from, out of the uplink, from the floating address.
    assert_bytes(out, rebuilt(synack, GW_MAC, PORT_MAC[UPLINK], src=FIP))
    assert delta == {(slot("p1"), "redirect", "flow"): (1, len(synack))}
    ack = from_ext(TCP(sport=5555, dport=22, flags="A", seq=8, ack=10), dst=FIP)
    (rc, out), delta = counters(nat, lambda: nat.run(raw(ack), UPLINK))
    assert_bytes(out, rebuilt(ack, VM_MAC["p1"], PORT_MAC["p1"], dst=VM1))
    assert delta == {(slot(UPLINK), "redirect", "flow"): (1, len(ack))}
    assert nat_stats(nat) == {(BLUE, abi.NATC_FIP_IN): 2, (BLUE, abi.NATC_FIP_OUT): 1}
    # The sweeper pairs the two directions (flows.pair_key), as the datapath keyed them.
    k_in, f_in = nat._find(abi.TENANT_EXTERNAL, 6, EXT, 5555, FIP, 22)
    k_out, f_out = nat._find(BLUE, 6, VM1, 22, EXT, 5555)
    assert pair_key(bytes(k_in), bytes(f_in)) == bytes(k_out)
    assert pair_key(bytes(k_out), bytes(f_out)) == bytes(k_in)


def test_fip_vm_starts_udp_out_with_the_fib_next_hop_and_the_reply_comes_back(nat):
    pkt = from_vm(UDP(sport=4000, dport=53) / (b"q" * 20), src=VM1, port="p1")
    rc, out = nat.run(raw(pkt), "p1")
    assert rc == XDP_REDIRECT
    # The fib's next hop (the gateway's MAC), the floating address, ports kept.
    assert_bytes(out, rebuilt(pkt, GW_MAC, PORT_MAC[UPLINK], src=FIP))
    back = from_ext(UDP(sport=53, dport=4000) / (b"a" * 30), dst=FIP)
    rc, out = nat.run(raw(back), UPLINK)
    assert rc == XDP_REDIRECT
    assert_bytes(out, rebuilt(back, VM_MAC["p1"], PORT_MAC["p1"], dst=VM1))


def test_fip_icmp_echo_in(nat):
    ping = from_ext(ICMP(type=8, id=300, seq=1) / b"ping", dst=FIP)
    rc, out = nat.run(raw(ping), UPLINK)
    assert_bytes(out, rebuilt(ping, VM_MAC["p1"], PORT_MAC["p1"], dst=VM1))
    pong = from_vm(ICMP(type=0, id=300, seq=1) / b"ping", src=VM1, port="p1")
    rc, out = nat.run(raw(pong), "p1")
    assert rc == XDP_REDIRECT
    assert_bytes(out, rebuilt(pong, GW_MAC, PORT_MAC[UPLINK], src=FIP))


# -- SNAT -------------------------------------------------------------------------------------

@pytest.mark.parametrize("l4, reply", [
    (TCP(sport=40000, dport=443, flags="S", seq=1), TCP(sport=443, flags="SA", seq=5, ack=2)),
    (UDP(sport=4000, dport=53) / (b"q" * 21), UDP(sport=53) / (b"r" * 33)),
    (UDP(sport=4000, dport=53, chksum=0) / (b"q" * 21), UDP(sport=53, chksum=0) / b"r"),
], ids=["tcp", "udp", "udp-checksum-0"])
def test_snat_out_and_back(nat, l4, reply):
    pkt = from_vm(l4)
    rc, out = nat.run(raw(pkt), "p2")
    assert rc == XDP_REDIRECT
    port = snat_port(out)
    assert PORTS[0] <= port <= PORTS[1]
    want = Ether(rebuilt(pkt, GW_MAC, PORT_MAC[UPLINK], src=SNAT_IP))
    want.getlayer(2).sport = port
    if not (UDP in want and want[UDP].chksum == 0):
        del want.getlayer(2).chksum
    assert_bytes(out, raw(want))
    if UDP in pkt and pkt[UDP].chksum == 0:
        assert Ether(out)[UDP].chksum == 0          # no checksum stays none
    back = from_ext(l4_ports(reply, dport=port))
    (rc, out), delta = counters(nat, lambda: nat.run(raw(back), UPLINK))
    assert rc == XDP_REDIRECT
    want = Ether(rebuilt(back, VM_MAC["p2"], PORT_MAC["p2"], dst=VM2))
    want.getlayer(2).dport = pkt.getlayer(2).sport
    if not (UDP in want and want[UDP].chksum == 0):
        del want.getlayer(2).chksum
    assert_bytes(out, raw(want))
    assert delta == {(slot(UPLINK), "redirect", "flow"): (1, len(back))}
    assert nat_stats(nat) == {(BLUE, abi.NATC_SNAT_OUT): 1, (BLUE, abi.NATC_SNAT_IN): 1}


def test_snat_icmp_echo_id_is_the_port(nat):
    ping = from_vm(ICMP(type=8, id=77, seq=3) / b"hello")
    rc, out = nat.run(raw(ping), "p2")
    assert rc == XDP_REDIRECT
    nid = snat_port(out)
    assert PORTS[0] <= nid <= PORTS[1]
    want = Ether(rebuilt(ping, GW_MAC, PORT_MAC[UPLINK], src=SNAT_IP))
    want[ICMP].id = nid
    del want[ICMP].chksum
    assert_bytes(out, raw(want))
    pong = from_ext(ICMP(type=0, id=nid, seq=3) / b"hello")
    rc, out = nat.run(raw(pong), UPLINK)
    want = Ether(rebuilt(pong, VM_MAC["p2"], PORT_MAC["p2"], dst=VM2))
    want[ICMP].id = 77
    del want[ICMP].chksum
    assert_bytes(out, raw(want))


# -- ICMP errors carrying a translated header --------------------------------------------------

def test_icmp_error_in_about_a_snat_flow_is_translated_back(nat):
    pkt = from_vm(UDP(sport=4000, dport=53) / (b"q" * 12))
    rc, out = nat.run(raw(pkt), "p2")
    port = snat_port(out)
    quoted = Ether(out)[IP]                       # what the router saw
    err = from_ext(ICMP(type=3, code=3) / raw(quoted), src=ROUTER)
    (rc, got), delta = counters(nat, lambda: nat.run(raw(err), UPLINK))
    assert rc == XDP_REDIRECT
    assert delta == {(slot(UPLINK), "redirect", "related"): (1, len(err))}
    inner = IP(raw(quoted))
    inner.src = VM2
    inner[UDP].sport = 4000
    del inner.chksum, inner[UDP].chksum
    want = Ether(rebuilt(err, VM_MAC["p2"], PORT_MAC["p2"], dst=VM2))
    want[ICMP].remove_payload()
    want[ICMP].add_payload(raw(IP(raw(inner))))
    del want[ICMP].chksum
    assert_bytes(got, raw(want))
    # The quoted header is the VM's own packet again, byte for byte past the TTL.
    q = Ether(got)[ICMP].payload
    assert raw(q)[20:] == raw(pkt[IP])[20:] and port != 4000 or port == 4000


def test_icmp_error_out_about_a_fip_flow_is_translated(nat):
    syn = from_ext(TCP(sport=5555, dport=80, flags="S", seq=7), dst=FIP)
    rc, delivered = nat.run(raw(syn), UPLINK)
    assert rc == XDP_REDIRECT
    quoted = Ether(delivered)[IP]                 # what the VM got, and quotes
    err = from_vm(ICMP(type=3, code=3) / raw(quoted), src=VM1, port="p1")
    (rc, out), delta = counters(nat, lambda: nat.run(raw(err), "p1"))
    assert rc == XDP_REDIRECT
    assert delta == {(slot("p1"), "redirect", "related"): (1, len(err))}
    inner = IP(raw(quoted))
    inner.dst = FIP
    del inner.chksum, inner[TCP].chksum
    want = Ether(rebuilt(err, GW_MAC, PORT_MAC[UPLINK], src=FIP))
    want[ICMP].remove_payload()
    want[ICMP].add_payload(raw(IP(raw(inner))))
    del want[ICMP].chksum
    assert_bytes(out, raw(want))


def test_icmp_error_in_about_a_snat_ping(nat):
    ping = from_vm(ICMP(type=8, id=77, seq=3) / b"hello")
    rc, out = nat.run(raw(ping), "p2")
    nid = snat_port(out)
    err = from_ext(ICMP(type=11, code=0) / raw(Ether(out)[IP]), src=ROUTER)
    rc, got = nat.run(raw(err), UPLINK)
    assert rc == XDP_REDIRECT
    q = IP(raw(Ether(got)[ICMP].payload))
    assert (q.src, q[ICMP].id) == (VM2, 77)
    assert raw(q)[20:] == raw(ping[IP])[20:]
    p = Ether(got)
    chk = p[ICMP].chksum
    del p[ICMP].chksum
    assert Ether(raw(p))[ICMP].chksum == chk
    assert p[IP].dst == VM2


# -- port allocation ------------------------------------------------------------------------

def test_two_tenants_with_the_same_inner_flow_get_different_ports(nat):
    blue_pkt = from_vm(UDP(sport=4000, dport=53) / b"q")
    red_pkt = from_vm(UDP(sport=4000, dport=53) / b"q", port="p3")
    rc1, o1 = nat.run(raw(blue_pkt), "p2")
    rc2, o2 = nat.run(raw(red_pkt), "p3")
    assert rc1 == rc2 == XDP_REDIRECT
    assert Ether(o1)[IP].src == Ether(o2)[IP].src == SNAT_IP
    assert snat_port(o1) != snat_port(o2)
    # Each reply reaches its own tenant's VM.
    for port, out in (("p2", o1), ("p3", o2)):
        back = from_ext(UDP(sport=53, dport=snat_port(out)) / b"r")
        rc, got = nat.run(raw(back), UPLINK)
        assert rc == XDP_REDIRECT and Ether(got).dst == (RED_MAC.get(port) or VM_MAC[port])


def _sweep_after(bench, tmp_path, seconds):
    time.sleep(seconds)
    store = Store.open(str(tmp_path / "state.db"))
    try:
        cfg = config.parse("[aging]\nudp = 1\n")
        return Sweeper(cfg, bench.dp, Evictions(store)).sweep()
    finally:
        store.close()


def test_a_tiny_range_is_exhausted_counted_and_released_by_the_sweeper(nat, tmp_path):
    nat.apply(nat_state(ports="20000-20001"))
    outs = []
    for sport in (4001, 4002):
        rc, out = nat.run(raw(from_vm(UDP(sport=sport, dport=53) / b"q")), "p2")
        assert rc == XDP_REDIRECT
        outs.append(snat_port(out))
    assert sorted(outs) == [20000, 20001]
    third = from_vm(UDP(sport=4003, dport=53) / b"q")
    (rc, out), delta = counters(nat, lambda: nat.run(raw(third), "p2"))
    assert (rc, out) == (XDP_DROP, raw(third))          # dropped untouched, not mistranslated
    assert delta == {(slot("p2"), "drop", "nat_exhausted"): (1, len(third))}
    assert nat_stats(nat)[(BLUE, abi.NATC_EXHAUSTED)] == 1
    assert nat.flow(BLUE, 17, VM2, 4003, EXT, 53) is None
    # Another remote address is another claim: the same ports serve it.
    rc, out = nat.run(raw(from_vm(UDP(sport=4003, dport=53) / b"q", dst="198.18.0.8")), "p2")
    assert rc == XDP_REDIRECT
    # Aged out, both directions go together and the ports are free again.
    gone = _sweep_after(nat, tmp_path, 2.2)
    assert gone.get("idle") == 6
    assert list(nat.dp.flows()) == []
    rc, out = nat.run(raw(third), "p2")
    assert rc == XDP_REDIRECT and snat_port(out) in (20000, 20001)


def test_a_rule_change_keeps_a_snat_flows_port(nat):
    pkt = from_vm(UDP(sport=4000, dport=53) / b"q")
    rc, out = nat.run(raw(pkt), "p2")
    port = snat_port(out)
    st = nat_state()
    st["rules"].append(rule(9, "deny", priority=1, src="10.9.0.0/16"))
    nat.sync(st)                                     # a new generation: flows go stale
    back = from_ext(UDP(sport=53, dport=port) / b"r")
    rc, got = nat.run(raw(back), UPLINK)             # judged again as the reply
    assert rc == XDP_REDIRECT and Ether(got)[IP].dst == VM2
    rc, out = nat.run(raw(pkt), "p2")
    assert rc == XDP_REDIRECT and snat_port(out) == port


# -- what tries to get around it --------------------------------------------------------------

@pytest.mark.parametrize("src", [FIP, SNAT_IP])
def test_a_vm_claiming_a_nat_address_is_spoofing(nat, src):
    pkt = from_vm(UDP(sport=4000, dport=53) / b"q", src=src)
    (rc, out), delta = counters(nat, lambda: nat.run(raw(pkt), "p2"))
    assert (rc, out) == (XDP_DROP, raw(pkt))
    assert delta == {(slot("p2"), "drop", "spoof"): (1, len(pkt))}


def test_external_packet_to_an_unallocated_snat_port_is_the_kernels(nat):
    pkt = from_ext(UDP(sport=53, dport=20005) / b"r")
    (rc, out), delta = counters(nat, lambda: nat.run(raw(pkt), UPLINK))
    assert (rc, out) == (XDP_PASS, raw(pkt))
    assert delta == {(slot(UPLINK), "pass", "nat_no_flow"): (1, len(pkt))}


def test_a_fip_reaches_only_its_tenants_vm(nat):
    """Red has a VM too; blue's floating IP goes to blue's VM1 (p1), by blue's rules."""
    pkt = from_ext(UDP(sport=53, dport=7000) / b"r", dst=FIP)
    rc, out = nat.run(raw(pkt), UPLINK)
    assert rc == XDP_REDIRECT and Ether(out).dst == VM_MAC["p1"]
    # Blue's rules judge the translated packet: allow only TCP 22 and it is dropped.
    nat.apply(nat_state(blue_rules=[rule(1, priority=10, proto="tcp", dport="22")]))
    (rc, out), delta = counters(nat, lambda: nat.run(raw(pkt), UPLINK))
    assert (rc, out) == (XDP_DROP, raw(pkt))
    assert delta == {(slot(UPLINK), "drop", "default"): (1, len(pkt))}


def test_a_tenant_without_snat_does_not_get_out(nat):
    nat.apply(nat_state(red_snat=False))
    pkt = from_vm(UDP(sport=4000, dport=53) / b"q", port="p3")
    (rc, out), delta = counters(nat, lambda: nat.run(raw(pkt), "p3"))
    assert (rc, out) == (XDP_DROP, raw(pkt))
    assert delta == {(slot("p3"), "drop", "no_route"): (1, len(pkt))}


def test_vxlan_to_a_fip_is_plain_udp_to_the_vm_never_decapsulated(nat):
    nat.apply(nat_state(blue_rules=[rule(1, priority=10, proto="tcp", dport="22")]))
    inner = Ether(src=VM_MAC["p2"], dst=PORT_MAC["p2"]) / IP(src=VM2, dst=VM1) / \
        TCP(sport=1, dport=22)
    pkt = from_ext(UDP(sport=51000, dport=4789) / VXLAN(vni=1) / inner, dst=FIP)
    (rc, out), delta = counters(nat, lambda: nat.run(raw(pkt), UPLINK))
    assert (rc, out) == (XDP_DROP, raw(pkt))
    assert delta == {(slot(UPLINK), "drop", "default"): (1, len(pkt))}


def test_a_tagged_frame_to_a_fip_is_the_kernels_untouched(nat):
    pkt = Ether(src=GW_MAC, dst=PORT_MAC[UPLINK]) / Dot1Q(vlan=5) / \
        IP(src=EXT, dst=FIP) / UDP(sport=53, dport=7000) / b"r"
    (rc, out), delta = counters(nat, lambda: nat.run(raw(pkt), UPLINK))
    assert (rc, out) == (XDP_PASS, raw(pkt))
    assert delta == {(slot(UPLINK), "pass", "uplink_other"): (1, len(pkt))}


def test_fragments_to_a_fip_are_dropped_and_to_the_snat_address_the_kernels(nat):
    for dst, verdict, reason in ((FIP, "drop", "nat_frag"), (SNAT_IP, "pass", "uplink_other")):
        for frag in fragment(IP(src=EXT, dst=dst) / UDP(sport=53, dport=7000) / (b"f" * 64),
                             fragsize=32):
            pkt = Ether(src=GW_MAC, dst=PORT_MAC[UPLINK]) / frag
            (rc, out), delta = counters(nat, lambda: nat.run(raw(pkt), UPLINK))
            assert (rc, out) == (cases.ACTION_OF[verdict], raw(pkt))
            assert delta == {(slot(UPLINK), verdict, reason): (1, len(pkt))}


def test_the_node_answers_arp_for_a_fip_on_the_uplink(nat):
    req = Ether(src=GW_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=GW_MAC, psrc=GW,
                                                            pdst=FIP)
    (rc, out), delta = counters(nat, lambda: nat.run(raw(req), UPLINK))
    assert rc == XDP_TX
    want = Ether(src=PORT_MAC[UPLINK], dst=GW_MAC) / ARP(
        op=2, hwsrc=PORT_MAC[UPLINK], psrc=FIP, hwdst=GW_MAC, pdst=GW)
    assert_bytes(out, raw(want))
    assert delta == {(slot(UPLINK), "tx", "arp_reply"): (1, len(req))}
    other = Ether(src=GW_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=GW_MAC, psrc=GW,
                                                              pdst=SNAT_IP)
    rc, out = nat.run(raw(other), UPLINK)
    assert (rc, out) == (XDP_PASS, raw(other))      # the node's own address: its kernel's


def test_unresolved_next_hop_is_dropped_never_sent_untranslated(nat, lab):
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        ipr.route("add", dst="198.19.1.0", dst_len=24, gateway="192.0.2.253",
                  oif=lab.ifindex[UPLINK])
        try:
            pkt = from_vm(UDP(sport=4000, dport=53) / b"q", dst="198.19.1.5")
            (rc, out), delta = counters(nat, lambda: nat.run(raw(pkt), "p2"))
        finally:
            ipr.route("del", dst="198.19.1.0", dst_len=24, gateway="192.0.2.253")
    assert (rc, out) == (XDP_DROP, raw(pkt))
    assert delta == {(slot("p2"), "drop", "nat_no_neigh"): (1, len(pkt))}


def test_trace_shows_the_translation_and_writes_nothing(nat):
    pkt = from_vm(UDP(sport=4000, dport=53) / b"q")
    flows0 = sorted(nat.dp.maps["xf_flows"].items())
    rc, out, t = nat.trace(raw(pkt), "p2")
    assert rc == XDP_REDIRECT
    assert t.nat_flags & abi.FLOW_SNAT and not t.nat_flags & abi.FLOW_FIP
    assert ipaddress.IPv4Address(bytes(abi.u32(t.nat_addr))) == ipaddress.ip_address(SNAT_IP)
    assert t.nat_port == snat_port(out)
    assert sorted(nat.dp.maps["xf_flows"].items()) == flows0
    rc2, out2 = nat.run(raw(pkt), "p2")
    assert (rc2, out2) == (rc, out)


def test_snat_removed_its_flows_no_longer_translate(nat):
    pkt = from_vm(UDP(sport=4000, dport=53) / b"q")
    rc, out = nat.run(raw(pkt), "p2")
    assert rc == XDP_REDIRECT
    st = nat_state()
    st["snats"] = [s for s in st["snats"] if s["tenant"] != "blue"]
    nat.sync(st)                       # the tenant's flows go stale: judged again, no NAT
    (rc, out), delta = counters(nat, lambda: nat.run(raw(pkt), "p2"))
    assert (rc, out) == (XDP_DROP, raw(pkt))
    assert delta[(slot("p2"), "drop", "no_route")] == (1, len(pkt))


def test_forwarding_off_on_the_vm_port_is_named_never_sent_untranslated(nat, lab):
    """bpf_fib_lookup answers only for an interface that forwards: with IPv4 forwarding
    off on the VM's port, a new NAT flow is dropped as nat_forwarding_off (not the
    misleading no_route), untranslated, and goes out once it is back on."""
    conf = "/proc/sys/net/ipv4/conf/p2/forwarding"
    pkt = from_vm(UDP(sport=4100, dport=53) / b"q")
    with open(conf) as f:
        was = f.read().strip()
    try:
        with open(conf, "w") as f:
            f.write("0")
        (rc, out), delta = counters(nat, lambda: nat.run(raw(pkt), "p2"))
    finally:
        with open(conf, "w") as f:
            f.write(was)
    assert (rc, out) == (XDP_DROP, raw(pkt))
    assert delta == {(slot("p2"), "drop", "nat_forwarding_off"): (1, len(pkt))}
    rc, out = nat.run(raw(pkt), "p2")
    assert rc == XDP_REDIRECT and Ether(out)[IP].src == SNAT_IP
