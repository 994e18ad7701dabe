"""IPv6 with extension headers in front of the transport header: the rules see the
transport header behind them on both paths."""
from . import Expect, Send

DESCRIPTION = __doc__

_H = 'Ether(src=me.mac, dst=me.gw)/IPv6(src=me.ip6, dst=vm("blue2").ip6)'

SENDS = [
    Send("blue1", _H + "/IPv6ExtHdrHopByHop()/UDP(sport=46000, dport=7100)/N", "hop-by-hop"),
    Send("blue1", _H + "/IPv6ExtHdrDestOpt()/UDP(sport=46001, dport=7100)/N",
         "destination options"),
    Send("blue1", _H + "/IPv6ExtHdrHopByHop()/IPv6ExtHdrDestOpt()/UDP(sport=46002, dport=7100)/N",
         "hop-by-hop + destination options"),
    Send("blue1", _H + "/IPv6ExtHdrDestOpt()/UDP(sport=46003, dport=7001)/N",
         "destination options, a udp port no rule allows"),
    Send("blue1", _H + '/IPv6ExtHdrDestOpt()/TCP(sport=46004, dport=5001, flags="S")/N',
         "destination options + tcp/5001"),
    Send("blue1", _H + '/IPv6ExtHdrHopByHop()/TCP(sport=46005, dport=5050, flags="S")/N',
         "hop-by-hop + tcp/5050 (denied)"),
    Send("blue1", _H + "/IPv6ExtHdrHopByHop()/ICMPv6EchoRequest(id=601)/N", "hop-by-hop + ping6"),
    Send("blue1", _H + "/IPv6ExtHdrDestOpt()/IPv6ExtHdrDestOpt()/IPv6ExtHdrDestOpt()"
                       "/UDP(sport=46006, dport=7100)/N", "three destination options headers"),
    Send("blue1", _H + "/" + "/".join(["IPv6ExtHdrDestOpt()"] * 7)
         + "/UDP(sport=46007, dport=7100)/N",
         "seven extension headers",
         expect=Expect("the datapath walks at most 6 IPv6 extension headers (a bounded "
                       "parser, see the README); a longer chain gets the tenant's default "
                       "verdict, where the kernel walks any chain and forwards it",
                       same_delivery=False)),
]
