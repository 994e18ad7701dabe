"""Fragments: a fragmented datagram of an allowed flow arrives whole on both paths (later
fragments take the ports of the first); a later fragment alone, or the fragments of a
denied flow, do not. The kernel path reassembles in conntrack and fragments again the same
way (IPv4: same sizes and identification, so the bytes compare)."""
from . import Expect, Send

DESCRIPTION = __doc__

_U4 = ('IP(src=me.ip, dst=vm("blue2").ip, id={id})/UDP(sport={sport}, dport={dport})'
       '/(N + b"f" * 1200)')
_U6 = ('IPv6(src=me.ip6, dst=vm("blue2").ip6)/IPv6ExtHdrFragment(id={id})'
       '/UDP(sport={sport}, dport={dport})/(N + b"f" * 1200)')

SENDS = [
    Send("blue1", f'[Ether(src=me.mac, dst=me.gw)/f for f in fragment({_U4.format(id=701, sport=47000, dport=7100)}, fragsize=400)]',
         "udp/7100 in 4 fragments, in order"),
    Send("blue1", f'[Ether(src=me.mac, dst=me.gw)/f for f in fragment({_U4.format(id=702, sport=47001, dport=7100)}, fragsize=400)][1:]',
         "the later fragments without the first"),
    Send("blue2", f'[Ether(src=me.mac, dst=me.gw)/f for f in fragment({_U4.format(id=703, sport=47002, dport=7000).replace("blue2", "blue1")}, fragsize=400)]',
         "fragments of a flow no rule allows (blue2 udp/7000)"),
    Send("blue1", f'[Ether(src=me.mac, dst=me.gw)/f for f in fragment6({_U6.format(id=704, sport=47003, dport=7100)}, 600)]',
         "udp6/7100 in fragments",
         expect=Expect("IPv6 conntrack reassembles the datagram and fragments it again "
                       "with a new fragment identification; the datapath forwards each "
                       "fragment as it came (same VMs, same sizes)")),
    Send("blue1", f'[Ether(src=me.mac, dst=me.gw)/f for f in fragment6({_U6.format(id=705, sport=47004, dport=7001)}, 600)]',
         "udp6/7001 (no rule) in fragments"),
]
