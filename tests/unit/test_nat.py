"""NAT's model, store and CLI (issue 11): floating IPs and SNAT are validated, stored
(schema 7, migrated from 6), listed and applied; bad input names what is wrong and changes
nothing."""
import json
import sqlite3

import pytest

from agent import model
from agent.model import Invalid, State
from agent.store import SCHEMA_VERSION, Store

from test_cli import agent, run  # noqa: F401  (fixtures)
from test_cli import setup_blue as _setup

pytestmark = pytest.mark.unit


def _base() -> dict:
    return {
        "tenants": [{"name": "blue", "id": 10}, {"name": "red", "id": 20}],
        "ports": [{"name": "vm1", "tenant": "blue"}, {"name": "vm2", "tenant": "red"},
                  {"name": "eth1", "uplink": True, "local_ip": "192.0.2.1"}],
        "endpoints": [
            {"tenant": "blue", "ip": "10.0.0.5", "port": "vm1", "mac": "02:00:00:00:00:05"},
            {"tenant": "blue", "ip": "10.0.0.6", "port": "vm1", "mac": "02:00:00:00:00:06"},
            {"tenant": "red", "ip": "10.0.0.5", "port": "vm2", "mac": "02:00:00:00:01:05"},
            {"tenant": "blue", "ip": "2001:db8::5", "port": "vm1",
             "mac": "02:00:00:00:00:05"}],
        "fips": [{"tenant": "blue", "ip": "203.0.113.10", "to": "10.0.0.5"},
                 {"tenant": "red", "ip": "203.0.113.20", "to": "10.0.0.5"}],
        "snats": [{"tenant": "blue", "to": "198.51.100.1"},
                  {"tenant": "red", "to": "198.51.100.1", "ports": "1000-1999"}],
    }


def _state(**changes) -> State:
    d = _base()
    d.update(changes)
    st = State.from_dict(d)
    st.validate()
    return st


def test_a_valid_nat_state_round_trips_as_dicts():
    st = _state()
    assert st.snats[0].ports == model.SNAT_PORTS == (20000, 60000)
    assert st.snats[1].ports == (1000, 1999)
    again = State.from_dict(st.to_dict())
    assert again.to_dict() == st.to_dict()
    assert st.to_dict()["snats"][1] == {"tenant": "red", "to": "198.51.100.1",
                                        "ports": "1000-1999"}
    assert st.to_dict()["fips"][0] == {"tenant": "blue", "ip": "203.0.113.10",
                                       "to": "10.0.0.5"}


@pytest.mark.parametrize("kind, obj, words", [
    ("fips", {"tenant": "blue", "ip": "2001:db8::10", "to": "10.0.0.5"},
     "fip blue/2001:db8::10: ip: 2001:db8::10 is IPv6"),
    ("fips", {"tenant": "blue", "ip": "203.0.113.10", "to": "2001:db8::5"},
     "to: 2001:db8::5 is IPv6"),
    ("fips", {"tenant": "blue", "ip": "224.0.0.1", "to": "10.0.0.5"}, "not a unicast"),
    ("fips", {"tenant": "blue", "ip": "nope", "to": "10.0.0.5"}, "ip: 'nope' is not an IP"),
    ("fips", {"tenant": "blue", "ip": "203.0.113.10"}, "field 'to' is required"),
    ("snats", {"tenant": "blue", "to": "198.51.100.1", "ports": "60000-20000"},
     "snat blue: ports: range 60000-20000 is empty"),
    ("snats", {"tenant": "blue", "to": "198.51.100.1", "ports": "0-100"},
     "snat blue: ports: port 0 cannot be allocated"),
    ("snats", {"tenant": "blue", "to": "198.51.100.1", "ports": "70000"}, "ports"),
    ("snats", {"tenant": "blue", "to": "198.51.100.1", "ports": "any"}, "ports"),
    ("snats", {"tenant": "blue", "to": "2001:db8::1"}, "to: 2001:db8::1 is IPv6"),
])
def test_bad_values_name_the_field(kind, obj, words):
    with pytest.raises(Invalid) as info:
        model.KINDS[kind].from_dict(obj)
    assert words in str(info.value)


