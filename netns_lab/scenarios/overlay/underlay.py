"""Crafted VXLAN on the underlay, sent out of node a's uplink to node b's VTEP: from a
known VTEP with a known VNI it is delivered (the control: the injection works); with a
VNI no tenant has, from a VTEP no endpoint of the VNI's tenant is behind, with the other
tenant's VNI for this tenant's inner addresses, or not VXLAN at all, nothing reaches any
VM on either path (the datapath drops by reason vni_unknown / vtep_unknown; the kernel
path's underlay filter and vxlan devices do the same)."""
from .. import Send

DESCRIPTION = __doc__

# node a's uplink -> node b's; the inner frame from blue1 (or red1) to 10.0.0.2 udp/7000.
_O = ('Ether(src=me.mac, dst=node("b").mac)/IP(src="{src}", dst=node("b").ip, id=1)'
      '/UDP(sport={sport}, dport={dport}, chksum=0)')
_X = ('/VXLAN(vni={vni}, flags=0x08)/Ether(src=vm("{tenant}1").mac, dst=node("b").router["{tenant}"])'
      '/IP(src="10.0.0.1", dst="10.0.0.2", ttl={ttl})/UDP(sport={isport}, dport=7000)/N')


def _vx(src="me.ip", vni=5010, tenant="blue", isport=45000, sport=50000, ttl=64):
    src = '" + me.ip + "' if src == "me.ip" else src
    return (_O.format(src=src, sport=sport, dport=4789) +
            _X.format(vni=vni, tenant=tenant, isport=isport, ttl=ttl))


SENDS = [
    Send("a.uplink", _vx(isport=45000), "blue VXLAN from node a's VTEP: delivered to blue2"),
    Send("a.uplink", _vx(vni=5020, tenant="red", isport=45001),
         "red VXLAN from node a's VTEP: delivered to red2"),
    Send("a.uplink", _vx(vni=5999, isport=45002), "unknown VNI 5999: nothing delivered"),
    Send("a.uplink", _vx(vni=0, isport=45003), "VNI 0: nothing delivered"),
    Send("a.uplink", _vx(src="192.0.2.99", isport=45004),
         "from an unknown VTEP 192.0.2.99: nothing delivered"),
    Send("a.uplink", _vx(src="192.0.2.99", vni=5020, tenant="red", isport=45005),
         "red's VNI from an unknown VTEP: nothing delivered"),
    Send("a.uplink", _O.format(src="192.0.2.1", sport=50001, dport=4790) + "/N",
         "udp to node b on another port (the node's own traffic): no VM gets it"),
    Send("a.uplink", 'Ether(src=me.mac, dst=node("b").mac)/IP(src=me.ip, dst=node("b").ip)'
                     '/ICMP(id=900)/N', "a ping between the VTEPs: no VM gets it"),
    Send("a.uplink", _vx(isport=45006, sport=50002), "the blue control again"),
]
