"""The unit tier's FakeController (tests/unit/test_commands.py) against the real Controller
over the loaded datapath: every command of the table, dispatched the same way to both,
must come back in the same shape (the same keys, at every level, and the same types) and
in the same words (verdicts, reasons, protocols, flow flags, eviction reasons that the
real one emits). Otherwise the API and CLI tests would pass against replies the agent
never sends."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from scapy.all import raw

from agent import abi, commands
from agent.flows import EVICTION_REASONS, PROTO_NAMES

from .cases import tcp4
from .conftest import VM_MAC

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))
from test_commands import FakeController  # noqa: E402

pytestmark = pytest.mark.bpf

# Dicts keyed by data (tenant names, rule ids), not by field names: only their values'
# shapes are compared.
DATA_KEYED = {"by_tenant", "rule_hits", "rule_counters"}
WORDS = {
    "verdict": set(abi.VERDICTS.values()),
    "reason": set(abi.REASONS.values()),
    "proto": set(PROTO_NAMES.values()),
}
XDP_ACTIONS = {"aborted", "drop", "pass", "tx", "redirect"}   # trace's "action"
FLOW_FLAGS = {"reply", "closing", "stale"}

STATE = [
    ("tenant add", {"name": "blue", "id": 10}),
    ("port add", {"name": "p1", "tenant": "blue"}),
    ("port add", {"name": "p2", "tenant": "blue"}),
    ("endpoint add", {"tenant": "blue", "ip": "10.0.0.1", "port": "p1", "mac": VM_MAC["p1"]}),
    ("endpoint add", {"tenant": "blue", "ip": "10.0.0.2", "port": "p2", "mac": VM_MAC["p2"]}),
    ("route add", {"tenant": "blue", "prefix": "10.9.0.0/16", "drop": True}),
    ("rule add", {"tenant": "blue", "priority": 10, "proto": "tcp", "dport": "80",
                  "action": "allow"}),
    ("fip add", {"tenant": "blue", "ip": "203.0.113.10", "to": "10.0.0.1"}),
    ("snat add", {"tenant": "blue", "to": "198.51.100.1", "ports": "20000-20009"}),
]
FRAME = raw(tcp4(4000, 80)).hex()
APPLY = {"tenants": [{"name": "blue", "id": 10}, {"name": "green", "id": 30}],
         "ports": [{"name": "p1", "tenant": "blue"}, {"name": "p2", "tenant": "blue"}],
         "endpoints": [{"tenant": "blue", "ip": "10.0.0.1", "port": "p1",
                        "mac": VM_MAC["p1"]}],
         "routes": [{"tenant": "blue", "prefix": "10.9.0.0/16", "action": "kernel"}],
         "rules": [{"id": 1, "tenant": "blue", "priority": 10, "proto": "tcp", "dport": "80",
                    "action": "allow"}]}
CALLS = [
    ("status", {}),
    *[(f"{k} list", {}) for k in ("tenant", "port", "endpoint", "route", "rule", "fip",
                                  "snat")],
    ("rule list", {"tenant": "blue"}),
    ("flow dump", {}),
    ("stats", {}),
    ("trace", {"port": "p1", "hex": FRAME}),
    ("apply", {"state": APPLY, "dry_run": True}),
    ("apply", {"state": APPLY}),
    ("rule del", {"id": 1}),
    ("flow flush", {}),
]


def shape(v):
    if isinstance(v, dict):
        return {k: shape(x) for k, x in v.items()}
    if isinstance(v, list):
        return [shape(v[0])] if v else []
    if isinstance(v, bool) or v is None:
        return type(v).__name__
    if isinstance(v, (int, float)):
        return "number"
    return type(v).__name__


def assert_same_shape(fake, real, where):
    if isinstance(real, dict) and isinstance(fake, dict):
        if where.rsplit(".", 1)[-1] in DATA_KEYED:
            for f in fake.values():
                for r in list(real.values())[:1]:
                    assert_same_shape(f, r, where + ".*")
            return
        assert set(fake) == set(real), (
            f"{where}: fake keys {sorted(set(fake) - set(real))} the real one never "
            f"sends; real keys {sorted(set(real) - set(fake))} the fake lacks")
        for k in real:
            assert_same_shape(fake[k], real[k], f"{where}.{k}")
    elif isinstance(real, list) and isinstance(fake, list):
        for f in fake:
            for r in real[:1]:
                assert_same_shape(f, r, where + "[]")
    elif "NoneType" not in (shape(fake), shape(real)):   # an unset value may be null
        assert shape(fake) == shape(real), f"{where}: fake {fake!r}, real {real!r}"


def words(doc, where="reply"):
    """Every value the fake sends under a key with a vocabulary, with where it is."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k in WORDS and isinstance(v, str):
                yield f"{where}.{k}", v, WORDS[k]
            elif where == "trace" and k == "action":
                yield f"{where}.{k}", v, XDP_ACTIONS
            elif k == "flags" and isinstance(v, str):
                for flag in filter(None, v.split(",")):
                    yield f"{where}.flags", flag, FLOW_FLAGS
            elif k == "evictions":
                yield f"{where}.evictions", frozenset(v), {frozenset(EVICTION_REASONS)}
            yield from words(v, f"{where}.{k}")
    elif isinstance(doc, list):
        for x in doc:
            yield from words(x, where + "[]")


@pytest.fixture
def both(node_controller):
    """The real Controller (p1/p2 of the node namespace as its ports) and a
    FakeController, both given the same state."""
    fake = FakeController()
    for c in (node_controller, fake):
        for name, args in STATE:
            commands.dispatch(c, name, args)
    return fake, node_controller


def test_the_fake_controller_answers_as_the_real_one(both, in_node):
    fake, real = both
    # A flow in the table, so the real flow dump and counters have rows.
    rc, _, _ = real.dp.run(bytes.fromhex(FRAME), in_node.ifindex["p1"])
    assert rc == 4                                   # redirected: allowed, a flow made
    for name, args in CALLS:
        got_real = commands.dispatch(real, name, args)
        got_fake = commands.dispatch(fake, name, args)
        assert_same_shape(got_fake, got_real, name)
        for where, value, allowed in words(got_fake, name):
            assert value in allowed, f"{where}: the fake says {value!r}; the real " \
                                     f"controller's words are {sorted(map(str, allowed))}"
