"""The agent's TOML config file -> validated, typed, frozen settings.

Every error names the dotted key that is wrong and, when it can be found, the line, so
`xdpflow-agent --check` can point an operator at the exact spot:

    agent.toml:7: aging.udp: -5 is out of range 1..86400
"""
from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11: the same parser under its old name
    import tomli as tomllib  # type: ignore[no-redef]

from agent.model import KINDS, Invalid, State


class ConfigError(Exception):
    """A config file that cannot be used. `key` is the dotted path ("aging.udp",
    "state.rules[2]") or None when no key can be named; `line` is 1-based or None."""

    def __init__(self, message: str, key: Optional[str] = None, line: Optional[int] = None,
                 source: str = "<string>"):
        self.message = message
        self.key = key
        self.line = line
        self.source = source
        where = source if line is None else f"{source}:{line}"
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


# ---------------------------------------------------------------------------------------
# Value checkers. Each takes the raw TOML value and returns the typed value or raises
# ValueError with a message; the caller adds the key and line. They are strict on purpose:
# TOML has real types, so "60" where 60 belongs is a mistake worth reporting.

def _describe(value: Any) -> str:
    kinds = {str: "a string", bool: "a boolean", int: "an integer", float: "a number",
             list: "an array", dict: "a table"}
    return f"{value!r} is {kinds.get(type(value), type(value).__name__)}"


def _int(lo: int, hi: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{_describe(value)}, expected an integer {lo}..{hi}")
        if not lo <= value <= hi:
            raise ValueError(f"{value} is out of range {lo}..{hi}")
        return value
    return check


def _number(lo: float, hi: float) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        # An integer is a fine number of seconds; a boolean is not.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{_describe(value)}, expected a number {lo}..{hi}")
        if not lo <= value <= hi:  # also refuses nan, which compares false
            raise ValueError(f"{value} is out of range {lo}..{hi}")
        return float(value)
    return check


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{_describe(value)}, expected true or false")
    return value


def _choice(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return value
    return check


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{_describe(value)}, expected a string")
    return value


def _abspath(value: Any) -> str:
    value = _string(value)
    if not value.startswith("/") or "\0" in value:
        raise ValueError(f"{value!r} is not an absolute path")
    return value


def _socket_path(value: Any) -> str:
    value = _abspath(value)
    # sun_path holds 108 bytes including the terminating NUL; longer fails only at bind().
    if len(value.encode()) > 107:
        raise ValueError(f"{value!r} is longer than a unix socket path may be (107 bytes)")
    return value


_GROUP_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")


def _group(value: Any) -> str:
    # Only the form: whether the group exists is a runtime question (the daemon falls
    # back to root), and a config must stay checkable on a machine without it.
    value = _string(value)
    if not _GROUP_RE.match(value):
        raise ValueError(f"{value!r} is not a group name")
    return value


def _group_or_none(value: Any) -> str:
    """A group name, or "" for none."""
    return _group(value) if _string(value) else ""


_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$")


def _split_listen(value: str) -> Tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' -> (host, port); host without brackets."""
    if value.startswith("["):
        m = re.fullmatch(r"\[([^\]]+)\]:(\d{1,5})", value)
        if not m:
            raise ValueError(f"{value!r} is not [IPV6]:PORT")
        host, port = m.group(1), m.group(2)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in {value!r} is not an IPv6 address") from None
    else:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"{value!r} is not HOST:PORT (or \"\" to disable metrics)")
        if ":" in host:
            raise ValueError(f"{value!r}: an IPv6 address needs brackets, as in [::1]:9477")
        if not _HOST_RE.match(host):
            raise ValueError(f"{host!r} in {value!r} is not an address or host name")
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"port {int(port)} in {value!r} is out of range 1..65535")
    return host, int(port)


def _listen(value: Any) -> str:
    value = _string(value)
    if value:
        _split_listen(value)
    return value


def _setting(default: Any, check: Callable[[Any], Any]) -> Any:
    """A dataclass field that carries its own checker, so each setting's default and rule
    live on one line."""
    return field(default=default, metadata={"check": check})


# ---------------------------------------------------------------------------------------
# The sections. Field names are the TOML keys.

