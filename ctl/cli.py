"""xdpflowctl: the operator's command line for a node's agent. Parses a command (parsers
and help come from the agent's command table), sends it over the control socket and prints
the answer as text or, with --json, as exactly one JSON document.

Exit status: 0 done; 1 the agent refused (the node's state is at odds with the request),
denied, failed (a port whose attach failed included), or cannot be reached; 2 bad usage or
input (argument errors, invalid values, unreadable or malformed files, bad Scapy).
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import signal
import sys
import textwrap
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from agent import VERSION, commands, model
from agent.api import DEFAULT_SOCKET, ApiClient, ApiError, RawJSON
from agent.bulk import no_collector_passes
from agent.commands import MAX_FLOW_DUMP

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2
# Which side is wrong decides the status: the input (2) or the agent's state or itself (1).
USAGE_CODES = {"invalid", "bad-request", "usage"}

SCAPY_NAMES = ("Ether", "Dot1Q", "ARP", "IP", "IPv6", "TCP", "UDP", "ICMP",
               "ICMPv6EchoRequest", "ICMPv6EchoReply", "ICMPv6ND_NS", "ICMPv6ND_NA",
               "ICMPv6DestUnreach", "IPv6ExtHdrHopByHop", "IPv6ExtHdrFragment",
               "IPv6ExtHdrRouting", "VXLAN", "GRE", "Raw", "Padding")


class UsageError(Exception):
    """Bad usage or input found on this side; exit 2."""


class _Parser(argparse.ArgumentParser):
    """A parser that raises UsageError, and may be built when argparse first comes to it
    (`fill`, see build_parser)."""

    def __init__(self, *args: Any, fill: Optional[Callable[["_Parser"], None]] = None,
                 **kw: Any):
        super().__init__(*args, **kw)
        self._fill = fill

    def filled(self) -> "_Parser":
        fill, self._fill = self._fill, None
        if fill:
            fill(self)
        return self

    # Every way argparse or a caller reads a parser goes through one of these.
    def parse_known_args(self, args=None, namespace=None):
        return super(_Parser, self.filled()).parse_known_args(args, namespace)

    def _parse_known_args(self, *args, **kw):
        return super(_Parser, self.filled())._parse_known_args(*args, **kw)

    def format_usage(self):
        return super(_Parser, self.filled()).format_usage()

    def format_help(self):
        return super(_Parser, self.filled()).format_help()

    # argparse prints and exits on its own; raising lets main() keep --json's promise of
    # one JSON document on stdout.
    def error(self, message):
        # main() puts "xdpflowctl: " in front; the command's own words follow once.
        where = self.prog.partition(" ")[2]
        raise UsageError(f"{where + ': ' if where else ''}{message}\n"
                         f"{self.format_usage().rstrip()}")


def build_parser(lazy: bool = False) -> argparse.ArgumentParser:
    """The parser of every command in the table. `lazy` (what main does): a command's
    parser gets its arguments and help when argparse comes to it, so a command pays to
    build its own parser only (all 29 took 15-20 ms of every command's start)."""
    p = _Parser(prog="xdpflowctl", description="Configure and inspect the node's xdpflow "
                                               "agent over its control socket.",
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="commands:\n" + "\n".join(
                    f"  {c.name:<15} {c.help}" for c in commands.COMMANDS.values()))
    p.add_argument("--socket", metavar="PATH",
                   default=os.environ.get("XDPFLOW_SOCKET") or DEFAULT_SOCKET,
                   help="the agent's control socket (env XDPFLOW_SOCKET; default "
                        f"{DEFAULT_SOCKET})")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long to wait for the agent (default 30)")
    p.add_argument("--version", action="version", version=f"xdpflowctl {VERSION}")
    top = p.add_subparsers(dest="_noun", metavar="COMMAND", required=True)
    verbs: Dict[str, List[commands.Command]] = {}
    for cmd in commands.COMMANDS.values():
        noun, _, verb = cmd.name.partition(" ")
        if verb:
            verbs.setdefault(noun, []).append(cmd)
    for cmd in commands.COMMANDS.values():      # in the table's order, as help lists them
        noun, _, verb = cmd.name.partition(" ")
        if not verb:
            _add_choice(top, noun, cmd.help, functools.partial(_fill_leaf, cmd), lazy)
        elif verbs[noun][0] is cmd:
            _add_choice(top, noun, f"{noun} commands",
                        functools.partial(_fill_noun, verbs[noun], lazy), lazy)
    return p


def _add_choice(sub: Any, name: str, help: str, fill: Callable[[_Parser], None],
                lazy: bool) -> None:
    parser = sub.add_parser(name, help=help, fill=fill)
    if not lazy:
        parser.filled()


def _fill_noun(cmds: List[commands.Command], lazy: bool, parser: _Parser) -> None:
    """A noun's parser ("rule"): its actions."""
    sub = parser.add_subparsers(dest="_verb", metavar="ACTION", required=True)
    for cmd in cmds:
        _add_choice(sub, cmd.name.split()[1], cmd.help, functools.partial(_fill_leaf, cmd),
                    lazy)


def _fill_leaf(cmd: commands.Command, parser: _Parser) -> None:
    """A command's parser: its help and arguments."""
    parser.description = textwrap.fill(cmd.help + ".", 78) + (
        "\n\n" + textwrap.fill(cmd.description, 78) if cmd.description else "")
    parser.epilog = "examples:\n" + cmd.examples
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    _add_args(parser, cmd)
    # Also after the command ("tenant list --json"); SUPPRESS keeps the leaf from
    # overwriting a --json given before it.
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print one JSON document")
    parser.set_defaults(_command=cmd.name)


def _add_args(parser: argparse.ArgumentParser, cmd: commands.Command) -> None:
    groups = {}
    for names, required in cmd.exclusive:
        g = parser.add_mutually_exclusive_group(required=required)
        for n in names:
            groups[n] = g
    for a in cmd.args:
        if not a.cli:
            continue
        target = groups.get(a.name, parser)
        kw: Dict[str, Any] = {"help": a.help}
        if a.kind == "flag":
            kw["action"] = "store_true"
        elif a.kind == "list":
            kw["action"] = "append"
            kw["metavar"] = a.metavar
        else:
            kw["metavar"] = a.metavar
            if a.kind in ("int", "float"):
                kw["type"] = int if a.kind == "int" else float
            if a.choices:
                kw["choices"] = a.choices
                kw.pop("metavar")
            if a.default is not None:
                kw["default"] = a.default
        if a.positional:
            target.add_argument(a.name, **kw)
        else:
            if a.name not in groups:
                kw["required"] = a.required
            target.add_argument(*a.flags, dest=a.name, **kw)


def leaf_commands(parser: argparse.ArgumentParser) -> List[str]:
    """Every command the parser accepts, as its table name ("rule add")."""
    out = []

    def walk(p, prefix):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, prefix + [name])
        if p._defaults.get("_command"):
            out.append(" ".join(prefix))
    walk(parser, [])
    return out


