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