@dataclass(frozen=True)
class AgentSettings:
    socket: str = _setting("/run/xdpflow/agent.sock", _socket_path)
    state_dir: str = _setting("/var/lib/xdpflow", _abspath)
    bpffs: str = _setting("/sys/fs/bpf/xdpflow", _abspath)
    socket_group: str = _setting("xdpflow", _group)  # owns the socket (0660): may read
    # May run changing commands besides root; "" (the default): root only, so the socket
    # group is a read-only tier unless an operator names an admin group.
    admin_group: str = _setting("", _group_or_none)
    teardown_on_exit: bool = _setting(False, _bool)
    log_level: str = _setting("info", _choice("debug", "info", "warning", "error"))
    request_timeout: float = _setting(5.0, _number(0.1, 300))
    max_request_bytes: int = _setting(4 * 1024 * 1024, _int(1024, 256 * 1024 * 1024))


@dataclass(frozen=True)
class MetricsSettings:
    listen: str = _setting("127.0.0.1:9477", _listen)  # "" disables the exporter
    # The kernel's run time and run count of the XDP program (agent/bpfstats.py): opt-in,
    # since counting costs every BPF program on the node two clock reads per run.
    bpf_stats: bool = _setting(False, _bool)
    # Per-rule packets and bytes as metrics (xdpflow_rule_packets_total, ..._bytes_total):
    # a series per rule, so opt-in; `xdpflowctl rule list` shows them either way.
    rule_counters: bool = _setting(False, _bool)


@dataclass(frozen=True)
class DatapathSettings:
    flow_table_size: int = _setting(1000000, _int(1024, 16777216))
    max_rule_entries: int = _setting(262144, _int(16, 4194304))
    # The verifier walks the classifier's mask loop: at 64 the trace build takes 40% of
    # its budget on 6.18 (tests/bpf/test_limits.py loads both builds at the limit).
    max_masks: int = _setting(32, _int(1, 32))   # NAT's hooks: see README (Masks)
    max_endpoints: int = _setting(65536, _int(16, 4194304))
    max_routes: int = _setting(16384, _int(16, 1048576))
    max_ports: int = _setting(1024, _int(2, 65535))
    xdp_mode: str = _setting("native", _choice("native", "generic"))


_timeout = _int(1, 86400)


@dataclass(frozen=True)
class AgingSettings:
    interval: float = _setting(2.0, _number(0.05, 3600))
    tcp_established: int = _setting(300, _timeout)
    tcp_closed: int = _setting(10, _timeout)
    udp: int = _setting(60, _timeout)
    icmp: int = _setting(30, _timeout)
    other: int = _setting(60, _timeout)
    # Above this fill the sweeper evicts the oldest flows early (reason "table_full").
    high_watermark: float = _setting(0.9, _number(0.1, 1.0))


@dataclass(frozen=True)
class MonitorSettings:
    # Events a second, per CPU, the datapath may send to `xdpflowctl monitor` listeners.
    rate_limit: int = _setting(1000, _int(1, 1000000))


@dataclass(frozen=True)
class FlowsSettings:
    # Flow-table entries a tenant may hold unless it has its own --max-flows (a flow and
    # its reply are two); over it, its new flows are judged but not cached. 0: no quota.
    max_per_tenant: int = _setting(0, _int(0, (1 << 32) - 1))


_SECTIONS = {"agent": AgentSettings, "metrics": MetricsSettings,
             "datapath": DatapathSettings, "aging": AgingSettings,
             "monitor": MonitorSettings, "flows": FlowsSettings}