# ---------------------------------------------------------------------------------------
# Turning CLI-only arguments into wire arguments.

class StateFile:
    """An apply file's text and data, to name the line of what an error is about."""

    def __init__(self, path: str, text: str, data: Optional[Dict[str, Any]],
                 wire: Optional[str] = None):
        """`data` None: parsed (and its outline checked) when first asked for, which
        apply does only to name the place of an error: a JSON file's text is sent as it
        is (RawJSON), a big TOML file's `wire` was made from its halves (_parse_halves).
        `wire`: a TOML file's data as JSON text (made once, when checking that it holds
        no dates)."""
        self.path = path if path != "-" else "<stdin>"
        self._path = path
        if data is not None:
            self.data = data
        self._text = text
        self._wire = wire
        self.is_json = is_json_file(path)

    @functools.cached_property
    def data(self) -> Dict[str, Any]:
        data = (_parse_json_state(self._path, self._text) if self.is_json else
                _parse_state_text(self._path, self._text)[0])
        self.__dict__["data"] = data        # check_shape reads it
        self.check_shape()
        return data

    def wire_state(self) -> Any:
        """What apply sends as its state, as JSON text: a JSON file's own, unparsed (the
        agent parses it anyway; a 100,000-rule file took the client 0.2 s to parse and
        encode again), a TOML file's data encoded once."""
        if self._wire is not None:
            return RawJSON(self._wire)
        return RawJSON(self._text) if "data" not in self.__dict__ else self.data

    @functools.cached_property
    def lines(self) -> Any:
        """Indexed when an error needs a line (a 100,000-rule file takes seconds)."""
        from agent.config import _Lines     # with tomllib: imported when an error needs it
        return _Lines(self._text)

    def at(self, key: str) -> str:
        """Where `key` ("rules[3].src") is written: "FILE:LINE" in TOML. A JSON file's
        text is not indexed (it may be one line): "FILE: rules[3].src" names the place."""
        if self.is_json:
            return f"{self.path}: {key}"
        line = self.lines.find(key)
        return f"{self.path}:{line}" if line else self.path

    def where(self, kind: str, i: int, field: str = "") -> str:
        return self.at(f"{kind}[{i}]" + (f".{field}" if field else ""))

    def check_shape(self, outline: Optional[Dict[str, Any]] = None) -> None:
        """What the file's outline shows wrong: an unknown table, a kind that is not a
        list. The objects themselves the agent checks, once (model.State.from_apply),
        and its error says where the object is (placed()). `outline`: data with the
        file's tables in the file's order and lists where the file has them (a split
        file's first half: its second holds only more rules)."""
        data = self.data if outline is None else outline
        for name in data:
            if name not in model.KINDS:
                raise UsageError(f"{self.at(name)}: unknown table "
                                 f"{name!r} (known: {', '.join(model.KINDS)})")
        for kind in model.KINDS:
            items = data.get(kind) or []
            if not isinstance(items, list):
                shape = "a list of objects" if self.is_json else f"an array of tables [[{kind}]]"
                raise UsageError(f"{self.path}: {kind} must be {shape}")

    def placed(self, e: ApiError) -> str:
        """An agent's error about an object of this file, named by the object's place:
        "FILE:LINE: rule 7: dport: ..." (what check() says of the same object)."""
        message = e.message
        if e.first_at and not self.is_json:
            message = message.replace(f"(first at {e.first_at})",
                                      f"(first at line {self.lines.find(e.first_at)})")
        return f"{self.at(e.at)}: {message}"

    def check(self) -> None:
        """What the file alone shows wrong: a bad value, an object given twice, checked
        here without the agent (when it cannot be reached, to still name the file's
        mistakes). What it is at odds with on the node, the agent says; locate() finds
        its line."""
        self.check_shape()
        for kind, typ in model.KINDS.items():
            items = self.data.get(kind) or []
            seen: Dict[Any, int] = {}
            for i, item in enumerate(items):
                try:
                    obj = typ.from_dict(item)
                except model.Invalid as e:
                    field = e.where.partition(": ")[2] if ": " in e.where else ""
                    unknown = re.match(r"unknown field '([^']+)'", e.message)
                    field = unknown.group(1) if unknown else field
                    raise UsageError(f"{self.where(kind, i, field)}: {e}") from None
                ident = model.identity(kind, obj)
                if ident in seen:
                    first = (f"{kind}[{seen[ident]}]" if self.is_json else
                             f"line {self.lines.find(f'{kind}[{seen[ident]}]')}")
                    raise UsageError(f"{self.where(kind, i)}: {_ident_text(kind, ident)}: "
                                     f"given twice (first at {first})")
                seen[ident] = i

    def locate(self, message: str) -> Optional[str]:
        """The file position of the object an agent error names ("rule 7: ...")."""
        for kind, typ in model.KINDS.items():
            for i, item in enumerate(self.data.get(kind) or []):
                try:
                    ident = _ident_text(kind, model.identity(kind, typ.from_dict(item)))
                except model.Invalid:
                    continue
                if message.startswith(ident + ":") or message.startswith(ident + " "):
                    return self.where(kind, i)
        return None


def _ident_text(kind: str, ident) -> str:
    """How the model names an object in its errors: "rule 7", "route blue/10.0.0.0/8"."""
    return f"{kind[:-1]} {'/'.join(str(x) for x in ident)}"


def is_json_file(path: str) -> bool:
    """An apply file named *.json is JSON (the same schema; json's C parser reads a
    100,000-rule file 20x faster than tomllib); anything else, stdin too, is TOML."""
    return path.lower().endswith(".json")


