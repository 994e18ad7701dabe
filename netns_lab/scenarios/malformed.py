"""Malformed frames: headers that lie about their length, truncated transport headers. The
kernel drops them on input or in its matches; the datapath gives them the tenant's default
verdict (drop), bytes untouched."""
from . import Expect, Send

DESCRIPTION = __doc__

_IP = 'IP(src=me.ip, dst=vm("blue2").ip{extra})'

SENDS = [
    Send("blue1", 'Ether(src=me.mac, dst=me.gw)/' + _IP.format(extra=", ihl=4")
         + "/UDP(sport=51000, dport=7100)/N", "IHL 4"),
    Send("blue1", 'Ether(src=me.mac, dst=me.gw)/' + _IP.format(extra=", len=400")
         + "/UDP(sport=51001, dport=7100)/N", "IP total length beyond the frame"),
    Send("blue1", 'Ether(src=me.mac, dst=me.gw)/' + _IP.format(extra=", proto=17")
         + '/Raw(b"\\x00\\x01")', "UDP header truncated"),
    Send("blue1", 'Ether(src=me.mac, dst=me.gw)/' + _IP.format(extra="")
         + "/UDP(sport=51003, dport=7100, len=400)/N", "UDP length beyond the packet",
         expect=Expect("the datapath checks the UDP length against the IP length (tenant "
                       "default: drop); the kernel forwards it (conntrack calls it INVALID, "
                       "the port rule still accepts it) and the receiving VM's stack drops "
                       "it", same_delivery=False)),
    Send("blue1", 'Ether(src=me.mac, dst=me.gw)/' + _IP.format(extra=", proto=6")
         + '/Raw(b"\\x00\\x01\\x13\\x89")', "TCP header truncated to its ports",
         expect=Expect("the datapath refuses a TCP header shorter than 20 bytes (tenant "
                       "default: drop); netfilter's port match reads only the port bytes, so "
                       "the kernel forwards it and the receiving VM's stack drops it",
                       same_delivery=False)),
    Send("blue1", 'Ether(src=me.mac, dst=me.gw)/IPv6(src=me.ip6, dst=vm("blue2").ip6, plen=400)'
                  '/UDP(sport=51005, dport=7100)/N', "IPv6 payload length beyond the frame"),
    Send("blue1", 'Ether(src=me.mac, dst=me.gw)/IPv6(src=me.ip6, dst=vm("blue2").ip6, nh=17)'
                  '/Raw(b"\\x00\\x01")', "IPv6: UDP header truncated"),
    Send("blue1", 'Ether(src=me.mac, dst=me.gw, type=0x0800)/Raw(b"\\x45\\x00")',
         "IPv4 header truncated"),
    Send("blue1", 'Ether(src=me.mac, dst=me.gw)/' + _IP.format(extra=", version=5")
         + "/UDP(sport=51008, dport=7100)/N", "IP version 5 in an IPv4 frame"),
]
