"""Stateful rules across nodes: the single-node stateful scenario's sends, unchanged: its
VMs (blue1 and red1 on node a, blue2 and red2 on node b) are on different nodes here. A
reply passes by state (conntrack at both ends on the kernel path, the flow's reply entry
at both nodes offloaded); the same ports unsolicited, or a "reply" to a flow that never
was, is dropped."""
from ..stateful import SENDS

DESCRIPTION = __doc__
