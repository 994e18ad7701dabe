"""ICMP errors about an allowed flow reach its sender although no rule allows ICMP: a UDP
client talking to a closed port hears "connection refused" at once, as it would through
conntrack, instead of waiting for a timeout."""
import sys

import pytest

pytestmark = pytest.mark.lab

CLIENT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.connect(("10.0.0.2", 5000))
s.send(b"anyone?")
try:
    s.recv(100)
    print("answer")
except ConnectionRefusedError:
    print("refused")
except socket.timeout:
    print("timeout")
"""


def test_port_unreachable_reaches_the_udp_client(lab):
    vm1, vm2 = lab.add_vm("blue", 1), lab.add_vm("blue", 2)
    lab.write_config(state={**lab.base_state(), "rules": [
        {"id": 1, "tenant": "blue", "priority": 1, "proto": "udp", "dport": "5000",
         "action": "allow"}]})
    lab.start_agent()
    out = lab.vm_run(vm1, [sys.executable, "-c", CLIENT], check=True).stdout.strip()
    assert out == "refused"
    _, stats = lab.ctl("stats")
    related = [r for r in stats["counters"] if r["reason"] == "related"]
    assert related and related[0]["port"] == vm2.port and related[0]["verdict"] == "redirect"
    # With no flow the same error would have met the rules: no rule allows ICMP.
    _, rules = lab.ctl("rule", "list")
    assert all(r["proto"] == "udp" for r in rules)