@pytest.mark.parametrize("changes, words", [
    ({"fips": [{"tenant": "green", "ip": "203.0.113.10", "to": "10.0.0.5"}]},
     "fip green/203.0.113.10: unknown tenant 'green'"),
    ({"fips": [{"tenant": "blue", "ip": "203.0.113.10", "to": "10.0.0.99"}]},
     "fip blue/203.0.113.10: to: 10.0.0.99 is not an endpoint of tenant blue"),
    # Overlapping floating addresses across tenants.
    ({"fips": [{"tenant": "blue", "ip": "203.0.113.10", "to": "10.0.0.5"},
               {"tenant": "red", "ip": "203.0.113.10", "to": "10.0.0.5"}]},
     "fip red/203.0.113.10: 203.0.113.10 is already a floating IP of tenant blue"),
    ({"fips": [{"tenant": "blue", "ip": "198.51.100.1", "to": "10.0.0.5"}]},
     "fip blue/198.51.100.1: 198.51.100.1 is the SNAT address of tenant blue"),
    ({"fips": [{"tenant": "blue", "ip": "192.0.2.1", "to": "10.0.0.5"}]},
     "192.0.2.1 is this node's own (uplink eth1"),
    ({"fips": [{"tenant": "blue", "ip": "203.0.113.10", "to": "10.0.0.5"},
               {"tenant": "blue", "ip": "203.0.113.11", "to": "10.0.0.5"}]},
     "to: 10.0.0.5 already has floating IP 203.0.113.10"),
    ({"snats": [{"tenant": "green", "to": "198.51.100.1"}]}, "snat green: unknown tenant"),
])
def test_inconsistent_nat_is_refused_naming_it(changes, words):
    d = _base()
    d.update(changes)
    st = State.from_dict(d)
    with pytest.raises(model.Conflict) as info:
        st.validate()
    assert words in str(info.value)


def test_adding_a_conflicting_fip_changes_nothing():
    st = _state()
    bad = model.Fip.from_dict({"tenant": "red", "ip": "203.0.113.10", "to": "10.0.0.5"})
    with pytest.raises(model.Conflict, match="already a floating IP of tenant blue"):
        st.with_added("fips", bad)
    assert st == _state()
    with pytest.raises(model.Conflict, match="snat blue: already exists"):
        st.with_added("snats", model.Snat.from_dict({"tenant": "blue", "to": "198.51.100.9"}))


def test_an_endpoint_with_a_fip_cannot_go_and_a_tenant_with_nat_says_so():
    st = _state()
    with pytest.raises(model.Conflict, match="10.0.0.5 is not an endpoint of tenant blue"):
        st.with_removed("endpoints", ("blue", "10.0.0.5"))
    assert st.users_of_tenant("blue") == {"ports": 1, "endpoints": 3, "fips": 1, "snats": 1}
    gone = st.without_tenant("blue", cascade=True)
    assert [f.tenant for f in gone.fips] == ["red"] and [s.tenant for s in gone.snats] == ["red"]


# -- the store ----------------------------------------------------------------------------

def test_store_keeps_fips_and_snats(tmp_path):
    st = _state()
    with Store.open(tmp_path / "s.db") as store:
        with store.transaction() as tx:
            tx.write(State(), st)
    with Store.open(tmp_path / "s.db") as store:
        assert store.load().to_dict() == st.to_dict()
        changed = st.copy()
        changed.snats = [model.replace(st.snats[0], ports=(30000, 30009)), st.snats[1]]
        changed.fips = st.fips[1:]
        with store.transaction() as tx:
            assert tx.write(st, changed) == 2
    with Store.open(tmp_path / "s.db") as store:
        assert store.load().to_dict() == changed.to_dict()
    db = sqlite3.connect(tmp_path / "s.db")
    assert db.execute("SELECT tenant, to_ip, port_lo, port_hi FROM snats ORDER BY tenant"
                      ).fetchall() == [("blue", "198.51.100.1", 30000, 30009),
                                       ("red", "198.51.100.1", 1000, 1999)]
    db.close()


def test_version_6_database_is_migrated_to_7(tmp_path):
    """A database of schema 6 (before NAT) gains the fips and snats tables, empty, its
    rows intact; a NAT state can then be written to it."""
    from test_store import database_at_version
    assert SCHEMA_VERSION >= 7
    path = tmp_path / "state.db"
    db = database_at_version(path, 6)
    db.execute("INSERT INTO tenants (name, id, default_verdict) VALUES ('blue', 10, 'drop')")
    db.execute("INSERT INTO ports (name, tenant, slot) VALUES ('vm1', 'blue', 3)")
    db.execute("INSERT INTO endpoints (tenant, ip, port, mac) VALUES "
               "('blue', '10.0.0.5', 'vm1', '02:00:00:00:00:05')")
    assert not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'fips'").fetchone()
    db.close()
    with Store.open(path) as store:
        assert store.get_meta("schema_version") == str(SCHEMA_VERSION)
        st = store.load()
        assert st.fips == [] and st.snats == [] and len(st.endpoints) == 1
        new = st.copy()
        new.fips.append(model.Fip.from_dict({"tenant": "blue", "ip": "203.0.113.10",
                                             "to": "10.0.0.5"}))
        new.snats.append(model.Snat.from_dict({"tenant": "blue", "to": "198.51.100.1"}))
        with store.transaction() as tx:
            tx.write(st, new)
    with Store.open(path) as store:
        assert store.load().to_dict() == new.to_dict() and store.port_slots() == {"vm1": 3}


