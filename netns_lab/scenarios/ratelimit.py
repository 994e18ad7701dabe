"""Rate limits: a rule with a limit of 1 packet a second after a burst of 3 (the demo lab's
rule 10, udp/7700) lets the first 3 frames of a back-to-back burst of 6 through and drops
the rest; the replies of its flow are not charged to it. (Packet limits only: the kernel's
byte limits hold a second's worth more than their burst, see netns_lab/render.py.)"""
from . import Send

DESCRIPTION = __doc__

_U = ('Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst=vm("{dst}").ip)'
      '/UDP(sport={sport}, dport={dport})/N')

SENDS = [
    Send("blue1", "[" + _U.format(dst="blue2", sport=44000, dport=7700) + "] * 6",
         "a burst of 6 to udp/7700 (1 pps, burst 3): 3 delivered"),
    Send("blue2", "[" + _U.format(dst="blue1", sport=7700, dport=44000) + "] * 6",
         "6 replies: not charged to the rule, all delivered"),
    Send("blue1", "[" + _U.format(dst="blue2", sport=44001, dport=7701) + "] * 6",
         "the same burst to udp/7701 (rule 5, no limit): 6 delivered"),
]
