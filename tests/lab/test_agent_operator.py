"""The operator's experience (issue 16) on a real agent, through the real CLI: what `port
add` says, what `tenant del` refuses and cascades, `apply` keeping what a file does not
name unless --prune, tables and trace output people read, metrics dashboards need, the
audit log, and a quiet stop."""
from __future__ import annotations

import hashlib
import os
import platform
import re
import signal

import pytest
from prometheus_client.parser import text_string_to_metric_families

from netns_lab.lab import TENANTS
from netns_lab.traffic import ping

pytestmark = pytest.mark.lab

ICMP_RULE = ["--id", "1", "--priority", "100", "--src", "10.0.0.1/32", "--dst", "10.0.0.2/32",
             "--proto", "icmp", "--action", "allow"]
SSH_RULE = ["--id", "2", "--priority", "100", "--src", "10.0.0.1/32", "--dst", "10.0.0.2/32",
            "--proto", "tcp", "--dport", "22", "--action", "allow"]


@pytest.fixture(scope="module")
def node(module_lab):
    lab = module_lab
    for tenant, i in (("blue", 1), ("blue", 2), ("red", 1)):
        lab.add_vm(tenant, i)
    lab.write_config(state=lab.base_state())
    lab.start_agent()
    lab.ok("rule", "add", "--tenant", "blue", *ICMP_RULE)
    lab.ok("rule", "add", "--tenant", "blue", *SSH_RULE)
    lab.ok("route", "add", "--tenant", "blue", "10.9.0.0/16", "--drop")
    lab.ok("rule", "add", "--tenant", "blue", "--id", "3", "--priority", "100", "--dst",
           "10.9.0.0/16", "--proto", "udp", "--action", "allow")
    return lab


def text(lab, *args):
    return lab.ctl(*args, json=False)


def write(lab, name, body):
    path = lab.dir / name
    path.write_text(body)
    return str(path)


# -- item 3: port add says what happened -------------------------------------------------------

def test_port_add_says_attached_waiting_or_failed(node):
    r = text(node, "port", "add", "lo", "--tenant", "blue")
    assert r.code == 1, r
    assert "attaching failed" in r.stdout and "errno" in r.stdout, r
    assert "port del lo" in r.stdout, r
    r = text(node, "port", "add", "xfnotyet0", "--tenant", "blue")
    assert r.code == 0 and "waiting for the interface" in r.stdout, r
    ports = {p["name"]: p for p in node.ok("port", "list")}
    assert ports["bvm1"]["attached"] and ports["bvm1"]["mode"] == "native", ports
    assert ports["lo"]["state"] == "failed" and "errno" in ports["lo"]["note"], ports
    assert ports["xfnotyet0"]["state"] == "waiting" and not ports["xfnotyet0"]["attached"]
    table = text(node, "port", "list").stdout.splitlines()
    head = table[0].split()
    assert head[:4] == ["NAME", "TENANT", "ATTACHED", "MODE"] and head[-1] == "NOTE", table
    assert [ln.split()[:4] for ln in table if ln.startswith("bvm1")] == \
        [["bvm1", "blue", "yes", "native"]], table
    for name in ("lo", "xfnotyet0"):
        node.ok("port", "del", name)
    r = node.ctl("port", "add", "bvm2x", "--tenant", "blue")   # JSON: the same facts
    assert r.code == 0 and r.data["state"] == "waiting", r
    node.ok("port", "del", "bvm2x")


# -- item 4: tenant del names what uses it, --cascade --------------------------------------

def test_tenant_del_names_what_uses_it_and_cascades(node):
    node.ok("tenant", "add", "green", "--id", "30")
    node.ok("port", "add", "xfgreen0", "--tenant", "green")
    node.ok("endpoint", "add", "--tenant", "green", "10.3.0.5", "--port", "xfgreen0",
            "--mac", "02:00:00:00:03:05")
    node.ok("rule", "add", "--tenant", "green", "--priority", "1", "--action", "allow")
    node.ok("rule", "add", "--tenant", "green", "--priority", "2", "--action", "deny")
    r = text(node, "tenant", "del", "green")
    assert r.code == 1, r
    assert "tenant green: still has 1 port, 1 endpoint, 2 rules" in r.stderr, r
    assert "--cascade" in r.stderr and "unknown tenant" not in r.stderr, r
    r = text(node, "tenant", "del", "green", "--cascade")
    assert r.code == 0, r
    assert r.stdout.strip() == "deleted tenant green and its 1 port, 1 endpoint, 2 rules"
    assert "green" not in {t["name"] for t in node.ok("tenant", "list")}
    assert not [x for x in node.ok("rule", "list") if x["tenant"] == "green"]


# -- item 5: apply keeps what the file does not name unless --prune --------------------------

