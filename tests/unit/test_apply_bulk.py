"""The apply path at scale (issue 12): an apply file's objects are checked once, by the
agent (model.State.from_apply), rules in bulk (model.rules_from_dicts) with the same
checks as Rule.from_dict; errors name the object's place in the file; a large diff is
cut to its first objects with counts; plain TOML is read by rtoml, anything else by
tomllib."""
from __future__ import annotations

import json
import tomllib

import pytest
from fuzzing import VALID, fuzz_settings, mutated
from hypothesis import given
from hypothesis import strategies as st

from agent import model
from ctl import cli
from test_cli import agent, run  # noqa: F401 - fixtures

pytestmark = pytest.mark.unit

RULE = {"id": 1, "tenant": "blue", "priority": 10, "action": "allow"}
PLAIN_AND_NOT = [
    dict(RULE),
    dict(RULE, src="10.0.0.0/24", proto="tcp", dport="22", comment="ssh"),
    dict(RULE, dst="fd00::/64", proto="udp", sport="1000-1999", in_port="vm1"),
    dict(RULE, src="::/0", dst="10.0.0.0/8", proto="icmp"),     # ::/0 is "any"
    dict(RULE, src="::/0", proto="icmpv6"),
    dict(RULE, src="10.0.0.1", proto=6, dport=22),               # numbers for names
    dict(RULE, proto="tcp", dport=[1000, 1999]),                 # a list: from_dict reads it
    dict(RULE, proto="icmp", icmp_type=8, icmp_code=0),
    dict(RULE, rate="100pps", burst=10),
    dict(RULE, src="any", dst="", comment=None),
]


@pytest.mark.parametrize("d", PLAIN_AND_NOT)
def test_bulk_rules_equal_rule_from_dict(d):
    (r,) = model.rules_from_dicts([d])
    assert r == model.Rule.from_dict(d) and r.to_dict() == model.Rule.from_dict(d).to_dict()
    assert hash(r) == hash(model.Rule.from_dict(d))


def test_bulk_rules_keep_true_and_one_apart():
    # The shared fields are parsed once per distinct value *and type*: proto True is not
    # proto 1 (icmp), though True == 1 in Python.
    icmp = dict(RULE, proto=1)
    with pytest.raises(model.Invalid, match=r"True is not a protocol") as e:
        model.rules_from_dicts([icmp, dict(icmp, id=2, proto=True)])
    assert e.value.at == "rules[1].proto"


@fuzz_settings(ci=300, long=20_000)
@given(mutated("rules"))
def test_bulk_rules_accept_and_refuse_as_rule_from_dict(case):
    d, _ = case
    try:
        want = model.Rule.from_dict(d)
    except model.Invalid as e:
        with pytest.raises(model.Invalid) as got:
            model.rules_from_dicts([VALID["rules"], d])
        assert str(got.value) == str(e)
        assert got.value.at.startswith("rules[1]")
        return
    assert model.rules_from_dicts([d]) == [want]


@pytest.mark.parametrize("state, at, message", [
    ({"rules": [RULE, dict(RULE, id=2, proto="udp", dport="x")]}, "rules[1].dport",
     "rule 2: dport: 'x' is not a port or port range"),
    ({"rules": [dict(RULE, bogus=1)]}, "rules[0].bogus", "rule 1: unknown field 'bogus'"),
    ({"tenants": [{"name": "b", "id": "10"}]}, "tenants[0].id", "tenant b: id: '10' is text"),
    ({"routes": [{"tenant": "b", "prefix": "10.0.0.0/8"}]}, "routes[0]",
     "route b/10.0.0.0/8: needs a next hop"),
])
def test_from_apply_errors_name_the_object_path(state, at, message):
    with pytest.raises(model.Invalid) as e:
        model.State.from_apply(state)
    assert e.value.at == at and str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize("kind, objs", [
    ("rules", [RULE, dict(RULE, id=2), dict(RULE, priority=5)]),
    ("tenants", [{"name": "b", "id": 1}, {"name": "c", "id": 2}, {"name": "b", "id": 3}]),
])
def test_from_apply_refuses_an_object_given_twice(kind, objs):
    with pytest.raises(model.Invalid, match=r"given twice \(first at " + kind + r"\[0\]\)") as e:
        model.State.from_apply({kind: objs}, no_duplicates=True)
    assert (e.value.at, e.value.first_at) == (f"{kind}[2]", f"{kind}[0]")
    # An API caller that does not ask: the later object counts, as it always did.
    assert len(getattr(model.State.from_apply({kind: objs}), kind)) == 3
    # from_dict (the store, the config) is as it was: validate() names duplicates.
    with pytest.raises(model.Conflict):
        model.State.from_dict({"tenants": [{"name": "b", "id": 1}], kind: objs}).validate()