def load_state_file(path: str) -> Dict[str, Any]:
    """A TOML (or *.json) desired-state file -> the dict model.State.from_dict takes
    (syntax checked; the lab reads its files with it too)."""
    return _read_state_file(path)[1]


def check_state_file(path: str) -> StateFile:
    """A desired-state file, read and checked object by object."""
    f = read_state_file(path)
    f.check()
    return f


def read_state_file(path: str, raw_json: bool = False) -> StateFile:
    """A desired-state file, read and its outline checked (what apply sends: the agent
    checks the objects). With `raw_json` (apply: what it needs is the wire text), a JSON
    file is only read, and a big TOML file is parsed in two halves at once when that is
    sure to mean the same (_parse_halves); either is parsed whole when its data is first
    asked for (StateFile.data)."""
    if raw_json and is_json_file(path):
        return StateFile(path, _read_text(path), None)
    text = _read_text(path)
    halves = _parse_halves(text) if raw_json else None
    if halves:
        outline, wire = halves
        f = StateFile(path, text, None, wire)
        f.check_shape(outline)
        return f
    f = StateFile(path, text, *_parse_state_text(path, text))
    f.check_shape()
    return f


def _read_text(path: str) -> str:
    try:
        if path == "-":
            raw = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_state_file(path: str) -> Tuple[str, Dict[str, Any], Optional[str]]:
    """(text, data, the data as JSON text: what apply sends; None for a JSON file)."""
    text = _read_text(path)
    return (text, *_parse_state_text(path, text))


def _tomllib() -> Any:
    """tomllib (tomli before Python 3.11: pyproject pulls it in there), imported when
    needed: rtoml reads plain files, and every command would pay its import (5 ms)."""
    try:
        import tomllib
    except ModuleNotFoundError:
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib


def _tomllib_loads(text: str) -> Dict[str, Any]:
    return _tomllib().loads(text)


def _parse_state_text(path: str, text: str) -> Tuple[Dict[str, Any], Optional[str]]:
    """A state file's text -> (data, the data as JSON text: None for a JSON file)."""
    # An except clause's class is looked up only when an exception arrives: tomllib is
    # imported for an error, not for every file rtoml reads.
    try:
        if is_json_file(path):
            return _parse_json_state(path, text), None
        data = _parse_toml(text, _tomllib_loads)
    except _tomllib().TOMLDecodeError as e:
        # tomllib's message ends "(at line L, column C)", which is what the user needs.
        raise UsageError(f"{path}: TOML syntax error: {e}") from None
    except RecursionError:
        # tomllib recurses per nested array or table: thousands of "[" end its parse with
        # RecursionError, not TOMLDecodeError (found by the fuzz tests, issue 14).
        raise UsageError(f"{path}: arrays or tables nested too deeply") from None
    try:
        wire = _json_text(data)
    except (TypeError, ValueError):
        try:
            _tomllib_loads(text)    # a time without seconds is TOML 1.1 (rtoml): its error
        except _tomllib().TOMLDecodeError as e:
            raise UsageError(f"{path}: TOML syntax error: {e}") from None
        raise UsageError(f"{path}: dates and times are not accepted in a state file") from None
    return data, wire


def _json_text(data: Any) -> str:
    """The wire's JSON text of a file's data (TypeError for a date or time: TOML has
    them, JSON and a state file do not)."""
    return json.dumps(data, separators=(",", ":"))


# What TOML 1.1 adds, and rtoml (which reads 1.1) would accept where tomllib (1.0) refuses:
# inline tables over lines or with a trailing comma, \e and \xHH escapes (a file with
# any "{", or any backslash before e or x, is read by tomllib), and times without seconds
# (read as times, which a state file refuses: _read_state_file then asks tomllib). So an
# apply file means what it meant and is refused as it was.
_TOML_1_1 = ("{", "\\e", "\\x")


def _parse_toml(text: str, loads: Callable[[str], Dict[str, Any]]) -> Dict[str, Any]:
    """TOML text -> data: rtoml (Rust, 5x tomllib on a big file) when it is installed
    and the text is plain TOML 1.0; tomllib (`loads`) otherwise, and for every error, so
    its message (with line and column) is what the user sees."""
    try:
        import rtoml
    except ImportError:
        return loads(text)
    if any(s in text for s in _TOML_1_1):
        return loads(text)
    try:
        return rtoml.loads(text)
    except rtoml.TomlParsingError:
        return loads(text)


# A big TOML file is parsed on two cores (a 100,000-rule file: rtoml 0.5 s and its JSON
# text 0.1 s on one, most of a TOML apply's client time): split at a line that is exactly
# [[rules]] past the middle, the second half parsed and encoded by a forked child while
# this process does the first, and the JSON texts spliced. The split is taken only when
# the whole text is sure to mean what the halves do, else the whole is parsed as before
# (which gives every error):
# - the first half parses alone: then its end is between two expressions of the whole
#   (not inside a multi-line string or array, which would not close there), and the
#   split line is a real [[rules]] header that starts the second half anew;
# - the second half's top level holds only `rules`: every table it defines or extends
#   (sub-tables like [rules.x] too) lies in rules it appends itself, so nothing of the
#   first half is extended or redefined;
# - the first half's `rules`, if it has one, is an array of [[rules]] tables, which the
#   second half may append to (a static array, `rules = [...]`, may not be): a list of
#   tables, since without inline tables ("{": none in the text) no static array holds one;
# - no TOML 1.1 (_TOML_1_1: the whole goes to tomllib), rtoml installed, this process
#   has one thread (fork copies only the calling one) and may run on two CPUs (on one,
#   the halves cost 10-20% more than the whole: the fork, the pipe, the child's exit);
# - a date or time in either half, or the child failing in any way: not split.
SPLIT_ABOVE = 1 << 20           # characters of TOML parsed in two halves at once
_SPLIT_LINE = "[[rules]]"


