"""Stateful rules across nodes: blue allows udp to 7000-7999 only. A reply from the other
node passes by state (conntrack at both ends on the kernel path, the flow's reply entry
at both nodes offloaded); the same ports unsolicited, or a "reply" to a flow that never
was, is dropped."""
from .. import Send

DESCRIPTION = __doc__

_U = ('Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst=vm("{dst}").ip)'
      '/UDP(sport={sport}, dport={dport})/N')
_T = ('Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst=vm("{dst}").ip)'
      '/TCP(sport={sport}, dport={dport}, flags="{flags}", seq=1000, ack={ack})/N')

SENDS = [
    Send("blue2", _U.format(dst="blue1", sport=7002, dport=43000),
         "blue2 udp/7002 -> blue1:43000 before any flow: no rule, dropped"),
    Send("blue1", _U.format(dst="blue2", sport=43000, dport=7002),
         "blue1:43000 -> blue2 udp/7002 (node b): allowed"),
    Send("blue2", _U.format(dst="blue1", sport=7002, dport=43000),
         "the reply blue2 udp/7002 -> blue1:43000: passes by state, across the overlay"),
    Send("blue2", _U.format(dst="blue1", sport=7002, dport=43001),
         "blue2 udp/7002 -> blue1:43001: not a reply, dropped"),
    Send("blue2", _U.format(dst="blue1", sport=7003, dport=43000),
         "blue2 udp/7003 -> blue1:43000: not a reply, dropped"),
    Send("blue4", _T.format(dst="blue3", sport=5005, dport=43100, flags="SA", ack=1),
         "unsolicited SYN-ACK from node b: dropped"),
    Send("blue3", _T.format(dst="blue4", sport=43101, dport=5005, flags="S", ack=0),
         "SYN blue3 -> blue4 tcp/5005: allowed, blue4's kernel answers RST"),
    Send("blue2", _U.format(dst="blue1", sport=7002, dport=43000), "the udp reply again"),
    Send("red1", _U.format(dst="red2", sport=43200, dport=7000), "red: allowed udp/7000"),
    Send("red2", _U.format(dst="red1", sport=7000, dport=43200), "red: its reply"),
    Send("red2", _U.format(dst="red1", sport=7000, dport=43201), "red: not a reply"),
]
