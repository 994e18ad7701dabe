"""The command table: it covers the contract, checks arguments, and maps each command to the
right controller call. Also home of FakeController, the in-memory controller the API and
CLI tests serve (test_api, test_cli import it from here)."""
import json
import threading
import time

import pytest

from agent import commands, model
from agent.flows import EVICTION_REASONS
from agent.commands import COMMANDS, BadArgs, Stream, dispatch

pytestmark = pytest.mark.unit

CONTRACT = {
    "status", "apply", "stats", "trace", "flow dump", "flow flush", "monitor", "top",
    *(f"{noun} {verb}" for noun in ("tenant", "port", "endpoint", "route", "rule")
      for verb in ("add", "del", "list")),
    *(f"{noun} {verb}" for noun in ("fip", "snat") for verb in ("add", "del", "list")),
}


class FakeMonitor:
    """Streams `lines` (then closes) to each monitor client, from a thread as the real
    one does; records the filters asked for."""

    def __init__(self):
        self.lines = [{"event": {"time": 1700000000.25, "tenant": "blue", "port": "veth-vm1",
                                 "verdict": "drop", "reason": "rule_deny", "rule": 3,
                                 "len": 54, "out_port": "", "flow_hit": False,
                                 "packet": FRAME_HEX}},
                      {"lost": {"rate_cap": 7, "ring_full": 0, "client": 1}},
                      {"event": {"time": 1700000000.5, "tenant": "blue", "port": "veth-vm1",
                                 "verdict": "drop", "reason": "default", "rule": None,
                                 "len": 54, "out_port": "", "flow_hit": False,
                                 "packet": FRAME_HEX}}]
        self.opened = []

    def open(self, args):
        self.opened.append(args)
        if args.get("tenant") == "nosuch":
            raise model.Conflict("tenant nosuch", "does not exist")

        def adopt(sock, reply):
            def feed():
                sock.setblocking(True)
                try:
                    sock.sendall(reply)
                    for doc in self.lines:
                        sock.sendall((json.dumps(doc) + "\n").encode())
                except OSError:
                    pass             # the client left (--count reached)
                finally:
                    sock.close()
            threading.Thread(target=feed, daemon=True).start()
        return Stream({"filter": {"type": args.get("type") or "all"}, "rate_limit": 1000},
                      adopt)


# TCP 10.0.0.5:40000 -> 10.0.0.6:22 in Ethernet (54 bytes).
FRAME_HEX = ("020000000006020000000005080045000028000100004006" "66c40a0000050a000006"
             "9c4000160000000000000000500220000000000000")


