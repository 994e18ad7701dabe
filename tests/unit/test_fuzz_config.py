"""Bad configuration and rules (issue 14 item 6), without a kernel: Hypothesis-generated
config files, objects of every kind and apply states (dry runs). Each is accepted, or
refused with the project's own error (config.ConfigError, model.Invalid) naming the key or
the field — never another exception (a traceback). The datapath side (real applies that
are refused whole, never half-applied) is tests/bpf/test_fuzz_apply.py.

CI: a few hundred examples per test; XDPFLOW_LONG=1: tens of thousands."""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from agent import config, model
from agent.control import Controller
from agent.store import Store

pytestmark = pytest.mark.unit

LONG = os.environ.get("XDPFLOW_LONG") == "1"
FUZZ = settings(max_examples=20_000 if LONG else 150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])

# --- values of every TOML / JSON type, the awkward ones on purpose --------------------------

SCALARS = st.one_of(
    st.integers(-2**63, 2**63 - 1), st.sampled_from([0, -1, 1, 65535, 65536, 2**31, 2**32]),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
    st.text(max_size=40), st.sampled_from(["", " ", "any", "default", "10", "10.0.0.0/8",
                                           "fd00::/64", "10.0.0.1", "1-2", "5-1", "tcp",
                                           "drop", "pass", "allow", "x" * 300, "/tmp/x",
                                           "02:00:00:00:00:01", "01:00:00:00:00:01",
                                           "[::1]:9477", "127.0.0.1:0", "\x00", "é"]),
    st.datetimes(min_value=datetime.datetime(1, 1, 1)), st.dates(), st.times())
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["a", "id", "name", "x"]),
                                                 inner, max_size=3)), max_leaves=6)


