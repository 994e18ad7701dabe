"""MTU: blue3 (node a) keeps an MTU of 1500; the uplink's is 1500 too, so its full frames
do not fit once encapsulated (50 bytes more). A 1450-byte IPv4 packet fits exactly and is
delivered on both paths; bigger ones never reach blue2. The datapath hands them to the
node's kernel (verdict pass, reason mtu_kernel, counted; tests/lab/test_overlay_nodes.py
checks the monitor event), whose lab node has no path for tenants: nothing comes back.
The kernel path's router forwards into its vxlan device (MTU 1450) and does what a router
does: with DF set it answers ICMP fragmentation needed (mtu 1450) to blue3 (from
192.0.0.8, the kernel's source when the router has no address), without DF it fragments
and blue2 gets the fragments. That is the difference listed on those sends:
where the offloaded node's own stack is the tenant's slow path (a real deployment), it
answers as the kernel path does; in this lab it has none."""
from .. import Expect, Send
from . import to

DESCRIPTION = __doc__



def _big(flags: str, sport: int, size: int) -> str:
    """An IPv4 packet of `size` bytes from blue3 to blue2."""
    return to("blue2", f'flags="{flags}"') + \
        f'/UDP(sport={sport}, dport=7000)/Raw(N + b"m" * ({size} - 28 - len(N)))'

_DF = Expect("too big for the uplink once encapsulated: the datapath passes it to the "
             "node's kernel (mtu_kernel), which in this lab has no path for tenants, so "
             "nothing comes back; the kernel path's router answers ICMP fragmentation "
             "needed (mtu 1450, from 192.0.0.8) to the sender, as a node whose own stack "
             "is the tenant's slow path would",
             same_delivery=False)
_NODF = Expect("too big for the uplink once encapsulated, DF clear: the datapath passes it "
               "to the node's kernel (mtu_kernel), which has no path for tenants here; the "
               "kernel path's router fragments it and blue2 gets the fragments",
               same_delivery=False)

SENDS = [
    Send("blue3", _big(flags="DF", sport=46000, size=1450),
         "1450 bytes with DF: fits the uplink encapsulated, delivered"),
    Send("blue3", _big(flags="DF", sport=46001, size=1451),
         "1451 bytes with DF: one byte too big", expect=_DF),
    Send("blue3", _big(flags="DF", sport=46002, size=1500),
         "1500 bytes with DF", expect=_DF),
    Send("blue3", _big(flags="", sport=46003, size=1500),
         "1500 bytes without DF", expect=_NODF),
    Send("blue3", _big(flags="DF", sport=46004, size=1400),
         "1400 bytes with DF after the big ones: delivered"),
]
