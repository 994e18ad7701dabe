"""The control API through the real CLI: `apply` of whole states (refused whole when any
part is wrong, a dry run that changes nothing), and who may do what on the socket."""
from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest

from netns_lab.lab import toml_tables

pytestmark = pytest.mark.lab

BASE = {
    "tenants": [{"name": "blue", "id": 10}, {"name": "red", "id": 20}],
    "ports": [{"name": "bvm1", "tenant": "blue"}],
    "endpoints": [{"tenant": "blue", "ip": "10.0.0.1", "port": "bvm1",
                   "mac": "02:00:00:00:00:01"}],
    "rules": [
        {"id": 1, "tenant": "blue", "priority": 100, "src": "10.0.0.0/24", "proto": "tcp",
         "dport": "22", "action": "allow", "comment": "ssh"},
        {"id": 2, "tenant": "red", "priority": 10, "proto": "udp", "dport": "53",
         "action": "allow"},
    ],
}


@pytest.fixture(scope="module")
def node(module_lab):
    lab = module_lab
    lab.add_vm("blue", 1)
    lab.write_config()
    lab.start_agent()
    path = lab.dir / "base.toml"
    path.write_text(toml_tables("", BASE))
    r = lab.ctl("apply", str(path))
    assert r.code == 0, r
    return lab


def apply_file(lab, name, state, *extra, json=True):
    path = Path(lab.dir) / name
    path.write_text(toml_tables("", state))
    return lab.ctl("apply", str(path), *extra, json=json)


def with_rule(**rule):
    st = copy.deepcopy(BASE)
    st["rules"].append(rule)
    return st


def rules(lab):
    return lab.ok("rule", "list")


def error_text(r):
    """The message of a refusal: the JSON error and what went to stderr."""
    err = (r.data or {}).get("error", {}) if isinstance(r.data, dict) else {}
    return f"{err.get('message', '')}\n{r.stderr}"


def test_the_base_state_was_applied(node):
    assert sorted(r["id"] for r in rules(node)) == [1, 2]
    assert {t["name"] for t in node.ok("tenant", "list")} == {"blue", "red"}


def test_apply_refuses_a_bad_prefix_whole(node):
    before = rules(node)
    r = apply_file(node, "bad-prefix.toml",
                   with_rule(id=7, tenant="blue", priority=5, src="10.0.0.300/24",
                             action="deny"))
    assert r.code == 2, r
    msg = error_text(r)
    assert "rule 7" in msg and "src" in msg and "10.0.0.300/24" in msg, msg
    assert rules(node) == before


def test_apply_refuses_an_unknown_tenant_whole(node):
    before = rules(node)
    st = with_rule(id=8, tenant="green", priority=5, action="deny")
    st["rules"][0]["priority"] = 101         # a valid change riding along is not applied
    r = apply_file(node, "unknown-tenant.toml", st)
    assert r.code in (1, 2), r
    msg = error_text(r)
    assert "green" in msg and "rule 8" in msg, msg
    assert rules(node) == before


def test_apply_refuses_a_duplicate_rule_id_whole(node):
    before = rules(node)
    st = with_rule(id=2, tenant="blue", priority=5, proto="icmp", action="allow")
    r = apply_file(node, "duplicate-id.toml", st)
    assert r.code in (1, 2), r
    msg = error_text(r)
    assert "rule 2" in msg and ("twice" in msg or "duplicate" in msg), msg
    assert rules(node) == before


def test_apply_dry_run_changes_nothing_then_apply_does(node):
    before = rules(node)
    st = with_rule(id=3, tenant="red", priority=20, proto="icmp", action="allow",
                   comment="new")
    st["rules"] = [r for r in st["rules"] if r["id"] != 2]          # and one removed
    # The file is the whole state: --prune removes what it does not name (rule 2).
    r = apply_file(node, "next.toml", st, "--dry-run", "--prune")
    assert r.code == 0, r
    assert [x["id"] for x in r.data["rules"]["add"]] == [3], r.data
    assert [x["id"] for x in r.data["rules"]["remove"]] == [2], r.data
    assert rules(node) == before
    text = apply_file(node, "next.toml", st, "--dry-run", "--prune", json=False)
    assert text.code == 0, text
    assert "+ rule 3" in text.stdout and "- rule 2" in text.stdout, text.stdout
    assert text.stdout.rstrip().endswith("dry run: would apply 2 changes"), text.stdout
    assert rules(node) == before
    # Now for real.
    r = apply_file(node, "next.toml", st, "--prune")
    assert r.code == 0, r
    after = rules(node)
    assert sorted(x["id"] for x in after) == [1, 3]
    new = [x for x in after if x["id"] == 3][0]
    assert (new["tenant"], new["priority"], new["proto"], new["action"], new["comment"]) == \
        ("red", 20, "icmp", "allow", "new")
    # The same file again: nothing to do.
    again = apply_file(node, "next.toml", st, "--prune")
    assert again.code == 0 and not any(v for k in again.data.values() for v in k.values())


