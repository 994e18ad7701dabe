"""Per-tenant flow quotas from the outside in: the config's default, a tenant's own
(`tenant add --max-flows`, apply files), what the compiler hands the datapath, the store
keeping it, and bad values refused naming the field (the datapath side is
tests/bpf/test_quota.py)."""
import pytest

from agent import compiler, config, model
from agent.config import ConfigError
from agent.store import Store
from ctl import cli

pytestmark = pytest.mark.unit

STATE = {"tenants": [{"name": "blue", "id": 10}, {"name": "red", "id": 20, "max_flows": 500},
                     {"name": "green", "id": 30, "max_flows": 0}]}


def test_the_config_default_applies_to_tenants_without_their_own():
    cfg = config.parse("[flows]\nmax_per_tenant = 100000\n")
    assert cfg.flows.max_per_tenant == 100000
    assert config.parse("").flows.max_per_tenant == 0          # no quota unless asked
    img = compiler.compile_state(model.State.from_dict(STATE), {},
                                 max_flows=cfg.flows.max_per_tenant)
    assert {t.name: t.max_flows for t in img.tenants.values()} == \
        {"blue": 100000, "red": 500, "green": 0}                 # 0: this tenant has none


@pytest.mark.parametrize("text, key", [("[flows]\nmax_per_tenant = -1\n", "flows.max_per_tenant"),
                                       ("[flows]\nmax_per_tenant = \"10\"\n", "flows.max_per_tenant"),
                                       ("[flows]\nmax_tenant = 3\n", "flows.max_tenant")])
def test_bad_config_names_the_key(text, key):
    with pytest.raises(ConfigError) as e:
        config.parse(text)
    assert key in str(e.value)


@pytest.mark.parametrize("value", [-1, 1 << 32, "10", 1.5, True])
def test_bad_quota_is_refused_naming_the_field(value):
    with pytest.raises(model.Invalid, match="tenant blue: max_flows"):
        model.Tenant.from_dict({"name": "blue", "id": 10, "max_flows": value})


def test_the_store_keeps_a_tenants_quota(tmp_path):
    st = model.State.from_dict(STATE)
    with Store.open(str(tmp_path / "state.db")) as s:
        with s.transaction() as tx:
            tx.write(model.State(), st)
    with Store.open(str(tmp_path / "state.db")) as s:
        got = {t.name: t.max_flows for t in s.load().tenants}
    assert got == {"blue": None, "red": 500, "green": 0}


def test_cli_max_flows_reaches_the_request():
    ns = cli.build_parser().parse_args(["tenant", "add", "blue", "--id", "10",
                                        "--max-flows", "250000"])
    assert ns.max_flows == 250000
    with pytest.raises(cli.UsageError, match="--max-flows: invalid int value: 'many'"):
        cli.build_parser().parse_args(["tenant", "add", "blue", "--id", "10",
                                       "--max-flows", "many"])


def test_apply_file_quota_roundtrips_through_the_config_state():
    cfg = config.parse("[[state.tenants]]\nname = \"blue\"\nid = 10\nmax_flows = 1000\n")
    assert cfg.state.tenants[0].max_flows == 1000
    assert config.parse(cfg.to_toml()) == cfg