class FakeController:
    """The controller's interface over a model.State, so adds, deletes and applies behave
    as the model says (duplicates and dangling references are refused). Every reply has
    the real Controller's shape and words (tests/bpf/test_contract.py checks it)."""

    def __init__(self):
        self.state = model.State()
        self.calls = []
        self.monitor = FakeMonitor()
        self.flows = [
            {"tenant": "blue", "proto": "tcp", "src": "10.0.0.5", "dst": "10.0.0.6",
             "sport": 40000, "dport": 22, "verdict": "redirect", "in_port": "veth-vm1",
             "out_port": "veth-vm2", "rule": 1, "packets": 10, "bytes": 1200,
             "idle_s": 1.5, "age_s": 9.0, "flags": ""},
            {"tenant": "red", "proto": "udp", "src": "10.0.0.9", "dst": "10.0.0.5",
             "sport": 5353, "dport": 53, "verdict": "redirect", "in_port": "veth-vm3",
             "out_port": "veth-vm4", "rule": 7, "packets": 1, "bytes": 80,
             "idle_s": 3.0, "age_s": 3.0, "flags": "reply"},
        ]
        self.fail = None          # an exception status() raises, to test "internal"
        self.slow = 0.0           # seconds each call takes, to test serialization
        self.inside = 0
        self.max_inside = 0

    def _enter(self, name, *args):
        self.calls.append((name,) + args)
        self.inside += 1
        self.max_inside = max(self.max_inside, self.inside)
        if self.slow:
            time.sleep(self.slow)
        self.inside -= 1

    def status(self):
        self._enter("status")
        if self.fail:
            raise self.fail
        return {"version": "test", "pid": 4242, "uptime_s": 12.0,
                "config": "/etc/xdpflow/agent.toml", "pin_dir": "/sys/fs/bpf/xdpflow",
                "program_id": 77,
                "maps": [{"map": "xf_flows", "action": "reuse", "detail": ""}],
                "tenants": [{"name": t.name, "id": t.id, "generation": 1,
                             "rules": sum(1 for r in self.state.rules if r.tenant == t.name),
                             "endpoints": sum(1 for e in self.state.endpoints
                                              if e.tenant == t.name)}
                            for t in self.state.sorted("tenants")],
                "ports": [{"name": p.name, "tenant": p.tenant or "", "attached": True,
                           "ifindex": 7, "mode": "native", "note": ""}
                          for p in self.state.sorted("ports")],
                "flows": len(self.flows), "flow_capacity": 65536,
                "rules": len(self.state.rules), "trace_program": "built",
                "store_writer": {"pid": None, "started": 0, "local_writes": 0,
                                 "last_wait_s": 0.0},
                "program": {"how": "adopted", "build_id": "00000000000000aa",
                            "load_seconds": 0.01},
                "bpf_stats": {"enabled": False, "how": "off ([metrics] bpf_stats = false)"},
                "startup": {"done": True, "phase": "", "seconds": 0.01,
                            "reconcile": "skipped: the pinned digest matches"}}

    @staticmethod
    def port_status(name):
        return {"attached": True, "state": "attached", "mode": "native", "ifindex": 7,
                "note": ""}

    def list(self, kind, tenant=None):
        self._enter("list", kind, tenant)
        objs = self.state.sorted(kind)
        if tenant is not None:
            objs = [o for o in objs if (o.name if kind == "tenants" else o.tenant) == tenant]
        out = [o.to_dict() for o in objs]
        for d in out:
            if kind == "rules":
                d.update(hits=0, packets=0, bytes=0)
            if kind == "ports":
                d.update(self.port_status(d["name"]))
        return out

    def add(self, kind, obj):
        self._enter("add", kind, obj)
        o = model.KINDS[kind].from_dict(obj)
        self.state = self.state.with_added(kind, o)
        return {**o.to_dict(), **(self.port_status(o.name) if kind == "ports" else {})}

    def delete(self, kind, ident, cascade=False):
        self._enter("delete", kind, ident)
        if kind == "tenants":
            gone = self.state.users_of_tenant(ident[0]) if cascade else {}
            self.state = self.state.without_tenant(ident[0], cascade)
            return gone
        self.state = self.state.with_removed(kind, tuple(ident))
        return {}

    def apply(self, state, dry_run, prune=False, diff_limit=None, no_duplicates=False):
        self._enter("apply", state, dry_run)
        given = model.State.from_apply(state, no_duplicates)
        new = given if prune else self.state.merged(given)
        new.validate()
        d = model.diff(self.state, new, kept=None if prune else given, limit=diff_limit)
        if not dry_run:
            self.state = new
        return d

    def flow_dump(self, tenant, limit, port=None, proto=None, ip=None):
        self._enter("flow_dump", tenant, limit)
        return [f for f in self.flows if tenant in (None, f["tenant"])
                and port in (None, f.get("in_port"), f["out_port"])
                and proto in (None, model.PROTOCOLS.get(f["proto"]))
                and (ip is None or str(ip) in (f["src"], f["dst"]))][:limit]

    def flow_flush(self, tenant):
        self._enter("flow_flush", tenant)
        keep = [f for f in self.flows if tenant not in (None, f["tenant"])]
        n = len(self.flows) - len(keep)
        self.flows = keep
        return n

    def stats(self, tenant=None):
        self._enter("stats", tenant)
        return {"counters": [
            {"tenant": "blue", "port": "veth-vm1", "verdict": "redirect", "reason": "flow",
             "packets": 1000, "bytes": 64000},
            {"tenant": "blue", "port": "veth-vm1", "verdict": "drop", "reason": "default",
             "packets": 3, "bytes": 180}],
            "flows": {"total": len(self.flows), "capacity": 65536,
                      "by_tenant": {"blue": 1, "red": 1}, "insert_failures": 0,
                      "quota_refusals": {"blue": 0}},
            "evictions": {r: 0 for r in EVICTION_REASONS},
            "rule_hits": {"1": 1000},
            "rule_counters": {"1": {"packets": 1200, "bytes": 76800}},
            "port_tx": [{"tenant": "blue", "port": "veth-vm2", "packets": 1000,
                         "bytes": 64000}]}

    def add_rule_stats(self, rules):
        self._enter("add_rule_stats")
        for r in rules:
            r["hits"], r["last_hit"] = (5, 1700000000.0) if r["id"] % 2 else (0, None)

    def top(self, tenant, by, limit):
        self._enter("top", tenant, by, limit)
        return {"by": by, "sampled": len(self.flows),
                "flows": [dict(f, pps=1.0, bps=8.0) for f in self.flows][:limit]}

    def trace(self, port, packet):
        self._enter("trace", port, packet)
        return {"built_trace_program": False, "seconds": 0.002,
                "route": "endpoint 10.0.0.6 on port veth-vm2",
                "port": port, "action": "redirect", "verdict": "redirect",
                "reason": "rule_allow", "tenant": "blue", "rule": 1, "out_port": "veth-vm2",
                "out_ifindex": 8, "flow_hit": False, "stale_flow": False,
                "decapsulated": False, "nat": None,
                "packet_in": packet.hex(), "packet_out": packet.hex(), "modified": False,
                "rate_limits": []}


