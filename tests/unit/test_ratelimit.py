"""Rate limits in the model, the store, the compiler and the CLI (no BPF): what is
accepted, what is refused with a clear error, and the buckets the datapath gets."""
import ctypes as ct

import pytest

from agent import abi, commands, compiler, model
from agent.store import Store
from ctl import cli

pytestmark = pytest.mark.unit


def _state(tenant=None, rule=None):
    return model.State.from_dict({
        "tenants": [{"name": "blue", "id": 10, **(tenant or {})}],
        "rules": [{"id": 7, "tenant": "blue", "priority": 1, "action": "allow",
                   **(rule or {})}]})


@pytest.mark.parametrize("rate,unit,n", [("10000pps", "pps", 10000), ("100mbit", "bps", 10**8),
                                         ("64kbit", "bps", 64000), ("1gbit", "bps", 10**9),
                                         ("1500bit", "bps", 1500), ("1pps", "pps", 1)])
def test_rates_parse(rate, unit, n):
    assert model.parse_rate(rate, "x") == rate
    assert model.rate_value(rate) == (unit, n)


@pytest.mark.parametrize("bad,says", [
    ("100", "not a rate"), ("100mbps", "not a rate"), ("0pps", "out of range"),
    ("10 pps", "not a rate"), (100, "not a rate"), ("-5pps", "not a rate"),
    ("2000000000pps", "out of range"), ("500gbit", "out of range")])
def test_bad_rates_are_refused_naming_the_field(bad, says):
    with pytest.raises(model.Invalid) as e:
        _state(tenant={"rate": bad})
    assert "tenant blue: rate" in str(e.value) and says in str(e.value)


def test_burst_needs_a_rate_and_a_rule_limit_needs_allow():
    with pytest.raises(model.Invalid, match="burst: needs a rate"):
        _state(rule={"burst": 5})
    with pytest.raises(model.Invalid, match="burst: 0 is out of range"):
        _state(rule={"rate": "5pps", "burst": 0})
    with pytest.raises(model.Invalid, match="rate: a rate limit needs action allow"):
        model.Rule.from_dict({"id": 1, "tenant": "blue", "priority": 1, "action": "deny",
                              "rate": "5pps"})


def test_objects_without_a_limit_print_as_before():
    st = _state()
    assert st.tenants[0].to_dict() == {"name": "blue", "id": 10, "vni": None, "default": "drop",
                                       "max_flows": None}
    assert "rate" not in st.rules[0].to_dict()
    st = _state(tenant={"rate": "100mbit"}, rule={"rate": "5pps", "burst": 2})
    assert st.tenants[0].to_dict()["rate"] == "100mbit"
    assert (st.rules[0].to_dict()["rate"], st.rules[0].to_dict()["burst"]) == ("5pps", 2)
    assert model.State.from_dict(st.to_dict()) == st


def test_default_burst_is_a_tenth_of_a_second():
    assert model.burst_of("10000pps", None) == 1000
    assert model.burst_of("5pps", None) == 1
    assert model.burst_of("100mbit", None) == 1_250_000    # bytes
    assert model.burst_of("8000bit", None) == 1500         # at least one frame
    assert model.burst_of("100mbit", 9000) == 9000


def test_store_round_trips_limits(tmp_path):
    st = _state(tenant={"rate": "100mbit", "burst": 20000}, rule={"rate": "5pps"})
    with Store.open(str(tmp_path / "s.db")) as s:
        with s.transaction() as tx:
            tx.write(model.State(), st)
    with Store.open(str(tmp_path / "s.db")) as s:
        assert s.load() == st


