"""Cross-node traffic: ICMP echo, UDP and TCP between VMs of one tenant on different
nodes, both directions and both tenants; the answers of the VMs' kernels (echo replies,
port unreachable, RST) come back across the overlay. Routed at both nodes: TTL 62 on
arrival."""
from .. import Send
from . import echo, syn, to, udp

DESCRIPTION = __doc__

SENDS = [
    Send(src, echo(dst, 100 + i), f"ping {src} -> {dst}")
    for i, (src, dst) in enumerate([("blue1", "blue2"), ("blue2", "blue1"), ("red1", "red2"),
                                    ("red2", "red1"), ("blue3", "blue4"), ("blue4", "blue1")])
] + [
    Send("blue1", udp("blue2", 40000, 7000),
         "udp blue1 -> blue2:7000 (closed: port unreachable comes back)"),
    Send("blue2", udp("blue1", 40001, 7001), "udp blue2 -> blue1:7001"),
    Send("red1", udp("red2", 40002, 7000), "udp red1 -> red2:7000"),
    Send("red2", udp("red1", 40003, 7000), "udp red2 -> red1:7000"),
    Send("blue1", syn("blue2", 40010, 5001),
         "tcp SYN blue1 -> blue2:5001 (closed: RST comes back)"),
    Send("blue4", syn("blue3", 40011, 5002), "tcp SYN blue4 -> blue3:5002"),
    Send("blue1", to("blue2") +
         '/UDP(sport=40020, dport=7000)/Raw(N + b"x" * (1450 - 28 - len(N)))',
         "a full 1450-byte frame from a VM with the overlay's MTU"),
    Send("blue1", "[" + ", ".join(udp("blue2", 40030 + i, 7010 + i)
                                  for i in range(4)) + "]", "a burst of four new flows"),
    Send("red1", syn("red2", 40040, 5001),
         "red tcp across nodes: denied (at the source node)"),
    Send("blue2", udp("blue3", 40050, 7000),
         "blue2 -> blue3: denied by rule 4"),
    Send("blue3", udp("blue2", 40051, 7000),
         "blue3 -> blue2 udp (rule 4 is one-way): allowed"),
]