def populated():
    c = FakeController()
    for kind, obj in (
            ("tenants", {"name": "blue", "id": 10}),
            ("ports", {"name": "veth-vm1", "tenant": "blue"}),
            ("endpoints", {"tenant": "blue", "ip": "10.0.0.5", "port": "veth-vm1",
                           "mac": "02:00:00:00:00:05"})):
        c.add(kind, obj)
    c.calls.clear()
    return c


def test_table_covers_the_contract_and_nothing_else():
    assert set(COMMANDS) == CONTRACT


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_every_command_has_help_examples_and_a_call(name):
    cmd = COMMANDS[name]
    assert cmd.help and "\n" not in cmd.help
    assert f"xdpflowctl {name}" in cmd.examples
    assert callable(cmd.run)
    for a in cmd.args:
        assert a.help
        assert a.wire or a.cli


def test_mutating_is_what_changes_state():
    mutating = {n for n, c in COMMANDS.items() if c.mutating}
    assert mutating == {"tenant add", "tenant del", "port add", "port del", "endpoint add",
                        "endpoint del", "route add", "route del", "rule add", "rule del",
                        "apply", "flow flush", "fip add", "fip del", "snat add",
                        "snat del"}
    assert COMMANDS["apply"].changes_state({"dry_run": False})
    assert not COMMANDS["apply"].changes_state({"dry_run": True})
    assert not COMMANDS["trace"].changes_state({})


def test_rule_priority_help_says_highest_wins():
    cmd = COMMANDS["rule add"]
    assert "highest" in cmd.help
    assert "highest" in next(a for a in cmd.args if a.name == "priority").help


def test_tenant_add_passes_only_given_fields():
    c = FakeController()
    assert dispatch(c, "tenant add", {"name": "blue", "id": 10}) == {
        "name": "blue", "id": 10, "vni": None, "default": "drop", "max_flows": None}
    assert c.calls == [("add", "tenants", {"name": "blue", "id": 10})]


def test_rule_id_is_the_smallest_unused():
    c = populated()
    for rid in (1, 2, 4):
        dispatch(c, "rule add", {"tenant": "blue", "priority": 5, "action": "deny", "id": rid})
    r = dispatch(c, "rule add", {"tenant": "blue", "priority": 100, "action": "allow",
                                 "proto": "tcp", "dport": "22"})
    assert r["id"] == 3
    assert c.calls[-1][:2] == ("add", "rules") and c.calls[-1][2]["id"] == 3
    assert c.calls[-2] == ("list", "rules", None)  # all tenants: ids are global
    assert dispatch(c, "rule add", {"tenant": "blue", "priority": 1, "action": "pass"})["id"] == 5
    assert commands.next_rule_id([]) == 1


def test_explicit_rule_id_is_kept_and_duplicate_refused():
    c = populated()
    assert dispatch(c, "rule add", {"tenant": "blue", "priority": 1, "action": "deny",
                                    "id": 42})["id"] == 42
    with pytest.raises(model.Conflict):
        dispatch(c, "rule add", {"tenant": "blue", "priority": 1, "action": "deny", "id": 42})


def test_route_next_hop_forms():
    c = populated()
    assert dispatch(c, "route add", {"tenant": "blue", "prefix": "default",
                                     "via": "10.0.0.5"})["action"] == "via"
    assert dispatch(c, "route add", {"tenant": "blue", "prefix": "192.168.0.0/16",
                                     "kernel": True})["action"] == "kernel"
    assert dispatch(c, "route add", {"tenant": "blue", "prefix": "10.9.0.0/16",
                                     "drop": True})["action"] == "drop"
    with pytest.raises(BadArgs, match="exclude"):
        dispatch(c, "route add", {"tenant": "blue", "prefix": "10.8.0.0/16", "drop": True,
                                  "kernel": True})
    with pytest.raises(BadArgs, match="one of"):
        dispatch(c, "route add", {"tenant": "blue", "prefix": "10.8.0.0/16"})


