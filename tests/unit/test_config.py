"""The config file: defaults, every kind of error naming its key and line, round-trips."""
import ipaddress
import textwrap

import pytest

from agent import config
from agent.config import Config, ConfigError
from agent.model import Rule, State, Tenant

pytestmark = pytest.mark.unit


def _write(tmp_path, text):
    path = tmp_path / "agent.toml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def _error(tmp_path, text) -> ConfigError:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    return info.value


DEFAULTS = {
    "agent": {"socket": "/run/xdpflow/agent.sock", "state_dir": "/var/lib/xdpflow",
              "bpffs": "/sys/fs/bpf/xdpflow", "socket_group": "xdpflow",
              "admin_group": "", "teardown_on_exit": False, "log_level": "info",
              "request_timeout": 5.0, "max_request_bytes": 4194304},
    "metrics": {"listen": "127.0.0.1:9477"},
    "datapath": {"flow_table_size": 1000000, "max_rule_entries": 262144, "max_masks": 32,
                 "max_endpoints": 65536, "max_routes": 16384, "max_ports": 1024,
                 "xdp_mode": "native"},
    "aging": {"interval": 2.0, "tcp_established": 300, "tcp_closed": 10, "udp": 60,
              "icmp": 30, "other": 60, "high_watermark": 0.9},
    "monitor": {"rate_limit": 1000},
}


@pytest.mark.parametrize("cfg", [Config.default(), config.parse(""), config.parse("[agent]")],
                         ids=["default", "empty", "empty-section"])
def test_every_default(cfg):
    for section, values in DEFAULTS.items():
        for key, want in values.items():
            got = getattr(getattr(cfg, section), key)
            assert got == want and type(got) is type(want), f"{section}.{key}"
    assert cfg.state == State()
    assert cfg.metrics_address() == ("127.0.0.1", 9477)
    assert cfg.datapath_defines() == {
        "XF_FLOW_TABLE_SIZE": 1000000, "XF_MAX_RULE_ENTRIES": 262144, "XF_MAX_MASKS": 32,
        "XF_MAX_ENDPOINTS": 65536, "XF_MAX_ROUTES": 16384, "XF_MAX_PORTS": 1024}


def test_settings_are_frozen():
    cfg = Config.default()
    with pytest.raises(AttributeError):
        cfg.aging.udp = 5


def test_load_names_source_and_reads_values(tmp_path):
    path = _write(tmp_path, """
        [aging]
        udp = 120
        interval = 1      # an integer is a fine number of seconds
    """)
    cfg = config.load(path)
    assert cfg.source == str(path)
    assert cfg.aging.udp == 120
    assert cfg.aging.interval == 1.0 and isinstance(cfg.aging.interval, float)
    assert cfg.aging.tcp_established == 300


# -- errors: each names the key and the line ----------

def test_out_of_range_message_format(tmp_path):
    e = _error(tmp_path, """
        # xdpflow agent
        [agent]
        log_level = "debug"

        [aging]
        tcp_established = 600
        udp = -5
    """)
    assert (e.key, e.line) == ("aging.udp", 7)
    assert str(e) == f"{tmp_path / 'agent.toml'}:7: aging.udp: -5 is out of range 1..86400"


def test_unknown_key(tmp_path):
    e = _error(tmp_path, """
        [agent]
        socket = "/run/x.sock"
        sockt = "/run/y.sock"
    """)
    assert (e.key, e.line) == ("agent.sockt", 3)
    assert "unknown key 'agent.sockt'" in str(e)
    assert "socket" in e.message and "state_dir" in e.message  # the known keys are listed


def test_unknown_section(tmp_path):
    e = _error(tmp_path, """
        [agent]
        log_level = "info"
        [metric]
        listen = ""
    """)
    assert (e.key, e.line) == ("metric", 3)
    assert "unknown section 'metric'" in e.message and "metrics" in e.message


def test_unknown_top_level_key(tmp_path):
    e = _error(tmp_path, 'log_level = "info"\n')
    assert (e.key, e.line) == ("log_level", 1)


