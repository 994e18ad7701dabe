"""SNAT: green2 and gold2 (the same address in two tenants, no floating IP) reach the
internet server from the same source port to the same server port; both leave with the
node's address and different allocated source ports (the comparison labels the ports in
order of appearance: each path may choose its own, but the same flow keeps its port and
two flows never share one), and the server's answers (RST, port unreachable with the
translated header inside, echo reply) come back translated to the right VM. Packets to the
node's address at a port no flow holds reach no VM (the node's stack answers). Rules judge
the untranslated packet."""
from . import Send

DESCRIPTION = __doc__

NODE = "198.51.100.1"          # the demo lab's SNAT address (the uplink's local_ip)
SERVER = "192.0.2.80"

_OUT = 'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst="{dst}")/{l4}/N'


def _out(l4: str, dst: str = SERVER) -> str:
    return _OUT.format(dst=dst, l4=l4)


SENDS = [
    Send("green2", _out("UDP(sport=40000, dport=7000)"),
         "green2 udp 40000 -> server:7000: out as the node, port unreachable back"),
    Send("gold2", _out("UDP(sport=40000, dport=7000)"),
         "gold2, the same address, port and destination: another allocated port"),
    Send("green2", _out('TCP(sport=40001, dport=5001, flags="S")'),
         "green2 SYN to the server: the server's RST comes back translated"),
    Send("gold2", _out('TCP(sport=40001, dport=5002, flags="S")'),
         "gold2, the same source port to the next server port (the RST closed green2's "
         "connection: the kernel may reuse its port for the same server port, rightly)"),
    Send("green2", _out("ICMP(id=0x4000)"), "green2 pings the server"),
    Send("gold2", _out("ICMP(id=0x4000)"), "gold2 pings it with the same echo id"),
    Send("green2", _out("UDP(sport=40000, dport=7000)"),
         "green2's first flow again: the same allocated port"),
    Send("green2", _out("UDP(sport=40003, dport=7001)", dst="198.51.100.2"),
         "green2 to the host on the link"),
    Send("inet", f'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst="{NODE}")'
                 f'/UDP(sport=40500, dport=30000)/N',
         "to the node's address at a port no flow holds: no VM (the node's stack answers)"),
    Send("inet", f'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst="{NODE}")'
                 f'/TCP(sport=40501, dport=10000, flags="S")/N',
         "a SYN to the node's address (outside the SNAT range): no VM, the node's RST"),
    Send("green2", _out('TCP(sport=40002, dport=22, flags="S")'),
         "green2 tcp/22 out: no rule allows it"),
]