def test_delete_identities_are_canonical():
    c = populated()
    dispatch(c, "port add", {"name": "veth-vm6", "tenant": "blue"})
    dispatch(c, "endpoint add", {"tenant": "blue", "ip": "2001:DB8::5", "port": "veth-vm6",
                                 "mac": "02:00:00:00:00:06"})
    dispatch(c, "route add", {"tenant": "blue", "prefix": "0.0.0.0/0", "kernel": True})
    assert dispatch(c, "route del", {"tenant": "blue", "prefix": "default"}) == {
        "deleted": "route", "identity": ["blue", "0.0.0.0/0"]}
    dispatch(c, "endpoint del", {"tenant": "blue", "ip": "2001:0db8:0::5"})
    assert c.calls[-1] == ("delete", "endpoints", ["blue", "2001:db8::5"])
    dispatch(c, "rule add", {"tenant": "blue", "priority": 1, "action": "deny"})
    dispatch(c, "rule del", {"id": 1})
    assert c.calls[-1] == ("delete", "rules", [1])
    with pytest.raises(model.Conflict, match="does not exist"):
        dispatch(c, "rule del", {"id": 1})
    with pytest.raises(model.Invalid):
        dispatch(c, "route del", {"tenant": "blue", "prefix": "10.0.0.1/8"})


@pytest.mark.parametrize("name,args,match", [
    ("nope", {}, "unknown command"),
    ("tenant add", [], "JSON object"),
    ("tenant add", {"name": "blue"}, "id is required"),
    ("tenant add", {"name": "blue", "id": 1, "colour": "x"}, "unknown argument"),
    ("tenant add", {"name": ["blue"], "id": 1}, "must be a JSON string"),
    ("tenant add", {"name": "blue", "id": True}, "must be a JSON integer"),
    ("route add", {"tenant": "blue", "prefix": "default", "kernel": "yes"}, "boolean"),
    ("apply", {"state": "tenants=[]"}, "JSON object"),
    ("apply", {"file": "x.toml", "state": {}}, "unknown argument"),   # CLI-only
    ("trace", {"port": "veth-vm1", "scapy": "Ether()"}, "unknown argument"),  # CLI-only
    ("trace", {"port": "veth-vm1"}, "hex"),
])
def test_bad_args(name, args, match):
    with pytest.raises(BadArgs, match=match):
        dispatch(FakeController(), name, args)


@pytest.mark.parametrize("name,args", [
    ("tenant add", {"name": "blue", "id": 0}),
    ("tenant add", {"name": "blue", "id": 1, "default": "maybe"}),
    ("endpoint add", {"tenant": "blue", "ip": "10.0.0.5", "port": "veth-vm1",
                      "mac": "01:00:00:00:00:05"}),
    ("rule add", {"tenant": "blue", "priority": 1, "action": "deny", "proto": "udp",
                  "icmp_type": 8}),
    ("flow dump", {"limit": 0}),
    ("trace", {"port": "veth-vm1", "hex": "zz"}),
    ("trace", {"port": "veth-vm1", "hex": "0011"}),
])
def test_bad_values_are_invalid_not_conflict(name, args):
    with pytest.raises(model.Invalid) as e:
        dispatch(populated(), name, args)
    assert not isinstance(e.value, model.Conflict)


def test_references_are_conflicts():
    with pytest.raises(model.Conflict, match="unknown tenant"):
        dispatch(FakeController(), "port add", {"name": "veth-vm1", "tenant": "blue"})


def test_reading_commands_map_to_their_calls():
    c = populated()
    assert dispatch(c, "rule list", {"tenant": "blue"}) == []
    assert c.calls[-1] == ("list", "rules", "blue")
    assert dispatch(c, "tenant list", None)[0]["name"] == "blue"
    assert len(dispatch(c, "flow dump", {})) == 2
    assert c.calls[-1] == ("flow_dump", None, 1000)
    assert dispatch(c, "flow flush", {"tenant": "red"}) == {"flushed": 1}
    assert dispatch(c, "stats", {})["counters"]
    assert dispatch(c, "status", {})["version"] == "test"
    frame = "02:00:00:00:00:06 02:00:00:00:00:05 0800" + "45" * 20
    r = dispatch(c, "trace", {"port": "veth-vm1", "hex": "0x" + frame})
    assert c.calls[-1][:2] == ("trace", "veth-vm1")
    assert r["packet_in"] == frame.replace(":", "").replace(" ", "")


def test_apply_passes_state_and_dry_run():
    c = FakeController()
    st = {"tenants": [{"name": "blue", "id": 10}]}
    d = dispatch(c, "apply", {"state": st, "dry_run": True})
    assert d["tenants"]["add"][0]["name"] == "blue" and c.state.tenants == []
    dispatch(c, "apply", {"state": st})
    assert c.calls[-1] == ("apply", st, False) and c.state.tenant("blue")


def test_fake_counts_concurrency():
    # The fake itself must be able to see overlapping calls for test_api's lock test.
    c = FakeController()
    c.slow = 0.05
    ts = [threading.Thread(target=c.status) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert c.max_inside > 1