def test_apply_without_prune_keeps_and_says_so(node):
    before = node.ok("rule", "list")
    f = write(node, "one-rule.toml", '[[rules]]\nid = 50\ntenant = "red"\npriority = 5\n'
                                     'proto = "udp"\ndport = "53"\naction = "allow"\n')
    r = text(node, "apply", f, "--dry-run")
    assert r.code == 0, r
    lines = r.stdout.splitlines()
    assert "+ rule 50 (" in r.stdout and not any(ln.startswith("- ") for ln in lines), r
    assert any(ln.startswith("= kept, not in the file: rule 1, rule 2, rule 3") for ln in lines), r
    assert lines[-1].startswith("dry run: would apply 1 change; kept "), lines[-1]
    assert "--prune" in lines[-1]
    whole = write(node, "whole.toml", f'[[tenants]]\nname = "red"\nid = {TENANTS["red"]}\n\n'
                  + open(f).read())
    pruned = node.ok("apply", whole, "--dry-run", "--prune")
    assert [x["name"] for x in pruned["tenants"]["remove"]] == ["blue"], pruned
    assert "keep" not in pruned["tenants"], "with --prune nothing is kept"
    assert node.ok("rule", "list") == before, "dry runs change nothing"
    r = node.ctl("apply", f)
    assert r.code == 0 and [x["id"] for x in r.data["rules"]["add"]] == [50], r
    assert sorted(x["id"] for x in node.ok("rule", "list")) == \
        sorted([x["id"] for x in before] + [50])
    node.ok("rule", "del", "50")


def test_apply_file_fields_are_the_flags(node):
    f = write(node, "routes.toml", '[[routes]]\ntenant = "blue"\nprefix = "10.8.0.0/16"\n'
                                   'drop = true\n\n[[routes]]\ntenant = "blue"\n'
                                   'prefix = "192.168.0.0/16"\nkernel = true\n')
    r = node.ctl("apply", f)
    assert r.code == 0, r
    routes = {x["prefix"]: x["action"] for x in node.ok("route", "list", "--tenant", "blue")}
    assert routes["10.8.0.0/16"] == "drop" and routes["192.168.0.0/16"] == "kernel", routes
    for prefix in ("10.8.0.0/16", "192.168.0.0/16"):
        node.ok("route", "del", "--tenant", "blue", prefix)


def test_apply_errors_name_the_line(node):
    before = node.ok("tenant", "list")
    f = write(node, "quoted.toml", '# a tenant\n[[tenants]]\nname = "green"\nid = "30"\n')
    r = text(node, "apply", f)
    assert r.code == 2, r
    assert f"{f}:4:" in r.stderr and "without quotes" in r.stderr, r
    f = write(node, "typo.toml", '[[tenants]]\nname = "green"\nid = 30\n\n[[rules]]\nid = 9\n'
                                 'tenant = "green"\npriority = 1\naction = "allow"\n'
                                 'dst_port = "22"\n')
    r = text(node, "apply", f)
    assert r.code == 2 and f"{f}:10:" in r.stderr and "dst_port" in r.stderr, r
    # What only the agent knows (a tenant that does not exist) is located too.
    f = write(node, "dangling.toml", '[[rules]]\nid = 9\ntenant = "nosuch"\npriority = 1\n'
                                     'action = "allow"\n')
    r = text(node, "apply", f)
    assert r.code == 1 and f"{f}:1:" in r.stderr and "nosuch" in r.stderr, r
    assert node.ok("tenant", "list") == before


# -- item 7: tables ---------------------------------------------------------------------------

def test_flow_dump_icmp_in_port_sorted_filtered_and_limited(node):
    bvm1 = node.vm("blue", 1)
    assert ping(bvm1, "10.0.0.2", count=2)
    r = text(node, "flow", "dump", "--proto", "icmp")
    assert r.code == 0, r
    head = r.stdout.splitlines()[0].split()
    assert head[:3] == ["TENANT", "IN_PORT", "PROTO"] and "ICMP" in head, head
    rows = [ln.split() for ln in r.stdout.splitlines()[1:]]
    assert rows and all(x[2] == "icmp" for x in rows), rows
    echo = [x for x in rows if x[3] == "10.0.0.1"]
    assert echo and echo[0][1] == "bvm1", rows
    assert re.search(r"type 8 code 0 id \d+", r.stdout), r.stdout
    data = node.ok("flow", "dump", "--ip", "10.0.0.2", "--port", "bvm2")
    assert data and all("10.0.0.2" in (x["src"], x["dst"]) for x in data), data
    assert all("bvm2" in (x["in_port"], x["out_port"]) for x in data), data
    everything = node.ok("flow", "dump")
    keys = [(x["tenant"], x["proto"], x["src"], x["sport"], x["dst"], x["dport"])
            for x in everything]
    assert len(everything) >= 2 and keys == sorted(keys), keys
    r = text(node, "flow", "dump", "--limit", "1")
    assert len(r.stdout.splitlines()) == 3 and "more match" in r.stdout, r.stdout
    r = node.ctl("flow", "dump", "--limit", "1")
    assert len(r.data) == 1 and "more match" in r.stderr, r


