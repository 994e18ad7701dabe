"""xdpflowctl end to end: the real CLI main() against a real ApiServer on a unix socket,
serving the in-memory FakeController. Exit codes, --json, output, and that the parsers and
the command table agree."""
import argparse
import grp
import json
import os
import subprocess
import sys

import pytest

from agent import commands
from agent.api import ApiServer, Peer
from ctl import cli
from test_commands import CONTRACT, FakeController

pytestmark = pytest.mark.unit

STATE_TOML = """
[[tenants]]
name = "blue"
id = 10

[[tenants]]
name = "red"
id = 20
vni = 5020

[[ports]]
name = "veth-vm1"
tenant = "blue"

[[endpoints]]
tenant = "blue"
ip = "10.0.0.5"
port = "veth-vm1"
mac = "02:00:00:00:00:05"

[[routes]]
tenant = "blue"
prefix = "0.0.0.0/0"
via = "10.0.0.5"

[[rules]]
id = 7
tenant = "blue"
priority = 100
proto = "tcp"
dport = "22"
action = "allow"
"""

FRAME = ("020000000006020000000005080045000028000100004006" "66c40a0000050a000006"
         "9c4000160000000000000000500220000000000000")


@pytest.fixture
def agent(tmp_path):
    ctl = FakeController()
    path = str(tmp_path / "run" / "agent.sock")
    # The real SO_PEERCRED path: this process is the peer and its group is the admin group.
    srv = ApiServer(ctl, path, admin_group=grp.getgrgid(os.getgid()).gr_name,
                    request_timeout=2.0)
    srv.start()
    yield ctl, path
    srv.stop()


@pytest.fixture
def run(agent, capsys):
    _, path = agent

    def run(*argv, socket=path):
        rc = cli.main(["--socket", socket, *argv])
        out, err = capsys.readouterr()
        return rc, out, err
    return run


def setup_blue(run):
    for argv in (["tenant", "add", "blue", "--id", "10"],
                 ["port", "add", "veth-vm1", "--tenant", "blue"],
                 ["endpoint", "add", "--tenant", "blue", "10.0.0.5", "--port", "veth-vm1",
                  "--mac", "02:00:00:00:00:05"]):
        assert run(*argv)[0] == 0, argv


# -- the table and the parsers --------------------------------------------------------------

def test_parsers_and_table_agree():
    parser = cli.build_parser()
    assert sorted(cli.leaf_commands(parser)) == sorted(commands.COMMANDS) == sorted(CONTRACT)


