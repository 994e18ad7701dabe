"""Flow aging against real maps: idle timeouts per protocol, TCP after FIN/RST, the high
watermark; the two directions of a flow age together; a flow of an older generation is
left to the datapath to judge again (never evicted for its generation), so an idle
connection survives an unrelated change and its server may speak first; evictions are
counted by reason and the counts survive a new controller (an agent restart)."""

import pytest

from scapy.all import raw

from agent import abi, config
from agent.control import Controller
from agent.flows import now_coarse_ns
from agent.store import Store
from agent.sweeper import Evictions, Sweeper

from .cases import BLUE, XDP_DROP, XDP_REDIRECT, blue, ep, rule, tcp4
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
            c.apply({"tenants": [{"name": "blue", "id": 10}, {"name": "red", "id": 20}]},
                    dry_run=False)
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
    done = ctl.sweeper.sweep()
    assert keys(ctl) == {fresh_udp, young_tcp}
    assert done == {"idle": 2}
    assert ctl.evictions.counts["idle"] == 2
    assert ctl.sweeper.flow_counts == {10: 2}


def test_tcp_after_fin_uses_the_short_timeout(ctl):
    closing = put_flow(ctl, 6, 2000, 80, idle_s=15, flags=abi.FLOW_CLOSING)
    open_ = put_flow(ctl, 6, 2001, 80, idle_s=15)
    assert ctl.sweeper.sweep() == {"closed": 1}
    assert keys(ctl) == {open_}
    assert closing not in keys(ctl)


def test_a_busy_forward_keeps_its_idle_reply(ctl):
    # A one-way UDP stream: the reply entry never sees a packet, yet must live as long
    # as the forward one is busy, or a late reply would be judged as new traffic.
    fwd = put_flow(ctl, 17, 3000, 5300, idle_s=1)
    rev = put_flow(ctl, 17, 5300, 3000, idle_s=120, flags=abi.FLOW_REVERSE, src=2, dst=1)
    ctl.sweeper.sweep()
    assert {fwd, rev} <= keys(ctl)
    # both idle: both go, counted as two evictions
    put_flow(ctl, 17, 3000, 5300, idle_s=100)
    assert ctl.sweeper.sweep() == {"idle": 2}
    assert not ({fwd, rev} & keys(ctl))


def test_stale_generation_is_left_to_the_datapath(ctl):
    # An older generation is a miss the datapath judges again: the sweeper keeps it (it
    # ages by idle time like any other), and only a removed tenant's flows go at once.
    stale = put_flow(ctl, 17, 4000, 53, idle_s=1, generation=ctl.dp.generation(10) - 1 or 99)
    gone_tenant = put_flow(ctl, 17, 4001, 53, idle_s=1, tenant=30, generation=1)
    keep = put_flow(ctl, 17, 4002, 53, idle_s=1)
    assert ctl.sweeper.sweep() == {"rule_change": 1}
    assert keys(ctl) == {stale, keep}
    assert gone_tenant not in keys(ctl)
    stale_idle = put_flow(ctl, 17, 4003, 53, idle_s=90, generation=ctl.dp.generation(10) - 1 or 99)
    assert ctl.sweeper.sweep() == {"idle": 1}
    assert stale_idle not in keys(ctl)


def test_over_the_high_watermark_the_longest_idle_go_first(ctl):
    # capacity 1024, watermark 0.1 -> at most 102 flows stay
    made = [(i, put_flow(ctl, 6, 10000 + i, 80, idle_s=i)) for i in range(150)]
    done = ctl.sweeper.sweep()
    assert done == {"table_full": 48}
    left = keys(ctl)
    assert left == {k for i, k in made if i < 102}
    assert ctl.sweeper.flow_counts == {10: 102}


def test_eviction_counts_survive_a_new_controller(ctl):
    put_flow(ctl, 17, 5000, 53, idle_s=120)
    ctl.sweeper.sweep()
    again = Controller(ctl.cfg, ctl.store, ctl.dp, links=None)
    assert again.evictions.counts["idle"] == 1
    assert ctl.flow_flush("blue") == 0
    put_flow(ctl, 17, 5001, 53, idle_s=1)
    assert ctl.flow_flush("blue") == 1
    assert Controller(ctl.cfg, ctl.store, ctl.dp, links=None).evictions.counts["flush"] == 1