def test_stats_per_tenant(node):
    r = node.ctl("stats", "--tenant", "blue")
    assert r.code == 0, r
    assert r.data["counters"] and {x["tenant"] for x in r.data["counters"]} == {"blue"}
    assert set(r.data["flows"]["by_tenant"]) <= {"blue"}


# -- item 8: trace ------------------------------------------------------------------------------

def test_trace_says_build_route_defaults_and_no_output_when_dropped(node):
    # Building the trace program takes seconds, minutes on a loaded machine.
    first = node.ctl("trace", "--port", "bvm1", "--scapy",
                     "Ether(src='02:00:00:00:00:01')/IP(src='10.0.0.1', dst='10.9.1.1')/UDP()",
                     json=False, timeout=240)
    assert first.code == 0, first
    assert "building the trace program first" in first.stderr, first
    assert "built the trace program first" in first.stdout, first
    assert "route:     route 10.9.0.0/16 drop" in first.stdout, first.stdout
    assert "output packet: none (dropped)" in first.stdout, first.stdout
    assert "--scapy filled in defaults: Ether.dst=ff:ff:ff:ff:ff:ff" in first.stderr
    assert "UDP.sport=53" in first.stderr and "UDP.dport=53" in first.stderr, first.stderr
    ssh = text(node, "trace", "--port", "bvm1", "--scapy",
               "Ether(src='02:00:00:00:00:01', dst='02:aa:00:00:01:01')/"
               "IP(src='10.0.0.1', dst='10.0.0.2')/TCP(sport=20, dport=22)")
    assert ssh.code == 0 and "building" not in ssh.stderr, ssh
    assert "verdict:   redirect" in ssh.stdout and "output packet:" in ssh.stdout, ssh.stdout
    assert "route:     endpoint 10.0.0.2 on port bvm2" in ssh.stdout, ssh.stdout
    assert re.search(r"dport\s+= 22\n", ssh.stdout) and "ssh" not in ssh.stdout
    assert re.search(r"sport\s+= 20\n", ssh.stdout) and "ftp" not in ssh.stdout


# -- item 9: metrics --------------------------------------------------------------------------

def test_metrics_for_dashboards(node):
    status = node.ok("status")
    body = node.metrics()
    samples = [s for f in text_string_to_metric_families(body) for s in f.samples]

    def find(name, **labels):
        return [s for s in samples if s.name == name and
                all(s.labels.get(k) == v for k, v in labels.items())]
    # red's VM never sent a thing: its series are there, at 0.
    assert [s.value for s in find("xdpflow_port_packets_total", port="rvm1", tenant="red",
                                  verdict="redirect")] == [0.0]
    assert [s.value for s in find("xdpflow_flows", tenant="red")] == [0.0]
    info = find("xdpflow_agent_info")
    assert len(info) == 1, info
    config_hash = hashlib.sha256(node.config.read_bytes()).hexdigest()
    assert info[0].labels["program_id"] == str(status["program_id"])
    assert info[0].labels["kernel"] == platform.release()
    assert info[0].labels["config_sha256"] == config_hash
    assert find("xdpflow_api_requests_total", command="status", result="ok")[0].value >= 1
    assert find("xdpflow_api_requests_total", command="tenant del", result="refused")
    assert find("xdpflow_api_request_seconds_count", command="rule add")[0].value >= 1
    assert find("xdpflow_reconcile_seconds_count")[0].value >= 1
    assert find("xdpflow_apply_seconds_count")[0].value >= 1
    last = find("xdpflow_last_config_change_timestamp_seconds")[0].value
    assert last > 1.7e9


# -- item 6: messages for people (last: it stops the agent) --------------------------------

def test_status_and_log_for_people_audit_and_a_quiet_stop(node):
    r = text(node, "status")
    assert r.code == 0, r
    assert "{'" not in r.stdout and "[{" not in r.stdout, r.stdout
    assert re.search(r"^ports:\n\s+NAME\s+TENANT\s+ATTACHED", r.stdout, re.M), r.stdout
    log = node.log_text()
    assert re.search(r"xdpflow\.audit: uid 0 \(root\) pid \d+: rule add tenant=blue .*: ok",
                     log), log
    assert re.search(r"xdpflow\.audit: .*: tenant del name=green: refused: .*still has", log)
    assert re.search(r"xdpflow\.audit: .*: apply state=\(1 rules\): ok, 1 change", log), log
    assert node.stop_agent(signal.SIGTERM) == 0
    log = node.log_text()
    stop = log[log.rindex("signal SIGTERM: stopping"):]
    assert "Task was destroyed" not in stop and "ERROR" not in stop, stop
    assert not re.search(r"\{'|': \{|\[\{", log), "a Python structure in the log"
    assert os.path.exists(node.pin_dir)
