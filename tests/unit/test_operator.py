"""The operator's experience (issue 16) without root: every command's help, error wording
and exit codes, apply without --prune and its file schema, tables, trace and status text,
the audit log and request metrics, dashboard series, teardown's refusal."""
import argparse
import json
import logging
import os
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent import VERSION, commands, model
from agent.api import ApiServer
from agent.metrics import DatapathCollector, serve
from ctl import cli
from test_cli import FRAME, setup_blue
from test_cli import agent, run  # noqa: F401 - fixtures
from test_metrics import FakeSource, scrape

pytestmark = pytest.mark.unit


def _leaves(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _leaves(sub, prefix + (name,))
    yield prefix, parser


# -- help -----------------------------------------------------------------------------------

@pytest.mark.parametrize("words", sorted({w for w, _ in _leaves(cli.build_parser())}))
def test_every_help_renders_and_names_every_flag(words, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*words, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: xdpflowctl")
    cmd = commands.get(" ".join(words))
    for a in (cmd.args if cmd else ()):
        if a.cli:
            assert (a.flags[0] if a.flags else a.metavar) in out, (words, a.name)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"xdpflowctl {VERSION}"


def test_readme_cli_section_uses_only_real_commands_and_flags():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    section = readme.split("## The CLI", 1)[1].split("\n## ", 1)[0]
    top = {f for a in cli.build_parser()._actions for f in a.option_strings}
    seen = set()
    for line in section.splitlines():
        for part in line.split("#")[0].split(";"):
            words = part.split()
            if not words or words[0] != "xdpflowctl":
                continue
            name = next((n for n in (" ".join(words[1:3]), words[1] if len(words) > 1
                                     else "") if n in commands.COMMANDS), None)
            cmd = commands.get(name) if name else None
            known = top | {f for a in (cmd.args if cmd else ()) for f in a.flags}
            for w in part.replace("[", " ").replace("]", " ").replace("|", " ").split():
                if w.startswith("--"):
                    assert w in known, (line, w)
            seen.add(name)
    assert len(seen - {None}) >= 10, seen


# -- wording and exit codes -----------------------------------------------------------------

def test_proto_bogus_names_the_protocols(run):
    setup_blue(run)
    rc, out, err = run("rule", "add", "--tenant", "blue", "--priority", "1", "--proto",
                       "bogus", "--action", "deny")
    assert rc == 2 and "tcp, udp, icmp, icmpv6" in err and "integer" not in err


def test_auto_id_is_never_named(run, agent):
    setup_blue(run)
    rc, out, err = run("rule", "add", "--tenant", "blue", "--priority", "1", "--src",
                       "10.0.0.0/33", "--action", "deny")
    assert rc == 2 and err.startswith("xdpflowctl: new rule: src: '10.0.0.0/33'"), err
    assert "rule 1" not in err


def test_no_doubled_prefix(run):
    rc, out, err = run("rule", "add", "--tenant", "blue")
    assert rc == 2 and err.startswith("xdpflowctl: rule add: ") and err.count("xdpflowctl:") == 1


def test_unreachable_socket_hints(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("XDPFLOW_SOCKET", raising=False)
    path = str(tmp_path / "nobody.sock")
    assert cli.main(["--socket", path, "status"]) == 1
    err = capsys.readouterr().err
    assert path in err and "--socket" in err and "XDPFLOW_SOCKET" in err
    assert "agent running" in err


@pytest.mark.parametrize("body,where", [
    ('[[tenants]]\nname = "green"\nid = "30"\n', ":3:"),                    # text for a number
    ('[[tenants]]\nname = "a"\nid = 1\n[[tenants]]\nname = "a"\nid = 2\n', ":4:"),  # twice
    ('[[routes]]\ntenant = "blue"\nprefix = "10.0.0.0/8"\nnexthop = "10.0.0.1"\n', ":4:"),
    ('[[routes]]\ntenant = "blue"\nprefix = "10.0.0.0/8"\ndrop = true\nkernel = true\n', ":1:"),
    ('[[rules]]\nid = 1\ntenant = "blue"\npriority = 1\naction = "deny"\nproto = "bogus"\n',
     ":6:"),
    ('[[vpcs]]\nname = "x"\n', ":1:"),
])
def test_apply_file_input_errors_exit_2_with_the_line(run, agent, tmp_path, body, where):
    ctl, _ = agent
    f = tmp_path / "s.toml"
    f.write_text(body)
    before = ctl.state.to_dict()
    rc, out, err = run("apply", str(f))
    assert rc == 2 and f"{f}{where}" in err, err
    # The objects are checked once, by the agent (issue 12: a 100,000-rule file is not
    # checked twice); what it refuses changes nothing.
    assert ctl.state.to_dict() == before


def test_apply_file_input_errors_are_named_without_the_agent(tmp_path, capsys):
    # Unreachable: the file is checked here, and its mistake named first, as before.
    f = tmp_path / "s.toml"
    f.write_text('[[tenants]]\nname = "a"\nid = 1\n[[tenants]]\nname = "a"\nid = 2\n')
    rc = cli.main(["--socket", str(tmp_path / "nobody.sock"), "--json", "apply", str(f)])
    out, err = capsys.readouterr()
    assert rc == 2 and json.loads(out)["error"]["code"] == "usage"
    assert f"{f}:4: tenant a: given twice (first at line 1)" in err, err


def test_apply_refusal_names_the_line(run, agent, tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('[[tenants]]\nname = "blue"\nid = 10\n\n[[ports]]\nname = "p1"\n'
                 'tenant = "nosuch"\n')
    rc, out, err = run("apply", str(f))
    assert rc == 1 and f"{f}:5: port p1: unknown tenant 'nosuch'" in err, err


# -- apply ------------------------------------------------------------------------------------

def test_apply_keeps_what_the_file_does_not_name(run, agent, tmp_path):
    ctl, _ = agent
    setup_blue(run)
    f = tmp_path / "r.toml"
    f.write_text('[[routes]]\ntenant = "blue"\nprefix = "10.9.0.0/16"\ndrop = true\n')
    rc, out, err = run("apply", str(f), "--dry-run")
    lines = out.splitlines()
    assert rc == 0 and lines[0] == "+ route blue/10.9.0.0/16 (action=drop)", out
    assert "= kept, not in the file: tenant blue" in out
    assert lines[-1] == ("dry run: would apply 1 change; kept 3 objects not in the file "
                         "(--prune removes them)"), lines
    assert run("apply", str(f))[0] == 0
    assert [r.action for r in ctl.state.routes] == ["drop"] and ctl.state.tenants
    f.write_text('[[tenants]]\nname = "blue"\nid = 10\n')
    rc, out, err = run("--json", "apply", str(f), "--prune", "--dry-run")
    d = json.loads(out)
    assert [p["name"] for p in d["ports"]["remove"]] == ["veth-vm1"] and "keep" not in d["ports"]


def test_route_switches_in_a_state_are_the_flags():
    r = model.Route.from_dict({"tenant": "b", "prefix": "10.0.0.0/8", "kernel": True})
    assert r.action == "kernel"
    assert model.Route.from_dict({"tenant": "b", "prefix": "10.0.0.0/8", "drop": True,
                                  "action": "drop"}).action == "drop"
    with pytest.raises(model.Invalid, match="exclude each other"):
        model.Route.from_dict({"tenant": "b", "prefix": "10.0.0.0/8", "drop": True,
                               "via": "10.0.0.1"})
    with pytest.raises(model.Invalid, match="not true or false"):
        model.Route.from_dict({"tenant": "b", "prefix": "10.0.0.0/8", "drop": "yes"})


# -- tenant del --------------------------------------------------------------------------------

def test_tenant_del_says_what_uses_it_then_cascades(run, agent):
    ctl, _ = agent
    setup_blue(run)
    run("rule", "add", "--tenant", "blue", "--priority", "1", "--action", "deny")
    run("rule", "add", "--tenant", "blue", "--priority", "2", "--action", "deny")
    rc, out, err = run("tenant", "del", "blue")
    assert rc == 1 and "tenant blue: still has 1 port, 1 endpoint, 2 rules" in err, err
    rc, out, err = run("tenant", "del", "blue", "--cascade")
    assert rc == 0 and out == "deleted tenant blue and its 1 port, 1 endpoint, 2 rules\n"
    assert ctl.state == model.State()
    assert run("tenant", "del", "blue")[0] == 1


# -- tables, status, trace ---------------------------------------------------------------------

ICMP_FLOW = {"tenant": "blue", "proto": "icmp", "src": "10.0.0.5", "sport": 7,
             "dst": "10.0.0.6", "dport": 8 << 8, "icmp_type": 8, "icmp_code": 0, "icmp_id": 7,
             "verdict": "redirect", "in_port": "veth-vm1", "out_port": "veth-vm2", "rule": 1,
             "packets": 1, "bytes": 98, "idle_s": 0.1, "flags": ""}


def test_flow_table_icmp_and_in_port():
    text = cli.render("flow dump", [ICMP_FLOW], {"limit": 1001})
    head, row = text.splitlines()
    assert head.split()[:2] == ["TENANT", "IN_PORT"] and "ICMP" in head.split()
    assert "type 8 code 0 id 7" in row and "2048" not in row
    assert row.split()[1] == "veth-vm1"


def test_flow_dump_limit_says_when_it_cut(run):
    rc, out, err = run("flow", "dump", "--limit", "1")
    assert rc == 0 and out.splitlines()[-1].startswith("(first 1 flows shown; more match")
    rc, out, err = run("flow", "dump", "--limit", "2")
    assert "more match" not in out
    rc, out, err = run("--json", "flow", "dump", "--limit", "1")
    assert len(json.loads(out)) == 1 and "more match" in err


def test_flow_dump_filters_and_stats_tenant(run, agent):
    ctl, _ = agent
    rc, out, err = run("--json", "flow", "dump", "--proto", "udp", "--ip", "10.0.0.9")
    assert rc == 0 and [f["proto"] for f in json.loads(out)] == ["udp"]
    assert run("flow", "dump", "--proto", "nope")[0] == 2
    rc, out, err = run("stats", "--tenant", "blue")
    assert rc == 0 and ctl.calls[-1] == ("stats", "blue")


def test_status_prints_no_python_structures():
    status = {"version": "0.1", "maps": [{"map": "xf_flows", "action": "create", "detail": ""}],
              "tenants": [{"name": "blue", "id": 10, "generation": 2}],
              "ports": [{"name": "veth-vm1", "tenant": "blue", "attached": True,
                         "ifindex": 7, "note": ""}], "flows": 3, "trace_program": "not built",
              "program": {"how": "adopted", "build_id": "1f2e3d4c5b6a7988", "load_seconds": 0.01}}
    text = cli.render("status", status, {})
    assert "how: adopted" in text, text
    assert "{" not in text and "[" not in text, text
    assert "  MAP       ACTION  DETAIL" in text and "  xf_flows  create" in text


def test_trace_text(run, agent, monkeypatch):
    ctl, _ = agent
    dropped = {"verdict": "drop", "action": "drop", "tenant": "blue", "rule": None,
               "route": None, "reason": "default", "packet_out": None,
               "built_trace_program": True, "seconds": 5.91}
    text = cli.render("trace", dropped, {})
    assert "output packet: none (dropped)" in text and "hex" not in text
    assert text.startswith("(built the trace program first: 5.9 s")
    routed = dict(dropped, verdict="redirect", action="redirect", route="route 0.0.0.0/0 via "
                  "10.0.0.254", packet_out=FRAME, built_trace_program=False)
    text = cli.render("trace", routed, {})
    assert "route:     route 0.0.0.0/0 via 10.0.0.254" in text
    assert "sport     = 40000" in text and "dport     = 22" in text and "ssh" not in text
    raw, defaults = cli.scapy_packet_defaults("IP(dst='10.0.0.6')/TCP(dport=22)")
    assert defaults[0] == "Ether header added"
    assert any(d.startswith("IP.src=") for d in defaults) and "TCP.sport=20" in defaults
    assert not any(d.startswith("IP.dst") or d.startswith("TCP.dport") for d in defaults)
    rc, out, err = run("trace", "--port", "veth-vm1", "--scapy", "IP()/UDP(sport=1, dport=2)")
    assert rc == 0 and "--scapy filled in defaults: Ether header added" in err
    assert "UDP.sport" not in err


# -- audit log and request metrics --------------------------------------------------------------

def test_audit_log_and_request_metrics(tmp_path, caplog):
    from agent.metrics import Timings
    from test_commands import populated
    t = Timings()
    path = str(tmp_path / "a.sock")
    with ApiServer(populated(), path, timings=t) as srv:
        with caplog.at_level(logging.INFO, logger="xdpflow.audit"):
            for req in ({"command": "tenant add", "args": {"name": "red", "id": 20}},
                        {"command": "tenant del", "args": {"name": "blue"}},
                        {"command": "tenant list"},
                        {"command": "apply", "args": {"state": {}, "dry_run": True}}):
                srv.handle(json.dumps(req).encode(), None if "list" in req["command"] else
                           __import__("agent.api").api.Peer(1, 0, 0))
    lines = [r.getMessage() for r in caplog.records if r.name == "xdpflow.audit"]
    assert lines == ["uid 0 (root) pid 1: tenant add name=red id=20: ok",
                     "uid 0 (root) pid 1: tenant del name=blue: refused: tenant blue: still "
                     "has 1 port, 1 endpoint; delete those first, or delete with --cascade"]
    assert dict(((c, r), n) for (c, r), n in t.counts("api")) == {
        ("tenant add", "ok"): 1, ("tenant del", "refused"): 1, ("tenant list", "ok"): 1,
        ("apply", "ok"): 1}
    (labels, buckets, total), = [h for h in t.histograms("api") if h[0] == ("tenant add",)]
    assert buckets[-1] == ("+Inf", 1) and total >= 0


# -- dashboards ---------------------------------------------------------------------------------

def test_zero_series_info_and_histograms():
    src = FakeSource()
    info = src.agent_info()
    src.agent_info = lambda: dict(info, program_id=42, kernel="6.18", config_sha256="ab" * 32,
                                  last_change=1700000001.0)
    from agent.metrics import Timings
    t = Timings()
    t.observe("reconcile", 0.02)
    t.observe("api", 0.001, "status")
    t.count("api", "status", "ok")
    srv = serve(DatapathCollector(src, t), "127.0.0.1", 0)
    try:
        body = scrape("127.0.0.1", srv.port)
    finally:
        srv.shutdown()
    got = {(s.name, frozenset(s.labels.items())): s.value
           for f in text_string_to_metric_families(body) for s in f.samples}

    def v(name, **labels):
        return got[(name, frozenset(labels.items()))]
    # veth-vm2 (red) had no traffic: still a series per verdict, at 0.
    for verdict in ("redirect", "drop"):
        assert v("xdpflow_port_packets_total", tenant="red", port="veth-vm2",
                 verdict=verdict) == 0
    assert v("xdpflow_port_packets_total", tenant="red", port="veth-vm2", verdict="pass") == 3
    assert v("xdpflow_port_packets_total", tenant="blue", port="veth-vm1",
             verdict="drop") == 7
    assert v("xdpflow_agent_info", version="0.1.0", program_id="42", kernel="6.18",
             config_sha256="ab" * 32) == 1
    assert v("xdpflow_last_config_change_timestamp_seconds") == 1700000001.0
    assert v("xdpflow_reconcile_seconds_bucket", le="0.025") == 1
    assert v("xdpflow_reconcile_seconds_count") == 1
    assert v("xdpflow_apply_seconds_count") == 0, "exported before the first change"
    assert v("xdpflow_api_requests_total", command="status", result="ok") == 1
    assert v("xdpflow_api_request_seconds_count", command="status") == 1


def test_flows_series_for_every_tenant():
    src = FakeSource()
    src.flow_summary = lambda: dict(total=5, capacity=10, by_tenant={"blue": 5},
                                    insert_failures=0)
    fams = {f.name: f for f in DatapathCollector(src).collect()}
    assert {s.labels["tenant"]: s.value for s in fams["xdpflow_flows"].samples} == \
        {"blue": 5, "red": 0}


# -- teardown -------------------------------------------------------------------------------------

def test_teardown_refuses_before_touching_anything(tmp_path, monkeypatch):
    from agent import daemon

    class NoLinks:
        def get(self, name):
            return None

        def detach(self, link):
            raise AssertionError("detached something")

    unpinned = []
    monkeypatch.setattr("agent.datapath.Datapath.unpin", lambda self: unpinned.append(1))
    state = model.State(tenants=[model.Tenant("blue", 10)],
                        ports=[model.Port("veth-vm1", "blue"), model.Port("veth-vm2", "blue")])
    cfg = type("Cfg", (), {"agent": type("A", (), {"bpffs": str(tmp_path)})()})()
    with pytest.raises(daemon.TeardownRefused, match="veth-vm1, veth-vm2 not found"):
        daemon.teardown(cfg, NoLinks(), state, force=False)
    assert unpinned == []
    daemon.teardown(cfg, NoLinks(), state, force=True)
    assert unpinned == [1]


def test_agent_help_names_force():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.run([sys.executable, "-m", "agent.daemon", "--help"], cwd=root,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "--force" in p.stdout and "--teardown" in p.stdout


@pytest.mark.parametrize("argv", [
    ["tenant", "add", "green", "--id", "70000"],
    ["tenant", "add", "9green", "--id", "7"],
    ["port", "add", "a/b", "--tenant", "blue"],
    ["endpoint", "add", "--tenant", "blue", "10.0.0.999", "--port", "veth-vm1", "--mac",
     "02:00:00:00:00:09"],
    ["route", "add", "--tenant", "blue", "10.0.0.1/8", "--drop"],
    ["rule", "add", "--tenant", "blue", "--priority", "1", "--dport", "99999", "--proto",
     "tcp", "--action", "deny"],
    ["rule", "del", "0"],
    ["flow", "dump", "--limit", "0"],
    ["flow", "dump", "--ip", "not-an-ip"],
    ["stats", "--tenant", "9x"],
    ["trace", "--port", "veth-vm1", "--hex", "xyz"],
])
def test_every_input_error_is_exit_2(run, argv):
    setup_blue(run)
    rc, out, err = run(*argv)
    assert rc == 2 and out == "" and err.startswith("xdpflowctl: "), (argv, rc, err)
    assert err.count("xdpflowctl:") == 1


@pytest.mark.parametrize("argv", [
    ["tenant", "add", "blue", "--id", "11"],                   # exists
    ["port", "add", "veth-vm9", "--tenant", "nosuch"],          # no such tenant
    ["rule", "del", "99"],                                     # no such rule
    ["tenant", "del", "blue"],                                 # still used
])
def test_refusals_are_exit_1(run, argv):
    setup_blue(run)
    rc, out, err = run(*argv)
    assert rc == 1 and out == "" and err.startswith("xdpflowctl: "), (argv, rc, err)
