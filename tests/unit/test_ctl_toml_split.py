"""xdpflowctl's start and its reading of a big TOML apply file (issue 12): the file parsed
in two halves at once (a forked child does the second) must give the wire text the whole
parse gives, byte for byte, or not be split; the errors stay the whole parse's. Commands'
parsers are built when argparse comes to them, with the same help, errors and results."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fuzzing import fuzz_settings
from hypothesis import event, given
from hypothesis import strategies as st
from test_cli import agent, run  # noqa: F401 - fixtures
from test_operator import _leaves

from agent import commands
from ctl import cli

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def outcome(path: str, split: bool):
    """What reading the file gives: ("ok", wire text, data, whether it was split) or
    ("error", the message)."""
    try:
        f = cli.read_state_file(path, raw_json=split)
    except cli.UsageError as e:
        return ("error", str(e))
    was_split = "data" not in f.__dict__         # data is parsed whole when asked for
    return ("ok", str(f.wire_state()), f.data, was_split)


def rule(i: int, extra: str = "") -> str:
    return f'[[rules]]\nid = {i}\ntenant = "blue"\npriority = {100 + i}\naction = "allow"\n' + extra


TENANT = '[[tenants]]\nname = "blue"\nid = 10\n'
# Pieces of a rule (after its fields): each means the same in a half as in the whole.
PLAIN_EXTRAS = ["", 'src = "10.0.0.0/8"\n', '# [[rules]]\n', "\n\n",
                'comment = """\nmulti\nline\n"""\n', "comment = '''\n[[rule]]\n'''\n",
                'allow = [\n  "10.0.0.0/8",\n  "fd00::/64",\n]\n',
                "[rules.x]\nk = 1\n", "[[rules.more]]\nk = 2\n[[rules.more]]\nk = 3\n",
                "dport = 1_000\nrate = 1.5e3\nflag = true\n", 'name = "\\u00e9 \\"q\\""\n']
# What can make a half mean something else than in the whole, or fail alone, or both.
NASTY = [
    'comment = """\n[[rules]]\n"""\n', "comment = '''\n[[rules]]\nid = 5\n'''\n",
    'x = [\n"a",\n', '"""\n', "rules = [1, 2]\n", "rules = []\n", 'rules = ["a"]\n',
    "rules.x = 1\n", '"rules" = [1]\n', "[rules]\nx = 1\n", "[tenants]\nname = 'x'\n",
    TENANT, '[[ports]]\nname = "p1"\ntenant = "blue"\n', "[[bogus]]\nx = 1\n",
    "[bogus]\n", "when = 1979-05-27\n", "at = 07:32\n", "t = 1979-05-27T07:32:00Z\n",
    "x = {a = 1}\n", 'e = "\\e"\n', 'h = "\\x41"\n', "id = \n", "= 1\n", "[[rules]\n",
    '"open\n', "id = 1\nid = 2\n", "[[rules]] # a comment\nid = 7\n", "  [[rules]]\nid = 8\n",
    "[[rules]]  \nid = 9\n", "[rules.x]\nk = 1\n", "\r", "[[rules.x]]\n", "rules = 5\n",
    "[[tenants.x]]\n", "[ rules . y ]\n", "\t[[rules]]\n",
]


@st.composite
def state_texts(draw):
    """(TOML text, whether it is plain: tenants, comments, then rules with plain extras,
    comments, blank lines; any line ends)."""
    plain = draw(st.booleans())
    parts = [TENANT] * draw(st.integers(0, 2))
    # Comment lines after the tenants: with many, the first half may hold no rule.
    parts.append("# a comment\n" * draw(st.sampled_from([0, 0, 3, 40])))
    n = draw(st.integers(0, 12))
    for i in range(n):
        parts.append(rule(i, draw(st.sampled_from(PLAIN_EXTRAS))))
        if draw(st.integers(0, 5)) == 0:
            parts.append(draw(st.sampled_from(["# a comment\n", "\n", "# [[rules]]\n"])))
    bom = False
    if not plain:
        for _ in range(draw(st.integers(1, 3))):
            parts.insert(draw(st.integers(0, len(parts))), draw(st.sampled_from(NASTY)))
        bom = draw(st.booleans())
    text = "".join(parts)
    if draw(st.booleans()):
        text = text.replace("\n", "\r\n")
    if bom:
        text = "\ufeff" + text
    return text, plain


