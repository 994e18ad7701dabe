"""Hypothesis helpers shared by the fuzz tests of every tier (issue 14): how many examples
a test runs (CI, or the long mode with XDPFLOW_LONG=1), values of every TOML / JSON type,
valid objects of each model kind and their mutations, whole apply states."""
from __future__ import annotations

import datetime
import json
import math
import os

from hypothesis import HealthCheck, settings, strategies as st

from agent import model

LONG = os.environ.get("XDPFLOW_LONG") == "1"


def fuzz_settings(ci: int, long: int, **kw) -> settings:
    """Settings for a fuzz test: `ci` examples, or `long` ones in the long mode; no
    deadline (the machine is shared) and no example database (CI starts clean)."""
    return settings(max_examples=long if LONG else ci, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture], **kw)


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


VALID = {
    "tenants": {"name": "blue", "id": 10, "vni": 5010, "default": "drop"},
    "ports": {"name": "vm1", "tenant": "blue", "allow": ["10.0.0.64/26"],
              "port_security": True, "allow_vlan": False},
    "endpoints": {"tenant": "blue", "ip": "10.0.0.1", "port": "vm1",
                  "mac": "02:00:00:00:00:01"},
    "routes": {"tenant": "blue", "prefix": "10.1.0.0/16", "via": "10.0.0.1"},
    "rules": {"id": 1, "tenant": "blue", "priority": 10, "action": "allow",
              "src": "10.0.0.0/24", "proto": "tcp", "dport": "22", "comment": "ssh"},
    "fips": {"tenant": "blue", "ip": "203.0.113.10", "to": "10.0.0.1"},
    "snats": {"tenant": "blue", "to": "198.51.100.1", "ports": "20000-60000"},
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
