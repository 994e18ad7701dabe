"""A VM moves between nodes: blue4 runs on node b, then on node a (its port moves to node
a; node a's state has its endpoint local, node b's remote behind a's VTEP; on the kernel
path its port moves between the routers, routes and neighbours follow), then back.
Traffic reaches it at its new home on both paths: from blue1 (node a) across the overlay
before (TTL 62), locally after (TTL 63); from blue2 (node b) the other way round."""
from .. import Move, Send
from . import echo, udp

DESCRIPTION = __doc__

def _round(tag: int, where: str):
    return [
        Send("blue1", udp("blue4", 47000 + tag, 7000),
             f"blue1 (node a) -> blue4 on node {where}"),
        Send("blue2", udp("blue4", 47100 + tag, 7000),
             f"blue2 (node b) -> blue4 on node {where}"),
        Send("blue4", echo("blue1", 700 + tag), f"blue4 on node {where} pings blue1"),
        Send("blue4", udp("blue2", 47200 + tag, 7000),
             f"blue4 on node {where} -> blue2"),
        Send("red1", udp("blue4", 47300 + tag, 7000),
             f"red1 -> 10.0.0.4 (blue's, on node {where}): nothing"),
        Send("blue1", udp("blue4", 47000, 7000),
             f"the first flow's tuple again, blue4 on node {where}"),
    ]


SENDS = _round(0, "b") + [Move("blue4", "a")] + _round(1, "a") + [Move("blue4", "b")] + \
    _round(2, "b")