def _split_at(text: str) -> int:
    """Where the second half starts: the first line at or past the middle that is exactly
    [[rules]] (LF or CRLF); -1: none."""
    head = "\n" + _SPLIT_LINE
    i = text.find(head, len(text) // 2)
    while i >= 0:
        end = i + len(head)
        if end == len(text) or text.startswith("\n", end) or text.startswith("\r\n", end):
            return i + 1
        i = text.find(head, end)
    return -1


def _parse_halves(text: str) -> Optional[Tuple[Dict[str, Any], str]]:
    """A big TOML text parsed in two halves at once: (the first half's data, which holds
    every table of the file but the second half's rules, for check_shape; the whole
    file's wire text, the same as _parse_state_text's), or None: parse it whole."""
    if len(text) < SPLIT_ABOVE or "{" in text or any(s in text for s in _TOML_1_1):
        return None
    at = _split_at(text)
    if at < 0 or _threads() > 1 or len(os.sched_getaffinity(0)) < 2:
        return None
    try:
        import rtoml
    except ImportError:
        return None
    parent = os.getpid()
    try:
        r, w = os.pipe()
    except OSError:                                # out of descriptors: one core will do
        return None
    try:
        pid = os.fork()
    except OSError:                                # out of processes or memory: likewise
        os.close(r)
        os.close(w)
        return None
    if pid == 0:                                   # the child: never returns
        os.close(r)
        _second_half_child(rtoml, text[at:], w, parent)
    os.close(w)
    try:
        try:
            first = rtoml.loads(text[:at])
            rules = first.get("rules")
            if rules is not None and not (isinstance(rules, list) and rules
                                          and isinstance(rules[0], dict)):
                return None
            parts = {k: _json_text(v) for k, v in first.items()}
        except Exception:           # a syntax error, a date: the whole parse says which
            return None
        with os.fdopen(r, "rb", closefd=False) as pipe:
            theirs = pipe.read()
        _, status = os.waitpid(pid, 0)
        pid = 0
        if status != 0 or theirs[:1] != b"1":
            return None
    finally:
        os.close(r)
        if pid:             # this process is leaving early (an error, Ctrl-C)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    more = theirs[1:].decode("ascii")              # json.dumps' text is ASCII
    mine = parts.pop("rules", "[]")
    parts["rules"] = mine[:-1] + ("," if len(mine) > 2 < len(more) else "") + more[1:]
    if "rules" in first:                           # the file's order, as the whole parse
        parts = {k: parts[k] for k in first}
    return first, "{" + ",".join(json.dumps(k) + ":" + v for k, v in parts.items()) + "}"


def _threads() -> int:
    """Threads of this process (1 unless something started one)."""
    threading = sys.modules.get("threading")
    return threading.active_count() if threading else 1


def _second_half_child(rtoml: Any, text: str, w: int, parent: int) -> None:
    """In the forked child: "1" and the JSON text of the half's rules on `w`, or "0"
    (anything but rules at its top level, a syntax error, a date); then exit at once
    (no atexit handlers, no flush of the parent's buffers). It dies with its parent."""
    code = 1
    try:
        from agent.child import die_with
        die_with(parent)
        try:
            data = rtoml.loads(text)
            ok = list(data) == ["rules"] and isinstance(data["rules"], list)
            out = b"1" + _json_text(data["rules"]).encode() if ok else b"0"
        except Exception:
            out = b"0"
        with os.fdopen(w, "wb") as pipe:
            pipe.write(out)
        code = 0
    finally:
        os._exit(code)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _parse_json_state(path: str, text: str) -> Dict[str, Any]:
    try:
        # NaN/Infinity are Python's extension, not JSON: refused like any other bad value.
        data = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as e:
        # json's message ends "line L column C (char N)", which is what the user needs.
        raise UsageError(f"{path}: JSON syntax error: {e}") from None
    except RecursionError:
        raise UsageError(f"{path}: arrays or tables nested too deeply") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a JSON apply file is one object "
                         f'{{"tenants": [...], "rules": [...], ...}}, not {type(data).__name__}')
    return data


def scapy_namespace() -> Dict[str, Any]:
    """Scapy's packet layers by name, and nothing else."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import (ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest,
                                    ICMPv6ND_NA, ICMPv6ND_NS, IPv6, IPv6ExtHdrFragment,
                                    IPv6ExtHdrHopByHop, IPv6ExtHdrRouting)
    from scapy.layers.l2 import ARP, GRE, Dot1Q, Ether
    from scapy.layers.vxlan import VXLAN
    from scapy.packet import Padding, Raw
    ns = dict(locals())
    assert set(ns) == set(SCAPY_NAMES)
    return ns


# The fields a trace depends on; when the expression leaves one unset, Scapy's default is
# used and reported (an all-zero source MAC or 127.0.0.1 explains many a surprising verdict).
DEFAULTED_FIELDS = {
    "Ether": ("dst", "src"), "IP": ("src", "dst", "ttl"), "IPv6": ("src", "dst", "hlim"),
    "TCP": ("sport", "dport", "flags"), "UDP": ("sport", "dport"),
    "ICMP": ("type", "code", "id"), "ICMPv6EchoRequest": ("id",),
}


def scapy_packet(expr: str) -> bytes:
    """The packet's bytes (see scapy_packet_defaults)."""
    return scapy_packet_defaults(expr)[0]


def scapy_packet_defaults(expr: str) -> Tuple[bytes, List[str]]:
    """Evaluate a Scapy expression with only the layers in scope (no builtins: it is a
    packet description, not a program; this is hygiene, not a sandbox, since it runs with
    the caller's own rights); return its bytes, Ethernet header first, and which fields
    Scapy filled with defaults ("Ether.src=00:00:00:00:00:00")."""
    ns = scapy_namespace()
    from scapy.config import conf
    from scapy.layers.l2 import Neighbor
    from scapy.packet import Packet
    try:
        pkt = eval(compile(expr, "--scapy", "eval"), {"__builtins__": {}}, ns)
    except Exception as e:
        raise UsageError(f"--scapy: {type(e).__name__}: {e}") from None
    if not isinstance(pkt, Packet):
        raise UsageError(f"--scapy: the expression gives a {type(pkt).__name__}, "
                         "not a packet")
    added_ether = not isinstance(pkt, ns["Ether"])
    if added_ether:
        pkt = ns["Ether"]() / pkt  # XDP sees frames; a bare IP packet gets a default header
    # Left to itself Scapy fills an unset Ether dst by ARPing for it on the node's network:
    # trace must send nothing, so with no resolvers an unset dst becomes broadcast.
    saved, conf.neighbor = conf.neighbor, Neighbor()
    quiet = logging.getLogger("scapy.runtime")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        raw = bytes(pkt)
    except Exception as e:
        raise UsageError(f"--scapy: cannot build the packet: {type(e).__name__}: {e}") from None
    finally:
        conf.neighbor = saved
        quiet.setLevel(level)
    return raw, _defaults_used(pkt, ns["Ether"](raw), added_ether)


