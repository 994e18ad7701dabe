"""IPv6 between VMs with real kernels on both ends: the VMs resolve each other through the
datapath's neighbour advertisements (nothing answers in the node's kernel), ICMPv6 echo is
forwarded with the hop limit decremented, and the rule set decides per direction."""
import pytest

from netns_lab import traffic
from netns_lab.lab import Lab

pytestmark = pytest.mark.lab


def add_v6(lab: Lab, vm, addr: str):
    lab.vm_run(vm, ["ip", "-6", "addr", "add", f"{addr}/64", "dev", "eth0", "nodad"],
               check=True)


def test_ipv6_neighbours_are_answered_and_echo_follows_the_rules(lab):
    vm1 = lab.add_vm("blue", 1)
    vm2 = lab.add_vm("blue", 2)
    add_v6(lab, vm1, "fd00::1")
    add_v6(lab, vm2, "fd00::2")
    lab.start_agent()
    lab.ok("tenant", "add", "blue", "--id", "10")
    for vm, addr in ((vm1, "fd00::1"), (vm2, "fd00::2")):
        lab.ok("port", "add", vm.port, "--tenant", "blue")
        lab.ok("endpoint", "add", "--tenant", "blue", addr, "--port", vm.port, "--mac", vm.mac)
    lab.ok("rule", "add", "--tenant", "blue", "--priority", "10", "--src", "fd00::1/128",
           "--proto", "icmpv6", "--icmp-type", "128", "--action", "allow")

    assert traffic.ping(vm1, "fd00::2", count=2)
    assert not traffic.ping(vm2, "fd00::1", count=2)

    # vm1 learned vm2 at the port's MAC, from the datapath's advertisement.
    neigh = lab.vm_run(vm1, ["ip", "-6", "neigh", "show", "fd00::2"], check=True).stdout
    assert vm1.port_mac in neigh.lower()
    _, stats = lab.ctl("stats")
    rows = {(r["port"], r["reason"]): r["packets"] for r in stats["counters"]}
    assert rows.get((vm1.port, "nd_reply"), 0) >= 1
    assert rows.get((vm1.port, "rule_allow"), 0) >= 1
    # The reply came back through the reverse flow, hop limit decremented on the way.
    _, flows = lab.ctl("flow", "dump")
    v6 = [f for f in flows if f["proto"] == "icmpv6"]
    assert {(f["src"], f["dst"], f["flags"]) for f in v6} == {
        ("fd00::1", "fd00::2", ""), ("fd00::2", "fd00::1", "reply")}
    hop = lab.vm_run(vm1, ["ping", "-6", "-n", "-c", "1", "fd00::2"], check=True).stdout
    assert "ttl=63" in hop or "hlim=63" in hop, hop
