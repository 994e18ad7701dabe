"""The SQLite state store: round-trips, diffs that touch only what changed, rollback,
crashes, port slots, schema versions and corrupted rows."""
import ipaddress
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from agent.model import Port, Route, Rule, State, Tenant, replace
from agent.store import SCHEMA_VERSION, Store, StoreError

pytestmark = pytest.mark.unit

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _state() -> State:
    """Every kind, and every rule field in use somewhere."""
    return State.from_dict({
        "tenants": [{"name": "blue", "id": 10, "vni": 5010},
                    {"name": "red", "id": 11, "default": "pass"}],
        "ports": [{"name": "vm1", "tenant": "blue"}, {"name": "vm2", "tenant": "blue"},
                  {"name": "vm3", "tenant": "red"},
                  {"name": "eth1", "uplink": True, "local_ip": "192.0.2.1"}],
        "endpoints": [
            {"tenant": "blue", "ip": "10.0.0.5", "port": "vm1", "mac": "02:00:00:00:00:05"},
            {"tenant": "blue", "ip": "2001:db8::5", "port": "vm2", "mac": "02:AA:00:00:00:06"},
            # Overlapping address in another tenant.
            {"tenant": "red", "ip": "10.0.0.5", "port": "vm3", "mac": "02:00:00:00:01:05"},
            # Behind another node's VTEP.
            {"tenant": "blue", "ip": "10.0.1.7", "vtep": "192.0.2.2",
             "mac": "02:00:00:00:01:07"}],
        "routes": [
            {"tenant": "blue", "prefix": "default", "via": "10.0.0.5"},
            {"tenant": "blue", "prefix": "2001:db8:1::/48", "via": "2001:db8::5"},
            {"tenant": "blue", "prefix": "192.168.0.0/16", "action": "kernel"},
            {"tenant": "red", "prefix": "10.9.0.0/16", "action": "drop"}],
        "rules": [
            {"id": 1, "tenant": "blue", "priority": 100, "action": "allow", "proto": "tcp",
             "src": "192.168.0.0/16", "dst": "10.0.0.5/32", "sport": "1024-65535",
             "dport": "22", "in_port": "vm1", "comment": "ssh from \"the\" office; ünïcode"},
            {"id": 2, "tenant": "blue", "priority": 90, "action": "deny", "proto": "udp",
             "src": "2001:db8::/32", "dport": "5000-5999"},
            {"id": 3, "tenant": "blue", "priority": 80, "action": "allow", "proto": "icmp",
             "dst": "10.0.0.0/8", "icmp_type": 8, "icmp_code": 0},
            {"id": 4, "tenant": "blue", "priority": 80, "action": "allow", "proto": "icmpv6",
             "src": "fe80::/10", "icmp_type": 135},
            {"id": 5, "tenant": "red", "priority": 0, "action": "pass"},
            {"id": 2147483647, "tenant": "red", "priority": 65535, "action": "deny",
             "proto": 47, "src": "0.0.0.0/0"},
        ],
    })


def _open(tmp_path) -> Store:
    return Store.open(tmp_path / "state.db")


def _put(store: Store, old: State, new: State) -> int:
    with store.transaction() as tx:
        return tx.write(old, new)


_RAW = []


@pytest.fixture(autouse=True)
def _close_raw_connections():
    yield
    while _RAW:
        _RAW.pop().close()


def _raw(tmp_path) -> sqlite3.Connection:
    """A second connection, as an operator with the sqlite3 shell would have."""
    _RAW.append(sqlite3.connect(tmp_path / "state.db", isolation_level=None))
    return _RAW[-1]


# -- round trips ----------