def test_from_apply_is_from_dict_for_a_valid_state():
    st = {k: [v] for k, v in VALID.items()}
    st["rules"] = [dict(RULE, id=i, src=f"10.0.{i}.0/24", proto="tcp", dport="22")
                   for i in range(1, 50)]
    assert model.State.from_apply(st) == model.State.from_dict(st)


def _rules_state(n: int, salt: int = 0):
    return model.State.from_dict({"tenants": [{"name": "blue", "id": 10}], "rules": [
        dict(RULE, id=i, src=f"10.{i >> 8}.{(i + salt) & 255}.0/24") for i in range(1, n + 1)]})


def test_a_cut_diff_is_the_full_diffs_head_with_its_counts():
    old, new = _rules_state(30), _rules_state(40, salt=1)    # 10 added, 30 changed
    full = model.diff(old, new)
    cut = model.diff(old, new, limit=5)
    assert cut["rules"]["counts"] == {"add": 10, "remove": 0, "change": 30}
    for k in ("add", "remove", "change"):
        assert cut["rules"][k] == full["rules"][k][:5]
    assert "counts" not in cut["tenants"]                     # nothing cut there
    assert model.count_changes(cut) == model.count_changes(full) == 40
    assert model.diff(old, new, limit=40) == full


def test_ctl_lists_the_first_objects_of_a_big_diff_and_counts_all(run, agent, tmp_path):
    from agent.commands import DIFF_SHOWN
    n = DIFF_SHOWN + 234
    f = tmp_path / "big.json"
    f.write_text(json.dumps({"tenants": [{"name": "blue", "id": 10}], "rules": [
        dict(RULE, id=i) for i in range(1, n + 1)]}))
    rc, out, _ = run("apply", str(f), "--dry-run")
    assert rc == 0 and out.count("\n+ rule ") == DIFF_SHOWN
    assert f"... and {n - DIFF_SHOWN} more (--full-diff lists them)" in out
    assert out.rstrip().endswith(f"dry run: would apply {n + 1} changes")
    rc, out, _ = run("--json", "apply", str(f), "--dry-run")
    d = json.loads(out)
    assert d["rules"]["counts"]["add"] == n and len(d["rules"]["add"]) == DIFF_SHOWN
    rc, out, _ = run("--json", "apply", str(f), "--dry-run", "--full-diff")
    d = json.loads(out)
    assert "counts" not in d["rules"] and [r["id"] for r in d["rules"]["add"]] == \
        list(range(1, n + 1))


def test_ctl_names_the_line_of_a_rule_the_agent_refuses(run, agent, tmp_path):
    ctl, _ = agent
    f = tmp_path / "s.toml"
    f.write_text('[[tenants]]\nname = "blue"\nid = 10\n\n' + "".join(
        f'[[rules]]\nid = {i}\ntenant = "blue"\npriority = 1\naction = "allow"\n'
        f'proto = "udp"\ndport = "{"9" if i != 3 else "x"}"\n\n' for i in range(1, 5)))
    rc, out, err = run("--json", "apply", str(f))
    assert rc == 2 and json.loads(out)["error"]["code"] == "usage"
    assert f"{f}:27: rule 3: dport: 'x' is not a port" in err, err
    assert ctl.state.rules == []
    f.write_text('[[tenants]]\nname = "blue"\nid = 10\n\n[[rules]]\nid = 1\ntenant = "blue"\n'
                 'priority = 1\naction = "allow"\n\n[[rules]]\nid = 1\ntenant = "blue"\n'
                 'priority = 2\naction = "deny"\n')
    rc, _, err = run("apply", str(f))
    assert rc == 2 and f"{f}:11: rule 1: given twice (first at line 5)" in err, err


@pytest.mark.parametrize("text", [
    'a = {\n b = 1 }\n', 'a = { b = 1, }\n', 'a = "\\e"\n', 'a = "\\x41"\n', 'a = 07:32\n',
    'a = [\n  07:32]\n', 'a = 1979-05-27T07:32\n', 'a = 1\na = 2\n', '[x]\n[x]\n', 'a = 01\n',
    'a = "\x01"\n',
])
def test_toml_that_tomllib_refuses_is_refused_with_its_message(text, tmp_path):
    # rtoml reads TOML 1.1; an apply file is read as TOML 1.0, as it always was.
    with pytest.raises(tomllib.TOMLDecodeError) as want:
        tomllib.loads(text)
    f = tmp_path / "s.toml"
    f.write_text(text)
    with pytest.raises(cli.UsageError) as got:
        cli.load_state_file(str(f))
    assert str(got.value) == f"{f}: TOML syntax error: {want.value}"


