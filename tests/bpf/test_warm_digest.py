"""The digest of the programmed image, pinned beside the maps (issue 12, warm restart): a
start whose stored state, interfaces and maps give the pinned digest compiles and
compares nothing (counted), and every way the store and the maps can disagree is seen
and repaired: the store changed behind the agent's back, the maps changed, the digest
missing or corrupt, a crash between the maps and the digest, and one between the digest
and the store's commit. "Repaired": the maps hold entry for entry what a fresh compile of
the store writes, and the next start trusts the digest again."""
from __future__ import annotations

import ctypes as ct
import os
import sqlite3

import pytest

from agent import compiler, digest
from agent.control import Controller
from agent.datapath import Datapath

from .test_incremental import BASE, BLUE, Crash, canonical, fresh

pytestmark = pytest.mark.bpf

RULES = BASE["rules"] + [
    {"id": 2, "tenant": "blue", "priority": 10, "action": "allow", "src": "10.1.0.0/16"},
    {"id": 3, "tenant": "blue", "priority": 30, "action": "deny", "src": "10.1.2.0/24"},
    {"id": 4, "tenant": "blue", "priority": 20, "action": "allow", "proto": "tcp",
     "dport": "22"}]


class Calls:
    """Counts calls of the functions that compile or compare an image."""

    def __init__(self, monkeypatch):
        self.n = {}
        for owner, name in ((compiler, "compile_state"), (compiler, "compile_rules"),
                            (Datapath, "sync"), (Datapath, "_holds")):
            real = getattr(owner, name)
            monkeypatch.setattr(owner, name, self._counted(name, real))

    def _counted(self, name, real):
        def call(*a, **kw):
            self.n[name] = self.n.get(name, 0) + 1
            return real(*a, **kw)
        return call


def restart(c):
    """What a new agent process does on a warm start: its mirror read from the maps as
    they are, the store loaded, then the start-up check."""
    c.dp._read_mirror()
    again = Controller(c.cfg, c.store, c.dp, c.links, load=False)
    again.load_state()
    return again, again.check_start()


def programmed(node_controller):
    c = node_controller
    c.apply(dict(BASE, rules=RULES), dry_run=False)
    assert c.dp.pinned_digest() is not None
    return c


def assert_repaired(again, how):
    assert how.startswith("reconciled"), how
    assert canonical(again.dp, BLUE) == fresh(again, BLUE)
    # Repaired and recorded: the next start trusts it.
    _, how = restart(again)
    assert how.startswith("skipped"), how


def test_a_matching_digest_skips_compiling_and_comparing(node_controller, monkeypatch):
    c = programmed(node_controller)
    c.add("rules", {"id": 5, "tenant": "blue", "priority": 40, "action": "deny",
                    "proto": "udp", "dport": "53"})       # one-rule change: digest kept
    calls = Calls(monkeypatch)
    again, how = restart(c)
    assert how == "skipped: the pinned digest matches"
    assert calls.n == {}, f"a warm start with a matching digest compiled: {calls.n}"
    # Its ports are known attached (status, detach on removal), with no attach made.
    assert set(again.attached) == {"p1", "p2", "p3"}
    # The first one-rule change compiles that tenant once, checks it against the maps,
    # and writes only its rule: the maps are then what a fresh compile writes.
    again.add("rules", {"id": 6, "tenant": "blue", "priority": 50, "action": "deny",
                        "src": "10.9.0.0/16"})
    assert calls.n.get("compile_state", 0) == 0 and calls.n.get("sync", 0) == 0
    assert calls.n["compile_rules"] == 1
    assert canonical(again.dp, BLUE) == fresh(again, BLUE)
    _, how = restart(again)
    assert how.startswith("skipped"), how


def test_a_store_changed_behind_the_agents_back_is_repaired(node_controller):
    c = programmed(node_controller)
    with sqlite3.connect(c.store.path) as db:      # an operator's sqlite3 shell
        db.execute("UPDATE rules SET priority = 99 WHERE id = 3")
    before = canonical(c.dp, BLUE)
    again, how = restart(c)
    assert how == "reconciled: the pinned digest differs"
    assert canonical(again.dp, BLUE) != before
    assert_repaired(again, how)


