"""The controller without a kernel: what it decides before any map is touched (dry runs,
compiles against the stored port slots)."""
from __future__ import annotations

import pytest

from agent import config, model
from agent.control import Controller
from agent.store import Store

pytestmark = pytest.mark.unit

STATE = {
    "tenants": [{"name": "blue", "id": 10}],
    "ports": [{"name": "vm1", "tenant": "blue"}, {"name": "vm2", "tenant": "blue"}],
    "rules": [{"id": 1, "tenant": "blue", "priority": 10, "action": "allow",
               "in_port": "vm2"}],
}


def test_dry_run_of_an_in_port_rule_whose_interface_is_absent(ctl):
    d = ctl.apply(STATE, dry_run=True)
    assert [r["id"] for r in d["rules"]["add"]] == [1]
    assert ctl.state.rules == []


def test_planned_slots_keep_stored_ones_and_fill_the_smallest_free(ctl):
    with ctl.store.transaction() as tx:
        tx.write(model.State(), model.State.from_dict(
            {"tenants": STATE["tenants"], "ports": STATE["ports"]}))
    have = ctl.store.port_slots()
    new = model.State.from_dict(dict(STATE, ports=[{"name": "vm2", "tenant": "blue"},
                                                   {"name": "vm3", "tenant": "blue"}]))
    planned = ctl.planned_slots(new)
    assert planned["vm2"] == have["vm2"]
    assert planned["vm3"] == min({1, 2, 3} - {have["vm2"]})


def test_a_state_with_more_ports_than_slots_is_refused_before_commit(tmp_path):
    cfg = config.parse("[datapath]\nmax_ports = 2\n")
    store = Store.open(str(tmp_path / "state.db"))
    try:
        c = Controller(cfg, store, datapath=None, links=None)
        with pytest.raises(model.Conflict, match="max_ports"):
            c.apply(STATE, dry_run=True)
    finally:
        store.close()


def test_a_dry_run_is_bounded_by_what_the_datapath_holds(tmp_path):
    # Port ranges become prefixes: 1024-65535 is 6 entries per rule. A client's dry run of
    # a state bigger than the datapath holds is refused as soon as it passes
    # datapath.max_rule_entries, instead of building all of it.
    cfg = config.parse("[datapath]\nmax_rule_entries = 100\n")
    store = Store.open(str(tmp_path / "state.db"))
    wide = [{"id": i, "tenant": "blue", "priority": 10, "action": "allow", "proto": "tcp",
             "dport": "1024-65535", "dst": f"10.0.{i}.0/24"}
            for i in range(1, 200)]
    try:
        c = Controller(cfg, store, datapath=None, links=None)
        with pytest.raises(model.Conflict, match="max_rule_entries"):
            c.apply({"tenants": STATE["tenants"], "rules": wide}, dry_run=True)
        assert c.apply({"tenants": STATE["tenants"], "rules": wide[:1]}, dry_run=True)
    finally:
        store.close()