@pytest.fixture
def two_cpus(monkeypatch):
    """The split wants two CPUs to run on: a test machine with one still tests it."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})


@pytest.fixture
def split_small(monkeypatch, two_cpus):
    """Split files of any size, so that small generated ones are."""
    monkeypatch.setattr(cli, "SPLIT_ABOVE", 0)


@fuzz_settings(ci=400, long=20_000)
@given(state_texts())
def test_a_split_file_means_what_the_whole_does_or_is_not_split(split_small, tmp_path, case):
    text, plain = case
    path = tmp_path / "s.toml"
    path.write_bytes(text.encode())
    whole = outcome(str(path), split=False)
    got = outcome(str(path), split=True)
    if whole[0] == "error":
        event("error")
        assert got == whole                             # the same words as ever
        assert not plain, whole
        return
    kind, wire, data, was_split = got
    event(f"{'plain' if plain else 'nasty'}: {'split' if was_split else 'whole'}")
    assert (kind, wire, data) == whole[:3]              # byte for byte
    assert json.loads(wire) == whole[2]
    if plain:       # nothing in the way: split exactly when there is a [[rules]] line to split at
        assert was_split == (cli._split_at(text) >= 0), text


R3 = rule(1) + rule(2) + rule(3)       # its split line: rule 3's header
PAD = "#\n" * 60                       # puts the split line in the second half


@pytest.mark.parametrize("text, why, split", [
    (rule(1) + 'comment = """\n[[rules]]\n"""\n', "the split line in a string", False),
    (rule(1) + "comment = '''\n[[rules]]\n'''\n", "... in a literal string", False),
    ("rules = [1]\n" + PAD + rule(1), "a static array before the split", False),
    ("rules = []\n" + PAD + rule(1), "an empty static array before it", False),
    ("[rules]\nx = 1\n" + PAD + rule(1), "a table named rules before it", False),
    (R3 + "[[tenants]]\nname = 'x'\n", "tenants after the split", False),
    (R3 + "[tenants]\nname = 'x'\n", "a table of another kind after it", False),
    (R3 + "[[ports]]\n[[tenants]]\n", "two kinds after it", False),
    (R3 + "x = {a = 1}\n", "TOML 1.1 (an inline table): tomllib's", False),
    (R3 + "when = 1979-05-27\n", "a date in the second half", False),
    ("when = 1979-05-27\n" + R3, "a date in the first half", False),
    (R3 + "at = 07:32\n", "a time without seconds (TOML 1.1)", False),
    (rule(1) + "id = \n" + rule(2) + rule(3), "a syntax error in the first half", False),
    (R3 + "id = \n", "a syntax error in the second half", False),
    (R3 + "id = 4\n", "a key given twice in the second half", False),
    (rule(1) + "[[rules]] # c\nid = 2\n" + rule(3), "a header with a comment before it", True),
    (rule(1) + rule(2) + rule(3, "[rules.x]\nk = 1\n"), "a sub-table in the second half", True),
    (rule(1) + rule(2) + rule(3, "[[rules.x]]\n[[rules.x]]\n"), "its array of tables", True),
    (TENANT + "[[rules]]\n[rules.x]\nk = 1\n" + rule(2) + rule(3), "... in the first", True),
    (R3.replace("\n", "\r\n"), "CRLF line ends", True),
    ("\ufeff" + R3, "a byte order mark", True),
])
def test_what_refuses_the_split_gives_the_whole_parse(text, why, split, split_small, tmp_path):
    assert cli._split_at(text) >= 0, why            # a split line the split could take
    path = tmp_path / "s.toml"
    path.write_bytes(text.encode())
    whole = outcome(str(path), split=False)
    got = outcome(str(path), split=True)
    assert got[:3] == whole[:3], why
    assert (got[0] == "ok" and got[3]) == split, why


def big_text(n: int = 11_000) -> str:
    from netns_lab.bench_control import shaped_rules, state
    from netns_lab.lab import toml_tables
    return toml_tables("", state(shaped_rules(n)))


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("big") / "big.toml"
    path.write_text(big_text())
    return path


def test_a_big_plain_file_is_split_on_the_apply_path(big, two_cpus):
    path = big
    assert len(path.read_text()) > cli.SPLIT_ABOVE    # the real threshold, not a patched one
    ns = cli.build_parser().parse_args(["apply", str(path)])
    args = cli.wire_args(commands.get("apply"), ns)
    assert "data" not in ns.state_file.__dict__          # the halves made the wire text
    _, wire, data, was_split = outcome(str(path), split=False)
    assert not was_split and args["state"] == wire
    assert ns.state_file.data == data                     # parsed whole when asked


def test_a_small_file_is_not_split(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(TENANT + rule(1) + rule(2))
    assert not outcome(str(path), split=True)[3]


def _child_says(behaviour: str, tmp_path: Path, big: Path) -> str:
    """A script: the big text split, its child doing `behaviour` in place of encoding its
    rules; prints the split's result ("split" / "whole") and the child's pid."""
    script = tmp_path / "child.py"
    script.write_text(f"""
