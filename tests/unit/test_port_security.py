"""Port security and VLAN ports in the model, the store (schema 1 -> 2), the compiler and
the CLI: `port add IFNAME --tenant T --allow PREFIX... [--no-port-security] [--allow-vlan]`,
apply fields `allow`, `port_security`, `allow_vlan`."""
import ctypes as ct
import ipaddress
import sqlite3

import pytest

from agent import abi, compiler, model, store
from agent.commands import COMMANDS, dispatch
from ctl import cli

from test_commands import FakeController

pytestmark = pytest.mark.unit


def port(**kw):
    return model.Port.from_dict({"name": "vm1", "tenant": "blue", **kw})


def test_port_defaults_are_secure_and_untagged():
    p = port()
    assert (p.allow, p.port_security, p.allow_vlan) == ((), True, False)
    assert p.to_dict() == {"name": "vm1", "tenant": "blue", "allow": [],
                           "port_security": True, "allow_vlan": False}


def test_port_fields_round_trip():
    p = port(allow=["fd00:1::/64", "10.0.0.64/26", "10.0.0.64/26"], port_security=False,
             allow_vlan=True)
    assert [str(a) for a in p.allow] == ["10.0.0.64/26", "fd00:1::/64"]
    assert model.Port.from_dict(p.to_dict()) == p


@pytest.mark.parametrize("kw,where", [
    ({"allow": ["10.0.0.1/24"]}, "port vm1: allow"),
    ({"allow": ["any"]}, "port vm1: allow"),
    ({"allow": 5}, "port vm1: allow"),
    ({"port_security": "no"}, "port vm1: port_security"),
    ({"allow_vlan": 1}, "port vm1: allow_vlan"),
])
def test_bad_port_fields_are_named(kw, where):
    with pytest.raises(model.Invalid) as e:
        port(**kw)
    assert e.value.where == where


def links():
    return {"vm1": compiler.PortLink("vm1", 5, "02:aa:00:00:00:01", 3),
            "vm2": compiler.PortLink("vm2", 6, "02:aa:00:00:00:02", 4)}


def state(**portkw):
    return model.State.from_dict({
        "tenants": [{"name": "blue", "id": 10}],
        "ports": [{"name": "vm1", "tenant": "blue", **portkw}, {"name": "vm2", "tenant": "blue",
                                                                "port_security": False}],
        "endpoints": [{"tenant": "blue", "ip": "10.0.0.1", "port": "vm1",
                       "mac": "02:00:00:00:00:01"},
                      {"tenant": "blue", "ip": "fd00::1", "port": "vm1",
                       "mac": "02:00:00:00:00:01"},
                      {"tenant": "blue", "ip": "10.0.0.2", "port": "vm2",
                       "mac": "02:00:00:00:00:02"}]})


def decoded(img):
    out = set()
    for k in img.port_src:
        sk = abi.SrcKey.from_buffer_copy(k)
        bits = sk.prefixlen - 64
        addr = abi.get_addr(sk.addr)
        bits -= 96 if addr.version == 4 else 0
        out.add((sk.slot, abi.mac_str(sk.mac), str(ipaddress.ip_network(f"{addr}/{bits}"))))
    return out


def test_compiler_port_flags_and_sources():
    img = compiler.compile_state(state(allow=["10.0.0.64/26"], allow_vlan=True), links())
    flags = {abi.Port.from_buffer_copy(v).slot: abi.Port.from_buffer_copy(v).flags
             for v in img.ports.values()}
    # blue's default is drop: every port of it carries that, to fail closed (no_tenant)
    drop = abi.PORT_TENANT_DROP
    assert flags == {3: abi.PORT_SECURITY | abi.PORT_VLAN | drop, 4: drop}
    mac = "02:00:00:00:00:01"
    # vm1's allowed prefix and link-local with its endpoints' MAC (the endpoints themselves
    # are checked in the endpoint map); nothing for vm2 (no port security).
    assert decoded(img) == {(3, mac, "10.0.0.64/26"), (3, mac, "fe80::/64")}


def test_compiler_no_port_security_no_sources():
    img = compiler.compile_state(state(port_security=False), links())
    assert img.port_src == {}
    assert {abi.Port.from_buffer_copy(v).flags for v in img.ports.values()} == \
        {abi.PORT_TENANT_DROP}


def test_store_migrates_a_version_1_database(tmp_path):
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    for stmt in store._statements(store._SCHEMA_V1):
        db.execute(stmt)
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute("INSERT INTO tenants VALUES ('blue', 10, NULL, 'drop')")
    db.execute("INSERT INTO ports (name, tenant, slot) VALUES ('vm1', 'blue', 1)")
    db.commit()
    db.close()
    with store.Store.open(path) as s:
        assert s.get_meta("schema_version") == str(store.SCHEMA_VERSION)
        st = s.load()
        assert st.tenants[0].max_flows is None                # the config's default
        assert st.ports == [model.Port("vm1", "blue")]        # secured, untagged
        new = st.copy()
        new.ports = [port(name="vm1", allow=["10.0.0.64/26"], port_security=False,
                          allow_vlan=True)]
        with s.transaction() as tx:
            tx.write(st, new)
        assert s.port_slots() == {"vm1": 1}
    with store.Store.open(path) as s:
        assert s.load().ports == new.ports


def test_cli_port_add_flags_reach_the_model():
    parser = cli.build_parser()
    ns = parser.parse_args(["port", "add", "vm1", "--tenant", "blue", "--allow",
                            "10.0.0.64/26", "--allow", "fd00:1::/64", "--no-port-security",
                            "--allow-vlan"])
    args = {k: v for k, v in vars(ns).items()
            if k in {a.name for a in COMMANDS["port add"].wire_args()}}
    ctl = FakeController()
    ctl.state.tenants.append(model.Tenant("blue", 10))
    dispatch(ctl, "port add", args)
    assert ctl.state.ports == [port(allow=["10.0.0.64/26", "fd00:1::/64"],
                                    port_security=False, allow_vlan=True)]


def test_port_list_shows_the_new_columns():
    rows = [port(allow=["10.0.0.64/26"], allow_vlan=True).to_dict(), port(name="vm2").to_dict()]
    out = cli.render("port list", rows, {})
    head, first, second = out.splitlines()
    assert head.split() == ["NAME", "TENANT", "PORT_SECURITY", "ALLOW_VLAN", "ALLOW"]
    assert first.split() == ["vm1", "blue", "yes", "yes", "10.0.0.64/26"]
    assert second.split() == ["vm2", "blue", "yes", "no", "-"]


def test_rule_list_shows_hits_packets_bytes():
    rows = [{"id": 1, "tenant": "blue", "priority": 100, "action": "allow", "hits": 2,
             "packets": 30, "bytes": 4200}]
    head, row = cli.render("rule list", rows, {}).splitlines()
    cols = head.split()
    assert cols[-4:] == ["HITS", "PACKETS", "BYTES", "COMMENT"]
    assert row.split()[-4:] == ["2", "30", "4200", "-"]
