"""The desired state in SQLite, so it survives agent restarts, crashes and reboots.

One row per object, one column per field, in canonical text and integers, so an operator
can read (and, carefully, fix) it with the sqlite3 shell. Changes are written as the
difference between two States inside one transaction, which the daemon keeps open while it
programs the datapath: if that fails, the store rolls back with it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from agent.model import (KINDS, Invalid, PROTOCOL_NAMES, State, identities, prefix_str,
                         rules_from_dicts)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 8


class StoreError(Exception):
    """The database cannot be used as it is: too new, corrupted, or out of step."""


# Foreign keys are DEFERRABLE INITIALLY DEFERRED so a diff can be written in any order
# (a port moving to a new tenant while the old one goes); Transaction.write() checks them
# before returning, so a violation never surfaces first at COMMIT, after the caller has
# programmed the datapath. Tenant id and VNI are not UNIQUE in SQL because two tenants
# swapping ids in one change would trip a per-row check; State.validate() owns that rule.
_SCHEMA_V1 = """
CREATE TABLE tenants (
    name            TEXT PRIMARY KEY,
    id              INTEGER NOT NULL,
    vni             INTEGER,                -- NULL: no VXLAN
    default_verdict TEXT NOT NULL           -- 'drop' | 'pass'
);
CREATE TABLE ports (
    name   TEXT PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants(name) DEFERRABLE INITIALLY DEFERRED,
    -- Stable small number for the datapath's per-port arrays: the smallest free one when
    -- the port is added, kept for as long as the port exists.
    slot   INTEGER NOT NULL UNIQUE CHECK (slot BETWEEN 1 AND 65535)
);
CREATE TABLE endpoints (
    tenant TEXT NOT NULL REFERENCES tenants(name) DEFERRABLE INITIALLY DEFERRED,
    ip     TEXT NOT NULL,                   -- canonical address text
    port   TEXT NOT NULL REFERENCES ports(name) DEFERRABLE INITIALLY DEFERRED,
    mac    TEXT NOT NULL,                   -- lower case xx:xx:xx:xx:xx:xx
    PRIMARY KEY (tenant, ip)
);
CREATE TABLE routes (
    tenant TEXT NOT NULL REFERENCES tenants(name) DEFERRABLE INITIALLY DEFERRED,
    prefix TEXT NOT NULL,                   -- canonical network text
    action TEXT NOT NULL,                   -- 'via' | 'kernel' | 'drop'
    via    TEXT,                            -- next-hop endpoint address when action='via'
    PRIMARY KEY (tenant, prefix),
    FOREIGN KEY (tenant, via) REFERENCES endpoints(tenant, ip) DEFERRABLE INITIALLY DEFERRED
);
CREATE TABLE rules (
    id        INTEGER PRIMARY KEY,
    tenant    TEXT NOT NULL REFERENCES tenants(name) DEFERRABLE INITIALLY DEFERRED,
    priority  INTEGER NOT NULL,
    action    TEXT NOT NULL,                -- 'allow' | 'deny' | 'pass'
    src       TEXT,                         -- prefix; NULL: any address of either version
    dst       TEXT,
    proto     INTEGER NOT NULL,             -- IP protocol number, 0: any
    sport_lo  INTEGER NOT NULL, sport_hi INTEGER NOT NULL,
    dport_lo  INTEGER NOT NULL, dport_hi INTEGER NOT NULL,
    icmp_type INTEGER,
    icmp_code INTEGER,
    in_port   TEXT REFERENCES ports(name) DEFERRABLE INITIALLY DEFERRED,
    comment   TEXT NOT NULL DEFAULT ''
);
CREATE INDEX rules_tenant ON rules(tenant);
CREATE INDEX rules_in_port ON rules(in_port);
CREATE INDEX endpoints_port ON endpoints(port);
CREATE INDEX routes_via ON routes(tenant, via);
CREATE INDEX ports_tenant ON ports(tenant);
"""

# Version 2: port security (allowed prefixes, an explicit opt-out) and VLAN-tagged ports.
# Ports of a version 1 database get port security on, as the datapath now does for all.
_PORTS_V2 = """
ALTER TABLE ports ADD COLUMN allow TEXT NOT NULL DEFAULT '';   -- prefixes, space-separated
ALTER TABLE ports ADD COLUMN port_security INTEGER NOT NULL DEFAULT 1 CHECK (port_security IN (0, 1));
ALTER TABLE ports ADD COLUMN allow_vlan INTEGER NOT NULL DEFAULT 0 CHECK (allow_vlan IN (0, 1));
"""

# Version 3: uplink ports (no tenant; the node's local address on the underlay). SQLite
# cannot drop NOT NULL from a column, so the table is rebuilt. Its rows leave and come back
# in one transaction: the deferred references of endpoints and rules to them are counted
# broken at the DROP and mended by the INSERT, before COMMIT looks.
_PORTS_V3 = """
CREATE TEMP TABLE ports_v2 AS SELECT * FROM ports;
DROP TABLE ports;
CREATE TABLE ports (
    name          TEXT PRIMARY KEY,
    tenant        TEXT REFERENCES tenants(name) DEFERRABLE INITIALLY DEFERRED, -- NULL: uplink
    slot          INTEGER NOT NULL UNIQUE CHECK (slot BETWEEN 1 AND 65535),
    allow         TEXT NOT NULL DEFAULT '',  -- prefixes, space-separated
    port_security INTEGER NOT NULL DEFAULT 1 CHECK (port_security IN (0, 1)),
    allow_vlan    INTEGER NOT NULL DEFAULT 0 CHECK (allow_vlan IN (0, 1)),
    uplink        INTEGER NOT NULL DEFAULT 0 CHECK (uplink IN (0, 1)),
    local_ip      TEXT,                      -- canonical address text; uplinks only
    CHECK ((uplink = 1) = (tenant IS NULL) AND (uplink = 1) = (local_ip IS NOT NULL))
);
INSERT INTO ports (name, tenant, slot, allow, port_security, allow_vlan)
    SELECT name, tenant, slot, allow, port_security, allow_vlan FROM ports_v2;
