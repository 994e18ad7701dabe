"""Uplink ports (the node's port to the underlay/external network): the model, the CLI
(`port add IFNAME --uplink --local-ip IP`), apply files, `port list` and the compiler."""
import json

import pytest

from agent import abi, compiler, model
from ctl import cli

# The CLI/API fixtures over a fake controller (test_cli's), so a command goes through
# argparse, the socket and the command table as typed.
from test_cli import agent, run  # noqa: F401  (pytest fixtures)

pytestmark = pytest.mark.unit


def uplink(**kw):
    return model.Port.from_dict({"name": "eth1", "uplink": True, "local_ip": "192.0.2.1", **kw})


def test_uplink_round_trips_and_has_no_tenant():
    p = uplink()
    assert (p.uplink, p.tenant, str(p.local_ip)) == (True, None, "192.0.2.1")
    assert p.to_dict() == {"name": "eth1", "tenant": None, "uplink": True,
                           "local_ip": "192.0.2.1"}
    assert model.Port.from_dict(p.to_dict()) == p
    assert str(uplink(local_ip="2001:db8::1").local_ip) == "2001:db8::1"


@pytest.mark.parametrize("kw,where,words", [
    ({"local_ip": None}, "port eth1", "needs 'local_ip'"),
    ({"local_ip": "192.0.2.300"}, "port eth1: local_ip", "not an IP address"),
    ({"local_ip": "224.0.0.1"}, "port eth1: local_ip", "not a unicast"),
    ({"local_ip": "0.0.0.0"}, "port eth1: local_ip", "not a unicast"),
    ({"tenant": "blue"}, "port eth1: tenant", "belongs to no tenant"),
    ({"allow": ["10.0.0.0/24"]}, "port eth1: allow", "belongs to no tenant"),
    ({"allow_vlan": True}, "port eth1: allow_vlan", "not an uplink"),
    ({"port_security": False}, "port eth1: port_security", "not an uplink"),
    ({"uplink": "yes"}, "port eth1: uplink", "not true or false"),
])
def test_bad_uplink_fields_are_named(kw, where, words):
    with pytest.raises(model.Invalid) as e:
        uplink(**kw)
    assert e.value.where == where and words in e.value.message


def test_tenant_port_takes_no_local_ip_and_needs_a_tenant():
    with pytest.raises(model.Invalid, match="port vm1: local_ip: only an uplink"):
        model.Port.from_dict({"name": "vm1", "tenant": "blue", "local_ip": "192.0.2.1"})
    with pytest.raises(model.Invalid, match="'tenant' is required"):
        model.Port.from_dict({"name": "vm1"})


def state(**extra):
    d = {"tenants": [{"name": "blue", "id": 10, "vni": 5010}],
         "ports": [{"name": "vm1", "tenant": "blue"},
                   {"name": "eth1", "uplink": True, "local_ip": "192.0.2.1"}],
         "endpoints": [{"tenant": "blue", "ip": "10.0.0.1", "port": "vm1",
                        "mac": "02:00:00:00:00:01"}]}
    for k, v in extra.items():
        d[k] = d.get(k, []) + v
    return model.State.from_dict(d)


def test_uplink_is_not_a_place_for_endpoints_or_in_port_rules():
    state().validate()
    with pytest.raises(model.Conflict, match="port eth1 is an uplink"):
        state(endpoints=[{"tenant": "blue", "ip": "10.0.0.9", "port": "eth1",
                          "mac": "02:00:00:00:00:09"}]).validate()
    with pytest.raises(model.Conflict, match="in_port: port eth1 is an uplink"):
        state(rules=[{"id": 1, "tenant": "blue", "priority": 1, "action": "allow",
                      "in_port": "eth1"}]).validate()
    with pytest.raises(model.Conflict, match="local_ip 192.0.2.1 is already uplink eth1"):
        state(ports=[{"name": "eth2", "uplink": True, "local_ip": "192.0.2.1"}]).validate()


def test_deleting_a_tenant_leaves_the_uplink():
    st = state().without_tenant("blue", cascade=True)
    assert [p.name for p in st.ports] == ["eth1"]