def _defaults_used(given, built, added_ether: bool) -> List[str]:
    out = ["Ether header added"] if added_ether else []
    mine, theirs = given, built
    while mine is not None and theirs is not None and type(mine) is type(theirs):
        for name in DEFAULTED_FIELDS.get(type(mine).__name__, ()):
            if name not in mine.fields:
                out.append(f"{type(mine).__name__}.{name}={_field_text(theirs, name)}")
        mine = mine.payload if mine.payload else None
        theirs = theirs.payload if theirs.payload else None
    return out


def _field_text(layer, name: str) -> str:
    v = layer.getfieldval(name)
    return str(v) if name != "flags" else str(layer.get_field(name).i2repr(layer, v))


def wire_args(cmd: commands.Command, ns: argparse.Namespace) -> Dict[str, Any]:
    """The request's args from parsed options; None and unset flags are left out."""
    args = {}
    for a in cmd.args:
        if a.wire and a.cli:
            v = getattr(ns, a.name, None)
            if v is not None and v is not False:
                args[a.name] = v
    if cmd.name == "apply":
        with no_collector_passes():     # the file's objects: hundreds of thousands
            ns.state_file = read_state_file(ns.file, raw_json=True)  # to place errors
        args["state"] = ns.state_file.wire_state()
        args["no_duplicates"] = True        # the agent checks the file's objects, once
        if not ns.full_diff:
            args["diff_limit"] = commands.DIFF_SHOWN
    elif cmd.name == "trace" and ns.scapy is not None:
        raw, defaults = scapy_packet_defaults(ns.scapy)
        args["hex"] = raw.hex()
        if defaults:
            print("--scapy filled in defaults: " + ", ".join(defaults), file=sys.stderr)
    elif cmd.name == "flow dump":
        try:
            model.parse_int(ns.limit, "flow dump: limit", 1, MAX_FLOW_DUMP)
        except model.Invalid as e:
            raise UsageError(str(e)) from None
        # One more than shown, to know whether --limit cut (within what one reply holds);
        # a page (--cursor) says itself where the next one starts.
        if ns.cursor is None:
            args["limit"] = min(ns.limit + 1, MAX_FLOW_DUMP)
    return args


# ---------------------------------------------------------------------------------------
# Human output.

def _cell(v: Any) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return ",".join(_cell(x) for x in v) or "-"
    return str(v)