def test_idle_connection_survives_an_unrelated_change_and_its_server_speaks_first(
        bench, tmp_path):
    """flip + sweep + reply through the real program: a TCP connection allowed from p1 to
    the server on p2 goes quiet; an endpoint is added (every blue flow is now of an older
    generation); a sweep runs; then the server sends first. Its packet must reach the
    client: the reply entry is judged again under the new rules, which still allow the
    forward direction. (Evicting stale flows made it new traffic: default drop.)"""
    allow_ssh = [rule(1, proto="tcp", dport=22, dst="10.0.0.2/32")]
    before = blue(allow_ssh)
    after = blue(allow_ssh, endpoints=[ep("blue", "10.0.0.3", "p3")], ports=("p3",))
    bench.apply(before)
    rc, _ = bench.run(raw(tcp4(40000, 22)), "p1")
    assert rc == XDP_REDIRECT
    gen = bench.dp.generation(BLUE)
    bench.sync(after)
    assert bench.dp.generation(BLUE) != gen            # the unrelated change flipped blue
    store = Store.open(str(tmp_path / "state.db"))
    try:
        sweeper = Sweeper(config.parse(""), bench.dp, Evictions(store))
        assert sweeper.sweep() == {}
        assert sweeper.flow_counts == {BLUE: 2}
    finally:
        store.close()
    server_first = tcp4(22, 40000, port="p2", src="10.0.0.2", dst="10.0.0.1", flags="PA")
    rc, _ = bench.run(raw(server_first), "p2")
    assert rc == XDP_REDIRECT
    # A packet the new rules never allowed is still dropped: nothing was opened up.
    rc, _ = bench.run(raw(tcp4(22, 40001, port="p2", src="10.0.0.2", dst="10.0.0.1")), "p2")
    assert rc == XDP_DROP


def test_over_the_high_watermark_the_biggest_holder_pays(ctl):
    """A steady tenant's established flows are the longest idle; a flooding tenant's are
    new. Over the watermark the flooding tenant gives its flows back, not the steady one
    (the longest-idle-first rule evicted blue's 30 first)."""
    steady = {put_flow(ctl, 6, 20000 + i, 80, idle_s=100 + i) for i in range(30)}
    flood = [(i, put_flow(ctl, 6, 30000 + i, 80, idle_s=i / 100, tenant=20))
             for i in range(150)]
    done = ctl.sweeper.sweep()
    # 180 entries, at most 102 stay: red (150) goes down to 72, blue (30) keeps all.
    assert done == {"table_full": 78}
    left = keys(ctl)
    assert steady <= left
    assert left - steady == {k for i, k in flood if i < 72}   # red's longest idle went
    assert ctl.sweeper.flow_counts == {10: 30, 20: 72}


def test_watermark_shares_are_water_filled():
    from agent.sweeper import shares_over
    assert shares_over({1: 30, 2: 150}, 78) == {2: 78}
    assert shares_over({1: 60, 2: 150}, 108) == {1: 9, 2: 99}      # both down to 51
    assert sum(shares_over({1: 10, 2: 11, 3: 12}, 7).values()) == 7
    assert shares_over({1: 5}, 0) == {}


class CountingLock:
    """A lock that counts how often it was taken."""

    def __init__(self):
        self.taken = 0

    def __enter__(self):
        self.taken += 1

    def __exit__(self, *exc):
        return False


def test_a_sweep_holds_the_lock_a_slice_at_a_time(ctl, monkeypatch):
    """The structural half of "status answers within 100 ms during a sweep of 1,000,000
    flows" (the time itself is measured in test_capacity's long mode): a sweep takes the
    caller's lock once per slice of the table, never for the whole, and another thread
    waiting for the lock gets it while the sweep is still going."""
    import threading
    for i in range(100):
        put_flow(ctl, 6, 40000 + i, 80, idle_s=1 if i % 2 else 400)
    monkeypatch.setattr(ctl.sweeper, "slice_entries", 8)
    lock = CountingLock()
    slices = ctl.sweeper.slices
    assert ctl.sweeper.sweep(lock) == {"idle": 50}
    assert ctl.sweeper.slices - slices >= 100 // 8
    assert lock.taken >= 100 // 8 + 2

    real = threading.RLock()            # the daemon's kind of lock
    first_slice, done, got = threading.Event(), threading.Event(), []
    orig = ctl.sweeper._slices

    def slices_noting_the_first(lk, items):
        for part in orig(lk, items):
            first_slice.set()
            yield part

    def client():
        first_slice.wait(5)
        with real:                     # e.g. `status`
            got.append(not done.is_set())

    monkeypatch.setattr(ctl.sweeper, "_slices", slices_noting_the_first)
    t = threading.Thread(target=client)
    t.start()
    ctl.sweeper.sweep(real)
    done.set()
    t.join(5)
    assert got == [True]                # served during the sweep, not after it