def test_new_store_is_empty_and_versioned(tmp_path):
    with _open(tmp_path) as store:
        assert store.load() == State()
        assert store.port_slots() == {}
        assert store.get_meta("schema_version") == str(SCHEMA_VERSION)
    assert _raw(tmp_path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_round_trip_every_kind_and_field(tmp_path):
    st = _state()
    st.validate()
    with _open(tmp_path) as store:
        assert _put(store, State(), st) == sum(len(getattr(st, k)) for k in
                                               ("tenants", "ports", "endpoints", "routes",
                                                "rules"))
        got = store.load()
    for kind in ("tenants", "ports", "endpoints", "routes", "rules"):
        assert got.sorted(kind) == st.sorted(kind), kind
    # Each rule's fields, one by one, so a field lost in both directions would show.
    by_id = {r.id: r for r in got.rules}
    r1 = by_id[1]
    assert (r1.sport, r1.dport, r1.in_port, r1.proto) == ((1024, 65535), (22, 22), "vm1", 6)
    assert r1.comment == "ssh from \"the\" office; ünïcode"
    assert (by_id[3].icmp_type, by_id[3].icmp_code) == (8, 0)
    assert (by_id[4].icmp_type, by_id[4].icmp_code) == (135, None)
    assert str(by_id[2].src) == "2001:db8::/32" and by_id[2].dport == (5000, 5999)
    assert by_id[2147483647].proto == 47 and str(by_id[2147483647].src) == "0.0.0.0/0"


def test_rows_are_readable_text_and_integers(tmp_path):
    with _open(tmp_path) as store:
        _put(store, State(), _state())
    db = _raw(tmp_path)
    assert db.execute("SELECT id, tenant, priority, action, src, dst, proto, sport_lo, "
                      "sport_hi, dport_lo, dport_hi, icmp_type, icmp_code, in_port "
                      "FROM rules WHERE id = 1").fetchone() == \
        (1, "blue", 100, "allow", "192.168.0.0/16", "10.0.0.5/32", 6, 1024, 65535, 22, 22,
         None, None, "vm1")
    assert db.execute("SELECT src, dst, proto FROM rules WHERE id = 5").fetchone() == \
        (None, None, 0)
    assert db.execute("SELECT name, id, vni, default_verdict FROM tenants ORDER BY name"
                      ).fetchall() == [("blue", 10, 5010, "drop"), ("red", 11, None, "pass")]
    assert db.execute("SELECT mac FROM endpoints WHERE ip = '2001:db8::5'").fetchone() == \
        ("02:aa:00:00:00:06",)
    assert db.execute("SELECT action, via FROM routes WHERE prefix = '0.0.0.0/0'"
                      ).fetchone() == ("via", "10.0.0.5")


def test_survives_close_and_reopen(tmp_path):
    store = _open(tmp_path)
    _put(store, State(), _state())
    store.set_meta("boot_id", "abc")
    slots = store.port_slots()
    store.close()
    with _open(tmp_path) as store:
        assert store.load().to_dict() == _state().to_dict()
        assert store.get_meta("boot_id") == "abc"
        assert store.port_slots() == slots


def test_parent_directory_is_created_0750(tmp_path):
    path = tmp_path / "var" / "lib" / "xdpflow" / "state.db"
    old = os.umask(0o077)  # the mode must not depend on the caller's umask
    try:
        Store.open(path).close()
    finally:
        os.umask(old)
    assert path.exists()
    assert os.stat(path.parent).st_mode & 0o777 == 0o750


# -- writing differences ----------

def _big(n: int) -> State:
    st = State(tenants=[Tenant("t", 1)], ports=[Port("p1", "t")])
    st.rules = [Rule(id=i, tenant="t", priority=i % 1000, action="allow", proto=6,
                     dport=(i % 65536, i % 65536)) for i in range(1, n + 1)]
    return st


def _audit(db: sqlite3.Connection, table: str, key: str):
    """Triggers that log every row written to `table`, seen from the store's connection."""
    db.execute("CREATE TABLE audit (op TEXT, k)")
    for op, ref in (("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD")):
        db.execute(f"CREATE TRIGGER audit_{op} AFTER {op} ON {table} "
                   f"BEGIN INSERT INTO audit VALUES ('{op}', {ref}.{key}); END")


def test_one_changed_rule_among_100000_writes_one_row(tmp_path):
    old = _big(100_000)
    with _open(tmp_path) as store:
        assert _put(store, State(), old) == 100_002
        db = _raw(tmp_path)
        _audit(db, "rules", "id")

        new = old.copy()
        new.rules[4999] = replace(new.rules[4999], priority=7, comment="changed")
        assert _put(store, old, new) == 1
        assert db.execute("SELECT op, k FROM audit").fetchall() == [("UPDATE", 5000)]

        # Add one, remove one, change one: three rows, nothing else.
        db.execute("DELETE FROM audit")
        newer = new.copy()
        del newer.rules[0]
        newer.rules.append(Rule(id=200_000, tenant="t", priority=1, action="deny"))
        newer.rules[10] = replace(newer.rules[10], action="deny")
        assert _put(store, new, newer) == 3
        assert sorted(db.execute("SELECT op, k FROM audit").fetchall()) == \
            [("DELETE", 1), ("INSERT", 200_000), ("UPDATE", newer.rules[10].id)]

    # Read back with SQL: load() of 100,000 rules is the model's cost, not this test's.
    assert db.execute("SELECT count(*) FROM rules").fetchone() == (100_000,)
    assert db.execute("SELECT priority, comment FROM rules WHERE id = 5000").fetchone() == \
        (7, "changed")
    assert db.execute("SELECT count(*) FROM rules WHERE id = 1").fetchone() == (0,)
    assert db.execute("SELECT action FROM rules WHERE id = 200000").fetchone() == ("deny",)


def test_changing_a_port_keeps_its_row_and_slot(tmp_path):
    st = _state()
    with _open(tmp_path) as store:
        _put(store, State(), st)
        db = _raw(tmp_path)
        before = db.execute("SELECT rowid, name, slot FROM ports ORDER BY name").fetchall()
        new = st.copy()
        # vm2 moves to tenant red: its endpoint and the route via it move or go too.
        new.ports = [replace(p, tenant="red") if p.name == "vm2" else p for p in new.ports]
        new.endpoints = [replace(e, tenant="red") if e.port == "vm2" else e
                         for e in new.endpoints]
        new.routes = [r for r in new.routes if str(r.prefix) != "2001:db8:1::/48"]
        new.validate()
        _put(store, st, new)
        assert db.execute("SELECT rowid, name, slot FROM ports ORDER BY name").fetchall() == \
            before
        assert store.load().sorted("ports") == new.sorted("ports")


def test_rollback_on_exception_leaves_previous_state(tmp_path):
    st = _state()
    with _open(tmp_path) as store:
        _put(store, State(), st)
        store.set_meta("generation", "1")
        slots = store.port_slots()
        new = State(tenants=[Tenant("green", 12)], ports=[Port("vm9", "green")])
        with pytest.raises(RuntimeError, match="datapath said no"):
            with store.transaction() as tx:
                tx.write(st, new)
                store.set_meta("generation", "2")
                # Inside the transaction the new state is what a reader of this connection sees.
                assert store.load() == new
                raise RuntimeError("datapath said no")
        assert store.load().to_dict() == st.to_dict()
        assert store.get_meta("generation") == "1"
        assert store.port_slots() == slots
        # And the store is usable afterwards.
        assert _put(store, st, new) > 0
        assert store.load() == new


def test_stale_old_state_is_refused(tmp_path):
    st = _state()
    with _open(tmp_path) as store:
        _put(store, State(), st)
        # Claiming a rule exists that does not: its update touches nothing.
        ghost = Rule(id=99, tenant="blue", priority=1, action="allow")
        old = st.copy()
        old.rules.append(ghost)
        new = old.copy()
        new.rules[-1] = replace(ghost, priority=2)
        with pytest.raises(StoreError, match="rules.*not what is stored"):
            _put(store, old, new)
        # Claiming the store is empty when it is not: the inserts collide.
        with pytest.raises(StoreError, match="insert in table tenants"):
            _put(store, State(), st)
        assert store.load().to_dict() == st.to_dict()


def test_dangling_reference_is_refused_before_commit(tmp_path):
    st = _state()
    with _open(tmp_path) as store:
        _put(store, State(), st)
        bad = st.copy()
        bad.tenants = [t for t in bad.tenants if t.name != "red"]  # red's rows still refer
        after_write = []
        with pytest.raises(StoreError, match="refers to a missing row of table tenants"):
            with store.transaction() as tx:
                tx.write(st, bad)
                after_write.append(True)  # must not be reached: the caller would program BPF
        assert after_write == []
        assert store.load().to_dict() == st.to_dict()


@pytest.mark.parametrize("kind,obj,parent", [
    ("rules", Rule.from_dict({"id": 77, "tenant": "ghost", "priority": 1, "action": "allow"}),
     "tenants"),
    ("rules", Rule.from_dict({"id": 78, "tenant": "blue", "priority": 1, "action": "allow",
                              "in_port": "vm9"}), "ports"),
    ("routes", Route.from_dict({"tenant": "blue", "prefix": "10.9.0.0/16",
                                "via": "10.0.0.99"}), "endpoints"),
])
def test_a_few_rows_referring_to_nothing_are_refused_before_commit(tmp_path, kind, obj,
                                                                   parent):
    """A small change is checked row by row (not by a scan of the table): a row whose
    reference names no row is still refused before the caller programs anything."""
    st = _state()
    with _open(tmp_path) as store:
        _put(store, State(), st)
        after_write = []
        with pytest.raises(StoreError, match=f"refers to a missing row of table {parent}"):
            with store.transaction() as tx:
                tx.write_changes({kind: ([obj], [], [])})
                after_write.append(True)
        assert after_write == []
        assert store.load().to_dict() == st.to_dict()


def test_nested_transaction_is_refused(tmp_path):
    with _open(tmp_path) as store:
        with store.transaction():
            with pytest.raises(StoreError, match="already open"):
                with store.transaction():
                    pass


def test_write_after_the_transaction_ended_is_refused(tmp_path):
    with _open(tmp_path) as store:
        with store.transaction() as tx:
            pass
        with pytest.raises(StoreError, match="after its transaction ended"):
            tx.write(State(), _state())
        assert store.load() == State()


def test_meta_outside_a_transaction(tmp_path):
    with _open(tmp_path) as store:
        assert store.get_meta("missing") is None
        store.set_meta("k", "v1")
        store.set_meta("k", "v2")
        assert store.get_meta("k") == "v2"
        with pytest.raises(TypeError):
            store.set_meta("k", 3)
    assert _raw(tmp_path).execute("SELECT value FROM meta WHERE key = 'k'").fetchone() == \
        ("v2",)


# -- port slots ----------

def _ports(*names) -> State:
    return State(tenants=[Tenant("t", 1)], ports=[Port(n, "t") for n in names])


def test_port_slots_are_stable_and_reuse_the_smallest_free(tmp_path):
    with _open(tmp_path) as store:
        s1 = _ports("b", "a", "c")
        _put(store, State(), s1)
        assert store.port_slots() == {"a": 1, "b": 2, "c": 3}

        s2 = _ports("a", "c")
        _put(store, s1, s2)
        assert store.port_slots() == {"a": 1, "c": 3}        # c keeps 3

        s3 = _ports("a", "c", "z", "y")
        _put(store, s2, s3)
        assert store.port_slots() == {"a": 1, "c": 3, "y": 2, "z": 4}

        # One change that removes a port and adds another: the new one takes the freed slot.
        s4 = _ports("c", "z", "y", "new")
        _put(store, s3, s4)
        assert store.port_slots() == {"new": 1, "c": 3, "y": 2, "z": 4}
    with _open(tmp_path) as store:
        assert store.port_slots() == {"new": 1, "c": 3, "y": 2, "z": 4}


# -- crashes ----------

_CHILD = textwrap.dedent("""
    import sys, time
    from agent.model import Rule, State, Tenant, Port
    from agent.store import Store

    committed = State(tenants=[Tenant("t", 1)], ports=[Port("p1", "t")],
                      rules=[Rule(id=i, tenant="t", priority=1, action="allow")
                             for i in range(1, 4)])
    bigger = committed.copy()
    bigger.ports.append(Port("p2", "t"))
    # Enough rows that SQLite spills uncommitted pages into the WAL before COMMIT.
    bigger.rules += [Rule(id=i, tenant="t", priority=2, action="deny", comment="x" * 50)
                     for i in range(4, 60000)]
    store = Store.open(sys.argv[1])
    with store.transaction() as tx:
        tx.write(State(), committed)
    if sys.argv[2] == "during":
        with store.transaction() as tx:
            tx.write(committed, bigger)
            store.set_meta("marker", "uncommitted")
            print("in transaction", flush=True)
            time.sleep(60)
    else:
        with store.transaction() as tx:
            tx.write(committed, bigger)
            store.set_meta("marker", "committed")
        print("committed", flush=True)
        time.sleep(60)
""")


@pytest.mark.parametrize("when", ["during", "after"])
def test_sigkill_leaves_the_last_committed_state(tmp_path, when):
    path = tmp_path / "state.db"
    env = dict(os.environ, PYTHONPATH=REPO)
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), when],
                             stdout=subprocess.PIPE, cwd=REPO, env=env)
    try:
        line = child.stdout.readline().decode().strip()
        assert line == ("in transaction" if when == "during" else "committed")
        wal = tmp_path / "state.db-wal"
        assert wal.exists() and wal.stat().st_size > 1_000_000  # the big write reached disk
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL

    with Store.open(path) as store:
        if when == "during":
            st = store.load()
            assert [r.id for r in st.rules] == [1, 2, 3]
            assert store.port_slots() == {"p1": 1}
            assert store.get_meta("marker") is None
            # And it takes writes again.
            _put(store, st, State())
            assert store.load() == State()
        else:
            # Counted in SQL: load() of 60,000 rules would only measure the model.
            assert _raw(tmp_path).execute("SELECT count(*), max(id) FROM rules"
                                          ).fetchone() == (59999, 59999)
            assert store.port_slots() == {"p1": 1, "p2": 2}
            assert store.get_meta("marker") == "committed"