def format_table(rows: Sequence[Dict[str, Any]], columns: Sequence[str],
                 right: Sequence[str] = ()) -> str:
    """Aligned columns with a header; numbers in `right` are right-aligned."""
    cells = [[c.upper() for c in columns]] + [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = []
    for row in cells:
        parts = [v.rjust(w) if columns[i] in right else v.ljust(w)
                 for i, (v, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


LIST_COLUMNS = {
    "tenants": ("name", "id", "vni", "default", "rate", "burst", "max_flows"),
    "ports": ("name", "tenant", "attached", "mode", "port_security", "allow_vlan", "allow",
              "local_ip", "note"),
    "endpoints": ("tenant", "ip", "port", "mac", "vtep"),
    "routes": ("tenant", "prefix", "action", "via"),
    "rules": ("id", "tenant", "priority", "action", "src", "dst", "proto", "sport", "dport",
              "icmp_type", "icmp_code", "in_port", "hits", "packets", "bytes", "rate",
              "burst", "comment"),
    "fips": ("tenant", "ip", "to"),
    "snats": ("tenant", "to", "ports"),
}
_PORT_STATE_COLUMNS = ("attached", "mode", "note")
_OVERLAY_COLUMNS = ("local_ip", "vtep")   # shown when some port/endpoint has one
_LIMIT_COLUMNS = ("rate", "burst")      # shown when some row has a rate limit
FLOW_COLUMNS = ("tenant", "in_port", "proto", "src", "sport", "dst", "dport", "verdict",
                "out_port", "rule", "packets", "bytes", "idle_s", "flags")
COUNTER_COLUMNS = ("tenant", "port", "verdict", "reason", "packets", "bytes")
PORT_TX_COLUMNS = ("tenant", "port", "packets", "bytes")
NUMERIC = ("id", "vni", "burst", "priority", "packets", "bytes", "idle_s", "rule", "sport", "dport",
           "hits")

# Match fields that print "any" rather than "-" when unset.
_ANY_FIELDS = ("src", "dst", "proto", "sport", "dport")


def _describe(kind: str, obj: Dict[str, Any]) -> str:
    """One object on one line: its identity, then its other fields."""
    ident = {"tenants": ("name",), "ports": ("name",), "endpoints": ("tenant", "ip"),
             "routes": ("tenant", "prefix"), "rules": ("id",), "fips": ("tenant", "ip"),
             "snats": ("tenant",)}.get(kind, ())
    head = "/".join(str(obj.get(k)) for k in ident)
    rest = " ".join(f"{k}={_cell(v)}" for k, v in obj.items()
                    if k not in ident and v not in (None, ""))
    return f"{kind[:-1]} {head}" + (f" ({rest})" if rest else "")


def format_diff(d: Dict[str, Any]) -> List[str]:
    lines = []
    for kind in model.KINDS:
        part = d.get(kind) or {}
        for obj in part.get("remove", []):
            lines.append("- " + _describe(kind, obj))
        for obj in part.get("add", []):
            lines.append("+ " + _describe(kind, obj))
        for ch in part.get("change", []):
            a, b = ch.get("from", {}), ch.get("to", {})
            fields = ", ".join(f"{k}: {_cell(a.get(k))} -> {_cell(b.get(k))}"
                               for k in b if a.get(k) != b.get(k))
            lines.append("~ " + _describe(kind, b).split(" (")[0] + f": {fields}")
    return lines


def _format_mapping(d: Any, indent: str = "") -> List[str]:
    """Nested mappings as indented "key: value" lines, lists of mappings as tables: what
    people read, never a Python structure."""
    lines = []
    if not isinstance(d, dict):
        return [indent + _cell(d)]
    for k, v in d.items():
        label = str(k)
        label = (label[:-2] + " (s)" if label.endswith("_s") else label).replace("_", " ")
        if isinstance(v, dict):
            lines.append(f"{indent}{label}:" + ("" if v else " none"))
            lines.extend(_format_mapping(v, indent + "  "))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            columns = list(dict.fromkeys(c for x in v for c in x))
            lines.append(f"{indent}{label}:")
            lines.extend(indent + "  " + ln for ln in format_table(v, columns, NUMERIC
                                                                   + ("ifindex",)).splitlines())
        else:
            lines.append(f"{indent}{label}: {_cell(v) if v != [] else 'none'}")
    return lines


def _packet_text(hexstr: Optional[str], title: str = "output packet:") -> List[str]:
    lines = [title]
    try:
        from scapy.config import conf
        ns = scapy_namespace()
        pkt = ns["Ether"](bytes.fromhex(hexstr))
        # Ports as numbers (22, not "ssh"): what rules and flow dumps show.
        ports = (ns["TCP"].sport, ns["TCP"].dport, ns["UDP"].sport, ns["UDP"].dport)
        added = [f for f in ports if f not in conf.noenum]
        conf.noenum.add(*added)
        try:
            lines += ["  " + ln for ln in pkt.show(dump=True).splitlines()]
        finally:
            if added:
                conf.noenum.remove(*added)
    except Exception:  # scapy is a nicety here; the hex below is the answer
        pass
    lines.append("  hex: " + hexstr)
    return lines


_PORT_STATES = {"attached": "attached ({mode})",
                "waiting": "waiting for the interface ({note})",
                "failed": "attaching failed: {note}"}


def _port_added(r: Dict[str, Any]) -> str:
    head = f"port {r.get('name')} in tenant {r.get('tenant')}"
    state = r.get("state")
    if state not in _PORT_STATES:
        return "added " + head
    what = _PORT_STATES[state].format(mode=r.get("mode") or "?", note=r.get("note") or "?")
    if state == "failed":
        return (f"added {head}, but {what}. The port stays configured: fix the cause, "
                f"or remove it with: xdpflowctl port del {r.get('name')}")
    return f"added {head}: {what}"


def _flow_rows(rows: List[Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], Tuple[str, ...]]:
    """ICMP flows show type/code/id in an ICMP column instead of ports."""
    out = []
    for r in rows:
        if "icmp_type" in r:
            r = {**r, "sport": None, "dport": None,
                 "icmp": f"type {r['icmp_type']} code {r['icmp_code']} id {r['icmp_id']}"}
        out.append(r)
    cols = FLOW_COLUMNS
    if any("icmp" in r for r in out):
        i = cols.index("dport") + 1
        cols = cols[:i] + ("icmp",) + cols[i:]
    if any("nat" in r for r in out):        # what NAT rewrites to: address:port
        cols = cols + ("nat",)
    return out, cols


def _kept_lines(d: Dict[str, Any]) -> Tuple[List[str], int]:
    lines, total = [], 0
    for kind in model.KINDS:
        kept = (d.get(kind) or {}).get("keep") or []
        n = ((d.get(kind) or {}).get("counts") or {}).get("keep", len(kept))
        total += n
        if kept:
            names = [_describe(kind, o).split(" (")[0] for o in kept]
            shown = ", ".join(names[:8]) + (f" and {n - 8} more" if n > 8 else "")
            lines.append(f"= kept, not in the file: {shown}")
    return lines, total


def _clock(t: Optional[float]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "NEVER"


def _rule_stats_table(rows: List[Dict[str, Any]]) -> str:
    """Rules with their counters and LAST_HIT; rules that never matched say NEVER and are
    named again below the table (candidates for removal, or a match that is not what was
    meant)."""
    rows = [{**r, "last_hit": _clock(r.get("last_hit")), "hits": r.get("hits", 0)}
            for r in rows]
    counters = ("hits", "packets", "bytes")
    cols = LIST_COLUMNS["rules"][:4] + counters + ("last_hit",) + tuple(
        c for c in LIST_COLUMNS["rules"][4:] if c not in counters)
    out = format_table(rows, cols, NUMERIC + counters)
    never = [str(r["id"]) for r in rows if not r["hits"] and not r.get("packets")]
    if never:
        out += (f"\n{len(never)} rule{'s' if len(never) != 1 else ''} never matched: "
                + ", ".join(never))
    return out


TOP_COLUMNS = ("tenant", "proto", "src", "sport", "dst", "dport", "verdict", "in_port",
               "out_port", "rule", "pps", "bps", "packets", "bytes")


def render_top(result: Dict[str, Any]) -> str:
    rows = list(result.get("flows") or [])
    head = (f"busiest flows by {result.get('by')} ({result.get('sampled', 0)} flows "
            f"sampled) at {time.strftime('%H:%M:%S')}")
    if not rows:
        return head + "\nno flows"
    return head + "\n" + format_table(rows, TOP_COLUMNS, NUMERIC + ("pps", "bps"))


def render(name: str, result: Any, args: Dict[str, Any]) -> str:
    noun, _, verb = name.partition(" ")
    kind = noun + "s"
    if verb == "list":
        rows = list(result or [])
        if not rows:
            return f"no {kind}"
        if kind == "rules":
            # The order the classifier evaluates them in: highest priority first.
            rows.sort(key=lambda r: (str(r.get("tenant")), -int(r.get("priority") or 0),
                                     int(r.get("id") or 0)))
            rows = [{**r, **{k: r.get(k) or "any" for k in _ANY_FIELDS}} for r in rows]
            if args.get("stats"):
                return _rule_stats_table(rows)
        # A port's attach state is left out when no row carries it (an older agent's
        # reply), an uplink's address when no port is one, rate limits when nothing has one.
        columns = [c for c in LIST_COLUMNS[kind]
                   if c not in _PORT_STATE_COLUMNS + _OVERLAY_COLUMNS + _LIMIT_COLUMNS
                   or any(c in r for r in rows)]
        return format_table(rows, columns, NUMERIC)
    if name == "port add":
        return _port_added(result or {})
    if verb == "add":
        return "added " + _describe(kind, result or {})
    if verb == "del":
        ident = "/".join(str(x) for x in (result or {}).get("identity", []))
        gone = (result or {}).get("cascaded") or {}
        return f"deleted {noun} {ident}" + (f" and its {model.count_phrase(gone)}"
                                            if gone else "")
    if name == "apply":
        lines = format_diff(result or {})
        n = model.count_changes(result or {})
        if n > len(lines):
            lines.append(f"... and {n - len(lines)} more (--full-diff lists them)")
        kept, n_kept = _kept_lines(result or {})
        lines += kept
        s = "s" if n != 1 else ""
        if args.get("dry_run"):
            lines.append(f"dry run: would apply {n} change{s}" if n else "dry run: no changes")
        else:
            lines.append(f"applied {n} change{s}" if n else "no changes")
        if n_kept:
            lines[-1] += (f"; kept {n_kept} object{'s' if n_kept != 1 else ''} not in the file "
                          "(--prune removes them)")
        return "\n".join(lines)
    if name == "flow dump" and isinstance(result, dict):
        rows, cols = _flow_rows(result["flows"])
        text = format_table(rows, cols, NUMERIC) if rows else "no flows"
        if result.get("next_cursor"):
            text += f"\n(more: --cursor '{result['next_cursor']}')"
        return text
    if name == "flow dump":
        rows = list(result or [])
        limit = args.get("limit", 0) - 1
        cut = limit > 0 and len(rows) > limit
        if not rows:
            return "no flows"
        rows, cols = _flow_rows(rows[:limit] if cut else rows)
        text = format_table(rows, cols, NUMERIC)
        if cut:
            text += f"\n(first {limit} flows shown; more match: raise --limit or filter)"
        return text
    if name == "flow flush":
        n = (result or {}).get("flushed", 0)
        return f"flushed {n} flow{'s' if n != 1 else ''}"
    if name == "stats":
        result = dict(result or {})
        counters = result.pop("counters", [])
        out = [format_table(counters, COUNTER_COLUMNS, NUMERIC) if counters else "no counters"]
        tx = result.pop("port_tx", [])
        if tx:
            out += ["", "transmitted on redirect, per port:",
                    format_table(tx, PORT_TX_COLUMNS, NUMERIC)]
        if result:
            out += [""] + _format_mapping(result)
        return "\n".join(out)
    if name == "top":
        return render_top(result or {})
    if name == "trace":
        r = result or {}
        lines = []
        if r.get("built_trace_program"):
            lines.append(f"(built the trace program first: {r.get('seconds', 0):.1f} s; "
                         "later traces reuse it)")
        lines += [f"{label:<10} {_cell(r.get(k))}" for label, k in (
            ("verdict:", "verdict"), ("tenant:", "tenant"), ("rule:", "rule"),
            ("route:", "route"), ("out port:", "out_port"), ("flow hit:", "flow_hit"),
            ("reason:", "reason"))]
        for b in r.get("rate_limits") or []:
            lines.append(f"{'limit:':<10} {b['bucket']} {b['rate']} burst {b['burst']}: "
                         f"{b['tokens']} {b['unit']} in the bucket, this packet "
                         f"{b['cost']}: {'conforms' if b['conformed'] else 'over the limit'}")
        nat = r.get("nat")
        if nat:
            lines.append(f"{'nat:':<10} {nat['kind']} {nat['direction']}: {nat['from']} -> "
                         f"{nat['to']}")
        if r.get("decapsulated"):
            lines.insert(1, f"{'overlay:':<10} decapsulated (VXLAN), judged as the tenant's")
        out = r.get("packet_out")
        if r.get("verdict") == "drop" or r.get("action") in ("drop", "aborted") or not out:
            lines.append("output packet: none (dropped)" if r.get("verdict") == "drop"
                         else "output packet: none")
        elif r.get("verdict") == "pass" or r.get("action") == "pass":
            lines += _packet_text(out, "to the kernel's stack, unchanged:")
        else:
            lines += _packet_text(out)
        return "\n".join(lines)
    return "\n".join(_format_mapping(result))


# ---------------------------------------------------------------------------------------

def check_repeat_options(ns: argparse.Namespace) -> None:
    for name, lo in (("count", 1), ("duration", 0), ("interval", 0)):
        v = getattr(ns, name, None)
        if v is not None and (v < lo or (lo == 0 and v <= 0)):
            raise UsageError(f"--{name}: {v:g} must be {'at least 1' if lo else 'above 0'}")


EVENT_FIELDS = ("time", "tenant", "port", "verdict", "reason", "rule", "proto", "src",
                "sport", "dst", "dport", "icmp_type", "icmp_code", "len", "out_port",
                "flow_hit", "decoded", "packet")


def event_line(ev: Dict[str, Any]) -> str:
    """One event as text: when, where, what, why, then the packet."""
    t = ev.get("time") or 0
    stamp = time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1e6) % 1000000:06d}"
    src, dst = ev.get("src", "?"), ev.get("dst", "?")
    if "sport" in ev:
        src, dst = f"{src}:{ev['sport']}", f"{dst}:{ev['dport']}"
    what = f"{ev.get('proto', 'non-ip')} {src} -> {dst}"
    if "icmp_type" in ev:
        what += f" type={ev['icmp_type']} code={ev['icmp_code']}"
    line = (f"{stamp} {ev.get('tenant') or '-'} {ev.get('port') or '-'} {ev['verdict']} "
            f"{ev['reason']}" + (f" rule={ev['rule']}" if ev.get("rule") else "")
            + f" {what} len={ev.get('len')}"
            + (f" -> {ev['out_port']}" if ev.get("out_port") else ""))
    if ev.get("decoded"):
        line += "\n    " + ev["decoded"]
    return line


def run_monitor(ns: argparse.Namespace, args: Dict[str, Any]) -> int:
    """Stream events until --count events, --duration seconds, or Ctrl-C; lost counts go
    to stderr, so stdout stays one event per line."""
    from agent.monitor import describe_packet
    describe_packet("")           # Scapy's import (a second or more) before the clock starts
    try:
        st = ApiClient(ns.socket, timeout=ns.timeout).stream("monitor", args)
    except ApiError as e:
        return _fail(e.code, e.message, ns.json)
    head = st.head or {}
    print(f"monitoring {head.get('filter')} at most {head.get('rate_limit')} events/s "
          "per CPU; Ctrl-C to stop", file=sys.stderr, flush=True)
    deadline = time.monotonic() + ns.duration if ns.duration else None
    seen, lost, rc = 0, {}, EXIT_OK
    try:
        while ns.count is None or seen < ns.count:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            msg = st.next(left)
            if not msg:
                continue
            if "lost" in msg:
                lost = msg["lost"]
                if not ns.json:
                    print(f"monitor: lost so far: {_lost_text(lost)}", file=sys.stderr)
                continue
            ev = msg.get("event") or {}
            ev.update(describe_packet(ev.get("packet", ""), ns.decode))
            ev = {k: ev[k] for k in EVENT_FIELDS if k in ev}
            print(json.dumps(ev) if ns.json else event_line(ev), flush=True)
            seen += 1
    except KeyboardInterrupt:
        pass
    except ApiError as e:
        rc = _fail(e.code, e.message, False)
    finally:
        st.close()
    print(f"monitor: {seen} event{'s' if seen != 1 else ''}"
          + (f"; lost: {_lost_text(lost)}" if lost else ""), file=sys.stderr)
    return rc


def _lost_text(lost: Dict[str, int]) -> str:
    return (f"{lost.get('rate_cap', 0)} to the rate limit, {lost.get('ring_full', 0)} to a "
            f"full ring, {lost.get('client', 0)} not read in time by this monitor")


def run_top(ns: argparse.Namespace, args: Dict[str, Any]) -> int:
    """Refresh in place every --interval seconds until Ctrl-C (--json: one document a
    line)."""
    client = ApiClient(ns.socket, timeout=ns.timeout)
    try:
        while True:
            try:
                result = client.call("top", args)
            except ApiError as e:
                return _fail(e.code, e.message, ns.json)
            if ns.json:
                print(json.dumps(result), flush=True)
            else:
                print("\x1b[H\x1b[2J" + render_top(result), flush=True)
            time.sleep(ns.interval)
    except KeyboardInterrupt:
        return EXIT_OK


# Indented output needs json's pure-Python encoder: 1.4 s for the diff of a 100,000-rule
# apply (22 MB), against 0.3 s compact in C. Past this size nobody reads it by eye.
INDENT_MAX_BYTES = 1 << 20


def json_document(result: Any) -> str:
    """--json's one document: indented for reading, compact when it is big."""
    text = json.dumps(result)
    return text if len(text) > INDENT_MAX_BYTES else json.dumps(result, indent=2)


def _fail(code: str, message: str, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"error": {"code": code, "message": message}}))
    print(f"xdpflowctl: {message}", file=sys.stderr)
    return EXIT_USAGE if code in USAGE_CODES else EXIT_REFUSED


