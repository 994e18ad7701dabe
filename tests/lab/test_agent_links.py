"""Ports that come and go while the agent runs (netlink link events), and SIGHUP reloads
that apply the difference of the config file."""
import signal
import time

import pytest

from netns_lab import traffic
from netns_lab.lab import Lab

pytestmark = pytest.mark.lab


def wait_for(fn, timeout=15.0, step=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(step)
    return fn()


def port_status(lab, name):
    _, st = lab.ctl("status")
    return next(p for p in st["ports"] if p["name"] == name)


@pytest.fixture
def lab():
    with Lab(prefix="xfk") as lab:
        yield lab


def test_a_port_created_after_the_agent_is_attached_and_one_removed_is_cleaned(lab):
    lab.start_agent()
    lab.ctl("tenant", "add", "blue", "--id", "10")
    for i in (1, 2):
        lab.ctl("port", "add", f"blue{i}", "--tenant", "blue")
        lab.ctl("endpoint", "add", "--tenant", "blue", f"10.0.0.{i}", "--port", f"blue{i}",
                "--mac", f"02:00:00:00:00:0{i}")
    lab.ctl("rule", "add", "--tenant", "blue", "--priority", "10", "--proto", "icmp",
            "--action", "allow")
    assert port_status(lab, "blue1") == {"name": "blue1", "tenant": "blue", "attached": False,
                                         "ifindex": 0, "note": "interface missing"}
    # The VMs' veths appear now: the agent sees the link events and attaches.
    vm1 = lab.add_vm("blue", 1, "10.0.0.1", "02:00:00:00:00:01")
    vm2 = lab.add_vm("blue", 2, "10.0.0.2", "02:00:00:00:00:02")
    assert wait_for(lambda: port_status(lab, "blue1")["attached"] and
                    port_status(lab, "blue2")["attached"])
    assert traffic.ping(lab, vm1, vm2)
    # vm2 goes away (its namespace and veth with it): its port leaves the datapath.
    lab.ns.delete(vm2.name)
    assert wait_for(lambda: not port_status(lab, "blue2")["attached"])
    assert port_status(lab, "blue2")["note"] == "interface missing"
    _, stats = lab.ctl("stats")
    assert any(r["port"] == "blue1" for r in stats["counters"])
    # ...and comes back under the same name: attached again, traffic flows again.
    vm2 = lab.add_vm("blue", 2, "10.0.0.2", "02:00:00:00:00:02")
    assert wait_for(lambda: port_status(lab, "blue2")["attached"])
    assert traffic.ping(lab, vm1, vm2)


def test_sighup_applies_the_config_difference_and_refuses_a_bad_config(lab):
    lab.start_agent()
    lab.ctl("tenant", "add", "blue", "--id", "10")
    base = lab.config.read_text()
    lab.config.write_text(base + '\n[[state.tenants]]\nname = "green"\nid = 30\n'
                                 '[[state.rules]]\nid = 50\ntenant = "green"\npriority = 5\n'
                                 'action = "deny"\n')
    lab.agent.send_signal(signal.SIGHUP)
    assert wait_for(lambda: {t["name"] for t in lab.ctl("tenant", "list")[1]} == {"blue", "green"})
    _, rules = lab.ctl("rule", "list")
    assert [r["id"] for r in rules] == [50]
    # A broken config: the reload is refused and the agent keeps serving what it had.
    lab.config.write_text(base.replace("interval = 1.0", "interval = -1.0"))
    lab.agent.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "reload refused" in lab.log())
    assert "aging.interval" in lab.log()
    assert lab.agent.poll() is None
    assert {t["name"] for t in lab.ctl("tenant", "list")[1]} == {"blue", "green"}
    # Removing the seeded objects from the file removes them from the node.
    lab.config.write_text(base)
    lab.agent.send_signal(signal.SIGHUP)
    assert wait_for(lambda: {t["name"] for t in lab.ctl("tenant", "list")[1]} == {"blue"})