def test_sql_refuses_a_fip_to_a_missing_endpoint(tmp_path):
    with Store.open(tmp_path / "s.db") as store:
        with store.transaction() as tx:
            tx.write(State(), _state())
    db = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    db.execute("PRAGMA foreign_keys=ON")
    with pytest.raises(sqlite3.IntegrityError):
        db.execute("UPDATE fips SET to_ip = '10.0.0.99' WHERE tenant = 'blue'")
    db.close()


# -- the CLI (against the fake controller: the real one's words are checked in bpf) -----------



def test_cli_fip_and_snat_add_list_del(run):  # noqa: F811
    _setup(run)
    rc, out, _ = run("fip", "add", "--tenant", "blue", "203.0.113.10", "--to", "10.0.0.5")
    assert rc == 0 and "fip blue/203.0.113.10" in out
    rc, out, _ = run("snat", "add", "--tenant", "blue", "--to", "198.51.100.1")
    assert rc == 0
    rc, out, _ = run("--json", "snat", "list")
    assert json.loads(out) == [{"tenant": "blue", "to": "198.51.100.1",
                                "ports": "20000-60000"}]
    rc, out, _ = run("fip", "list")
    assert out.split("\n")[0].split() == ["TENANT", "IP", "TO"]
    assert out.split("\n")[1].split() == ["blue", "203.0.113.10", "10.0.0.5"]
    assert run("fip", "del", "--tenant", "blue", "203.0.113.10")[0] == 0
    assert run("snat", "del", "--tenant", "blue")[0] == 0
    assert run("fip", "list")[1].strip() == "no fips"


@pytest.mark.parametrize("argv, rc, words", [
    (["fip", "add", "--tenant", "blue", "203.0.113.10", "--to", "10.0.0.9"], 1,
     "10.0.0.9 is not an endpoint of tenant blue"),
    (["fip", "add", "--tenant", "blue", "2001:db8::1", "--to", "10.0.0.5"], 2, "is IPv6"),
    (["snat", "add", "--tenant", "blue", "--to", "198.51.100.1", "--ports", "9-8"], 2,
     "ports: range 9-8 is empty"),
    (["snat", "add", "--tenant", "nosuch", "--to", "198.51.100.1"], 1,
     "unknown tenant 'nosuch'"),
])
def test_cli_bad_nat_input_is_named_and_changes_nothing(run, argv, rc, words):  # noqa: F811
    _setup(run)
    got, out, err = run(*argv)
    assert got == rc and words in err
    assert run("--json", "fip", "list")[1].strip() == "[]"
    assert run("--json", "snat", "list")[1].strip() == "[]"


def test_apply_file_with_fips_and_snats(run, tmp_path):  # noqa: F811
    _setup(run)
    f = tmp_path / "nat.toml"
    f.write_text('[[fips]]\ntenant = "blue"\nip = "203.0.113.10"\nto = "10.0.0.5"\n\n'
                 '[[snats]]\ntenant = "blue"\nto = "198.51.100.1"\nports = "20000-20009"\n')
    rc, out, _ = run("apply", str(f))
    assert rc == 0, out
    assert "+ fip blue/203.0.113.10 (to=10.0.0.5)" in out
    assert "+ snat blue (to=198.51.100.1 ports=20000-20009)" in out
    assert json.loads(run("--json", "snat", "list")[1])[0]["ports"] == "20000-20009"
    bad = tmp_path / "bad.toml"
    bad.write_text('[[snats]]\ntenant = "blue"\nto = "198.51.100.1"\nports = "5-1"\n')
    rc, _, err = run("apply", str(bad))
    assert rc == 2 and "bad.toml:" in err and "ports" in err


# -- trace's account of a translation ---------------------------------------------------------

def test_trace_nat_names_before_and_after():
    from scapy.all import ICMP, IP, UDP, Ether, raw

    from agent import abi
    from agent.control import trace_nat
    rec = abi.Trace()
    assert trace_nat(rec, b"\0" * 60) is None
    rec.nat_flags = abi.FLOW_SNAT
    rec.nat_addr = int.from_bytes(bytes([198, 51, 100, 1]), "little")
    rec.nat_port = 20007
    pkt = raw(Ether() / IP(src="10.0.0.5", dst="198.18.0.7") / UDP(sport=4000, dport=53))
    assert trace_nat(rec, pkt) == {"kind": "snat", "direction": "out",
                                   "from": "10.0.0.5:4000", "to": "198.51.100.1:20007"}
    rec.nat_flags = abi.FLOW_DNAT | abi.FLOW_FIP
    rec.nat_addr = int.from_bytes(bytes([10, 0, 0, 5]), "little")
    rec.nat_port = 300
    ping = raw(Ether() / IP(src="198.18.0.7", dst="203.0.113.10") / ICMP(id=300))
    assert trace_nat(rec, ping) == {"kind": "fip", "direction": "in",
                                    "from": "203.0.113.10:300", "to": "10.0.0.5:300"}
