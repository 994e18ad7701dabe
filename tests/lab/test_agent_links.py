"""Ports that come and go while the agent runs (netlink link events), and SIGHUP reloads
that apply the difference of the config file."""
import signal
import time

import pytest

from netns_lab.traffic import ping

pytestmark = pytest.mark.lab


def wait_for(fn, timeout=60.0, step=0.2):
    """fn() once true, polled until `timeout` (a bound for a reload on a busy machine)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(step)
    return fn()


def port_status(lab, name):
    st = lab.ok("status")
    return next(p for p in st["ports"] if p["name"] == name)


def test_a_port_created_after_the_agent_is_attached_and_one_removed_is_cleaned(lab):
    lab.start_agent()
    lab.ok("tenant", "add", "blue", "--id", "10")
    for i in (1, 2):
        lab.ok("port", "add", f"blue{i}", "--tenant", "blue")
        lab.ok("endpoint", "add", "--tenant", "blue", f"10.0.0.{i}", "--port", f"blue{i}",
               "--mac", f"02:00:00:00:00:0{i}")
    lab.ok("rule", "add", "--tenant", "blue", "--priority", "10", "--proto", "icmp",
           "--action", "allow")
    assert port_status(lab, "blue1") == {"name": "blue1", "tenant": "blue", "attached": False,
                                         "ifindex": 0, "mode": "", "note": "interface missing"}
    # The VMs' veths appear now: the agent sees the link events and attaches.
    vm1 = lab.add_vm("blue", 1, "10.0.0.1", "02:00:00:00:00:01", port="blue1")
    vm2 = lab.add_vm("blue", 2, "10.0.0.2", "02:00:00:00:00:02", port="blue2")
    assert wait_for(lambda: port_status(lab, "blue1")["attached"] and
                    port_status(lab, "blue2")["attached"])
    assert ping(vm1, vm2.ip, count=2)
    # vm2 goes away (its namespace and veth with it): its port leaves the datapath.
    lab.ns.delete(vm2.name)
    assert wait_for(lambda: not port_status(lab, "blue2")["attached"])
    assert port_status(lab, "blue2")["note"] == "interface missing"
    stats = lab.ok("stats")
    assert any(r["port"] == "blue1" for r in stats["counters"])
    # ...and comes back under the same name: attached again, traffic flows again.
    vm2 = lab.add_vm("blue", 2, "10.0.0.2", "02:00:00:00:00:02", port="blue2")
    assert wait_for(lambda: port_status(lab, "blue2")["attached"])
    assert ping(vm1, vm2.ip, count=2)


def test_sighup_applies_the_config_difference_and_refuses_a_bad_config(lab):
    lab.write_config(aging={"interval": 1.0})
    lab.start_agent()
    lab.ok("tenant", "add", "blue", "--id", "10")
    base = lab.config.read_text()
    lab.config.write_text(base + '\n[[state.tenants]]\nname = "green"\nid = 30\n'
                                 '[[state.rules]]\nid = 50\ntenant = "green"\npriority = 5\n'
                                 'action = "deny"\n')
    lab.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: {t["name"] for t in lab.ok("tenant", "list")} == {"blue", "green"})
    rules = lab.ok("rule", "list")
    assert [r["id"] for r in rules] == [50]
    # A broken config: the reload is refused and the agent keeps serving what it had.
    lab.config.write_text(base.replace("interval = 1.0", "interval = -1.0"))
    lab.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "reload refused" in lab.log_text())
    assert "aging.interval" in lab.log_text()
    assert lab.proc.poll() is None
    assert {t["name"] for t in lab.ok("tenant", "list")} == {"blue", "green"}
    # Removing the seeded objects from the file removes them from the node.
    lab.config.write_text(base)
    lab.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: {t["name"] for t in lab.ok("tenant", "list")} == {"blue"})


def test_sighup_with_a_new_flow_table_size_migrates_flows_and_keeps_traffic(lab):
    vm1, vm2 = lab.add_vm("blue", 1), lab.add_vm("blue", 2)
    lab.write_config(state={**lab.base_state(), "rules": [
        {"id": 1, "tenant": "blue", "priority": 1, "proto": "icmp", "action": "allow"}]})
    lab.start_agent()
    assert ping(vm1, vm2.ip, count=2)
    before = lab.ok("status")["program_id"]
    flows_before = {(f["src"], f["dst"], f["flags"]) for f in lab.ok("flow", "dump")}
    text = lab.config.read_text()
    assert "flow_table_size = 65536" in text
    lab.config.write_text(text.replace("flow_table_size = 65536", "flow_table_size = 131072"))
    lab.proc.send_signal(signal.SIGHUP)
    # A reload that resizes compiles (9 s quiet; far more on a busy machine).
    assert wait_for(lambda: lab.ok("status")["program_id"] != before, timeout=240)
    maps = {m["map"]: m for m in lab.ok("status")["maps"]}
    assert maps["xf_flows"]["action"] == "migrate"
    assert "65536 -> 131072" in maps["xf_flows"]["detail"]
    assert {(f["src"], f["dst"], f["flags"]) for f in lab.ok("flow", "dump")} == flows_before
    assert ping(vm1, vm2.ip, count=2)