import os, signal, sys, time
sys.path.insert(0, {str(ROOT)!r})
from ctl import cli
os.sched_getaffinity = lambda pid: {{0, 1}}     # as the two_cpus fixture
parent = os.getpid()
encode = cli._json_text

def child_json_text(v):
    if os.getpid() != parent:
        open({str(tmp_path / 'pid')!r}, "w").write(str(os.getpid()))
        {behaviour}
    return encode(v)

cli._json_text = child_json_text
text = open({str(big)!r}).read()
print("split" if cli._parse_halves(text) else "whole", flush=True)
""")
    return str(script)


@pytest.mark.parametrize("behaviour", ["os.kill(os.getpid(), signal.SIGKILL)",
                                       "raise RuntimeError('boom')", "os._exit(0)",
                                       "raise SystemExit(0)", "raise KeyboardInterrupt"])
def test_a_failing_child_means_the_whole_parse(behaviour, tmp_path, big):
    out = subprocess.run([sys.executable, _child_says(behaviour, tmp_path, big)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["whole"]
    assert_gone(int((tmp_path / "pid").read_text()))


def test_the_check_of_a_healthy_child_passes(tmp_path, big):
    out = subprocess.run([sys.executable, _child_says("pass", tmp_path, big)],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["split"], out.stderr


def assert_gone(pid: int, within: float = 10.0) -> None:
    """The process has exited (gone, or a zombie its new parent has not reaped yet)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still runs")


def test_the_child_dies_with_a_killed_client(tmp_path, big):
    proc = subprocess.Popen([sys.executable, _child_says("time.sleep(300)", tmp_path, big)],
                            stdout=subprocess.PIPE)
    try:
        pid_file = tmp_path / "pid"
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        child = int(pid_file.read_text())
    finally:
        proc.kill()
        proc.wait()
    assert_gone(child)


def test_an_interrupted_client_kills_and_reaps_its_child(tmp_path, monkeypatch, big,
                                                         two_cpus):
    """Ctrl-C while this process parses its half: the child is killed and waited for
    before the interrupt goes on."""
    text = big.read_text()
    parent = os.getpid()
    pid_file = tmp_path / "pid"

    def json_text(v):
        if os.getpid() != parent:                    # the child: wait to be killed
            pid_file.write_text(str(os.getpid()))
            time.sleep(300)
        while not pid_file.exists():
            time.sleep(0.01)
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_json_text", json_text)
    with pytest.raises(KeyboardInterrupt):
        cli._parse_halves(text)
    child = int(pid_file.read_text())
    with pytest.raises(ChildProcessError):
        os.waitpid(child, os.WNOHANG)               # reaped already
    assert not Path(f"/proc/{child}").exists()


def test_no_split_with_threads(split_small, tmp_path):
    import threading
    path = tmp_path / "s.toml"
    path.write_text(TENANT + rule(1) + rule(2) + rule(3))
    assert outcome(str(path), split=True)[3]
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert not outcome(str(path), split=True)[3]     # fork would copy one thread only
    finally:
        stop.set()
        t.join()


# -- start-up: what the command line imports and builds ---------------------------------