# --- who may do what -----------------------------------------------------------------------

def setpriv(*groups):
    gids = ",".join(str(g) for g in groups)
    return ["setpriv", "--reuid=nobody", "--regid=nogroup",
            f"--groups={gids}" if groups else "--clear-groups"]


@pytest.mark.skipif(not shutil.which("setpriv") or not shutil.which("groupadd"),
                    reason="needs setpriv (util-linux) and groupadd")
def test_socket_group_reads_admin_group_writes(lab):
    readers, admins = lab.add_group("r"), lab.add_group("a")
    os.chmod(lab.dir, 0o755)                 # nobody must reach the socket's directory
    lab.write_config(agent={"socket_group": readers, "admin_group": admins})
    lab.start_agent()
    r_gid, a_gid = lab.gid(readers), lab.gid(admins)
    # The agent made the socket's directory and the socket for the readers.
    st = os.stat(lab.socket)
    assert st.st_gid == r_gid and st.st_mode & 0o777 == 0o660, oct(st.st_mode)
    assert os.stat(os.path.dirname(lab.socket)).st_gid == r_gid

    # A reader may read...
    r = lab.ctl("status", as_user=setpriv(r_gid))
    assert r.code == 0, r
    assert r.data["pid"] == lab.proc.pid
    assert lab.ctl("tenant", "list", as_user=setpriv(r_gid)).code == 0
    # ...and even ask for a dry run (it changes nothing)...
    plan = lab.dir / "plan.toml"
    plan.write_text(toml_tables("", {"tenants": [{"name": "blue", "id": 10}]}))
    plan.chmod(0o644)
    r = lab.ctl("apply", str(plan), "--dry-run", as_user=setpriv(r_gid))
    assert r.code == 0, r
    # ...but not change anything.
    r = lab.ctl("tenant", "add", "blue", "--id", "10", as_user=setpriv(r_gid))
    assert r.code == 1, r
    assert r.data["error"]["code"] == "denied", r
    assert admins in r.stderr, r.stderr
    denied_text = r.stderr
    r = lab.ctl("apply", str(plan), as_user=setpriv(r_gid))
    assert r.code == 1 and r.data["error"]["code"] == "denied", r
    assert lab.ok("tenant", "list") == []

    # Someone in neither group cannot even reach the socket.
    r = lab.ctl("status", as_user=setpriv())
    assert r.code == 1, r

    # A reader who is an admin too may change the state.
    r = lab.ctl("tenant", "add", "blue", "--id", "10", as_user=setpriv(r_gid, a_gid))
    assert r.code == 0, r
    assert [t["name"] for t in lab.ok("tenant", "list")] == ["blue"]
    r = lab.ctl("tenant", "del", "blue", as_user=setpriv(r_gid, a_gid))
    assert r.code == 0, r
    assert lab.ok("tenant", "list") == []
    # Last, so that everything above is checked either way: what the operator reads on a
    # refusal says it was denied (not only the JSON error code).
    assert "denied" in denied_text.lower(), \
        f"the message should say the request was denied: {denied_text!r}"


def test_a_state_past_the_request_limit_applies_through_the_cli(lab):
    """40,000 rules are about 4.2 MB of JSON, past the agent's 4 MiB max_request_bytes
    (refused before issue 12): xdpflowctl sends them compressed; every rule arrives, the
    dry run first changes nothing, and one rule added beside them lands in place."""
    from netns_lab.bench_control import TENANT, shaped_rules, state
    lab.write_config(datapath={"max_rule_entries": 131072})
    lab.start_agent()
    st = state(shaped_rules(40_000))
    import json as jsonlib
    assert len(jsonlib.dumps({"command": "apply", "args": {"state": st}})) > 4 * 2**20
    path = Path(lab.dir) / "big.toml"
    path.write_text(toml_tables("", st))
    r = lab.ctl("apply", str(path), "--dry-run", timeout=600)
    assert r.code == 0, r
    # The diff lists the first DIFF_SHOWN and counts all (--full-diff lists all).
    from agent.commands import DIFF_SHOWN
    assert r.data["rules"]["counts"]["add"] == 40_000 and lab.ok("status")["rules"] == 0
    assert [d["id"] for d in r.data["rules"]["add"]] == list(range(1, DIFF_SHOWN + 1))
    r = lab.ctl("apply", str(path), timeout=600)
    assert r.code == 0, r
    assert lab.ok("status")["rules"] == 40_000
    gen = {t["name"]: t["generation"] for t in lab.ok("status")["tenants"]}[TENANT]
    lab.ok("rule", "add", "--tenant", TENANT, "--id", "900000", "--priority", "60000",
           "--src", "198.18.0.1/32", "--proto", "udp", "--dport", "53", "--action", "deny")
    listed = {d["id"] for d in lab.ok("rule", "list")}
    assert len(listed) == 40_001 and 900000 in listed
    assert {t["name"]: t["generation"] for t in lab.ok("status")["tenants"]}[TENANT] != gen
