"""Leaving is explicit: a plain stop keeps the datapath (hitless restart), while
`--teardown`, or `teardown_on_exit` on stop, takes the programs off the ports and their
veth peers and removes the pinned maps."""
import os
import signal
import subprocess

import pytest

from netns_lab.lab import AGENT
from netns_lab.netns import ip

pytestmark = pytest.mark.lab


def peer_prog(lab, vm):
    out = ip("-d", "link", "show", "dev", "eth0", ns=vm.name)
    return "prog/xdp" in out


def prepared(lab, agent=None):
    vm1, vm2 = lab.add_vm("blue", 1), lab.add_vm("blue", 2)
    lab.write_config(agent=agent, state=lab.base_state())
    lab.start_agent()
    return vm1, vm2


def test_stop_keeps_the_datapath_and_teardown_removes_it(lab):
    vm1, vm2 = prepared(lab)
    assert lab.xdp_prog(vm1.port) and peer_prog(lab, vm1)
    lab.stop_agent(signal.SIGTERM)
    assert lab.xdp_prog(vm1.port), "a plain stop leaves the program attached"
    assert os.path.isdir(lab.pin_dir)
    p = subprocess.run(["nsenter", f"--net=/run/netns/{lab.node}", AGENT, "--config",
                        str(lab.config), "--teardown"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    for vm in (vm1, vm2):
        assert not lab.xdp_prog(vm.port)
        assert not peer_prog(lab, vm), "the veth peer's pass-through program is removed"
    assert not os.path.exists(lab.pin_dir)


def test_teardown_on_exit_detaches_when_the_agent_stops(lab):
    vm1, _ = prepared(lab, agent={"teardown_on_exit": True})
    assert lab.xdp_prog(vm1.port)
    assert lab.stop_agent(signal.SIGTERM) == 0
    assert not lab.xdp_prog(vm1.port)
    assert not os.path.exists(lab.pin_dir)


def test_teardown_from_another_namespace_refuses_and_changes_nothing(lab):
    # Issue 16: from the host namespace the ports are invisible; removing the pins there
    # stranded the programs on the ports with no agent able to adopt them.
    vm1, vm2 = prepared(lab)
    lab.stop_agent(signal.SIGTERM)
    prog = lab.xdp_prog(vm1.port)["id"]
    p = subprocess.run([AGENT, "--config", str(lab.config), "--teardown"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert vm1.port in p.stderr and vm2.port in p.stderr and "nothing was changed" in p.stderr
    assert os.path.isdir(lab.pin_dir), "no pin removed"
    assert lab.xdp_prog(vm1.port)["id"] == prog
    # A new agent adopts what is there; a teardown where the ports are then works.
    lab.start_agent()
    assert lab.xdp_prog(vm1.port)
    lab.stop_agent(signal.SIGTERM)
    p = subprocess.run(["nsenter", f"--net=/run/netns/{lab.node}", AGENT, "--config",
                        str(lab.config), "--teardown"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    assert not lab.xdp_prog(vm1.port) and not os.path.exists(lab.pin_dir)


def test_teardown_force_goes_ahead_without_a_port(lab):
    vm1, vm2 = prepared(lab)
    lab.stop_agent(signal.SIGTERM)
    ip("link", "del", vm2.port, ns=lab.node)             # that VM is gone for good
    cmd = ["nsenter", f"--net=/run/netns/{lab.node}", AGENT, "--config", str(lab.config),
           "--teardown"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and vm2.port in p.stderr and vm1.port not in p.stderr
    assert lab.xdp_prog(vm1.port) and os.path.isdir(lab.pin_dir)
    p = subprocess.run(cmd + ["--force"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert not lab.xdp_prog(vm1.port) and not os.path.exists(lab.pin_dir)