def test_plain_toml_reads_as_tomllib_reads_it():
    pytest.importorskip("rtoml")   # a dependency (pyproject); ctl works without it
    from netns_lab.lab import toml_tables
    text = toml_tables("", {k: [v] * 3 for k, v in VALID.items()}) + \
        '# a comment\n[[rules]]\nid = 9\ntenant = "b"\npriority = 1_000\naction = \'deny\'\n' \
        'src = """10.0.0.0/8"""\nmac = "02:00:00:00:00:05"\nip = "fe80::10:20"\nf = 1.5e3\n'
    assert not any(s in text for s in cli._TOML_1_1)
    assert cli._parse_toml(text, tomllib.loads) == tomllib.loads(text)


# parse_prefix's fast IPv4 path (model.Net4) against ipaddress, on texts around the
# edges: what it accepts must be the same network with the same text, what it refuses
# must be refused with the same words as before.
PREFIX_TEXTS = [
    "10.0.0.0/8", "10.1.2.3/32", "10.1.2.3", "1.2.3.4/31", "1.2.3.4/30", "0.0.0.0/0",
    "255.255.255.255/32", "10.0.0.0/08", "10.0.0.0/008", "10.0.0.1/24", "10.0.0.01/24",
    "010.0.0.0/8", "10.0.0/24", "10.0.0.0.0/8", "256.0.0.0/8", "10.0.0.0/33", "10.0.0.0/",
    "10.0.0.0/-1", "10.0.0.0/+8", "10.0.0.0/8 ", " 10.0.0.0/8", "10.0.0.0/1_6",
    "10.0.0.0/\u0661\u0666", "10.0.0.0\x00/8", "10.0.0.0/8/8", "fd00::/64", "::/0",
    "::ffff:10.0.0.0/104", "1.2.3.4/\u00b2", "\ud800/8", "a.b.c.d/8",
]


def _general(text):
    """What parse_prefix said before the fast path: ipaddress's parse, strict."""
    import ipaddress
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        return "host bits" if "has host bits set" in str(e) else "not a prefix"


@pytest.mark.parametrize("text", PREFIX_TEXTS)
def test_fast_prefixes_are_ipaddress_networks(text):
    import ipaddress
    import itertools
    want = _general(text)
    try:
        got = model.parse_prefix(text, "src")
    except model.Invalid as e:
        assert isinstance(want, str) and want in e.message, (text, want, e.message)
        return
    assert not isinstance(want, str), (text, got)
    assert got == want and hash(got) == hash(want) and str(got) == str(want)
    assert repr(got) == repr(want) and got.prefixlen == want.prefixlen
    assert isinstance(got, type(want)) and not (got < want) and not (want < got)
    assert list(itertools.islice(got.hosts(), 3)) == list(itertools.islice(want.hosts(), 3))
    assert got.broadcast_address == want.broadcast_address and got.overlaps(want)
    if want.prefixlen:
        assert str(got.supernet()) == str(want.supernet())


_OCTET = st.integers(0, 300)


@fuzz_settings(ci=300, long=20_000)
@given(st.builds(lambda a, b, c, d, n, zeros: f"{a}.{b}.{c}.{d}" + (
    "" if n is None else "/" + "0" * zeros + str(n)),
    _OCTET, _OCTET, _OCTET, _OCTET, st.none() | st.integers(0, 40), st.integers(0, 2)))
def test_fast_prefixes_agree_with_ipaddress_on_random_texts(text):
    want = _general(text)
    try:
        got = model.parse_prefix(text, "src")
    except model.Invalid as e:
        assert isinstance(want, str) and want in e.message
        return
    assert got == want and str(got) == str(want) and got.network_address == want.network_address


@pytest.mark.parametrize("text", ["10.0.0.0/8", "10.1.2.3/32", "0.0.0.0/0", "1.2.3.4/31",
                                  "255.255.255.255"])
def test_fast_prefixes_compile_to_the_same_datapath_key(text):
    import ipaddress
    from agent import compiler
    fast, slow = model.parse_prefix(text, "src"), ipaddress.ip_network(text)
    assert type(fast) is model.Net4 and type(slow) is ipaddress.IPv4Network
    assert compiler.prefix_mask(fast) == compiler.prefix_mask(slow)
    assert model.prefix_str(fast) == model.prefix_str(slow)
