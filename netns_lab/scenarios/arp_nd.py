"""ARP and IPv6 neighbour discovery: a VM asking for an address its tenant knows gets its
port's MAC (proxy ARP / proxy ND on the kernel path); its own address, unknown addresses,
gratuitous ARP, probes and duplicate-address detection get no answer."""
from . import Expect, Send

DESCRIPTION = __doc__

_ARP = ('Ether(src=me.mac, dst="ff:ff:ff:ff:ff:ff")/ARP(op=1, hwsrc=me.mac, psrc={psrc}, '
        'pdst={pdst})')
_NS = ('Ether(src=me.mac, dst=snmac({tgt}))/IPv6(src={src}, dst=snma({tgt}), hlim={hlim})'
       '/ICMPv6ND_NS(tgt={tgt})/ICMPv6NDOptSrcLLAddr(lladdr=me.mac)')
_NA_DIFF = Expect("a Linux proxy neighbour advertisement comes from the router port's "
                  "link-local address with Override clear; the datapath's from the target "
                  "address with Router|Solicited|Override (both give the port's MAC)")

SENDS = [
    Send("blue1", _ARP.format(psrc="me.ip", pdst='vm("blue2").ip'), "who has blue2"),
    Send("blue1", _ARP.format(psrc="me.ip", pdst='vm("blue3").ip'), "who has blue3"),
    Send("blue2", _ARP.format(psrc="me.ip", pdst='vm("blue1").ip'), "blue2: who has blue1"),
    Send("blue1", _ARP.format(psrc="me.ip", pdst='"192.168.50.7"'),
         "who has an address behind a route"),
    Send("blue1", _ARP.format(psrc="me.ip", pdst="me.ip"), "gratuitous ARP"),
    Send("blue1", _ARP.format(psrc='"0.0.0.0"', pdst='vm("blue2").ip'), "ARP probe"),
    Send("blue1", _ARP.format(psrc="me.ip", pdst='"10.0.0.99"'), "who has an unknown address"),
    Send("red1", _ARP.format(psrc="me.ip", pdst='vm("red2").ip'), "red: who has red2"),
    Send("blue1", 'Ether(src=me.mac, dst=me.gw)/ARP(op=2, hwsrc=me.mac, psrc=me.ip, '
                  'hwdst=me.gw, pdst=vm("blue2").ip)', "an unsolicited ARP reply"),
    Send("blue1", _NS.format(src="me.ip6", tgt='vm("blue2").ip6', hlim=255),
         "neighbour solicitation for blue2", expect=_NA_DIFF),
    Send("red2", _NS.format(src="me.ip6", tgt='vm("red1").ip6', hlim=255),
         "red: neighbour solicitation for red1", expect=_NA_DIFF),
    Send("blue1", _NS.format(src="me.ip6", tgt="me.ip6", hlim=255), "solicitation for itself"),
    Send("blue1", _NS.format(src="me.ip6", tgt='"fd00::99"', hlim=255),
         "solicitation for an unknown address"),
    Send("blue1", _NS.format(src='"::"', tgt='vm("blue2").ip6', hlim=255),
         "duplicate-address detection"),
    Send("blue1", _NS.format(src="me.ip6", tgt='vm("blue2").ip6', hlim=64),
         "solicitation with hop limit 64 (invalid)"),
]