# -- versions and damage ----------

def test_future_schema_version_is_refused(tmp_path):
    _open(tmp_path).close()
    _raw(tmp_path).execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                           (str(SCHEMA_VERSION + 1),))
    with pytest.raises(StoreError, match=rf"schema version {SCHEMA_VERSION + 1} is newer "
                                         rf"than this agent knows \({SCHEMA_VERSION}\)"):
        _open(tmp_path)
    # Refusing did not touch it.
    assert _raw(tmp_path).execute("SELECT value FROM meta WHERE key = 'schema_version'"
                                  ).fetchone() == (str(SCHEMA_VERSION + 1),)


def test_garbled_schema_version_is_refused(tmp_path):
    _open(tmp_path).close()
    _raw(tmp_path).execute("UPDATE meta SET value = 'one' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="not a version number"):
        _open(tmp_path)


def test_foreign_database_is_refused(tmp_path):
    db = _raw(tmp_path)
    db.execute("CREATE TABLE something_else (x)")
    db.close()
    with pytest.raises(StoreError, match="not an xdpflow state database"):
        _open(tmp_path)


def test_file_that_is_not_sqlite_is_refused(tmp_path):
    (tmp_path / "state.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="not a usable state database"):
        _open(tmp_path)


@pytest.mark.parametrize("table, sql, words", [
    ("rules", "UPDATE rules SET action = 'maybe' WHERE id = 2", "action"),
    ("rules", "UPDATE rules SET sport_lo = 70000 WHERE id = 1", "sport"),
    ("rules", "UPDATE rules SET src = '10.0.0.1/8' WHERE id = 1", "host bits"),
    ("tenants", "UPDATE tenants SET id = 0 WHERE name = 'red'", "out of range"),
    ("endpoints", "UPDATE endpoints SET mac = 'nope' WHERE ip = '10.0.0.5' AND "
                  "tenant = 'red'", "MAC"),
    ("routes", "UPDATE routes SET action = 'teleport' WHERE action = 'drop'", "action"),
])
def test_corrupted_row_names_table_and_row(tmp_path, table, sql, words):
    with _open(tmp_path) as store:
        _put(store, State(), _state())
    db = _raw(tmp_path)
    cur = db.execute(sql)
    assert cur.rowcount == 1
    with _open(tmp_path) as store:
        with pytest.raises(StoreError) as info:
            store.load()
    msg = str(info.value)
    assert f"table {table}, row " in msg and words in msg


def test_version_2_database_is_migrated_keeping_ports_slots_and_references(tmp_path):
    """A database written before uplinks (schema 2: ports.tenant NOT NULL) is rebuilt to
    schema 3 with every port, its slot and the rows that refer to it intact (and goes on
    to 4: rate limits, none)."""
    from agent import store as store_mod
    path = tmp_path / "state.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA foreign_keys=ON")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    for n in (0, 1):
        for stmt in store_mod._statements(store_mod.MIGRATIONS[n]):
            db.execute(stmt)
    db.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    db.execute("INSERT INTO tenants VALUES ('blue', 10, 5010, 'drop')")
    db.execute("INSERT INTO ports (name, tenant, slot, allow, port_security, allow_vlan) "
               "VALUES ('vm1', 'blue', 7, '10.0.0.64/26', 0, 1)")
    db.execute("INSERT INTO endpoints VALUES ('blue', '10.0.0.5', 'vm1', '02:00:00:00:00:05')")
    db.execute("INSERT INTO rules (id, tenant, priority, action, proto, sport_lo, sport_hi, "
               "dport_lo, dport_hi, in_port) VALUES (1, 'blue', 1, 'allow', 0, 0, 65535, "
               "0, 65535, 'vm1')")
    db.close()
    with Store.open(path) as store:
        assert store.get_meta("schema_version") == str(SCHEMA_VERSION)
        assert store.port_slots() == {"vm1": 7}
        st = store.load()
        p, = st.ports
        assert (p.tenant, [str(a) for a in p.allow], p.port_security, p.allow_vlan,
                p.uplink) == ("blue", ["10.0.0.64/26"], False, True, False)
        assert [e.port for e in st.endpoints] == ["vm1"] and st.rules[0].in_port == "vm1"
        up = st.copy()
        up.ports.append(Port("eth1", uplink=True, local_ip=ipaddress.ip_address("192.0.2.1")))
        _put(store, st, up)
    with Store.open(path) as store:
        assert store.load().sorted("ports") == up.sorted("ports")
        assert store.port_slots() == {"vm1": 7, "eth1": 1}
    row = _raw(tmp_path).execute("SELECT tenant, uplink, local_ip FROM ports WHERE name = "
                                 "'eth1'").fetchone()
    assert row == (None, 1, "192.0.2.1")


def test_uplink_row_without_local_ip_is_refused_by_sql(tmp_path):
    with _open(tmp_path) as store:
        _put(store, State(), _state())
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        _raw(tmp_path).execute("UPDATE ports SET local_ip = NULL WHERE name = 'eth1'")


def test_corrupted_row_names_its_rowid(tmp_path):
    with _open(tmp_path) as store:
        _put(store, State(), _state())
    _raw(tmp_path).execute("UPDATE rules SET priority = 70000 WHERE id = 4")
    with _open(tmp_path) as store:
        with pytest.raises(StoreError, match=r"table rules, row 4: rule 4: priority"):
            store.load()


def test_inconsistent_rows_are_refused(tmp_path):
    # An operator's sqlite3 shell does not enforce foreign keys; load() still checks.
    with _open(tmp_path) as store:
        _put(store, State(), _state())
    _raw(tmp_path).execute("UPDATE rules SET tenant = 'ghost' WHERE id = 5")
    with _open(tmp_path) as store:
        with pytest.raises(StoreError, match="inconsistent: rule 5: unknown tenant 'ghost'"):
            store.load()


def test_the_rows_digest_of_a_load_is_that_of_its_objects_and_follows_changes(tmp_path):
    """The digest of the applied image (agent/digest.py) hashes the rows as stored: a
    load's digest (from the rows as read) equals the objects' (as the store writes them),
    for every kind and field in use; a change updates it to what a whole hash of the new
    state gives; a row changed by hand, or written in another form, changes it."""
    from agent import digest
    from agent.store import changes
    st = _state()
    s = _open(tmp_path)
    with s.transaction() as tx:
        tx.write(State(), st)
    loaded, rows = s.load_with_digest()
    assert rows == digest.rows_digest(loaded) == digest.rows_digest(st)
    new = State.from_dict({**st.to_dict(), "rules": [
        r for r in st.to_dict()["rules"] if r["id"] != 5] + [
        {"id": 9, "tenant": "red", "priority": 7, "action": "deny"}]})
    new.rules = [replace(r, priority=3) if r.id == 1 else r for r in new.rules]
    assert digest.changed_rows(rows, st, changes(st, new)) == digest.rows_digest(new)
    assert digest.changed_rows(None, st, changes(st, new)) is None
    with s.transaction() as tx:
        tx.write(st, new)
    assert s.load_with_digest()[1] == digest.rows_digest(new)
    db = _raw(tmp_path)
    db.execute("UPDATE rules SET comment = 'by hand' WHERE id = 2")
    db.commit()
    assert s.load_with_digest()[1] != digest.rows_digest(new)
    db.execute("UPDATE rules SET comment = '' WHERE id = 2")
    db.execute("UPDATE endpoints SET mac = '02:00:00:00:00:05' WHERE ip = '10.0.0.5' "
               "AND tenant = 'blue'")
    db.commit()
    assert s.load_with_digest()[1] == digest.rows_digest(new)      # as it was written
    db.execute("UPDATE endpoints SET mac = '02:00:00:00:00:0A' WHERE ip = '10.0.0.5' "
               "AND tenant = 'blue'")
    db.commit()
    loaded, rows = s.load_with_digest()     # upper case: the same object, another row
    assert rows != digest.rows_digest(loaded)


@pytest.mark.parametrize("column,value,says", [
    ("dport_lo", 70000, "dport"),          # out of range: the bulk builder's fallback names it
    ("action", "maybe", "action"),
    ("dst", "10.0.0.0/33", "dst"),
])
def test_a_hand_edited_bad_rule_row_is_named_by_its_row(tmp_path, column, value, says):
    """Rules load through the apply path's bulk builder (a large state's warm start); a
    row edited by hand into something the model refuses still stops the load with the
    table, the row and the field, as every other table's rows do."""
    with _open(tmp_path) as store:
        _put(store, State(), _state())
    db = _raw(tmp_path)
    rowid = db.execute("SELECT rowid FROM rules ORDER BY id DESC LIMIT 1").fetchone()[0]
    db.execute(f"UPDATE rules SET {column} = ? WHERE rowid = ?", (value, rowid))
    with _open(tmp_path) as store:
        with pytest.raises(StoreError, match=f"table rules, row {rowid}: .*{says}"):
            store.load()


def test_version_7_database_gets_the_lean_rule_indexes_and_keeps_its_references(tmp_path):
    """Schema 8 drops the rule indexes an apply paid for on every row (rules_tenant) and
    makes rules_in_port partial; SQLite's foreign keys still refuse removing a port or a
    tenant that rules name, and a port's rules are found through the partial index."""
    path = tmp_path / "state.db"
    database_at_version(path, 7).close()
    with Store.open(path) as store:
        assert store.get_meta("schema_version") == str(SCHEMA_VERSION)
        with store.transaction() as tx:
            tx.write(State(), _state())
    raw = _raw(tmp_path)
    indexes = dict(raw.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' "
                               "AND tbl_name = 'rules'").fetchall())
    assert set(indexes) == {"rules_in_port"} and "WHERE in_port IS NOT NULL" in indexes[
        "rules_in_port"]
    plan = " ".join(str(r) for r in raw.execute(
        "EXPLAIN QUERY PLAN SELECT id FROM rules WHERE in_port = 'vm1'"))
    assert "rules_in_port" in plan
    raw.execute("PRAGMA foreign_keys=ON")
    named = raw.execute("SELECT in_port, tenant FROM rules WHERE in_port IS NOT NULL"
                        ).fetchone()
    assert named is not None
    for sql, arg in (("DELETE FROM ports WHERE name = ?", named[0]),
                     ("DELETE FROM tenants WHERE name = ?", named[1])):
        with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
            raw.execute("BEGIN")
            try:
                raw.execute(sql, (arg,))
                raw.execute("COMMIT")
            finally:
                if raw.in_transaction:
                    raw.execute("ROLLBACK")
    with Store.open(path) as store:
        assert store.load().to_dict() == _state().to_dict()


def test_many_rows_referring_to_nothing_are_refused_at_commit_naming_one(tmp_path):
    """Past a few rows no scan is made before the commit (a 100,000-rule apply's rows are
    written beside its map writes anyway): SQLite's deferred keys refuse the commit, the
    error names a row that refers to nothing, and nothing of the change is stored."""
    from agent import store as store_mod
    st = _state()
    ghosts = [Rule.from_dict({"id": 1000 + i, "tenant": "ghost", "priority": 1,
                              "action": "allow"}) for i in range(store_mod._FEW + 1)]
    with _open(tmp_path) as store:
        _put(store, State(), st)
        with pytest.raises(StoreError, match=r"commit failed|refers to a missing row") as e:
            with store.transaction() as tx:
                tx.write_changes({"rules": (ghosts, [], [])})
        assert "table rules: row {'id': 10" in str(e.value) and "table tenants" in str(e.value)
        assert store.load().to_dict() == st.to_dict()


def database_at_version(path, version: int) -> sqlite3.Connection:
    """A database file as a `version` agent left it (its migrations up to there), open."""
    from agent import store as store_mod
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    for n in range(version):
        for stmt in store_mod._statements(store_mod.MIGRATIONS[n]):
            db.execute(stmt)
    db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(version),))
    return db
