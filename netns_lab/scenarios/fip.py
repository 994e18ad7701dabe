"""Floating IPs (1:1 NAT): the external host reaches green1 and gold1, which have the same
address in two tenants, through their floating IPs (TCP, UDP, ICMP echo); their answers
and ICMP errors leave with the floating IP (the error's inner header translated too); what
they send on their own leaves with it and its ICMP error comes back translated; the
tenant's rules judge the translated packet (its VM address, the untranslated peer); the
node answers ARP for a floating IP on the uplink."""
from . import Send

DESCRIPTION = __doc__

GREEN, GOLD = "203.0.113.10", "203.0.113.20"     # the demo lab's [[fips]]
SERVER = "192.0.2.80"                            # behind the external host

_IN = 'Ether(src=me.mac, dst=me.gw)/IP(src={src}, dst="{fip}")/{l4}/N'
_OUT = 'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst="{dst}")/{l4}/N'


def _in(fip: str, l4: str, src: str = "me.ip") -> str:
    return _IN.format(fip=fip, l4=l4, src=src)


SENDS = [
    Send("inet", _in(GREEN, 'TCP(sport=41000, dport=5001, flags="S")'),
         "SYN to green's floating IP: green1 (its RST leaves with the floating IP)"),
    Send("inet", _in(GOLD, 'TCP(sport=41001, dport=5001, flags="S")'),
         "SYN to gold's floating IP: gold1, the same address in another tenant"),
    Send("inet", _in(GREEN, "UDP(sport=41002, dport=7001)"),
         "udp to green1's closed port: its port unreachable, inner header translated too"),
    Send("inet", _in(GREEN, "ICMP(id=0x4101)"), "ping green's floating IP"),
    Send("inet", _in(GOLD, "ICMP(id=0x4102)"), "ping gold's floating IP"),
    Send("inet", _in(GREEN, 'TCP(sport=41003, dport=22, flags="S")'),
         "tcp/22 to green1: no rule allows it, dropped"),
    Send("inet", _in(GREEN, 'TCP(sport=41004, dport=8080, flags="S")'),
         "tcp/8080: allowed by a rule on green1's own address (the translated one)"),
    Send("inet", _in(GOLD, 'TCP(sport=41005, dport=5001, flags="S")', src=f'"{SERVER}"'),
         "from the internet server to gold1: gold's rule on the peer denies it"),
    Send("inet", _in("203.0.113.99", 'TCP(sport=41006, dport=5001, flags="S")'),
         "to a floating address nobody has: dropped"),
    Send("green1", _OUT.format(dst=SERVER, l4="UDP(sport=41010, dport=7005)"),
         "green1's own udp to the server: leaves with its floating IP, the port "
         "unreachable comes back translated"),
    Send("green1", _OUT.format(dst=SERVER, l4="ICMP(id=0x4110)"),
         "green1 pings the server: out with its floating IP, the reply back"),
    Send("gold1", _OUT.format(dst=SERVER, l4="UDP(sport=41010, dport=7005)"),
         "gold1, the same address and port: out with gold's floating IP"),
    Send("green1", _OUT.format(dst="198.51.100.2", l4='TCP(sport=41011, dport=22, flags="S")'),
         "green1 tcp/22 out: no rule allows it"),
    Send("inet", 'Ether(src=me.mac, dst="ff:ff:ff:ff:ff:ff")/ARP(hwsrc=me.mac, psrc=me.ip, '
                 f'pdst="{GREEN}")',
         "ARP for green's floating IP on the uplink: the node answers with the uplink's MAC"),
]