def _leaf(parser, name):
    p = parser
    for word in name.split():
        sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
        p = sub.choices[word]
    return p


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_each_parser_has_the_table_args_and_examples(name):
    cmd = commands.COMMANDS[name]
    leaf = _leaf(cli.build_parser(), name)
    dests = {a.dest for a in leaf._actions} - {"help", "json"}
    assert dests == {a.name for a in cmd.args if a.cli}
    assert "examples:" in leaf.format_help() and cmd.examples.strip() in leaf.format_help()


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["rule", "add", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "highest" in out and "examples:" in out


def test_python_dash_m_ctl(tmp_path):
    env = dict(os.environ, XDPFLOW_SOCKET=str(tmp_path / "none.sock"))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.run([sys.executable, "-m", "ctl", "--json", "status"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert json.loads(p.stdout)["error"]["code"] == "unreachable"
    assert str(tmp_path / "none.sock") in p.stderr


# -- every contract command round-trips -----------------------------------------------------

def test_tenants(run, agent):
    ctl, _ = agent
    assert run("tenant", "add", "blue", "--id", "10")[0] == 0
    rc, out, _ = run("tenant", "add", "red", "--id", "20", "--vni", "5020", "--default", "pass")
    assert rc == 0 and out.startswith("added tenant red")
    rc, out, _ = run("tenant", "list")
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "ID", "VNI", "DEFAULT", "MAX_FLOWS"]
    assert lines[2].split() == ["red", "20", "5020", "pass", "-"]
    assert run("tenant", "del", "red") == (0, "deleted tenant red\n", "")
    assert [t.name for t in ctl.state.tenants] == ["blue"]


def test_ports_endpoints_routes(run, agent):
    ctl, _ = agent
    setup_blue(run)
    rc, out, _ = run("port", "list", "--tenant", "blue")
    assert rc == 0 and "veth-vm1" in out
    assert "no ports" in run("port", "list", "--tenant", "red")[1]
    rc, out, _ = run("endpoint", "list")
    assert "02:00:00:00:00:05" in out
    assert run("route", "add", "--tenant", "blue", "0.0.0.0/0", "--via", "10.0.0.5")[0] == 0
    assert run("route", "add", "--tenant", "blue", "192.168.0.0/16", "--kernel")[0] == 0
    assert run("route", "add", "--tenant", "blue", "10.9.0.0/16", "--drop")[0] == 0
    rc, out, _ = run("route", "list", "--tenant", "blue")
    assert [ln.split()[2] for ln in out.splitlines()[1:]] == ["via", "drop", "kernel"]
    assert run("route", "del", "--tenant", "blue", "0.0.0.0/0")[0] == 0
    assert run("endpoint", "del", "--tenant", "blue", "10.0.0.5")[0] == 0
    assert run("port", "del", "veth-vm1")[0] == 0
    assert ctl.state.ports == [] and ctl.state.endpoints == [] and len(ctl.state.routes) == 2


def test_rules_with_auto_ids(run, agent):
    ctl, _ = agent
    setup_blue(run)
    rc, out, _ = run("rule", "add", "--tenant", "blue", "--priority", "100", "--proto", "tcp",
                     "--dport", "22", "--action", "allow", "--comment", "ssh")
    assert rc == 0 and out.startswith("added rule 1 ")
    rc, out, _ = run("--json", "rule", "add", "--tenant", "blue", "--priority", "200",
                     "--id", "5", "--src", "10.0.0.0/24", "--proto", "icmp", "--icmp-type",
                     "8", "--icmp-code", "0", "--in-port", "veth-vm1", "--action", "deny")
    assert json.loads(out)["id"] == 5 and json.loads(out)["icmp_type"] == 8
    rc, out, _ = run("--json", "rule", "add", "--tenant", "blue", "--priority", "1",
                     "--sport", "1000-1999", "--proto", "udp", "--dst", "10.0.0.6",
                     "--action", "pass")
    assert json.loads(out)["id"] == 2
    rc, out, _ = run("rule", "list", "--tenant", "blue")
    rows = [ln.split() for ln in out.splitlines()]
    assert rows[0][:4] == ["ID", "TENANT", "PRIORITY", "ACTION"]
    assert [r[0] for r in rows[1:]] == ["5", "1", "2"]       # highest priority first
    assert rows[2][4:6] == ["any", "any"]
    assert run("rule", "del", "1")[0] == 0
    assert run("--json", "rule", "add", "--tenant", "blue", "--priority", "3",
               "--action", "deny")[1].count('"id": 1') == 1   # freed id reused
    assert sorted(r.id for r in ctl.state.rules) == [1, 2, 5]


def test_apply_dry_run_then_real(run, agent, tmp_path):
    ctl, _ = agent
    f = tmp_path / "state.toml"
    f.write_text(STATE_TOML)
    rc, out, _ = run("apply", str(f), "--dry-run")
    assert rc == 0
    assert "+ tenant blue (id=10 default=drop)" in out
    assert "+ rule 7 (" in out and out.rstrip().endswith("dry run: would apply 6 changes")
    assert ctl.state.tenants == []
    rc, out, _ = run("apply", str(f))
    assert rc == 0 and out.rstrip().endswith("applied 6 changes")
    f.write_text(STATE_TOML.replace("vni = 5020", "vni = 5021").replace(
        '[[tenants]]\nname = "blue"', '[[tenants]]\nname = "blue"', 1))
    rc, out, _ = run("apply", str(f), "-n")
    assert "~ tenant red: vni: 5020 -> 5021" in out
    f.write_text('[[tenants]]\nname = "blue"\nid = 10\n')
    rc, out, _ = run("apply", str(f), "--prune")
    assert "- rule 7" in out and "- tenant red" in out
    rc, out, _ = run("--json", "apply", str(f), "--prune")
    assert json.loads(out)["tenants"] == {"add": [], "remove": [], "change": []}
    rc, out, _ = run("apply", str(f), "--prune")
    assert out.strip() == "no changes"


def test_apply_json_file_is_the_same_state_as_toml(run, agent, tmp_path):
    from ctl.cli import load_state_file
    toml = tmp_path / "state.toml"
    toml.write_text(STATE_TOML)
    f = tmp_path / "state.JSON"           # by extension, any case
    f.write_text(json.dumps(load_state_file(str(toml))))
    assert load_state_file(str(f)) == load_state_file(str(toml))
    rc, out, _ = run("apply", str(f))
    assert rc == 0 and out.rstrip().endswith("applied 6 changes")
    assert run("apply", str(toml))[1].strip() == "no changes"


@pytest.mark.parametrize("text, message", [
    ('{"tenants": [', "JSON syntax error: Expecting value: line 1 column 14"),
    ('{"tenants": [{"name": "blue", "id": NaN}]}', "NaN is not a JSON number"),
    ('[{"name": "blue"}]', "a JSON apply file is one object"),
    ('{"tenants": {"name": "blue"}}', "tenants must be a list of objects"),
    ('{"vpcs": []}', "vpcs: unknown table 'vpcs'"),
    ('{"tenants": [{"name": "blue", "id": "10"}]}', "tenants[0].id: tenant blue: id: '10' is text"),
    ('{"tenants": [{"name": "b", "id": 1}, {"name": "b", "id": 2}]}',
     "tenants[1]: tenant b: given twice (first at tenants[0])"),
    ("[" * 100_000, "nested too deeply"),
    # The file's text goes to the agent unparsed (api.RawJSON); whatever the agent makes
    # of Python's NaN/Infinity extension, the file is refused for it, as before.
    ('{"tenants": [{"name": "blue", "id": 1, "max_flows": Infinity}]}', "Infinity is not"),
    ('{"tenants": [{"name": "blue", "id": 1}], "rules": [{"id": 1, "tenant": "blue", '
     '"priority": 1, "action": "allow", "comment": NaN}]}', "NaN is not a JSON number"),
    ('{"tenants": [{"name": "blue", "id": 1}], "rules": [{"id": 1, "tenant": "blue", '
     '"priority": -Infinity, "action": "allow"}]}', "-Infinity is not a JSON number"),
    ('{"tenants": [{"name": "blue", "id": 1}]} trailing', "JSON syntax error: Extra data"),
    ('', "JSON syntax error: Expecting value: line 1 column 1"),
])
def test_apply_json_file_errors_name_the_place(run, agent, tmp_path, text, message):
    ctl, _ = agent
    f = tmp_path / "state.json"
    f.write_text(text)
    rc, _, err = run("apply", str(f))
    assert rc == 2 and f"{f}" in err and message in err, err
    assert ctl.state.tenants == []


def test_apply_json_file_agent_error_names_the_object(run, agent, tmp_path):
    f = tmp_path / "state.json"
    f.write_text(json.dumps({"rules": [{"id": 7, "tenant": "nosuch", "priority": 1,
                                        "action": "allow"}]}))
    rc, _, err = run("apply", str(f))
    assert rc != 0 and f"{f}: rules[0]: rule 7" in err, err


def test_json_output_is_indented_unless_big():
    small = {"a": [1, 2]}
    assert cli.json_document(small) == json.dumps(small, indent=2)
    big = {"rules": [{"id": i, "tenant": "blue"} for i in range(40_000)]}
    text = cli.json_document(big)
    assert "\n" not in text and json.loads(text) == big


def test_apply_from_stdin(run, agent, monkeypatch):
    import io
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(STATE_TOML.encode())))
    rc, out, _ = run("apply", "-", "--dry-run")
    assert rc == 0 and "+ port veth-vm1" in out


