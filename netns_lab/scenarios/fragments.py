"""Fragments: a fragmented datagram of an allowed flow arrives whole on both paths (later
fragments take the ports of the first); a later fragment alone, or the fragments of a
denied flow, do not. The kernel path reassembles in conntrack and fragments again the same
way (IPv4: same sizes and identification, so the bytes compare)."""
from . import Expect, Send

DESCRIPTION = __doc__


def _v4(src_dst: str, ident: int, sport: int, dport: int, keep: str = "") -> str:
    """IPv4 fragments of 400 bytes of a UDP datagram (`keep`: a slice of them)."""
    dgram = (f'IP({src_dst}, id={ident})/UDP(sport={sport}, dport={dport})'
             f'/(N + b"f" * 1200)')
    return f'[Ether(src=me.mac, dst=me.gw)/f for f in fragment({dgram}, fragsize=400)]{keep}'


def _v6(ident: int, sport: int, dport: int) -> str:
    dgram = (f'IPv6(src=me.ip6, dst=vm("blue2").ip6)/IPv6ExtHdrFragment(id={ident})'
             f'/UDP(sport={sport}, dport={dport})/(N + b"f" * 1200)')
    return f'[Ether(src=me.mac, dst=me.gw)/f for f in fragment6({dgram}, 600)]'


_TO_BLUE2 = 'src=me.ip, dst=vm("blue2").ip'

SENDS = [
    Send("blue1", _v4(_TO_BLUE2, 701, 47000, 7100), "udp/7100 in 4 fragments, in order"),
    Send("blue1", _v4(_TO_BLUE2, 702, 47001, 7100, keep="[1:]"),
         "the later fragments without the first"),
    Send("blue2", _v4('src=me.ip, dst=vm("blue1").ip', 703, 47002, 7000),
         "fragments of a flow no rule allows (blue2 udp/7000)"),
    Send("blue1", _v6(704, 47003, 7100), "udp6/7100 in fragments",
         expect=Expect("IPv6 conntrack reassembles the datagram and fragments it again "
                       "with a new fragment identification; the datapath forwards each "
                       "fragment as it came (same VMs, same sizes)")),
    Send("blue1", _v6(705, 47004, 7001), "udp6/7001 (no rule) in fragments"),
]
