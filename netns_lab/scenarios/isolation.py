"""Cross-tenant isolation: blue and red use the same addresses and the same VM MACs; only
the tenant (the port a frame comes from) keeps them apart. Nothing of one tenant reaches
the other, and an address only the other tenant has is unknown."""
from . import Expect, Send

DESCRIPTION = __doc__

SENDS = [
    Send("red1", 'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst="10.0.0.2")'
                 '/UDP(sport=41000, dport=7000)/N', "red1 -> 10.0.0.2: red2, never blue2"),
    Send("blue1", 'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst="10.0.0.2")'
                  '/UDP(sport=41000, dport=7000)/N', "blue1 -> 10.0.0.2: blue2, never red2"),
    Send("red1", 'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst="10.0.0.3")'
                 '/ICMP(id=201)/N', "red1 -> 10.0.0.3 (only blue has it)"),
    Send("red1", 'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst="192.168.50.7")'
                 '/TCP(sport=41001, dport=80, flags="S")/N', "red1 -> blue's routed prefix"),
    Send("red1", 'Ether(src=me.mac, dst=me.gw)/IPv6(src=me.ip6, dst="fd00::2")'
                 '/ICMPv6EchoRequest(id=202)/N', "red ping6 (red has no icmpv6 rule)"),
    Send("red2", 'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst="10.0.0.1")'
                 '/TCP(sport=41002, dport=5001, flags="S")/N',
         "red tcp/5001 (allowed in blue, denied in red)"),
    Send("blue2", 'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst="10.0.0.1")'
                  '/TCP(sport=41002, dport=5001, flags="S")/N', "the same tuple in blue"),
    Send("red1", 'Ether(src=me.mac, dst=vm("blue2").gw)/IP(src=me.ip, dst="10.0.0.2")'
                 '/UDP(sport=41003, dport=7000)/N',
         "red1 addressing blue2's gateway MAC: still red's traffic, never blue's",
         expect=Expect("the datapath routes what a VM port sends whatever its destination "
                       "MAC (the port is the VM's only wire); the kernel drops a frame for "
                       "a MAC that is not its own (PACKET_OTHERHOST). Either way nothing "
                       "reaches blue", same_delivery=False)),
    Send("red1", 'Ether(src=me.mac, dst="ff:ff:ff:ff:ff:ff")/ARP(op=1, hwsrc=me.mac, '
                 'psrc=me.ip, pdst="10.0.0.3")', "red1 asks for 10.0.0.3 (blue's only)"),
] + [
    Send(src, f'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst="{dst}")'
              f'/UDP(sport={41100 + i}, dport=7000)/N', f"{src} -> {dst} udp/7000")
    for i, (src, dst) in enumerate([("red1", "10.0.0.2"), ("red2", "10.0.0.1"),
                                    ("blue1", "10.0.0.2"), ("blue2", "10.0.0.1"),
                                    ("blue3", "10.0.0.1"), ("red2", "10.0.0.3")])
]