def test_flows_stats_status(run):
    rc, out, _ = run("flow", "dump")
    assert rc == 0 and out.splitlines()[0].split()[:4] == ["TENANT", "IN_PORT", "PROTO", "SRC"]
    assert len(out.splitlines()) == 3
    rc, out, _ = run("--json", "flow", "dump", "--tenant", "blue", "--limit", "5")
    assert [f["tenant"] for f in json.loads(out)] == ["blue"]
    assert run("flow", "flush", "--tenant", "red")[1] == "flushed 1 flow\n"
    assert run("flow", "flush")[1] == "flushed 1 flow\n"
    assert run("flow", "dump")[1] == "no flows\n"
    rc, out, _ = run("stats")
    assert rc == 0 and "default" in out and "insert failures: 0" in out
    assert out.splitlines()[0].split() == ["TENANT", "PORT", "VERDICT", "REASON", "PACKETS",
                                           "BYTES"]
    rc, out, _ = run("status")
    assert rc == 0 and "version: test" in out and "capacity: 65536" in out


def test_trace_hex(run, agent):
    ctl, _ = agent
    rc, out, _ = run("trace", "--port", "veth-vm1", "--hex", FRAME)
    assert rc == 0
    assert "verdict:   redirect" in out and "out port:  veth-vm2" in out
    assert "flow hit:  no" in out and "rule:      1" in out
    assert "hex: " + FRAME in out and "###[ Ethernet ]###" in out
    assert ctl.calls[-1] == ("trace", "veth-vm1", bytes.fromhex(FRAME))


