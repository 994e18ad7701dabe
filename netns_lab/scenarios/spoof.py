"""Spoofed sources: a VM port accepts only its endpoints' MACs and addresses and its
`allow` prefixes (allowed address pairs): Neutron's anti-spoofing rules per port, ARP
included, on the kernel path; the datapath's port security (drop reason `spoof`)."""
from . import Send

DESCRIPTION = __doc__

SENDS = [
    Send("blue1", 'Ether(src=me.mac, dst=me.gw)/IP(src="10.0.0.9", dst=vm("blue2").ip)'
                  '/UDP(sport=49000, dport=7100)/N', "an address that is nobody's"),
    Send("blue1", 'Ether(src=me.mac, dst=me.gw)/IP(src=vm("blue2").ip, dst=vm("blue3").ip)'
                  '/UDP(sport=49001, dport=7100)/N', "blue2's address from blue1"),
    Send("blue1", 'Ether(src="02:00:00:00:00:99", dst=me.gw)/IP(src=me.ip, dst=vm("blue2").ip)'
                  '/UDP(sport=49002, dport=7100)/N', "another source MAC"),
    Send("blue1", 'Ether(src=me.mac, dst=me.gw)/IPv6(src="fd00::99", dst=vm("blue2").ip6)'
                  '/UDP(sport=49003, dport=7100)/N', "an IPv6 address that is nobody's"),
    Send("red1", 'Ether(src=me.mac, dst=me.gw)/IP(src="10.0.0.3", dst=vm("red2").ip)'
                 '/UDP(sport=49004, dport=7000)/N', "red1 using an address only blue has"),
    Send("blue1", 'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst=vm("blue2").ip)'
                  '/UDP(sport=49005, dport=7100)/N', "the real source: delivered"),
    Send("blue3", 'Ether(src=me.mac, dst=me.gw)/IP(src="192.168.50.7", dst=vm("blue1").ip)'
                  '/TCP(sport=49006, dport=5001, flags="S")/N',
         "blue3 from its port's allowed prefix: delivered (and blue1's RST goes back by the "
         "route through blue3)"),
    Send("blue1", 'Ether(src=me.mac, dst=me.gw)/IP(src="192.168.50.7", dst=vm("blue2").ip)'
                  '/TCP(sport=49007, dport=5001, flags="S")/N',
         "blue1 from blue3's allowed prefix: dropped"),
    Send("blue1", 'Ether(src=me.mac, dst="ff:ff:ff:ff:ff:ff")/ARP(op=1, hwsrc=me.mac, '
                  'psrc=vm("blue2").ip, pdst=vm("blue3").ip)',
         "ARP claiming blue2's address: not answered"),
    Send("blue1", 'Ether(src=me.mac, dst="ff:ff:ff:ff:ff:ff")/ARP(op=1, '
                  'hwsrc="02:00:00:00:00:99", psrc=me.ip, pdst=vm("blue2").ip)',
         "ARP with another sender MAC: not answered"),
    Send("blue1", 'Ether(src=me.mac, dst=snmac(vm("blue2").ip6))/IPv6(src=vm("blue2").ip6, '
                  'dst=snma(vm("blue2").ip6), hlim=255)/ICMPv6ND_NS(tgt=vm("blue2").ip6)'
                  '/ICMPv6NDOptSrcLLAddr(lladdr=me.mac)',
         "neighbour solicitation from blue2's address: not answered"),
]
