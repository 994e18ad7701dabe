"""Unknown destinations, broadcast, multicast and other ethertypes: allowed by the rules but
nowhere to go, or not unicast IP: nothing is delivered, and no error comes back."""
from . import Send

DESCRIPTION = __doc__

SENDS = [
    Send("blue1", f'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst="{d}")'
                  f'/UDP(sport={50000 + i}, dport=7100)/N', f"udp/7100 to {d}")
    for i, d in enumerate(("10.0.0.99", "172.16.0.1", "8.8.8.8", "10.0.0.255"))
] + [
    Send("blue1", f'Ether(src=me.mac, dst=me.gw)/IPv6(src=me.ip6, dst="{d}")'
                  f'/UDP(sport={50100 + i}, dport=7100)/N', f"udp6/7100 to {d}")
    for i, d in enumerate(("fd00::99", "2001:db8::1"))
] + [
    Send("blue1", 'Ether(src=me.mac, dst="ff:ff:ff:ff:ff:ff")/IP(src=me.ip, dst="255.255.255.255")'
                  '/UDP(sport=50200, dport=7100)/N', "broadcast"),
    Send("blue1", 'Ether(src=me.mac, dst="01:00:5e:00:00:01")/IP(src=me.ip, dst="224.0.0.1")'
                  '/ICMP(id=801)/N', "multicast ping"),
    Send("blue1", 'Ether(src=me.mac, dst="33:33:00:00:00:01")/IPv6(src=me.ip6, dst="ff02::1")'
                  '/ICMPv6EchoRequest(id=802)/N', "ping6 all-nodes"),
    Send("blue1", 'Ether(src=me.mac, dst=me.gw, type=0x88b5)/N', "a local experimental ethertype"),
    Send("blue1", 'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst="192.168.51.1")'
                  '/TCP(sport=50300, dport=80, flags="S")/N', "next to the routed prefix"),
]