def test_trace_scapy(run, agent):
    ctl, _ = agent
    rc, out, err = run("--json", "trace", "--port", "veth-vm1", "--scapy",
                       "Ether(src='02:00:00:00:00:05', dst='02:00:00:00:00:06')/"
                       "IP(src='10.0.0.5', dst='10.0.0.6')/TCP(dport=22)")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["verdict"] == "redirect"
    sent = ctl.calls[-1][2]
    assert sent[:12] == bytes.fromhex("020000000006020000000005") and sent[12:14] == b"\x08\x00"
    # a bare IP packet gets an Ethernet header
    assert run("trace", "--port", "veth-vm1", "--scapy", "IP()/UDP()")[0] == 0
    assert ctl.calls[-1][2][12:14] == b"\x08\x00"


def test_trace_scapy_sends_nothing(monkeypatch):
    # An unset Ether dst would make Scapy ARP for the address on the node's network.
    from scapy.config import conf
    from scapy.layers.inet import IP
    from scapy.layers.l2 import Ether

    def no_arp(*a):
        raise AssertionError("trace --scapy tried to resolve a MAC address")
    monkeypatch.setitem(conf.neighbor.resolvers, (Ether, IP), no_arp)
    frame = cli.scapy_packet("Ether()/IP(dst='10.0.0.6')/UDP(dport=53)")
    assert frame[:6] == b"\xff" * 6


@pytest.mark.parametrize("expr,match", [
    ("Ether(", "SyntaxError"),
    ("__import__('os')", "NameError"),
    ("open('/etc/passwd')", "NameError"),
    ("Ether().__class__.__base__", "not a packet"),
    ("42", "not a packet"),
    ("IP(ttl='x')", "--scapy"),
])
def test_trace_bad_scapy_is_exit_2(run, agent, expr, match):
    ctl, _ = agent
    rc, out, err = run("trace", "--port", "veth-vm1", "--scapy", expr)
    assert rc == 2 and match in err and out == ""
    assert not any(c[0] == "trace" for c in ctl.calls)