DROP TABLE ports_v2;
CREATE INDEX ports_tenant ON ports(tenant);
"""

# Version 4: remote endpoints (behind a VTEP, no local port). Rebuilt as version 3 was.
_ENDPOINTS_V4 = """
CREATE TEMP TABLE endpoints_v3 AS SELECT * FROM endpoints;
DROP TABLE endpoints;
CREATE TABLE endpoints (
    tenant TEXT NOT NULL REFERENCES tenants(name) DEFERRABLE INITIALLY DEFERRED,
    ip     TEXT NOT NULL,                   -- canonical address text
    port   TEXT REFERENCES ports(name) DEFERRABLE INITIALLY DEFERRED,  -- NULL: remote
    mac    TEXT NOT NULL,                   -- lower case xx:xx:xx:xx:xx:xx
    vtep   TEXT,                            -- a remote endpoint's VTEP address
    PRIMARY KEY (tenant, ip),
    CHECK ((port IS NULL) = (vtep IS NOT NULL))
);
INSERT INTO endpoints (tenant, ip, port, mac) SELECT tenant, ip, port, mac FROM endpoints_v3;
DROP TABLE endpoints_v3;
CREATE INDEX endpoints_port ON endpoints(port);
"""

# Version 5: rate limits of tenants and rules (NULL: none).
_RATE_LIMITS_V5 = """
ALTER TABLE tenants ADD COLUMN rate TEXT;      -- e.g. '10000pps', '100mbit'
ALTER TABLE tenants ADD COLUMN burst INTEGER;  -- packets or bytes; NULL: the default
ALTER TABLE rules ADD COLUMN rate TEXT;
ALTER TABLE rules ADD COLUMN burst INTEGER;
"""

# Version 6: per-tenant flow quotas. NULL: the config's [flows] max_per_tenant.
_TENANTS_V6 = """
ALTER TABLE tenants ADD COLUMN max_flows INTEGER CHECK (max_flows >= 0);
"""

# Version 7: NAT (issue 11): floating IPs and one SNAT per tenant. Addresses in canonical
# text; `to` is an SQL keyword, so the columns are to_ip.
_NAT_V7 = """
CREATE TABLE fips (
    tenant TEXT NOT NULL REFERENCES tenants(name) DEFERRABLE INITIALLY DEFERRED,
    ip     TEXT NOT NULL,                   -- the floating (external) IPv4 address
    to_ip  TEXT NOT NULL,                   -- the tenant's endpoint it stands for
    PRIMARY KEY (tenant, ip),
    FOREIGN KEY (tenant, to_ip) REFERENCES endpoints(tenant, ip) DEFERRABLE INITIALLY DEFERRED
);
CREATE UNIQUE INDEX fips_ip ON fips(ip);
CREATE INDEX fips_to ON fips(tenant, to_ip);
CREATE TABLE snats (
    tenant  TEXT PRIMARY KEY REFERENCES tenants(name) DEFERRABLE INITIALLY DEFERRED,
    to_ip   TEXT NOT NULL,                  -- the address its connections leave with
    port_lo INTEGER NOT NULL CHECK (port_lo BETWEEN 1 AND 65535),
    port_hi INTEGER NOT NULL CHECK (port_hi BETWEEN port_lo AND 65535)
);
"""

# Version 8: leaner rule indexes (issue 12). Each index is written on every row an apply
# inserts: with both, 100,000 rules took 0.74 s of CPU to insert, without them 0.44 s
# (measured). They serve only SQLite's foreign-key checks when a port or tenant is
# deleted. in_port is NULL for most rules: a partial index holds only those naming a port
# (and serves `in_port = ?`). A tenant's rules are found by a scan when the tenant is
# deleted (a few milliseconds per 100,000 rules, on a rare change).
_RULE_INDEXES_V8 = """
DROP INDEX rules_tenant;
DROP INDEX rules_in_port;
CREATE INDEX rules_in_port ON rules(in_port) WHERE in_port IS NOT NULL;
"""

# MIGRATIONS[n] is the SQL that brings a database from version n to n + 1 (0: a new file).
MIGRATIONS: Dict[int, str] = {0: _SCHEMA_V1, 1: _PORTS_V2, 2: _PORTS_V3, 3: _ENDPOINTS_V4,
                              4: _RATE_LIMITS_V5, 5: _TENANTS_V6,
                              6: _NAT_V7, 7: _RULE_INDEXES_V8}


# ---------------------------------------------------------------------------------------
# Rows <-> objects. Each kind: its key columns (the identity), its other columns, the
# object -> row function, and the row -> from_dict input function. Rows go back through
# the model's from_dict so a hand-edited bad value is caught like any other input.

def _rule_row(r) -> Tuple:
    return (r.id, r.tenant, r.priority, r.action, prefix_str(r.src), prefix_str(r.dst),
            r.proto, r.sport[0], r.sport[1], r.dport[0], r.dport[1], r.icmp_type,
            r.icmp_code, r.in_port, r.comment, r.rate, r.burst)


def _rule_dict(row: sqlite3.Row) -> Dict[str, Any]:
    d = dict(row)
    d["proto"] = PROTOCOL_NAMES.get(d["proto"], d["proto"])
    # Tuples, not lists: the bulk builder (rules_from_dicts) keys its memo of parsed
    # fields by them, which is most of what makes a large load fast.
    d["sport"] = (d.pop("sport_lo"), d.pop("sport_hi"))
    d["dport"] = (d.pop("dport_lo"), d.pop("dport_hi"))
    return d


def _port_row(p) -> Tuple:
    return (p.name, p.tenant, " ".join(str(a) for a in p.allow), int(p.port_security),
            int(p.allow_vlan), int(p.uplink), None if p.local_ip is None else str(p.local_ip))


def _port_dict(row: sqlite3.Row) -> Dict[str, Any]:
    d = dict(row)
    d["allow"] = d["allow"].split()
    d["port_security"] = bool(d["port_security"])
    d["allow_vlan"] = bool(d["allow_vlan"])
    d["uplink"] = bool(d["uplink"])
    if d["uplink"]:     # an uplink's tenant-port columns hold their defaults
        for k in ("allow", "port_security", "allow_vlan", "tenant"):
            d.pop(k)
    return d


def _endpoint_dict(row: sqlite3.Row) -> Dict[str, Any]:
    return {k: v for k, v in dict(row).items() if v is not None or k not in ("port", "vtep")}


def _tenant_dict(row: sqlite3.Row) -> Dict[str, Any]:
    d = dict(row)
    d["default"] = d.pop("default_verdict")
    return d


def _fip_dict(row: sqlite3.Row) -> Dict[str, Any]:
    d = dict(row)
    d["to"] = d.pop("to_ip")
    return d


def _snat_dict(row: sqlite3.Row) -> Dict[str, Any]:
    d = dict(row)
    d["to"] = d.pop("to_ip")
    d["ports"] = [d.pop("port_lo"), d.pop("port_hi")]
    return d


_TABLES: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...], Callable, Callable]] = {
    "tenants": (("name",), ("id", "vni", "default_verdict", "rate", "burst", "max_flows"),
                lambda t: (t.name, t.id, t.vni, t.default, t.rate, t.burst, t.max_flows),
                _tenant_dict),
    "ports": (("name",), ("tenant", "allow", "port_security", "allow_vlan", "uplink",
                          "local_ip"), _port_row,
              _port_dict),
    "endpoints": (("tenant", "ip"), ("port", "mac", "vtep"),
                  lambda e: (e.tenant, str(e.ip), e.port, e.mac,
                             None if e.vtep is None else str(e.vtep)), _endpoint_dict),
    "routes": (("tenant", "prefix"), ("action", "via"),
               lambda r: (r.tenant, str(r.prefix), r.action,
                          None if r.via is None else str(r.via)), dict),
    "rules": (("id",), ("tenant", "priority", "action", "src", "dst", "proto", "sport_lo",
                        "sport_hi", "dport_lo", "dport_hi", "icmp_type", "icmp_code",
                        "in_port", "comment", "rate", "burst"), _rule_row, _rule_dict),
    "fips": (("tenant", "ip"), ("to_ip",), lambda f: (f.tenant, str(f.ip), str(f.to)),
             _fip_dict),
    "snats": (("tenant",), ("to_ip", "port_lo", "port_hi"),
              lambda n: (n.tenant, str(n.to), n.ports[0], n.ports[1]), _snat_dict),
}

# Which tables hold references to which: a change to a child, or a delete from a parent,
# means the child's references must be checked.
_PARENTS = {"tenants": (), "ports": ("tenants",), "endpoints": ("tenants", "ports"),
            "routes": ("tenants", "endpoints"), "rules": ("tenants", "ports"),
            "fips": ("tenants", "endpoints"), "snats": ("tenants",)}

assert set(_TABLES) == set(KINDS) == set(_PARENTS)


def row_of(kind: str, obj) -> Tuple:
    """The row an object is stored as (its columns, port slots aside): what the digest of
    the applied image hashes (agent/digest.py)."""
    return _TABLES[kind][2](obj)


class Store:
    """One open state database. Not for use from several threads at once."""

    def __init__(self, db: sqlite3.Connection, path: str):
        self._db = db
        self.path = path
        self._in_tx = False

    @classmethod
    def open(cls, path) -> "Store":
        path = os.fspath(path)
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            os.makedirs(parent, mode=0o750, exist_ok=True)
            os.chmod(parent, 0o750)  # makedirs' mode is filtered by the umask
        try:
            # Autocommit mode: transactions are begun and ended explicitly, never implicitly
            # by the sqlite3 module.
            db = sqlite3.connect(path, isolation_level=None, timeout=10.0,
                                 # the daemon serializes all use with one lock, from
                                 # the API worker, the main loop and metrics threads
                                 check_same_thread=False)
        except sqlite3.Error as e:
            raise StoreError(f"{path}: cannot open: {e}") from None
        db.row_factory = sqlite3.Row
        store = cls(db, path)
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                log.warning("%s: journal mode is %s, not wal", path, mode)
            # FULL: a transaction reported committed survives power loss, not only a crash.
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            store._migrate()
        except sqlite3.DatabaseError as e:
            db.close()
            raise StoreError(f"{path}: not a usable state database: {e}") from None
        except StoreError:
            db.close()
            raise
        return store

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- schema --------------------------------------------------------------------------
    def _version(self) -> int:
        has_meta = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
        if not has_meta:
            others = self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if others:
                raise StoreError(f"{self.path}: has tables but no 'meta' table; "
                                 "not an xdpflow state database")
            return 0
        value = self.get_meta("schema_version")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise StoreError(f"{self.path}: meta.schema_version is {value!r}, not a "
                             "version number") from None

    def _migrate(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")  # so two agents cannot migrate at once
        try:
            version = self._version()
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: schema version {version} is newer than this agent "
                    f"knows ({SCHEMA_VERSION}); run a newer xdpflow or restore a backup")
            if version == 0:
                self._db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            while version < SCHEMA_VERSION:
                log.info("%s: migrating schema %d -> %d", self.path, version, version + 1)
                for stmt in _statements(MIGRATIONS[version]):
                    self._db.execute(stmt)
                version += 1
                self.set_meta("schema_version", str(version))
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        # SQLite ends the transaction itself after some errors (disk full, I/O); a second
        # ROLLBACK would then raise and hide the error that matters.
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    # -- reading -------------------------------------------------------------------------
    def load(self) -> State:
        """The stored state, every row checked by the model as if it were new input."""
        return self.load_with_digest()[0]

    def load_with_digest(self) -> Tuple[State, int]:
        """load(), and the digest of the rows as stored (agent/digest.py): equal to that
        of the state's objects when every row is as the agent wrote it; a row written by
        hand in another form (an upper-case MAC) makes them differ, which at worst costs
        a start a compare."""
        from agent.digest import add_row
        st = State()
        rows = 0
        for kind, (keys, cols, _, to_dict) in _TABLES.items():
            order = ", ".join(keys)
            dicts, rowids = [], []
            for row in self._db.execute(
                    f"SELECT rowid AS _rowid, {', '.join(keys + cols)} FROM {kind} "
                    f"ORDER BY {order}"):
                rows = add_row(rows, kind, tuple(row)[1:])
                d = to_dict(row)
                rowids.append(d.pop("_rowid"))
                dicts.append(d)
            setattr(st, kind, self._objects(kind, dicts, rowids))
        try:
            st.validate()
        except Invalid as e:
            raise StoreError(f"{self.path}: stored state is inconsistent: {e}") from None
        return st, rows

    def _objects(self, kind: str, dicts: List[dict], rowids: List[int]) -> list:
        """A table's rows as model objects, checked as new input. Rules (the bulk of a
        large state) go through the apply path's builder, which parses each distinct
        combination of shared fields once: a warm start's load is mostly this."""
        if kind == "rules":
            try:
                return rules_from_dicts(dicts)
            except Invalid as e:
                i = int(re.match(r"rules\[(\d+)\]", e.at or "rules[0]").group(1))
                raise StoreError(f"{self.path}: table rules, row {rowids[i]}: {e}") from None
        objs = []
        for d, rowid in zip(dicts, rowids):
            try:
                objs.append(KINDS[kind].from_dict(d))
            except Invalid as e:
                raise StoreError(f"{self.path}: table {kind}, row {rowid}: {e}") from None
        return objs

    def port_slots(self) -> Dict[str, int]:
        """Port name -> its slot."""
        return {name: slot for name, slot in self._db.execute("SELECT name, slot FROM ports")}

    def get_meta(self, key: str) -> Optional[str]:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        """Record a small fact; part of the open transaction if there is one."""
        set_meta(self._db, key, value)

    # -- writing -------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator["Transaction"]:
        """One SQLite transaction: committed when the block ends, rolled back if it raises."""
        if self._in_tx:
            raise StoreError("a transaction is already open")
        # IMMEDIATE takes the write lock now, so a second writer waits here rather than
        # failing at its first write, halfway through the caller's work.
        self._db.execute("BEGIN IMMEDIATE")
        self._in_tx = True
        tx = Transaction(self._db, self.path)
        try:
            yield tx
        except BaseException:
            self._rollback()
            raise
        else:
            try:
                self._db.execute("COMMIT")
            except sqlite3.DatabaseError as e:
                try:
                    if "FOREIGN KEY" in str(e):     # which row: the transaction is still open
                        for kind in _TABLES:
                            _raise_missing_parent(self._db, self.path, kind)
                finally:
                    self._rollback()
                raise StoreError(f"{self.path}: commit failed, rolled back: {e}") from None
        finally:
            self._in_tx = tx.open = False


