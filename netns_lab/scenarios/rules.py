"""Allow and deny with priorities and port ranges (see the demo lab's rules): the edges of
every range, a deny inside an allowed range (higher priority), a source-limited range, an
all-protocol deny above everything, an in-port rule, and the tenant default."""
from . import Send

DESCRIPTION = __doc__

_TCP = ('Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst=vm("{dst}").ip)'
        '/TCP(sport={sport}, dport={dport}, flags="S")/N')
_UDP = ('Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst=vm("{dst}").ip)'
        '/UDP(sport={sport}, dport={dport})/N')
_UDP6 = ('Ether(src=me.mac, dst=me.gw)/IPv6(src=me.ip6, dst=vm("{dst}").ip6)'
         '/UDP(sport={sport}, dport={dport})/N')
_TCP6 = ('Ether(src=me.mac, dst=me.gw)/IPv6(src=me.ip6, dst=vm("{dst}").ip6)'
         '/TCP(sport={sport}, dport={dport}, flags="S")/N')

SENDS = (
    [Send("blue1", _TCP.format(dst="blue2", sport=42000 + i, dport=d), f"tcp/{d}")
     for i, d in enumerate((4999, 5000, 5001, 5049, 5050, 5051, 5098, 5099, 5100, 22))]
    + [Send("blue1", _UDP.format(dst="blue2", sport=42100 + i, dport=d), f"udp/{d} from blue1")
       for i, d in enumerate((6999, 7000, 7001, 7500, 7998, 7999, 8000))]
    + [Send("blue2", _UDP.format(dst="blue1", sport=42200 + i, dport=d),
            f"udp/{d} from blue2 (the range is blue1's only)")
       for i, d in enumerate((7000, 7099, 7100, 7101))]
    + [Send("blue2", _TCP.format(dst="blue3", sport=42300, dport=5001),
            "blue2 -> blue3 tcp/5001: denied by the priority-400 rule"),
       Send("blue2", 'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst=vm("blue3").ip)'
                     '/ICMP(id=301)/N', "blue2 -> blue3 ping: denied"),
       Send("blue3", _TCP.format(dst="blue2", sport=42301, dport=5001),
            "blue3 -> blue2 tcp/5001: the other direction is allowed"),
       Send("blue1", _TCP.format(dst="blue3", sport=42302, dport=5050),
            "blue1 -> blue3 tcp/5050: denied")]
    + [Send("blue1", _UDP6.format(dst="blue2", sport=42400 + i, dport=d), f"udp6/{d}")
       for i, d in enumerate((7001, 7099, 7100, 7101))]
    + [Send("blue1", _TCP6.format(dst="blue2", sport=42500 + i, dport=d), f"tcp6/{d}")
       for i, d in enumerate((4999, 5000, 5050, 5099))]
    + [Send(src, _TCP.format(dst=dst, sport=42800 + i, dport=9000),
            f"{src} -> {dst} tcp/9000 (allowed only in from blue2's port)")
       for i, (src, dst) in enumerate([("blue2", "blue1"), ("blue2", "blue3"),
                                       ("blue1", "blue2"), ("blue3", "blue1")])]
    + [Send("red1", _TCP.format(dst="red2", sport=42600 + i, dport=d), f"red tcp/{d}")
       for i, d in enumerate((80, 5001))]
    + [Send("red1", _UDP.format(dst="red2", sport=42700 + i, dport=d), f"red udp/{d}")
       for i, d in enumerate((6999, 7000, 7001))]
)