# -- exit codes and --json ------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["tenant", "add", "blue"],                         # --id missing
    ["tenant", "add", "blue", "--id", "ten"],          # not an int
    ["tenant", "add", "blue", "--id", "1", "--default", "maybe"],
    ["route", "add", "--tenant", "blue", "0.0.0.0/0", "--kernel", "--drop"],
    ["route", "add", "--tenant", "blue", "0.0.0.0/0"],
    ["trace", "--port", "veth-vm1"],
    ["trace", "--port", "veth-vm1", "--hex", "00", "--scapy", "Ether()"],
    ["flow"],
    ["bogus"],
    [],
])
def test_usage_errors_exit_2(run, argv):
    rc, out, err = run(*argv)
    assert rc == 2 and out == "" and "usage:" in err
    rc, out, err = run("--json", *argv)
    assert rc == 2 and json.loads(out)["error"]["code"] == "usage"


def test_invalid_values_exit_2(run):
    setup_blue(run)
    rc, out, err = run("endpoint", "add", "--tenant", "blue", "10.0.0.7", "--port", "veth-vm1",
                       "--mac", "zz:00:00:00:00:07")
    assert rc == 2 and "mac" in err
    rc, out, err = run("--json", "rule", "add", "--tenant", "blue", "--priority", "1",
                       "--proto", "udp", "--icmp-type", "3", "--action", "deny")
    assert rc == 2 and json.loads(out)["error"]["code"] == "invalid"
    assert run("trace", "--port", "veth-vm1", "--hex", "xyz")[0] == 2


def test_refused_exit_1(run):
    setup_blue(run)
    rc, out, err = run("tenant", "add", "blue", "--id", "11")
    assert rc == 1 and "already exists" in err and out == ""
    rc, out, err = run("--json", "tenant", "del", "blue")   # the port still refers to it
    assert rc == 1 and json.loads(out)["error"]["code"] == "refused"
    assert run("rule", "del", "99")[0] == 1


def test_internal_exit_1(run, agent):
    ctl, _ = agent
    ctl.fail = RuntimeError("boom")
    rc, out, err = run("--json", "status")
    assert rc == 1 and json.loads(out)["error"]["code"] == "internal" and "boom" not in err


def test_denied_exit_1(tmp_path, capsys):
    path = str(tmp_path / "agent.sock")
    with ApiServer(FakeController(), path, admin_group="xdpflow",
                   peercred=lambda s: Peer(0, 4242, 4242)):
        rc = cli.main(["--socket", path, "tenant", "add", "blue", "--id", "10"])
        out, err = capsys.readouterr()
        assert rc == 1 and "'tenant add'" in err and "xdpflow" in err
        assert cli.main(["--socket", path, "--json", "tenant", "list"]) == 0
        assert json.loads(capsys.readouterr().out) == []


def test_unreachable_exit_1_names_the_socket(tmp_path, capsys):
    path = str(tmp_path / "nobody-home.sock")
    assert cli.main(["--socket", path, "status"]) == 1
    assert path in capsys.readouterr().err


def test_socket_from_environment(agent, monkeypatch, capsys):
    _, path = agent
    monkeypatch.setenv("XDPFLOW_SOCKET", path)
    assert cli.main(["status"]) == 0
    assert "version: test" in capsys.readouterr().out


