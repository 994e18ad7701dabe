"""Bad configuration and rules against the real controller and datapath (issue 14 item 6):
Hypothesis-generated `apply` states and single-object commands, sent as API requests to
a Controller over the session's datapath. Each is accepted — then the store, the
controller and the maps agree (a reconcile finds nothing to write) — or refused with
"invalid", "refused" or "bad-request" and a message, never "internal" nor a traceback,
and then nothing changed: not the state, not the store, not one map entry.

CI: FUZZ_CI requests; XDPFLOW_LONG=1: FUZZ_LONG."""
from __future__ import annotations

import ctypes as ct
import json

import pytest
from fuzzing import VALID, VALUES, apply_states, fuzz_settings, mutated
from hypothesis import given, strategies as st

from agent import model
from agent.api import BAD_REQUEST, INVALID, REFUSED, ApiServer, Peer
from agent.commands import RULE_FIELDS

from .conftest import VM_MAC

pytestmark = pytest.mark.bpf

FUZZ_CI, FUZZ_LONG = 120, 20_000
ROOT = Peer(pid=1, uid=0, gid=0)

BASE = {
    "tenants": [{"name": "blue", "id": 10}, {"name": "red", "id": 30, "default": "pass"}],
    "ports": [{"name": "p1", "tenant": "blue"}, {"name": "p2", "tenant": "blue"},
              {"name": "p3", "tenant": "red"}],
    "endpoints": [{"tenant": "blue", "ip": "10.0.0.1", "port": "p1", "mac": VM_MAC["p1"]},
                  {"tenant": "blue", "ip": "10.0.0.2", "port": "p2", "mac": VM_MAC["p2"]},
                  {"tenant": "red", "ip": "10.0.0.1", "port": "p3", "mac": VM_MAC["p1"]}],
    "routes": [{"tenant": "blue", "prefix": "10.1.0.0/16", "via": "10.0.0.2"}],
    "rules": [{"id": 1, "tenant": "blue", "priority": 10, "action": "allow", "proto": "udp",
               "dport": "5000"},
              {"id": 2, "tenant": "red", "priority": 10, "action": "deny"}],
}
CONFIG_MAPS = ("xf_ports", "xf_endpoints", "xf_routes", "xf_port_src", "xf_masks", "xf_rules")


def maps(dp, tenant_ids) -> dict:
    """Every entry of the configuration maps, and the tenant rows of `tenant_ids`."""
    out = {name: dict(dp.maps[name].items()) for name in CONFIG_MAPS}
    tenants = dp.maps["xf_tenants"]
    out["xf_tenants"] = {t: tenants.get(bytes(ct.c_uint32(t))) for t in sorted(tenant_ids)}
    return out


def snapshot(c, tenant_ids):
    return c.state.to_dict(), c.store.load().to_dict(), maps(c.dp, tenant_ids)


def ids_named(request) -> set:
    """Tenant ids a request names (as rows to watch), besides the base's."""
    found = {10, 30}

    def walk(v):
        if isinstance(v, dict):
            if isinstance(v.get("id"), int) and not isinstance(v["id"], bool) and \
                    0 < v["id"] < 65536:
                found.add(v["id"])
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
    walk(request)
    return found


@pytest.fixture
def api(node_controller):
    node_controller.apply(BASE, dry_run=False, prune=True)
    return ApiServer(node_controller)


@st.composite
def requests(draw):
    """An apply of a generated state (pruned or not), or a single add of a mutated
    object, or an add whose arguments are anything at all."""
    how = draw(st.sampled_from(["apply", "apply", "add", "junk"]))
    if how == "apply":
        state, _ = draw(apply_states())
        if draw(st.booleans()):
            # Mostly the base, with generated objects mixed in.
            for kind, items in BASE.items():
                if isinstance(state.get(kind), list):
                    state[kind] = items + state[kind]
        return "apply", {"state": state, "prune": draw(st.booleans())}
    kind = draw(st.sampled_from(["tenants", "ports", "endpoints", "rules"]))
    command = f"{kind[:-1]} add"
    if how == "add":
        obj, _ = draw(mutated(kind))
        if kind == "rules":
            obj = {k: v for k, v in obj.items() if k in RULE_FIELDS}
        elif kind == "ports":
            obj = {k: v for k, v in obj.items() if k in ("name", "tenant", "allow")}
        return command, obj
    return command, draw(st.dictionaries(st.sampled_from(sorted(VALID[kind]) + ["x"]), VALUES,
                                         max_size=4))


@fuzz_settings(ci=FUZZ_CI, long=FUZZ_LONG)
@given(req=requests())
def test_a_generated_change_is_applied_whole_or_refused_changing_nothing(api, req):
    c = api.controller
    if c.state.to_dict() != model.State.from_dict(BASE).to_dict():
        c.apply(BASE, dry_run=False, prune=True)
    command, args = req
    watch = ids_named(args)
    before = snapshot(c, watch)
    # JSON has no dates: they go as the text a client would send.
    reply = api.handle(json.dumps({"command": command, "args": args}, default=str).encode(), ROOT)
    text = json.dumps(reply)
    assert "Traceback" not in text
    if reply["ok"]:
        assert c.store.load().to_dict() == c.state.to_dict()
        summary = c.reconcile("check")
        written = {k: v for k, v in summary.items()
                   if isinstance(v, dict) and (v["written"] or v["removed"])}
        assert not written and not summary["flipped"], \
            f"the maps did not hold the accepted state: {summary}"
        return
    err = reply["error"]
    assert err["code"] in (INVALID, REFUSED, BAD_REQUEST), reply
    assert err["message"], reply
    assert snapshot(c, watch) == before, f"{command} refused ({err}) but something changed"