@pytest.mark.parametrize("text, key, line, words", [
    ('[aging]\nudp = "60"\n', "aging.udp", 2, "is a string"),
    ("[aging]\nudp = 60.0\n", "aging.udp", 2, "expected an integer"),
    ("[aging]\n\nudp = true\n", "aging.udp", 3, "is a boolean"),
    ('[agent]\nteardown_on_exit = "yes"\n', "agent.teardown_on_exit", 2, "true or false"),
    ("[agent]\nteardown_on_exit = 1\n", "agent.teardown_on_exit", 2, "true or false"),
    ('[agent]\nrequest_timeout = "5"\n', "agent.request_timeout", 2, "expected a number"),
    ("[agent]\nsocket = 5\n", "agent.socket", 2, "expected a string"),
    ("[datapath]\nmax_masks = [32]\n", "datapath.max_masks", 2, "is an array"),
    ("agent = 3\n", "agent", 1, "expected a table"),
])
def test_wrong_type(tmp_path, text, key, line, words):
    e = _error(tmp_path, text)
    assert (e.key, e.line) == (key, line)
    assert words in e.message


@pytest.mark.parametrize("key, value, words", [
    ("agent.request_timeout", "0.01", "out of range 0.1..300"),
    ("agent.request_timeout", "nan", "out of range"),
    ("agent.max_request_bytes", "1023", "out of range 1024..268435456"),
    ("agent.log_level", '"verbose"', "not one of debug, info, warning, error"),
    ("agent.socket", '"run/agent.sock"', "not an absolute path"),
    ("agent.socket", '"/' + "x" * 107 + '"', "unix socket path"),
    ("agent.socket_group", '"xdp flow"', "not a group name"),
    ("agent.admin_group", '"-x"', "not a group name"),
    ("agent.admin_group", "1", "expected a string"),
    ("datapath.flow_table_size", "1023", "out of range 1024..16777216"),
    ("datapath.max_rule_entries", "4194305", "out of range 16..4194304"),
    ("datapath.max_masks", "33", "out of range 1..32"),
    ("datapath.max_masks", "0", "out of range 1..32"),
    ("datapath.max_endpoints", "15", "out of range 16..4194304"),
    ("datapath.max_routes", "1048577", "out of range 16..1048576"),
    ("datapath.max_ports", "1", "out of range 2..65535"),
    ("datapath.xdp_mode", '"offload"', "not one of native, generic"),
    ("aging.interval", "0.01", "out of range 0.05..3600"),
    ("aging.tcp_closed", "0", "out of range 1..86400"),
    ("aging.icmp", "86401", "out of range 1..86400"),
    ("aging.high_watermark", "1.5", "out of range 0.1..1.0"),
    ("metrics.listen", '"127.0.0.1"', "not HOST:PORT"),
    ("metrics.listen", '"::1:9477"', "needs brackets"),
    ("metrics.listen", '"[::1]"', "not [IPV6]:PORT"),
    ("metrics.listen", '"[10.0.0.1]:9477"', "not an IPv6 address"),
    ("metrics.listen", '"127.0.0.1:0"', "out of range 1..65535"),
    ("metrics.listen", '"127.0.0.1:65536"', "out of range 1..65535"),
    ("metrics.listen", '"bad host:80"', "not an address or host name"),
])
def test_out_of_range_and_bad_values(tmp_path, key, value, words):
    section, name = key.split(".")
    e = _error(tmp_path, f"# comment\n[{section}]\n{name} = {value}\n")
    assert (e.key, e.line) == (key, 3)
    assert words in e.message


@pytest.mark.parametrize("listen, address", [
    ("", None),
    ("0.0.0.0:9100", ("0.0.0.0", 9100)),
    ("[::1]:9477", ("::1", 9477)),
    ("[::]:1", ("::", 1)),
    ("localhost:65535", ("localhost", 65535)),
])
def test_metrics_address(listen, address):
    cfg = config.parse(f'[metrics]\nlisten = "{listen}"\n')
    assert cfg.metrics.listen == listen
    assert cfg.metrics_address() == address