def test_apply_file_errors_exit_2(run, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[tenants]]\nname = "blue"\nid = = 10\n')
    rc, out, err = run("apply", str(bad))
    assert rc == 2 and str(bad) in err and "line 3" in err
    rc, out, err = run("--json", "apply", str(tmp_path / "missing.toml"))
    assert rc == 2 and "missing.toml" in json.loads(out)["error"]["message"]
    dated = tmp_path / "dated.toml"
    dated.write_text("when = 2024-01-01\n")
    assert run("apply", str(dated))[0] == 2
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('[[vpcs]]\nname = "blue"\n')
    rc, out, err = run("apply", str(unknown))
    assert rc == 2 and "vpcs" in err                    # invalid from the agent's model


JSON_EVERYWHERE = [
    ["status"], ["stats"], ["tenant", "list"], ["port", "list"], ["endpoint", "list"],
    ["route", "list"], ["rule", "list"], ["flow", "dump"],
    ["tenant", "add", "green", "--id", "30"],
    ["port", "add", "veth-vm9", "--tenant", "green"],
    ["endpoint", "add", "--tenant", "green", "10.1.0.9", "--port", "veth-vm9", "--mac",
     "02:00:00:00:01:09"],
    ["route", "add", "--tenant", "green", "10.2.0.0/16", "--via", "10.1.0.9"],
    ["fip", "add", "--tenant", "green", "203.0.113.10", "--to", "10.1.0.9"],
    ["snat", "add", "--tenant", "green", "--to", "198.51.100.1", "--ports", "1000-1999"],
    ["fip", "list"], ["snat", "list"],
    ["fip", "del", "--tenant", "green", "203.0.113.10"],
    ["snat", "del", "--tenant", "green"],
    ["rule", "add", "--tenant", "green", "--priority", "5", "--action", "allow"],
    ["trace", "--port", "veth-vm9", "--hex", FRAME],
    ["rule", "del", "1"],
    ["route", "del", "--tenant", "green", "10.2.0.0/16"],
    ["endpoint", "del", "--tenant", "green", "10.1.0.9"],
    ["port", "del", "veth-vm9"],
    ["tenant", "del", "green"],
    ["flow", "flush"],
    ["top", "--once"], ["rule", "list", "--stats"],
    ["tenant", "del", "green"],                  # refused now
    ["tenant", "add", "x"],                      # usage
]


def test_json_is_always_one_document(run, tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(STATE_TOML)
    seen = set()
    for argv in JSON_EVERYWHERE + [["apply", str(f), "--dry-run"], ["apply", str(f)]]:
        rc, out, err = run("--json", *argv)
        json.loads(out)  # exactly one document: json.loads rejects trailing data
        seen.add(" ".join(argv[:2]) if argv[0] in ("tenant", "port", "endpoint", "route",
                                                   "rule", "flow", "fip", "snat")
                 else argv[0])
        # --json after the command works too
        if rc == 0 and argv[-1] in ("list", "dump", "status", "stats"):
            rc2, out2, _ = run(*argv, "--json")
            assert rc2 == 0 and json.loads(out2) == json.loads(out)
    # monitor streams one object per line (tests below).
    assert seen >= CONTRACT - {"monitor"}


def test_render_tables_align():
    text = cli.format_table([{"a": "x", "n": 5}, {"a": "longer", "n": 12345}], ("a", "n"),
                            right=("n",))
    assert text.splitlines() == ["A           N", "x           5", "longer  12345"]


# -- monitor, top, rule stats ----------------------------------------------------------------

def test_monitor_json_is_one_event_a_line_and_lost_counts_go_to_stderr(run, agent):
    ctl, _ = agent
    rc, out, err = run("--json", "monitor", "--type", "drop", "--tenant", "blue",
                      "--count", "2")
    assert rc == 0
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["reason"] for e in events] == ["rule_deny", "default"]
    first = events[0]
    assert (first["tenant"], first["port"], first["verdict"], first["rule"]) == \
        ("blue", "veth-vm1", "drop", 3)
    # Decoded from the packet bytes by Scapy, on the client's side.
    assert (first["proto"], first["src"], first["sport"], first["dst"], first["dport"]) == \
        ("tcp", "10.0.0.5", 40000, "10.0.0.6", 22)
    assert "decoded" not in first
    assert "7 to the rate limit" in err and "2 events" in err
    assert ctl.monitor.opened == [{"tenant": "blue", "port": None, "type": "drop",
                                   "reason": None}]