@pytest.mark.parametrize("change", ["entry removed", "generation moved"])
def test_maps_changed_behind_the_agents_back_are_repaired(node_controller, change):
    c = programmed(node_controller)
    dp = c.dp
    if change == "entry removed":
        key = next(k for k, _ in dp.maps["xf_rules"].items())
        dp.maps["xf_rules"].delete(key)
    else:
        from agent import abi
        k = bytes(ct.c_uint32(BLUE))
        t = abi.Tenant.from_buffer_copy(dp.maps["xf_tenants"].get(k))
        t.generation += 7
        dp.maps["xf_tenants"].put(k, bytes(t))
    again, how = restart(c)
    assert how == "reconciled: the pinned digest differs"
    assert_repaired(again, how)


@pytest.mark.parametrize("damage", ["missing", "cleared", "foreign", "wrong digest"])
def test_a_missing_or_corrupt_digest_is_compared(node_controller, damage):
    c = programmed(node_controller)
    dp = c.dp
    m = dp._digest_map
    if damage == "missing":
        m.close()
        os.unlink(f"{dp.pin_dir}/{digest.PIN}")
        dp._open_digest()              # what a new process finds: made anew, empty
    elif damage == "cleared":
        dp.forget_digest()
    elif damage == "foreign":
        m.put(bytes(4), os.urandom(m.value_size))
    else:
        m.put(bytes(4), digest.pack(os.urandom(digest.SIZE)))
    again, how = restart(c)
    want = "the pinned digest differs" if damage == "wrong digest" else "no pinned digest"
    assert how == f"reconciled: {want}"
    assert_repaired(again, how)


@pytest.mark.parametrize("when", ["after the maps, before the digest",
                                  "after the digest, before the store's commit"])
def test_a_crash_around_the_digest_is_repaired_from_the_store(node_controller, monkeypatch,
                                                              when):
    """kill -9 stands in as an exception nothing catches: the maps hold the new rule, the
    store the old one (its transaction rolled back as a dead process's would)."""
    c = programmed(node_controller)
    real = Datapath.record_digest

    def record(self, value):
        if value is not None and when.startswith("after the digest"):
            real(self, value)
            raise Crash("after the digest")
        if value is not None:
            raise Crash("before the digest")
        return real(self, value)
    monkeypatch.setattr(Datapath, "record_digest", record)
    with pytest.raises(Crash):
        c.apply({"rules": [{"id": 3, "tenant": "blue", "priority": 700, "action": "deny",
                            "proto": "tcp", "dport": "22"}]}, dry_run=False)
    monkeypatch.setattr(Datapath, "record_digest", real)
    assert {r.id: r for r in c.store.load().rules}[3].priority == 30
    before = canonical(c.dp, BLUE)
    again, how = restart(c)
    want = "the pinned digest differs" if when.startswith("after the digest") else \
        "no pinned digest"
    assert how == f"reconciled: {want}"
    assert canonical(again.dp, BLUE) != before        # the new rule was in the maps
    assert_repaired(again, how)


def test_a_big_change_leaves_the_digest_to_the_next_start(node_controller, monkeypatch):
    """More rows than digest.MAX_CHANGED_ROWS are not hashed under the lock: the digest
    stays cleared and the next start compares (and records it)."""
    c = programmed(node_controller)
    monkeypatch.setattr(digest, "MAX_CHANGED_ROWS", 2)
    c.apply({"rules": [{"id": 10 + i, "tenant": "red", "priority": 5 + i, "action": "deny",
                        "src": f"10.7.{i}.0/24"} for i in range(3)]}, dry_run=False)
    assert c.dp.pinned_digest() is None
    again, how = restart(c)
    assert how == "reconciled: no pinned digest"
    _, how = restart(again)
    assert how.startswith("skipped"), how


def test_an_interface_changed_while_stopped_is_reconciled(node_controller):
    """The digest covers the ports' interfaces: one that changed (a VM's veth made
    anew: new MAC) makes the start compare and rewrite the forwarding entries."""
    import dataclasses
    c = programmed(node_controller)
    real = c.links.get

    def get(name):
        link = real(name)
        if link is not None and name == "p2":
            link = dataclasses.replace(link, mac="02:00:00:00:99:99")
        return link
    c.links.get = get
    try:
        again, how = restart(c)
    finally:
        del c.links.get
    assert how == "reconciled: the pinned digest differs"