@dataclass(frozen=True)
class Config:
    agent: AgentSettings = field(default_factory=AgentSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    datapath: DatapathSettings = field(default_factory=DatapathSettings)
    aging: AgingSettings = field(default_factory=AgingSettings)
    monitor: MonitorSettings = field(default_factory=MonitorSettings)
    flows: FlowsSettings = field(default_factory=FlowsSettings)
    state: State = field(default_factory=State)  # declarative initial state, may be empty
    # Where it came from, for messages; two configs with the same settings are equal.
    source: str = field(default="<default>", compare=False)

    @classmethod
    def default(cls) -> "Config":
        return cls()

    def datapath_defines(self) -> Dict[str, int]:
        """The `-D` macro values the datapath is compiled with."""
        d = self.datapath
        return {"XF_FLOW_TABLE_SIZE": d.flow_table_size,
                "XF_MAX_RULE_ENTRIES": d.max_rule_entries,
                "XF_MAX_MASKS": d.max_masks,
                "XF_MAX_ENDPOINTS": d.max_endpoints,
                "XF_MAX_ROUTES": d.max_routes,
                "XF_MAX_PORTS": d.max_ports}

    def metrics_address(self) -> Optional[Tuple[str, int]]:
        """(host, port) to serve metrics on, host without IPv6 brackets; None if disabled."""
        if not self.metrics.listen:
            return None
        return _split_listen(self.metrics.listen)

    def to_toml(self) -> str:
        """The config as a TOML file that parses back to an equal Config."""
        out: List[str] = []
        for name in _SECTIONS:
            out.append(f"[{name}]")
            section = getattr(self, name)
            for f in dataclasses.fields(section):
                out.append(f"{f.name} = {_toml_value(getattr(section, f.name))}")
            out.append("")
        for kind in KINDS:
            for obj in getattr(self.state, kind):
                out.append(f"[[state.{kind}]]")
                out.extend(f"{k} = {_toml_value(v)}" for k, v in obj.to_dict().items()
                           if v is not None)
                out.append("")
        return "\n".join(out)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    # A JSON string uses only escapes that TOML basic strings also define.
    return json.dumps(v)


# ---------------------------------------------------------------------------------------
# Where keys are. tomllib keeps no positions, so scan the text for table headers and
# `key =` lines. Good enough for this flat format; anything it cannot place falls back to
# the line of the nearest enclosing table, or no line at all.

_HEADER_RE = re.compile(r"""^\s*(\[\[?)\s*([A-Za-z0-9_."' -]+?)\s*\]\]?\s*(#.*)?$""")
_KEY_RE = re.compile(r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
                     r"""(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*=""")


def _dotted(key: str) -> str:
    parts = re.findall(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""", key)
    return ".".join(p.strip("\"'") for p in parts)


class _Lines:
    def __init__(self, text: str):
        self.of_key: Dict[str, int] = {}
        self.key_at: Dict[int, str] = {}  # what the line defines, or the table it is in
        counts: Dict[str, int] = {}
        table = ""
        in_multiline = None  # the quote that opened a multi-line string, if inside one
        for n, line in enumerate(text.splitlines(), 1):
            if in_multiline:
                if line.count(in_multiline) % 2:
                    in_multiline = None
                self.key_at[n] = table
                continue
            m = _HEADER_RE.match(line)
            if m:
                name = _dotted(m.group(2))
                if m.group(1) == "[[":
                    # Each [[a.b]] starts entry a.b[i]; it names the entry.
                    i = counts[name] = counts.get(name, -1) + 1
                    name = f"{name}[{i}]"
                table = name
                self.of_key.setdefault(table, n)
                self.key_at[n] = table
                continue
            m = _KEY_RE.match(line)
            if m:
                key = f"{table}.{_dotted(m.group(1))}" if table else _dotted(m.group(1))
                self.of_key.setdefault(key, n)
                self.key_at[n] = key
                for quote in ('"""', "'''"):
                    if line.count(quote) % 2:
                        in_multiline = quote
            else:
                self.key_at[n] = table

    def find(self, key: str) -> Optional[int]:
        """The line of `key`, else of the closest enclosing key or table that is written."""
        while key:
            if key in self.of_key:
                return self.of_key[key]
            if f"{key}[0]" in self.of_key:  # an array of tables: where it begins
                return self.of_key[f"{key}[0]"]
            key = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", key) if re.search(r"[.\[]", key) else ""
        return None


# ---------------------------------------------------------------------------------------

def load(path) -> Config:
    """Read and check the config file at `path`."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", source=source) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text (byte {e.start})", source=source) from None
    return parse(text, source)


def parse(text: str, source: str = "<string>") -> Config:
    """Check config text; `source` names it in errors."""
    lines = _Lines(text)

    def error(message: str, key: Optional[str]) -> ConfigError:
        return ConfigError(message, key, lines.find(key) if key else None, source)

    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = re.search(r"\s*\(at line (\d+), column \d+\)$", msg)
        line = int(m.group(1)) if m else None
        if m:
            msg = msg[:m.start()]
        elif msg.endswith(" (at end of document)"):
            msg = msg[:-len(" (at end of document)")]
            line = max(1, text.count("\n") + (0 if text.endswith("\n") else 1))
        raise ConfigError(f"TOML syntax: {msg}", lines.key_at.get(line) or None, line,
                          source) from None
    except RecursionError:
        # tomllib recurses per nested array or table: thousands of "[" end its parse with
        # RecursionError, not TOMLDecodeError (found by the fuzz tests, issue 14).
        raise ConfigError("TOML syntax: arrays or tables nested too deeply",
                          source=source) from None

    known = sorted([*_SECTIONS, "state"])
    for name in doc:
        if name not in known:
            raise error(f"unknown section {name!r}{_known(name, known)}", name)

    sections = {}
    for name, cls in _SECTIONS.items():
        sections[name] = _section(cls, name, doc.get(name, {}), error)
    state = _state(doc.get("state", {}), lines, error, source)
    return Config(state=state, source=source, **sections)


def _known(name: str, known: List[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f" (known: {', '.join(known)}){hint}"


def _section(cls, name: str, raw: Any, error):
    if not isinstance(raw, dict):
        raise error(f"{_describe(raw)}, expected a table [{name}]", name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    known = sorted(fields)
    for key in raw:
        if key not in fields:
            dotted = f"{name}.{key}"
            raise error(f"unknown key {dotted!r}{_known(key, known)}", dotted)
    values = {}
    for key, value in raw.items():
        try:
            values[key] = fields[key].metadata["check"](value)
        except ValueError as e:
            raise error(str(e), f"{name}.{key}") from None
    return cls(**values)


def _state(raw: Any, lines: _Lines, error, source: str) -> State:
    if not isinstance(raw, dict):
        raise error(f"{_describe(raw)}, expected a table [state]", "state")
    for kind in raw:
        if kind not in KINDS:
            raise error(f"unknown key {'state.' + kind!r}{_known(kind, list(KINDS))}",
                        f"state.{kind}")
    # Entry by entry rather than State.from_dict in one go, so an error can name which
    # [[state.KIND]] entry is wrong.
    st = State()
    for kind, typ in KINDS.items():
        items = raw.get(kind, [])
        if not isinstance(items, list):
            raise error(f"{_describe(items)}, expected an array of tables [[state.{kind}]]",
                        f"state.{kind}")
        objs = []
        for i, item in enumerate(items):
            key = f"state.{kind}[{i}]"
            try:
                objs.append(typ.from_dict(item))
            except Invalid as e:
                # The header of the entry, not the field: that is where the entry begins.
                raise ConfigError(str(e), key, lines.find(key), source) from None
        setattr(st, kind, objs)
    try:
        st.validate()
    except Invalid as e:
        kind, i = _first_invalid(st)
        key = f"state.{kind}[{i}]"
        raise ConfigError(str(e), key, lines.find(key), source) from None
    return st


def _first_invalid(st: State) -> Tuple[str, int]:
    """Which entry makes `st.validate()` fail. validate() only checks entries against
    earlier ones and earlier kinds, so failure is monotone in the length of a prefix:
    find the kind, then bisect for the shortest failing prefix of it."""
    def fails(kind: str, n: int) -> bool:
        trial = State()
        for k in KINDS:
            if k == kind:
                setattr(trial, k, getattr(st, k)[:n])
                break
            setattr(trial, k, getattr(st, k))
        try:
            trial.validate()
        except Invalid:
            return True
        return False

    for kind in KINDS:
        items = getattr(st, kind)
        if fails(kind, len(items)):
            lo, hi = 1, len(items)  # fails(hi); find the least such
            while lo < hi:
                mid = (lo + hi) // 2
                if fails(kind, mid):
                    hi = mid
                else:
                    lo = mid + 1
            return kind, lo - 1
    raise AssertionError("validate() failed but no prefix of the state fails")