def test_compiled_buckets():
    st = _state(tenant={"rate": "100mbit", "burst": 15000}, rule={"rate": "10000pps",
                                                                  "burst": 100})
    img = compiler.compile_state(st, {})
    assert img.tenants[10].policer == 10
    pol = {ct.c_uint32.from_buffer_copy(k).value: abi.Policer.from_buffer_copy(v)
           for k, v in img.policers.items()}
    t, r = pol[10], pol[7 | abi.POLICER_RULE]
    # 100 mbit/s: 80 ns a byte (16 fraction bits); 15,000 bytes of burst = 1.2 ms.
    assert (t.cost, t.burst_ns, t.flags, t.tat_ns) == (80 << 16, 1_200_000, abi.POL_BYTES, 0)
    assert (r.cost, r.burst_ns, r.flags) == (100_000, 10_000_000, 0)
    (_, v), = img.tenants[10].classifier.rule_items(10, 1)
    assert abi.Rule.from_buffer_copy(v).policer == 7 | abi.POLICER_RULE


def test_no_limit_no_bucket():
    img = compiler.compile_state(_state(), {})
    assert img.policers == {} and img.tenants[10].policer == 0
    (_, v), = img.tenants[10].classifier.rule_items(10, 1)
    assert abi.Rule.from_buffer_copy(v).policer == 0


def test_cli_sends_rate_and_burst():
    parser = cli.build_parser()
    for name, argv in (("tenant add", ["tenant", "add", "blue", "--id", "10", "--rate",
                                       "100mbit", "--burst", "9000"]),
                       ("rule add", ["rule", "add", "--tenant", "blue", "-p", "5", "--action",
                                     "allow", "--rate", "10000pps", "--burst", "100"])):
        args = cli.wire_args(commands.COMMANDS[name], parser.parse_args(argv))
        assert (args["rate"], args["burst"]) == (argv[-3], int(argv[-1])), name


def test_apply_file_takes_limits(tmp_path):
    f = tmp_path / "state.toml"
    f.write_text('[[tenants]]\nname = "blue"\nid = 10\nrate = "100mbit"\nburst = 30000\n'
                 '[[rules]]\nid = 1\ntenant = "blue"\npriority = 1\naction = "allow"\n'
                 'rate = "10000pps"\n')
    st = model.State.from_dict(cli.load_state_file(str(f)))
    assert (st.tenants[0].rate, st.tenants[0].burst, st.rules[0].rate) == \
        ("100mbit", 30000, "10000pps")


def test_trace_text_shows_the_bucket():
    text = cli.render("trace", {"verdict": "drop", "reason": "ratelimit", "rate_limits": [
        {"bucket": "rule 7", "rate": "5pps", "burst": 2, "unit": "packets", "tokens": 0,
         "cost": 1, "conformed": False}]}, {})
    assert "limit:     rule 7 5pps burst 2: 0 packets in the bucket, this packet 1: over " \
           "the limit" in text


def test_bench_limit_is_half_the_offered_load_in_frames():
    from netns_lab import bench_ratelimit as br
    assert br.limit_for("pps", 5241.7) == ("2620pps", 2620)
    # 2,620 frames/s of 60 bytes = 1,257.6 kbit/s: 1257kbit allows 2,618 frames/s.
    assert br.limit_for("bit", 5241.7) == ("1257kbit", 2618)


def test_bench_table_reports_against_the_limit():
    from netns_lab import bench_ratelimit as br
    from netns_lab import benchlib
    c = {"case": "pps", "rate": "2716pps", "limit_pps": 2716, "offered_pps": 5241,
         "delivered_pps": 2686, "delivered_over_limit": 0.989}
    doc = {"cases": [c], "goals": [benchlib.goal_entry("pps", 0.011, "<=", 0.1)]}
    text = br.ratelimit_table(doc)
    assert "2716pps" in text and "0.989" in text and "met" in text


def test_more_limits_than_the_datapath_holds_are_refused_naming_it(monkeypatch):
    monkeypatch.setattr(abi, "MAX_POLICERS", 2)
    st = model.State.from_dict({
        "tenants": [{"name": "blue", "id": 10, "rate": "5pps"}],
        "rules": [{"id": i, "tenant": "blue", "priority": 1, "action": "allow",
                   "rate": "5pps", "dport": i, "proto": "tcp"} for i in (1, 2)]})
    with pytest.raises(compiler.CompileError, match="rate limits: 3 tenants and rules have "
                                                    "one; the datapath holds 2"):
        compiler.compile_state(st, {})