def _unreachable_hint(message: str, path: str, from_env: bool) -> str:
    where = "from XDPFLOW_SOCKET" if from_env else (
        "the default" if path == DEFAULT_SOCKET else "from --socket")
    first = ("  the socket is there but not yours: reading needs its group ([agent] "
             "socket_group), changes need root or admin_group" if "ermission denied" in message
             else "  is the agent running? (systemctl status xdpflow-agent)")
    return (f"{message}\n{first}\n  the socket path is {where}; another one is chosen with "
            "--socket PATH or XDPFLOW_SOCKET")


TRACE_BUILD_TIMEOUT = 180.0


def _announce_trace_build(client: ApiClient, quiet: bool) -> None:
    """The first trace builds the trace program (seconds, more on a busy node): say so
    before waiting, and wait long enough for it."""
    try:
        st = client.call("status", {})
    except ApiError:
        return
    if isinstance(st, dict) and st.get("trace_program") == "not built":
        client.timeout = max(client.timeout, TRACE_BUILD_TIMEOUT)
        if not quiet:
            print("building the trace program first (takes a few seconds; later traces "
                  "reuse it)...", file=sys.stderr, flush=True)


def _apply_error(f: StateFile, e: ApiError) -> Tuple[str, str]:
    """(code, message) of an apply the agent refused, with the file's place of what it
    is about. An object of the file that is wrong is the file's mistake ("usage", as
    when it is found here). Unreachable: the file is checked here, so its mistakes are
    still named first."""
    if e.code == "unreachable":
        try:
            f.check()
        except UsageError as bad:
            return "usage", str(bad)
        return e.code, e.message
    try:
        f.data      # a JSON file sent unread: its syntax and outline first, as before
    except UsageError as bad:
        return "usage", str(bad)
    if e.at:
        return "usage", f.placed(e)
    where = f.locate(e.message)
    return e.code, f"{where}: {e.message}" if where else e.message


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Known before parsing, so that even a usage error comes out as JSON when asked to.
    as_json = "--json" in argv[:argv.index("--")] if "--" in argv else "--json" in argv
    parser = build_parser(lazy=True)
    try:
        ns = parser.parse_args(argv)
    except UsageError as e:
        return _fail("usage", str(e), as_json)
    cmd = commands.get(ns._command)
    try:
        args = wire_args(cmd, ns)
        check_repeat_options(ns)
    except UsageError as e:
        return _fail("usage", str(e), ns.json)
    if cmd.stream:
        return run_monitor(ns, args)
    if cmd.name == "top" and not ns.once:
        return run_top(ns, args)
    client = ApiClient(ns.socket, timeout=ns.timeout)
    if cmd.name == "trace":
        _announce_trace_build(client, quiet=ns.json)
    try:
        result = client.call(cmd.name, args)
    except ApiError as e:
        code, message = _apply_error(ns.state_file, e) if cmd.name == "apply" else \
            (e.code, e.message)
        if code == "unreachable":
            message = _unreachable_hint(message, ns.socket,
                                        ns.socket == os.environ.get("XDPFLOW_SOCKET"))
        return _fail(code, message, ns.json)
    if ns.json:
        if cmd.name == "flow dump" and isinstance(result, list) and len(result) > ns.limit:
            result = result[:ns.limit]
            print(f"xdpflowctl: first {ns.limit} flows shown; more match", file=sys.stderr)
        print(json_document(result))
    else:
        text = render(cmd.name, result, args)
        if text:
            print(text)
    if cmd.name == "port add" and isinstance(result, dict) and result.get("state") == "failed":
        if ns.json:
            print(f"xdpflowctl: {_port_added(result)}", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