def set_meta(db: sqlite3.Connection, key: str, value: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"meta value for {key!r} must be str, not {type(value).__name__}")
    db.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
               "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))


_FEW = 64       # rows of one table written: checked one by one rather than by a scan


def _raise_missing_parent(db: sqlite3.Connection, path: str, kind: str) -> None:
    """StoreError naming a row of table `kind` whose foreign key names no row."""
    bad = db.execute(f"PRAGMA foreign_key_check({kind})").fetchone()
    if bad:
        row = db.execute(f"SELECT * FROM {kind} WHERE rowid = ?", (bad[1],)).fetchone()
        raise StoreError(f"{path}: table {kind}: row {dict(row) if row else bad[1]} refers "
                         f"to a missing row of table {bad[2]}")


def _statements(script: str) -> List[str]:
    """Split SQL into statements. executescript() would COMMIT the migration's transaction
    first, so migrations run one statement at a time."""
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):  # knows about comments and quotes
            out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return out


class Transaction:
    """Writes inside one open transaction of a Store."""

    def __init__(self, db: sqlite3.Connection, path: str):
        self._db = db
        self._path = path
        self.open = True

    def write(self, old: State, new: State) -> int:
        """Make the stored state go from `old` (what is stored now) to `new`, touching only
        the rows that differ. Returns how many rows were written."""
        return self.write_changes(changes(old, new))

    def write_changes(self, changes: Dict[str, Tuple[list, list, list]],
                      meta: Optional[Dict[str, str]] = None) -> int:
        """Write a change given as {kind: (added, removed, changed)} objects (changed: the
        new versions; kinds left out: unchanged), as changes() makes it; a caller that
        knows its change (one rule added) spares the diff of two whole states. `meta`:
        facts recorded with it (Store.set_meta), in the same transaction."""
        return self.write_rows(change_rows(changes), meta)

    def write_rows(self, rows: Dict[str, Tuple[List[Tuple], List[Tuple], List[Tuple]]],
                   meta: Optional[Dict[str, str]] = None) -> int:
        """write_changes() of a change given as its rows (change_rows()): what a store
        writer in another process is sent (agent/storewriter.py)."""
        if not self.open:
            # After the `with`, the connection is in autocommit: each row would commit alone.
            raise StoreError("write() after its transaction ended")
        rows = {kind: rows.get(kind, ([], [], [])) for kind in KINDS}
        written = 0
        # Deletes first so a port removed and another added in one change can take its slot.
        for kind in reversed(list(KINDS)):
            keys = _TABLES[kind][0]
            where = " AND ".join(f"{k} = ?" for k in keys)
            written += self._many(f"DELETE FROM {kind} WHERE {where}", rows[kind][1], kind,
                                  "delete")
        for kind in KINDS:
            added, _, changed = rows[kind]
            keys, cols = _TABLES[kind][:2]
            if kind == "ports":
                added = self._with_slots(added)
                cols = cols + ("slot",)
            names = keys + cols
            written += self._many(
                f"INSERT INTO {kind} ({', '.join(names)}) "
                f"VALUES ({', '.join('?' * len(names))})", added, kind, "insert")
            # An UPDATE keeps the row (and a port its slot); the identity never changes.
            # Its parameters are the other columns, then the key columns for WHERE.
            written += self._many(
                f"UPDATE {kind} SET {', '.join(f'{c} = ?' for c in _TABLES[kind][1])} "
                f"WHERE {' AND '.join(f'{k} = ?' for k in keys)}",
                [row[len(keys):] + row[:len(keys)] for row in changed], kind, "update")
        self._check_references(rows)
        for key, value in (meta or {}).items():
            set_meta(self._db, key, value)
        return written

    def _many(self, sql: str, rows: List[Tuple], kind: str, what: str) -> int:
        if not rows:
            return 0
        try:
            n = self._db.executemany(sql, rows).rowcount
        except sqlite3.IntegrityError as e:
            raise StoreError(f"{self._path}: {what} in table {kind}: {e} (is `old` what "
                             "is stored?)") from None
        if n != len(rows):
            raise StoreError(f"{self._path}: {what} in table {kind} touched {n} rows, "
                             f"expected {len(rows)}: `old` is not what is stored")
        return n

    def _with_slots(self, rows: List[Tuple]) -> List[Tuple]:
        used = {slot for (slot,) in self._db.execute("SELECT slot FROM ports")}
        out, slot = [], 1
        for row in sorted(rows):  # by name, so a batch of new ports is numbered predictably
            while slot in used:
                slot += 1
            if slot > 65535:
                raise StoreError(f"{self._path}: no free port slot for port {row[0]}")
            used.add(slot)
            out.append(row + (slot,))
        return out

    def _check_references(self, rows) -> None:
        for kind, parents in _PARENTS.items():
            touched = rows[kind][0] + rows[kind][2]
            parent_gone = any(rows[p][1] for p in parents)
            if not touched and not parent_gone:
                continue
            if not parent_gone:
                # No parent removed: only the rows written can refer to nothing. A few are
                # checked here, one by one (the whole table's check is a scan: 100,000
                # rules for one rule added); many are left to the commit, which checks
                # every deferred key anyway and names the row (Store.transaction): a
                # scan here took a tenth of a 100,000-rule apply's store write.
                if len(touched) <= _FEW:
                    self._check_rows(kind, touched)
                continue
            _raise_missing_parent(self._db, self._path, kind)

    def _check_rows(self, kind: str, rows: List[Tuple]) -> None:
        """Each of these rows' foreign keys names an existing parent row (SQLite's rule:
        a key with a NULL column refers to nothing and is fine)."""
        keys = _TABLES[kind][0]
        fks: Dict[int, List[Tuple[str, str, str]]] = {}
        for fk in self._db.execute(f"PRAGMA foreign_key_list({kind})"):
            fks.setdefault(fk["id"], []).append((fk["table"], fk["from"], fk["to"]))
        me = " AND ".join(f"c.{k} = ?" for k in keys)
        for cols in fks.values():
            parent = cols[0][0]
            set_ = " AND ".join(f"c.{f} IS NOT NULL" for _, f, _ in cols)
            match = " AND ".join(f"p.{t} = c.{f}" for _, f, t in cols)
            sql = (f"SELECT 1 FROM {kind} c WHERE {me} AND {set_} AND NOT EXISTS "
                   f"(SELECT 1 FROM {parent} p WHERE {match})")
            for row in rows:
                ident = row[:len(keys)]
                if self._db.execute(sql, ident).fetchone():
                    bad = self._db.execute(f"SELECT * FROM {kind} c WHERE {me}",
                                           ident).fetchone()
                    raise StoreError(f"{self._path}: table {kind}: row {dict(bad)} refers to "
                                     f"a missing row of table {parent}")


