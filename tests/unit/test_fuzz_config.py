"""Bad configuration and rules (issue 14 item 6), without a kernel: Hypothesis-generated
config files, objects of every kind and apply states (dry runs). Each is accepted, or
refused with the project's own error (config.ConfigError, model.Invalid) naming the key or
the field — never another exception (a traceback). The datapath side (real applies that
are refused whole, never half-applied) is tests/bpf/test_fuzz_apply.py.

CI: a few hundred examples per test; XDPFLOW_LONG=1: tens of thousands."""
from __future__ import annotations

import dataclasses

import pytest
from fuzzing import VALUES, apply_states, fuzz_settings, mutated, names_a_field, toml_value
from hypothesis import given, strategies as st

from agent import config, model

pytestmark = pytest.mark.unit

FUZZ = fuzz_settings(ci=150, long=20_000)

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

@FUZZ
@given(st.sampled_from(sorted(model.KINDS)).flatmap(
    lambda kind: st.tuples(st.just(kind), mutated(kind))))
def test_a_generated_object_is_accepted_or_refused_naming_the_field(case):
    kind, (obj, touched) = case
    try:
        model.KINDS[kind].from_dict(obj)
    except model.Invalid as e:
        assert names_a_field(e, kind, touched), f"{kind} {obj}: {e}"


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
