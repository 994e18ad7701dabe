"""Same-tenant traffic: ICMP, UDP and TCP between VMs of one tenant, both families, and a
route through a VM. What a VM's kernel answers (echo reply, port unreachable, RST) is part
of the outcome."""
from . import Send

DESCRIPTION = __doc__

_V4 = 'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst=vm("{dst}").ip)'
_V6 = 'Ether(src=me.mac, dst=me.gw)/IPv6(src=me.ip6, dst=vm("{dst}").ip6)'

SENDS = [
    Send("blue1", _V4.format(dst="blue2") + "/ICMP(id=101, seq=1)/N", "ping blue1 -> blue2"),
    Send("blue2", _V4.format(dst="blue1") + "/ICMP(id=102, seq=1)/N", "ping blue2 -> blue1"),
    Send("blue1", _V4.format(dst="blue3") + "/ICMP(id=103, seq=1)/N", "ping blue1 -> blue3"),
    Send("blue1", _V6.format(dst="blue2") + "/ICMPv6EchoRequest(id=104, seq=1)/N",
         "ping6 blue1 -> blue2"),
    Send("blue2", _V6.format(dst="blue1") + "/ICMPv6EchoRequest(id=105, seq=1)/N",
         "ping6 blue2 -> blue1"),
    Send("red1", _V4.format(dst="red2") + "/ICMP(id=106, seq=1)/N", "ping red1 -> red2"),
    Send("red2", _V4.format(dst="red1") + "/ICMP(id=107, seq=1)/N", "ping red2 -> red1"),
    Send("red1", _V4.format(dst="red2") + "/UDP(sport=40000, dport=7000)/N", "red udp/7000"),
    Send("blue1", 'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst="192.168.50.7")'
                  '/TCP(sport=40001, dport=80, flags="S")/N',
         "tcp/80 to an address behind the route via blue3: delivered to blue3"),
] + [
    Send("blue1", _V4.format(dst="blue2") + f"/ICMP(id=110, seq={i})/N",
         f"ping blue1 -> blue2, seq {i} (a flow-table hit on the offloaded path)")
    for i in range(2, 6)
] + [
    Send("blue1", _V4.format(dst="blue2") + f'/UDP(sport=40010, dport=7100)/Raw(b"x" * {n})/N',
         f"udp/7100, {n} bytes of payload") for n in (0, 100, 1000, 1400)
]
