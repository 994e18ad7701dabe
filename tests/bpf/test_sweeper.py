"""Flow aging against real maps: idle timeouts per protocol, TCP after FIN/RST, stale
generations, the high watermark; the two directions of a flow age together; evictions are
counted by reason and the counts survive a new controller (an agent restart)."""

import pytest

from agent import abi, config, model
from agent.control import Controller, now_coarse_ns
from agent.store import Store

from .conftest import loaded

pytestmark = pytest.mark.bpf

CONFIG = """
[datapath]
flow_table_size = 1024
max_rule_entries = 1024
max_endpoints = 64
max_routes = 64
max_ports = 16
[aging]
tcp_established = 300
tcp_closed = 10
udp = 60
icmp = 30
other = 60
high_watermark = 0.1
"""
S = 1_000_000_000


@pytest.fixture
def ctl(tmp_path):
    cfg = config.parse(CONFIG)
    store = Store.open(str(tmp_path / "state.db"))
    try:
        with loaded(cfg.datapath_defines()) as dp:
            c = Controller(cfg, store, dp, links=None)
            c._commit(model.State.from_dict({"tenants": [{"name": "blue", "id": 10},
                                                        {"name": "red", "id": 20}]}))
            yield c
    finally:
        store.close()


def put_flow(c, proto, sport, dport, idle_s, tenant=10, flags=0, generation=None, src=1, dst=2):
    k = abi.FlowKey(tenant=tenant, proto=proto, sport=sport, dport=dport)
    abi.set_addr(k.src, bytes(15) + bytes([src]))
    abi.set_addr(k.dst, bytes(15) + bytes([dst]))
    now = now_coarse_ns()
    # The datapath's clock counts from boot: "idle for longer than the machine is up" would
    # wrap around in the u64 field and read as the newest flow of all.
    assert now > idle_s * S, f"the machine has been up less than {idle_s} s"
    f = abi.Flow(generation=c.dp.generation(tenant) if generation is None else generation,
                 last_seen_ns=now - int(idle_s * S), created_ns=now - int(idle_s * S),
                 flags=flags, verdict=abi.V_REDIRECT, packets=1)
    c.dp.maps["xf_flows"].put(bytes(k), bytes(f))
    return bytes(k)


def keys(c):
    return set(c.dp.maps["xf_flows"].keys())


def test_idle_timeouts_follow_the_protocol(ctl):
    fresh_udp = put_flow(ctl, 17, 1000, 53, idle_s=30)
    put_flow(ctl, 17, 1001, 53, idle_s=90)             # idle past udp (60)
    young_tcp = put_flow(ctl, 6, 1002, 80, idle_s=200)
    put_flow(ctl, 1, 7, 8 << 8, idle_s=45)             # idle past icmp (30)
    done = ctl.sweep()
    assert keys(ctl) == {fresh_udp, young_tcp}
    assert done == {"idle": 2}
    assert ctl.evicted["idle"] == 2
    assert ctl.flow_counts == {10: 2}


def test_tcp_after_fin_uses_the_short_timeout(ctl):
    closing = put_flow(ctl, 6, 2000, 80, idle_s=15, flags=abi.FLOW_CLOSING)
    open_ = put_flow(ctl, 6, 2001, 80, idle_s=15)
    assert ctl.sweep() == {"closed": 1}
    assert keys(ctl) == {open_}
    assert closing not in keys(ctl)


def test_a_busy_forward_keeps_its_idle_reply(ctl):
    # A one-way UDP stream: the reply entry never sees a packet, yet must live as long
    # as the forward one is busy, or a late reply would be judged as new traffic.
    fwd = put_flow(ctl, 17, 3000, 5300, idle_s=1)
    rev = put_flow(ctl, 17, 5300, 3000, idle_s=120, flags=abi.FLOW_REVERSE, src=2, dst=1)
    ctl.sweep()
    assert {fwd, rev} <= keys(ctl)
    # both idle: both go, counted as two evictions
    put_flow(ctl, 17, 3000, 5300, idle_s=100)
    assert ctl.sweep() == {"idle": 2}
    assert not ({fwd, rev} & keys(ctl))


def test_stale_generation_is_evicted_as_rule_change(ctl):
    stale = put_flow(ctl, 17, 4000, 53, idle_s=1, generation=ctl.dp.generation(10) - 1 or 99)
    gone_tenant = put_flow(ctl, 17, 4001, 53, idle_s=1, tenant=30, generation=1)
    keep = put_flow(ctl, 17, 4002, 53, idle_s=1)
    assert ctl.sweep() == {"rule_change": 2}
    assert keys(ctl) == {keep}
    del stale, gone_tenant


def test_over_the_high_watermark_the_longest_idle_go_first(ctl):
    # capacity 1024, watermark 0.1 -> at most 102 flows stay
    made = [(i, put_flow(ctl, 6, 10000 + i, 80, idle_s=i)) for i in range(150)]
    done = ctl.sweep()
    assert done == {"table_full": 48}
    left = keys(ctl)
    assert left == {k for i, k in made if i < 102}
    assert ctl.flow_counts == {10: 102}


def test_eviction_counts_survive_a_new_controller(ctl):
    put_flow(ctl, 17, 5000, 53, idle_s=120)
    ctl.sweep()
    again = Controller(ctl.cfg, ctl.store, ctl.dp, links=None)
    assert again.evicted["idle"] == 1
    assert ctl.flow_flush("blue") == 0
    put_flow(ctl, 17, 5001, 53, idle_s=1)
    assert ctl.flow_flush("blue") == 1
    assert Controller(ctl.cfg, ctl.store, ctl.dp, links=None).evicted["flush"] == 1