@pytest.mark.parametrize("text, line", [
    ('[agent]\nlog_level = "info"\nsocket = /run/x\n', 3),   # unquoted string
    ("[agent]\nlog_level = 'info\n", 2),                      # unterminated string
    ("[aging]\nudp = 1\nudp = 2\n", 3),                       # key defined twice
    ("[aging]\n[aging]\n", 2),                                # table defined twice
])
def test_toml_syntax_error_has_line(tmp_path, text, line):
    e = _error(tmp_path, text)
    assert e.line == line
    assert str(e).startswith(f"{tmp_path / 'agent.toml'}:{line}: ")
    assert "TOML syntax" in e.message and "(at line" not in e.message


def test_syntax_error_names_the_key_on_its_line(tmp_path):
    e = _error(tmp_path, "[aging]\nudp = 1\nudp = 2\n")
    assert e.key == "aging.udp"


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path / "missing.toml")
    assert info.value.line is None and "cannot read" in str(info.value)
    assert str(tmp_path / "missing.toml") in str(info.value)


# -- [state] ----------

STATE = """
[[state.tenants]]
name = "blue"
id = 10
vni = 5010

[[state.tenants]]
name = "red"
id = 11
default = "pass"

[[state.ports]]
name = "vm1"
tenant = "blue"

[[state.ports]]
name = "vm2"
tenant = "red"

[[state.endpoints]]
tenant = "blue"
ip = "10.0.0.5"
port = "vm1"
mac = "02:00:00:00:00:05"

[[state.routes]]
tenant = "blue"
prefix = "0.0.0.0/0"
via = "10.0.0.5"

[[state.rules]]
id = 1
tenant = "blue"
priority = 100
action = "allow"
proto = "tcp"
dport = "22"
src = "192.168.0.0/16"
comment = "ssh"

[[state.rules]]
id = 2
tenant = "blue"
priority = 90
action = "allow"
proto = "icmp"
icmp_type = 8

[[state.rules]]
id = 3
tenant = "red"
priority = 10
action = "deny"
proto = "udp"
sport = "1000-1999"
dst = "2001:db8::/32"
in_port = "vm2"
"""


def test_state_is_parsed():
    cfg = config.parse(STATE)
    assert [t.name for t in cfg.state.tenants] == ["blue", "red"]
    assert cfg.state.tenants[0] == Tenant(name="blue", id=10, vni=5010)
    assert cfg.state.tenants[1].default == "pass"
    assert len(cfg.state.ports) == 2 and len(cfg.state.endpoints) == 1
    r3 = cfg.state.rules[2]
    assert isinstance(r3, Rule)
    assert r3.sport == (1000, 1999) and r3.proto == 17 and r3.in_port == "vm2"
    assert r3.dst == ipaddress.ip_network("2001:db8::/32")


def _line_of_nth(text: str, needle: str, n: int) -> int:
    lines = [i for i, s in enumerate(text.splitlines(), 1) if s.strip() == needle]
    return lines[n]


def test_bad_state_entry_names_index_and_header_line(tmp_path):
    text = STATE.replace('proto = "udp"', 'proto = "udpp"')
    e = _error(tmp_path, text)
    assert e.key == "state.rules[2]"
    assert e.line == _line_of_nth(textwrap.dedent(text).lstrip("\n"), "[[state.rules]]", 2)
    assert "rule 3" in e.message and "proto" in e.message


def test_bad_state_field_value(tmp_path):
    e = _error(tmp_path, STATE.replace('mac = "02:00:00:00:00:05"', 'mac = "01:00:00:00:00:05"'))
    assert e.key == "state.endpoints[0]" and "multicast" in e.message
    assert e.line == _line_of_nth(STATE.lstrip("\n"), "[[state.endpoints]]", 0)


def test_duplicate_tenant_in_state(tmp_path):
    text = STATE + '\n[[state.tenants]]\nname = "blue"\nid = 12\n'
    e = _error(tmp_path, text)
    assert e.key == "state.tenants[2]"
    assert e.line == _line_of_nth(text.lstrip("\n"), "[[state.tenants]]", 2)
    assert "defined twice" in e.message