def toml_value(v) -> str:
    """TOML for one value (json.dumps spells strings as TOML basic strings do)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, (int,)):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (datetime.datetime, datetime.date, datetime.time)):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


SECTIONS = {name: [f.name for f in dataclasses.fields(cls)]
            for name, cls in config._SECTIONS.items()}


@st.composite
def config_texts(draw):
    """A config: known sections and keys (sometimes an unknown one) with values of any
    type; returns (text, the keys given)."""
    lines, keys = [], []
    for section, fields in SECTIONS.items():
        chosen = draw(st.lists(st.sampled_from(fields + ["bogus_key"]), unique=True,
                               max_size=3))
        if not chosen and draw(st.booleans()):
            continue
        lines.append(f"[{section}]")
        for key in chosen:
            lines.append(f"{key} = {toml_value(draw(VALUES))}")
            keys.append(f"{section}.{key}")
    if draw(st.integers(0, 9)) == 0:
        lines.insert(0, f"stray = {toml_value(draw(VALUES))}")
        keys.append("stray")
    return "\n".join(lines) + "\n", keys


@FUZZ
@given(config_texts())
def test_a_generated_config_is_accepted_or_refused_naming_its_key(doc):
    text, keys = doc
    try:
        cfg = config.parse(text)
    except config.ConfigError as e:
        assert e.key, f"no key named: {e}"
        # The key named is one this file gave (or its section / the TOML syntax's line).
        assert any(e.key == k or k.startswith(e.key + ".") or e.key.startswith(k)
                   for k in keys), f"{e} names {e.key!r}, not one of {keys}"
        assert "Traceback" not in str(e)
        return
    assert isinstance(cfg, config.Config)


@FUZZ
@given(st.text(max_size=200))
def test_config_text_of_any_shape_is_accepted_or_a_config_error(text):
    try:
        config.parse(text)
    except config.ConfigError as e:
        assert str(e)


# --- objects of every kind ------------------------------------------------------------------

VALID = {
    "tenants": {"name": "blue", "id": 10, "vni": 5010, "default": "drop"},
    "ports": {"name": "vm1", "tenant": "blue", "allow": ["10.0.0.64/26"],
              "port_security": True, "allow_vlan": False},
    "endpoints": {"tenant": "blue", "ip": "10.0.0.1", "port": "vm1",
                  "mac": "02:00:00:00:00:01"},
    "routes": {"tenant": "blue", "prefix": "10.1.0.0/16", "via": "10.0.0.1"},
    "rules": {"id": 1, "tenant": "blue", "priority": 10, "action": "allow",
              "src": "10.0.0.0/24", "proto": "tcp", "dport": "22", "comment": "ssh"},
}


@st.composite
def mutated(draw, kind: str):
    """A valid object of `kind` with fields replaced by anything, removed or added;
    returns (the object, the fields touched)."""
    obj = dict(VALID[kind])
    touched = []
    fields = list(model.KINDS[kind].FIELDS) + list(getattr(model.KINDS[kind], "SWITCHES", ()))
    for f in draw(st.lists(st.sampled_from(fields + ["bogus"]), min_size=1, max_size=3,
                           unique=True)):
        how = draw(st.sampled_from(["set", "set", "set", "drop"]))
        if how == "drop":
            obj.pop(f, None)
        else:
            obj[f] = draw(VALUES)
        touched.append(f)
    return obj, touched


def names_a_field(err: model.Invalid, kind: str, touched) -> bool:
    """The error names a touched field, or the object (when what is wrong is the object
    as a whole: a missing field, fields that exclude each other)."""
    text = str(err)
    singular = kind[:-1]
    return any(f in text for f in touched) or text.startswith(singular) or \
        text.startswith("new rule")


@FUZZ
@given(st.sampled_from(sorted(model.KINDS)).flatmap(
    lambda kind: st.tuples(st.just(kind), mutated(kind))))
def test_a_generated_object_is_accepted_or_refused_naming_the_field(case):
    kind, (obj, touched) = case
    try:
        model.KINDS[kind].from_dict(obj)
    except model.Invalid as e:
        assert names_a_field(e, kind, touched), f"{kind} {obj}: {e}"


@pytest.fixture
def ctl(tmp_path):
    store = Store.open(str(tmp_path / "state.db"))
    try:
        yield Controller(config.Config(), store, datapath=None, links=None)
    finally:
        store.close()


@st.composite
def apply_states(draw):
    """A whole state: each kind a list of valid or mutated objects, sometimes not a list."""
    state, touched = {}, []
    for kind in model.KINDS:
        roll = draw(st.integers(0, 19))
        if roll == 0:
            state[kind] = draw(VALUES)
            touched.append(kind)
            continue
        items = []
        for _ in range(draw(st.integers(0, 2))):
            if draw(st.booleans()):
                items.append(dict(VALID[kind]))
            else:
                obj, t = draw(mutated(kind))
                items.append(obj)
                touched += t
        state[kind] = items
    if draw(st.integers(0, 19)) == 0:
        state["bogus"] = []
        touched.append("bogus")
    return state, touched


@FUZZ
@given(apply_states())
def test_a_generated_apply_dry_run_is_accepted_or_refused_naming_what(ctl, doc):
    state, touched = doc
    try:
        ctl.apply(state, dry_run=True)
    except model.Invalid as e:
        assert str(e) and "Traceback" not in str(e)
    assert ctl.state.to_dict() == model.State().to_dict()


# --- what the fuzz tests found, kept as regressions ------------------------------------------

DEEP = 5000


def test_a_config_nested_too_deeply_is_a_config_error_not_a_recursion_error():
    """Found here: tomllib recurses per nested array, so thousands of "[" ended
    `xdpflow-agent --check` with a RecursionError traceback."""
    for text in ("a = " + "[" * DEEP + "]" * DEEP,
                 "[state]\nrules = " + "[" * DEEP + "]" * DEEP,
                 "[agent]\nsocket = " + "{a = " * DEEP + "1" + "}" * DEEP):
        with pytest.raises(config.ConfigError, match="nested too deeply"):
            config.parse(text)


def test_an_apply_file_nested_too_deeply_is_a_usage_error(tmp_path):
    from ctl import cli
    path = tmp_path / "deep.toml"
    path.write_text("[[tenants]]\nname = " + "[" * DEEP + "]" * DEEP + "\n")
    with pytest.raises(cli.UsageError, match="nested too deeply"):
        cli._read_state_file(str(path))


def test_a_request_nested_too_deeply_is_a_bad_request_with_no_traceback(caplog):
    """Found by the hostile-client tests: json recurses per nested array, so a request of
    thousands of "[" was a RecursionError, logged with its traceback and answered
    "internal"."""
    from agent.api import BAD_REQUEST, ApiServer, Peer
    server = ApiServer(controller=None)
    for data in (b"[" * DEEP * 20 + b"]" * DEEP * 20,
                 b'{"command": "status", "args": ' + b"[" * DEEP * 20 + b"}"):
        reply = server.handle(data, Peer(1, 0, 0))
        assert reply["error"]["code"] == BAD_REQUEST, reply
        assert "nested too deeply" in reply["error"]["message"]
    assert "Traceback" not in caplog.text
