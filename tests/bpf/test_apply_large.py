"""A large apply against the real controller, store and maps (issue 12): its store rows
are written by the store writer process while the maps are (control.WRITER_ABOVE), and
afterwards the store holds exactly
what was applied (also as a new process reads it), the maps hold what a from-scratch
compile writes, and a refused large apply or one whose store write fails changes nothing."""
from __future__ import annotations

import json
import os
import sqlite3

import pytest

from agent import config, control, model
from agent.api import ApiServer, Peer
from agent.control import Controller
from agent.store import Store, StoreError

from .conftest import loaded
from .test_incremental import canonical, fresh

pytestmark = pytest.mark.bpf

ROOT = Peer(pid=1, uid=0, gid=0)
N = 3 * control.WRITER_ABOVE
BLUE = 10
MAPS = ("xf_masks", "xf_rules", "xf_tenants")


def rules(n: int, salt: int = 0):
    return [{"id": i, "tenant": "blue", "priority": 100 + i % 7, "action": "allow",
             "src": f"10.{(i + salt) >> 8 & 255}.{(i + salt) & 255}.0/24", "proto": "tcp",
             "dport": "22" if i % 2 else "1000-1999"} for i in range(1, n + 1)]


def state(n: int, salt: int = 0):
    return {"tenants": [{"name": "blue", "id": 10}], "rules": rules(n, salt)}


@pytest.fixture
def node(tmp_path):
    cfg = config.parse(f"[datapath]\nmax_rule_entries = {40 * N}\n")
    path = str(tmp_path / "state.db")
    store = Store.open(path)
    try:
        with loaded(cfg.datapath_defines()) as dp:
            yield Controller(cfg, store, dp, links=None), path
    finally:
        store.close()


def maps(c):
    return {name: dict(c.dp.maps[name].items()) for name in MAPS}


def assert_agree(c, path):
    again = Store.open(path)       # what the next start reads
    try:
        assert again.load().to_dict() == c.state.to_dict()
    finally:
        again.close()
    summary = c.reconcile("check")
    written = {k: v for k, v in summary.items()
               if isinstance(v, dict) and (v["written"] or v["removed"])}
    assert not written and not summary["flipped"], summary


def test_a_large_apply_leaves_store_and_maps_with_exactly_the_state(node):
    c, path = node
    c.apply(state(N), dry_run=False, prune=True)
    assert c.state.to_dict() == model.State.from_dict(state(N)).to_dict()
    assert_agree(c, path)
    # Written by the store writer, a process of its own (status says so).
    writer = c.status()["store_writer"]
    assert writer["pid"] not in (None, os.getpid()) and writer["started"] == 1
    assert writer["local_writes"] == 0
    # Every rule changed (a new source), half of them removed: rows updated and deleted.
    c.apply(state(N // 2, salt=7), dry_run=False, prune=True)
    assert len(c.state.rules) == N // 2
    assert_agree(c, path)


def test_a_large_apply_whose_store_write_fails_changes_nothing(node):
    c, path = node
    c.apply(state(N), dry_run=False, prune=True)
    # The maps are put back as the old state wants them (a new generation of the same
    # classifier, as after any failed change): compared by what they mean.
    before = (c.state.to_dict(), canonical(c.dp, BLUE))

    # The writer process's SQLite refuses a row of the change (as a full disk would).
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TRIGGER fail BEFORE UPDATE ON rules WHEN NEW.id = 17 "
               "BEGIN SELECT RAISE(ABORT, 'disk full (test)'); END")
    try:
        with pytest.raises(StoreError, match="disk full"):
            c.apply(state(N, salt=3), dry_run=False, prune=True)
        assert c.writer.pid is not None and c.writer.local_writes == 0
    finally:
        db.execute("DROP TRIGGER fail")
        db.close()
    assert (c.state.to_dict(), canonical(c.dp, BLUE)) == before
    assert canonical(c.dp, BLUE) == fresh(c, BLUE)
    assert_agree(c, path)


def test_a_refused_large_apply_names_the_rule_and_changes_nothing(node):
    c, path = node
    c.apply(state(N), dry_run=False, prune=True)
    before = (c.state.to_dict(), maps(c))
    bad = state(N, salt=5)
    bad["rules"][N - 10]["dport"] = "70000"
    reply = ApiServer(c).handle(
        json.dumps({"command": "apply", "args": {"state": bad}}).encode(), ROOT)
    assert reply["error"]["code"] == "invalid"
    assert reply["error"]["at"] == f"rules[{N - 10}].dport"
    assert reply["error"]["message"].startswith(f"rule {N - 9}: dport: 70000 is out of range")
    assert (c.state.to_dict(), maps(c)) == before