@pytest.mark.parametrize("old, new, key, words", [
    # A reference to something that does not exist is found by State.validate().
    ('in_port = "vm2"', 'in_port = "vm9"', "state.rules[2]", "unknown port"),
    ('via = "10.0.0.5"', 'via = "10.0.0.6"', "state.routes[0]", "not an endpoint"),
    ('name = "vm2"\ntenant = "red"', 'name = "vm2"\ntenant = "green"', "state.ports[1]",
     "unknown tenant"),
])
def test_inconsistent_state_names_the_entry(tmp_path, old, new, key, words):
    assert old in STATE
    e = _error(tmp_path, STATE.replace(old, new))
    assert e.key == key and words in e.message
    kind, index = key[len("state."):-1].split("[")
    assert e.line == _line_of_nth(STATE.replace(old, new).lstrip("\n"),
                                  f"[[state.{kind}]]", int(index))


def test_state_unknown_kind_and_wrong_shape(tmp_path):
    e = _error(tmp_path, "[[state.tenant]]\nname = 'blue'\nid = 1\n")
    assert (e.key, e.line) == ("state.tenant", 1) and "tenants" in e.message
    e = _error(tmp_path, "[state]\nrules = 4\n")
    assert (e.key, e.line) == ("state.rules", 2)


def test_bad_state_among_many_entries_finds_the_right_one(tmp_path):
    text = "[[state.tenants]]\nname = 't'\nid = 1\n"
    for i in range(1, 200):
        rid = 77 if i == 150 else i   # entry 149 reuses id 77
        text += f"[[state.rules]]\nid = {rid}\ntenant = 't'\npriority = 1\naction = 'allow'\n"
    e = _error(tmp_path, text)
    assert e.key == "state.rules[149]" and "id used twice" in e.message
    assert e.line == 4 + 149 * 5


# -- a full file ----------

FULL = """
[agent]
socket = "/run/xf/ctl.sock"
state_dir = "/srv/xdpflow"
bpffs = "/sys/fs/bpf/xf"
socket_group = "netops"
admin_group = "wheel"
teardown_on_exit = true
log_level = "debug"
request_timeout = 12.5
max_request_bytes = 1048576

[metrics]
listen = "[::1]:9100"

[datapath]
flow_table_size = 2097152
max_rule_entries = 1024
max_masks = 8
max_endpoints = 4096
max_routes = 512
max_ports = 64
xdp_mode = "generic"

[aging]
interval = 0.5
tcp_established = 7200
tcp_closed = 5
udp = 30
icmp = 10
other = 20
high_watermark = 0.75

[monitor]
rate_limit = 500
""" + STATE


def test_full_example_file(tmp_path):
    cfg = config.load(_write(tmp_path, FULL))
    assert cfg.agent.socket == "/run/xf/ctl.sock" and cfg.agent.teardown_on_exit is True
    assert cfg.agent.socket_group == "netops" and cfg.agent.admin_group == "wheel"
    assert cfg.agent.request_timeout == 12.5 and cfg.agent.log_level == "debug"
    assert cfg.metrics_address() == ("::1", 9100)
    assert cfg.datapath_defines() == {
        "XF_FLOW_TABLE_SIZE": 2097152, "XF_MAX_RULE_ENTRIES": 1024, "XF_MAX_MASKS": 8,
        "XF_MAX_ENDPOINTS": 4096, "XF_MAX_ROUTES": 512, "XF_MAX_PORTS": 64}
    assert cfg.datapath.xdp_mode == "generic"
    assert cfg.aging.tcp_established == 7200 and cfg.aging.high_watermark == 0.75
    assert cfg.state == config.parse(STATE).state
    for section, values in DEFAULTS.items():  # nothing was left at its default
        for key, default in values.items():
            assert getattr(getattr(cfg, section), key) != default, f"{section}.{key}"


def test_full_example_round_trips(tmp_path):
    cfg = config.load(_write(tmp_path, FULL))
    again = config.parse(cfg.to_toml())
    assert again == cfg
    assert again.state.to_dict() == cfg.state.to_dict()
    assert config.parse(Config.default().to_toml()) == Config.default()


def test_configs_differing_in_one_value_are_not_equal():
    assert config.parse("[aging]\nudp = 61\n") != Config.default()