def test_compiler_uplink_entry():
    links = {"vm1": compiler.PortLink("vm1", 5, "02:aa:00:00:00:01", 3),
             "eth1": compiler.PortLink("eth1", 7, "02:aa:00:00:00:07", 4)}
    img = compiler.compile_state(state(), links)
    v = abi.Port.from_buffer_copy(img.ports[bytes(abi.u32(7))])
    assert (v.tenant, v.slot, v.flags) == (0, 4, abi.PORT_UPLINK)
    assert abi.mac_str(v.mac) == "02:aa:00:00:00:07"
    assert str(abi.get_addr(v.local_ip)) == "192.0.2.1"
    # A tenant port's value carries no local address.
    t = abi.Port.from_buffer_copy(img.ports[bytes(abi.u32(5))])
    assert (t.tenant, bytes(t.local_ip)) == (10, bytes(16))


def test_cli_port_add_uplink_and_list(run, agent):  # noqa: F811
    ctl, _ = agent
    assert run("port", "add", "eth1", "--uplink", "--local-ip", "192.0.2.1")[0] == 0
    assert ctl.state.ports == [uplink()]
    rc, out, _ = run("port", "list")
    head, row = out.splitlines()
    cols = dict(zip(head.split(), row.split()))
    assert (cols["NAME"], cols["TENANT"], cols["LOCAL_IP"]) == ("eth1", "-", "192.0.2.1")
    rc, out, _ = run("--json", "port", "list")
    got, = json.loads(out)
    assert {k: got[k] for k in uplink().to_dict()} == uplink().to_dict()


@pytest.mark.parametrize("argv,code,words", [
    (["port", "add", "eth1", "--uplink"], 2, "needs 'local_ip'"),
    (["port", "add", "eth1", "--uplink", "--local-ip", "nope"], 2, "not an IP address"),
    (["port", "add", "eth1", "--uplink", "--tenant", "blue", "--local-ip", "192.0.2.1"], 2,
     "not allowed with argument --uplink"),
    (["port", "add", "eth1", "--uplink", "--local-ip", "192.0.2.1", "--no-port-security"],
     2, "not an uplink"),
    (["port", "add", "eth1"], 2, "tenant"),
])
def test_cli_bad_uplink_is_refused_and_changes_nothing(run, agent, argv, code,  # noqa: F811
                                                       words):
    ctl, _ = agent
    rc, out, err = run(*argv)
    assert rc == code and words in err
    assert ctl.state.ports == []


def test_apply_file_with_an_uplink(run, agent, tmp_path):  # noqa: F811
    ctl, _ = agent
    f = tmp_path / "state.toml"
    f.write_text('[[ports]]\nname = "eth1"\nuplink = true\nlocal_ip = "192.0.2.1"\n')
    rc, out, _ = run("apply", str(f), "--dry-run")
    assert rc == 0 and "+ port eth1 (uplink=yes local_ip=192.0.2.1)" in out
    assert run("apply", str(f))[0] == 0
    assert ctl.state.ports == [uplink()]
    f.write_text('[[ports]]\nname = "eth1"\nuplink = true\n')
    rc, _, err = run("apply", str(f))
    assert rc == 2 and "needs 'local_ip'" in err and ctl.state.ports == [uplink()]


# -- remote endpoints (behind another node's VTEP) ---------------------------------------

def remote(**kw):
    return {"tenant": "blue", "ip": "10.0.1.7", "vtep": "192.0.2.2",
            "mac": "02:00:00:00:01:07", **kw}


def test_remote_endpoint_round_trips():
    e = model.Endpoint.from_dict(remote())
    assert (e.port, str(e.vtep)) == (None, "192.0.2.2")
    assert e.to_dict() == {"tenant": "blue", "ip": "10.0.1.7", "port": None,
                           "mac": "02:00:00:00:01:07", "vtep": "192.0.2.2"}
    assert model.Endpoint.from_dict(e.to_dict()) == e
    state(endpoints=[remote()]).validate()


@pytest.mark.parametrize("kw,words", [
    ({"port": "vm1"}, "needs one of 'port'"),
    ({"vtep": None}, "needs one of 'port'"),
    ({"vtep": "2001:db8::2"}, "not a unicast IPv4"),
    ({"vtep": "239.1.1.1"}, "not a unicast IPv4"),
    ({"vtep": "nope"}, "not an IP address"),
])
def test_bad_remote_endpoints_are_named(kw, words):
    with pytest.raises(model.Invalid) as e:
        model.Endpoint.from_dict(remote(**kw))
    assert words in str(e.value)


