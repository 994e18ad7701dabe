"""Cross-node isolation: blue and red use the same addresses and MACs on both nodes; only
the VNI keeps them apart on the underlay. Nothing one tenant sends reaches the other
tenant's VM on the other node, and an address only the other tenant has is unknown."""
from .. import Send

DESCRIPTION = __doc__

_U = ('Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst="{dst}")'
      '/UDP(sport={sport}, dport={dport})/N')

SENDS = [
    Send("red1", _U.format(dst="10.0.0.2", sport=41000, dport=7000),
         "red1 -> 10.0.0.2: red2 (node b), never blue2"),
    Send("blue1", _U.format(dst="10.0.0.2", sport=41000, dport=7000),
         "blue1 -> 10.0.0.2, the same tuple: blue2, never red2"),
    Send("red2", _U.format(dst="10.0.0.1", sport=41001, dport=7000),
         "red2 -> 10.0.0.1: red1 (node a), never blue1"),
    Send("blue2", _U.format(dst="10.0.0.1", sport=41001, dport=7000),
         "blue2 -> 10.0.0.1: blue1, never red1"),
    Send("red1", _U.format(dst="10.0.0.4", sport=41002, dport=7000),
         "red1 -> 10.0.0.4 (only blue has it, on node b)"),
    Send("red2", _U.format(dst="10.0.0.3", sport=41003, dport=7000),
         "red2 -> 10.0.0.3 (only blue has it, on node a)"),
    Send("red1", 'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst="10.0.0.4")/ICMP(id=300)/N',
         "red ping to blue's address"),
    Send("red1", 'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst="10.0.0.2")'
                 '/TCP(sport=41004, dport=5001, flags="S")/N',
         "red tcp/5001 (allowed in blue, denied in red)"),
    Send("blue1", 'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst="10.0.0.2")'
                  '/TCP(sport=41004, dport=5001, flags="S")/N', "the same tuple in blue"),
    Send("red1", 'Ether(src=me.mac, dst="ff:ff:ff:ff:ff:ff")/ARP(op=1, hwsrc=me.mac, '
                 'psrc=me.ip, pdst="10.0.0.4")', "red1 asks for 10.0.0.4 (blue's only)"),
    Send("blue1", 'Ether(src=me.mac, dst="ff:ff:ff:ff:ff:ff")/ARP(op=1, hwsrc=me.mac, '
                  'psrc=me.ip, pdst="10.0.0.4")', "blue1 asks for 10.0.0.4 (remote)"),
    Send("blue1", _U.format(dst="10.0.0.99", sport=41005, dport=7000),
         "blue1 -> an address no node has"),
]