def test_monitor_count_stops_early_and_decode_adds_scapy_summary(run):
    rc, out, err = run("monitor", "--count", "1", "--decode")
    assert rc == 0
    lines = out.splitlines()
    assert "blue veth-vm1 drop rule_deny rule=3 tcp 10.0.0.5:40000 -> 10.0.0.6:22" in lines[0]
    assert lines[1].strip().startswith("Ether / IP / TCP 10.0.0.5:40000 > 10.0.0.6")
    assert len(lines) == 2


def test_monitor_refusal_and_bad_options(run):
    rc, out, err = run("--json", "monitor", "--tenant", "nosuch")
    assert rc == 1 and json.loads(out)["error"]["code"] == "refused"
    for bad in (["--count", "0"], ["--duration", "0"], ["--type", "bogus"]):
        rc, out, err = run("--json", "monitor", *bad)
        assert rc == 2 and json.loads(out)["error"]["code"] == "usage", bad


def test_rule_list_stats_marks_rules_that_never_matched(run):
    setup_blue(run)
    for prio in ("10", "20"):
        assert run("rule", "add", "--tenant", "blue", "--priority", prio,
                   "--action", "allow")[0] == 0
    rc, out, _ = run("rule", "list", "--stats")
    assert rc == 0
    head, *rows, footer = out.splitlines()
    assert "HITS" in head and "LAST_HIT" in head
    never = [r for r in rows if "NEVER" in r]
    assert len(never) == 1 and never[0].split()[0] == "2"
    assert footer == "1 rule never matched: 2"
    rc, out, _ = run("--json", "rule", "list", "--stats")
    assert {r["id"]: r["hits"] for r in json.loads(out)} == {1: 5, 2: 0}


def test_top_once_prints_the_busiest_flows(run, agent):
    ctl, _ = agent
    rc, out, _ = run("top", "--once", "--by", "bps", "--limit", "1")
    assert rc == 0
    assert out.startswith("busiest flows by bps")
    assert "PPS" in out and "10.0.0.6" in out and "10.0.0.9" not in out
    assert ("top", None, "bps", 1) in ctl.calls


def test_lab_events_for_finds_a_packet_by_its_bytes():
    from netns_lab.events import events_for
    from test_commands import FRAME_HEX
    ev = {"verdict": "drop", "reason": "rule_deny", "packet": FRAME_HEX}
    other = {"verdict": "pass", "reason": "local", "packet": "00" * 60}
    (got,) = events_for([other, ev], bytes.fromhex("0a0000050a000006"))   # src, dst
    assert (got["reason"], got["src"], got["dport"]) == ("rule_deny", "10.0.0.5", 22)
    assert events_for([other, ev], b"absent") == []


def test_describe_packet_never_raises_and_finds_l4_past_extension_headers():
    from scapy.layers.inet import ICMP, IP, UDP
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop
    from scapy.layers.l2 import Ether
    from agent.monitor import describe_packet
    v6 = Ether() / IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrHopByHop() / UDP(
        sport=1, dport=2)
    assert describe_packet(bytes(v6).hex()) == {"src": "fd00::1", "dst": "fd00::2",
                                                "proto": "udp", "sport": 1, "dport": 2}
    # An ICMP error: the quoted packet's ports are not the packet's.
    err = Ether() / IP(src="1.1.1.1", dst="2.2.2.2") / ICMP(type=3) / IP() / UDP()
    got = describe_packet(bytes(err).hex())
    assert got["proto"] == "icmp" and got["icmp_type"] == 3 and "sport" not in got
    assert describe_packet("zz") == {} and describe_packet(bytes(v6)[:20].hex()) == {}
