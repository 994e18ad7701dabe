"""Cross-node isolation: blue and red use the same addresses and MACs on both nodes; only
the VNI keeps them apart on the underlay. Nothing one tenant sends reaches the other
tenant's VM on the other node, and an address only the other tenant has is unknown."""
from .. import Send
from . import echo, syn, udp

DESCRIPTION = __doc__

SENDS = [
    Send("red1", udp("10.0.0.2", 41000, 7000),
         "red1 -> 10.0.0.2: red2 (node b), never blue2"),
    Send("blue1", udp("10.0.0.2", 41000, 7000),
         "blue1 -> 10.0.0.2, the same tuple: blue2, never red2"),
    Send("red2", udp("10.0.0.1", 41001, 7000),
         "red2 -> 10.0.0.1: red1 (node a), never blue1"),
    Send("blue2", udp("10.0.0.1", 41001, 7000),
         "blue2 -> 10.0.0.1: blue1, never red1"),
    Send("red1", udp("10.0.0.4", 41002, 7000),
         "red1 -> 10.0.0.4 (only blue has it, on node b)"),
    Send("red2", udp("10.0.0.3", 41003, 7000),
         "red2 -> 10.0.0.3 (only blue has it, on node a)"),
    Send("red1", echo("10.0.0.4", 300),
         "red ping to blue's address"),
    Send("red1", syn("10.0.0.2", 41004, 5001),
         "red tcp/5001 (allowed in blue, denied in red)"),
    Send("blue1", syn("10.0.0.2", 41004, 5001), "the same tuple in blue"),
    Send("red1", 'Ether(src=me.mac, dst="ff:ff:ff:ff:ff:ff")/ARP(op=1, hwsrc=me.mac, '
                 'psrc=me.ip, pdst="10.0.0.4")', "red1 asks for 10.0.0.4 (blue's only)"),
    Send("blue1", 'Ether(src=me.mac, dst="ff:ff:ff:ff:ff:ff")/ARP(op=1, hwsrc=me.mac, '
                  'psrc=me.ip, pdst="10.0.0.4")', "blue1 asks for 10.0.0.4 (remote)"),
    Send("blue1", udp("10.0.0.99", 41005, 7000),
         "blue1 -> an address no node has"),
]
