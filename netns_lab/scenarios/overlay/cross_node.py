"""Cross-node traffic: ICMP echo, UDP and TCP between VMs of one tenant on different
nodes, both directions and both tenants; the answers of the VMs' kernels (echo replies,
port unreachable, RST) come back across the overlay. Routed at both nodes: TTL 62 on
arrival."""
from .. import Send

DESCRIPTION = __doc__

_E = ('Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst=vm("{dst}").ip)'
      '/ICMP(id={id}, seq=1)/N')
_U = ('Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst=vm("{dst}").ip)'
      '/UDP(sport={sport}, dport={dport})/N')
_T = ('Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst=vm("{dst}").ip)'
      '/TCP(sport={sport}, dport={dport}, flags="S", seq=1000)/N')

SENDS = [
    Send(src, _E.format(dst=dst, id=100 + i), f"ping {src} -> {dst}")
    for i, (src, dst) in enumerate([("blue1", "blue2"), ("blue2", "blue1"), ("red1", "red2"),
                                    ("red2", "red1"), ("blue3", "blue4"), ("blue4", "blue1")])
] + [
    Send("blue1", _U.format(dst="blue2", sport=40000, dport=7000),
         "udp blue1 -> blue2:7000 (closed: port unreachable comes back)"),
    Send("blue2", _U.format(dst="blue1", sport=40001, dport=7001), "udp blue2 -> blue1:7001"),
    Send("red1", _U.format(dst="red2", sport=40002, dport=7000), "udp red1 -> red2:7000"),
    Send("red2", _U.format(dst="red1", sport=40003, dport=7000), "udp red2 -> red1:7000"),
    Send("blue1", _T.format(dst="blue2", sport=40010, dport=5001),
         "tcp SYN blue1 -> blue2:5001 (closed: RST comes back)"),
    Send("blue4", _T.format(dst="blue3", sport=40011, dport=5002), "tcp SYN blue4 -> blue3:5002"),
    Send("blue1", 'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst=vm("blue2").ip)'
                  '/UDP(sport=40020, dport=7000)/Raw(N + b"x" * (1450 - 28 - len(N)))',
         "a full 1450-byte frame from a VM with the overlay's MTU"),
    Send("blue1", "[" + ", ".join(_U.format(dst="blue2", sport=40030 + i, dport=7010 + i)
                                  for i in range(4)) + "]", "a burst of four new flows"),
    Send("red1", _T.format(dst="red2", sport=40040, dport=5001),
         "red tcp across nodes: denied (at the source node)"),
    Send("blue2", _U.format(dst="blue3", sport=40050, dport=7000),
         "blue2 -> blue3: denied by rule 4"),
    Send("blue3", _U.format(dst="blue2", sport=40051, dport=7000),
         "blue3 -> blue2 udp (rule 4 is one-way): allowed"),
]
