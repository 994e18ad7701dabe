"""VLAN-tagged frames from a VM: a VM port carries untagged frames only. The kernel path
has no VLAN device, so the kernel drops them; the datapath drops them with reason `vlan`.
(A priority tag, VLAN 0, is not here: Linux takes it for untagged and forwards it.)"""
from . import Send

DESCRIPTION = __doc__

SENDS = [
    Send("blue1", 'Ether(src=me.mac, dst=me.gw)/Dot1Q(vlan=100)/IP(src=me.ip, '
                  'dst=vm("blue2").ip)/UDP(sport=48000, dport=7100)/N', "802.1Q tag 100"),
    Send("blue1", 'Ether(src=me.mac, dst=me.gw, type=0x88a8)/Dot1Q(vlan=10)/Dot1Q(vlan=20)'
                  '/IP(src=me.ip, dst=vm("blue2").ip)/UDP(sport=48002, dport=7100)/N',
         "QinQ (802.1ad outer tag)"),
    Send("red1", 'Ether(src=me.mac, dst=me.gw)/Dot1Q(vlan=200)/IPv6(src=me.ip6, '
                 'dst=vm("red2").ip6)/UDP(sport=48003, dport=7000)/N', "red: tagged IPv6"),
]