def test_importing_the_cli_leaves_the_config_module_and_tomllib_out():
    code = ("import sys, ctl.cli; print(sorted(m for m in ('agent.config', 'tomllib', "
            "'tomli', 'rtoml', 'scapy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_a_lazy_parser_is_the_eager_one_when_used():
    eager = dict(_leaves(cli.build_parser()))
    lazy_top = cli.build_parser(lazy=True)
    assert lazy_top.format_help() == eager[()].format_help()
    for words, parser in eager.items():
        lazy = lazy_top
        for i, w in enumerate(words):    # each reached as argparse reaches it
            sub = next(a for a in lazy._actions if isinstance(a, argparse._SubParsersAction))
            lazy = sub.choices[w]
            lazy = lazy.filled() if i < len(words) - 1 else lazy     # shown unfilled
        assert lazy.format_help() == parser.format_help(), words
        assert lazy.format_usage() == parser.format_usage(), words


def _parse(parser, argv):
    try:
        return vars(parser.parse_args(argv))
    except cli.UsageError as e:
        return str(e)


@pytest.mark.parametrize("name", sorted(commands.COMMANDS))
def test_lazy_and_eager_parsers_read_every_example_and_mistake_alike(name):
    cmd = commands.COMMANDS[name]
    argvs = [shlex.split(line.split("#")[0])[1:] for line in cmd.examples.splitlines()
             if line.strip().startswith("xdpflowctl")]
    words = name.split()
    argvs += [words, words + ["--bogus"], words[:1] + ["bogus"], ["--json"] + words + ["-h"],
              words + ["--json", "--timeout", "x"]]
    assert argvs
    for argv in argvs:
        got = []
        for lazy in (False, True):
            try:
                got.append(_parse(cli.build_parser(lazy=lazy), argv))
            except SystemExit as e:               # -h
                got.append(("exit", e.code))
        assert got[0] == got[1], argv



def test_no_fork_means_the_whole_parse(split_small, tmp_path, monkeypatch):
    def no_fork():
        raise BlockingIOError(11, "Resource temporarily unavailable")
    monkeypatch.setattr(os, "fork", no_fork)
    path = tmp_path / "s.toml"
    path.write_text(TENANT + rule(1) + rule(2) + rule(3))
    fds = len(os.listdir("/proc/self/fd"))
    got = outcome(str(path), split=True)
    assert got[0] == "ok" and not got[3] and got[1] == outcome(str(path), split=False)[1]
    assert len(os.listdir("/proc/self/fd")) == fds          # the pipe closed again


def test_no_split_on_one_cpu(split_small, tmp_path, monkeypatch):
    path = tmp_path / "s.toml"
    path.write_text(TENANT + rule(1) + rule(2) + rule(3))
    assert outcome(str(path), split=True)[3]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})     # taskset -c 0
    assert not outcome(str(path), split=True)[3]


def test_a_split_file_refused_by_the_agent_names_the_same_lines(run, agent, tmp_path,
                                                                 split_small, monkeypatch):
    """Through xdpflowctl apply to an agent (in this process: its server's threads would
    refuse the split, and the child runs nothing of theirs): a wrong rule and a rule given
    twice in the second half, named by their lines as the whole parse names them."""
    monkeypatch.setattr(cli, "_threads", lambda: 1)
    halves = []
    parse_halves = cli._parse_halves
    monkeypatch.setattr(cli, "_parse_halves", lambda text: halves.append(
        parse_halves(text)) or halves[-1])
    ctl, _ = agent
    f = tmp_path / "s.toml"
    bad_port = TENANT + "".join(rule(i, 'proto = "udp"\ndport = "x"\n' if i == 7 else "")
                                for i in range(1, 9))
    twice = TENANT + "".join(rule(i) for i in range(1, 8)) + rule(2)
    first, second = [n for n, ln in enumerate(twice.splitlines(), 1) if ln == "id = 2"]
    dport = bad_port.splitlines().index('dport = "x"') + 1
    for text, error in (
            (bad_port, f":{dport}: rule 7: dport: 'x' is not a port"),
            (twice, f":{second - 1}: rule 2: given twice (first at line {first - 1})")):
        f.write_text(text)
        got = run("apply", str(f))
        assert halves.pop() is not None                       # split
        assert got[0] == 2 and f"{f}{error}" in got[2], got
        monkeypatch.setattr(cli, "SPLIT_ABOVE", 1 << 40)
        assert run("apply", str(f)) == got                    # whole: the same words
        assert halves.pop() is None
        monkeypatch.setattr(cli, "SPLIT_ABOVE", 0)
        assert ctl.state.rules == []