def change_rows(changes: Dict[str, Tuple[list, list, list]]
                ) -> Dict[str, Tuple[List[Tuple], List[Tuple], List[Tuple]]]:
    """A change ({kind: (added, removed, changed)} objects) as the rows it writes: {kind:
    (rows added, keys removed, rows changed)}, plain tuples (port slots aside)."""
    out = {}
    for kind, (added, removed, changed) in changes.items():
        keys, _, to_row, _ = _TABLES[kind]
        out[kind] = ([to_row(o) for o in added], [to_row(o)[:len(keys)] for o in removed],
                     [to_row(o) for o in changed])
    return out


def changes(old: State, new: State) -> Dict[str, Tuple[list, list, list]]:
    """{kind: (added, removed, changed)} from `old` to `new`, kinds without change left out."""
    out = {}
    for kind in KINDS:
        a, b = getattr(old, kind), getattr(new, kind)
        if a is b:
            continue
        d = _diff(kind, a, b)
        if any(d):
            out[kind] = d
    return out


def _diff(kind: str, old: list, new: list) -> Tuple[list, list, list]:
    """(added, removed, changed) objects of one kind, by identity."""
    a = dict(zip(identities(kind, old), old))
    added, changed = [], []
    for ident, o in zip(identities(kind, new), new):
        prev = a.pop(ident, None)
        if prev is None:
            added.append(o)
        elif prev is not o and prev != o:  # `is` first: unchanged objects are shared
            changed.append(o)
    return added, list(a.values()), changed