def test_remote_endpoint_needs_a_vni_an_uplink_and_a_foreign_vtep():
    st = state(endpoints=[remote()])
    st.tenants = [model.replace(st.tenants[0], vni=None)]
    with pytest.raises(model.Conflict, match="has no VNI"):
        st.validate()
    st = state(endpoints=[remote()])
    st.ports = [p for p in st.ports if not p.uplink]
    with pytest.raises(model.Conflict, match="needs an uplink port"):
        st.validate()
    with pytest.raises(model.Conflict, match="192.0.2.1 is this node's own"):
        state(endpoints=[remote(vtep="192.0.2.1")]).validate()
    # A route may point at a remote endpoint.
    state(endpoints=[remote()],
          routes=[{"tenant": "blue", "prefix": "10.9.0.0/16", "via": "10.0.1.7"}]).validate()


def test_compiler_remote_endpoint_and_decap_entries():
    links = {"vm1": compiler.PortLink("vm1", 5, "02:aa:00:00:00:01", 3),
             "eth1": compiler.PortLink("eth1", 7, "02:aa:00:00:00:07", 4, mtu=9000)}
    st = state(endpoints=[remote()])
    img = compiler.compile_state(st, links, neighbours={"192.0.2.2": "02:ee:00:00:00:02"})
    k = abi.EpKey(tenant=10)
    abi.set_addr(k.addr, model.parse_ip("10.0.1.7", "t"))
    v = abi.Endpoint.from_buffer_copy(img.endpoints[bytes(k)])
    assert (v.ifindex, v.port, v.flags, v.vni) == (7, 4, abi.EP_REMOTE, 5010)
    assert bytes(abi.u32(v.vtep)) == bytes([192, 0, 2, 2])       # network order
    assert (abi.mac_str(v.mac), abi.mac_str(v.port_mac), abi.mac_str(v.vtep_mac)) == \
        ("02:00:00:00:01:07", "02:aa:00:00:00:07", "02:ee:00:00:00:02")
    assert abi.Port.from_buffer_copy(img.ports[bytes(abi.u32(7))]).mtu == 9000
    vtep = int.from_bytes(bytes([192, 0, 2, 2]), "little")
    assert {(abi.VniKey.from_buffer_copy(k).vni, abi.VniKey.from_buffer_copy(k).vtep):
            abi.u32.from_buffer_copy(v).value for k, v in img.vnis.items()} == \
        {(5010, 0): 10, (5010, vtep): 10}
    # Unresolved: a zero MAC (the datapath hands such packets to the kernel).
    img = compiler.compile_state(st, links)
    assert bytes(abi.Endpoint.from_buffer_copy(img.endpoints[bytes(k)]).vtep_mac) == bytes(6)
    # No uplink interface: no remote entries, and nothing points at a missing port.
    img = compiler.compile_state(st, {"vm1": links["vm1"]})
    assert bytes(k) not in img.endpoints


def test_cli_endpoint_add_remote(run, agent):  # noqa: F811
    ctl, _ = agent
    for argv in (["tenant", "add", "blue", "--id", "10", "--vni", "5010"],
                 ["port", "add", "eth1", "--uplink", "--local-ip", "192.0.2.1"],
                 ["endpoint", "add", "--tenant", "blue", "10.0.1.7", "--vtep", "192.0.2.2",
                  "--mac", "02:00:00:00:01:07"]):
        assert run(*argv)[0] == 0, argv
    rc, out, _ = run("endpoint", "list")
    head, row = out.splitlines()
    assert dict(zip(head.split(), row.split()))["VTEP"] == "192.0.2.2"
    rc, _, err = run("endpoint", "add", "--tenant", "blue", "10.0.1.8", "--vtep", "192.0.2.2",
                     "--port", "eth1", "--mac", "02:00:00:00:01:08")
    assert rc == 2 and "--port: not allowed with argument --vtep" in err
    rc, _, err = run("endpoint", "add", "--tenant", "blue", "10.0.1.8",
                     "--mac", "02:00:00:00:01:08")
    assert rc == 2 and "--port" in err and "--vtep" in err
    assert len(ctl.state.endpoints) == 1
