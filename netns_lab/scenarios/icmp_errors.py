"""ICMP errors: what a VM's kernel answers for a closed port comes back to the sender on
both paths (conntrack's RELATED on the kernel path, the flow's reply path on the offloaded
one); an error about a flow that never was is judged by the rules."""
from . import Send

DESCRIPTION = __doc__

SENDS = [
    Send("blue1", 'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst=vm("blue2").ip)'
                  '/UDP(sport=44000, dport=7010)/N', "udp to a closed port: port unreachable"),
    Send("blue1", 'Ether(src=me.mac, dst=me.gw)/IPv6(src=me.ip6, dst=vm("blue2").ip6)'
                  '/UDP(sport=44001, dport=7100)/N', "udp6 to a closed port"),
    Send("blue1", 'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst=vm("blue2").ip)'
                  '/TCP(sport=44002, dport=5010, flags="S")/N', "tcp to a closed port: RST"),
    Send("red1", 'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst=vm("red2").ip)'
                 '/UDP(sport=44003, dport=7000)/N', "red: udp to a closed port"),
    Send("blue2", 'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst=vm("blue1").ip)'
                  '/ICMP(type=3, code=3)/IP(src=vm("blue1").ip, dst=me.ip)'
                  '/UDP(sport=44900, dport=7999)/N',
         "an unreachable about a flow that never was (ICMP rule allows it)"),
    Send("blue2", 'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst=vm("blue1").ip)'
                  '/ICMP(type=11, code=0)/IP(src=vm("blue1").ip, dst=me.ip)'
                  '/UDP(sport=44000, dport=7010)/N', "time exceeded about blue1's flow"),
    Send("blue2", 'Ether(src=me.mac, dst=me.gw)/IPv6(src=me.ip6, dst=vm("blue1").ip6)'
                  '/ICMPv6PacketTooBig(mtu=1280)/IPv6(src=vm("blue1").ip6, dst=me.ip6)'
                  '/UDP(sport=44001, dport=7100)/N', "packet too big about blue1's flow"),
    Send("red2", 'Ether(src=me.mac, dst=me.gw)/IPv6(src=me.ip6, dst=vm("red1").ip6)'
                 '/ICMPv6DestUnreach(code=4)/IPv6(src=vm("red1").ip6, dst=me.ip6)'
                 '/UDP(sport=44010, dport=7000)/N',
         "red: an ICMPv6 error about no flow (red has no icmpv6 rule)"),
]
