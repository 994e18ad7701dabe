"""The Prometheus collector, scraped over real HTTP from a fake datapath source."""
import shutil
import socket
import subprocess
import threading
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import _FAMILIES, EVICTION_REASONS, DatapathCollector, serve

pytestmark = pytest.mark.unit

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


class FakeSource:
    """The datapath as the collector sees it, with numbers the tests can check."""

    def __init__(self):
        self.calls = 0
        self.broken = set()

    def _call(self, name):
        self.calls += 1
        if name in self.broken:
            raise RuntimeError(f"bpf map read failed: {name}")

    def counters(self):
        self._call("counters")
        return [
            dict(tenant="blue", port="veth-vm1", verdict="allow", reason="rule",
                 packets=1200, bytes=96000),
            dict(tenant="blue", port="veth-vm1", verdict="drop", reason="default",
                 packets=7, bytes=420),
            dict(tenant="red", port="veth-vm2", verdict="pass", reason="unparsed",
                 packets=3, bytes=180),
        ]

    def flow_summary(self):
        self._call("flow_summary")
        return dict(total=250, capacity=1000, by_tenant={"blue": 200, "red": 50},
                    insert_failures=4, quota_refusals={"red": 7})

    def evictions(self):
        self._call("evictions")
        return {"idle": 30, "closed": 12, "table_full": 1}

    def tenants(self):
        self._call("tenants")
        return [
            dict(name="blue", id=10, generation=3, rules=5, endpoints=2),
            dict(name="red", id=20, generation=1, rules=0, endpoints=1),
        ]

    def ports(self):
        self._call("ports")
        return [
            dict(name="veth-vm1", tenant="blue", attached=True, ifindex=7, mode="native"),
            dict(name="veth-vm2", tenant="red", attached=False, ifindex=0, mode=""),
        ]

    def agent_info(self):
        self._call("agent_info")
        return dict(version="0.1.0", started_at=1700000000.5, last_reconcile_seconds=0.25,
                    last_apply_seconds=0.125, reconcile_errors=2, sweeps=40, sweep_seconds_total=1.5)

    def map_pressure(self):
        self._call("map_pressure")
        return {"xf_flows": (250, 1000), "xf_rules": (5, 4096)}

    def datapath_runs(self):
        self._call("datapath_runs")
        return {"run_time_ns": 2_500_000_000, "run_count": 100_000_000}


    def monitor(self):
        self._call("monitor")
        return dict(listeners=1, sent=900, rate_cap=99100, ring_full=3, client=5)

    def port_tx(self):
        self._call("port_tx")
        return [dict(tenant="blue", port="veth-vm1", packets=40, bytes=3200),
                dict(tenant="red", port="veth-vm2", packets=0, bytes=0)]

    def nat(self):
        self._call("nat")
        return [dict(tenant="blue", kind="snat", direction="out", packets=7),
                dict(tenant="blue", kind="snat", direction="exhausted", packets=2)]

    def rule_counters(self):
        self._call("rule_counters")
        return [dict(tenant="blue", rule=3, packets=1200, bytes=96000)]


class RaisingSource:
    """Every read fails, as when the BPF maps are gone."""

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise OSError(f"{name}: no such map")
        return fail


@pytest.fixture
def source():
    return FakeSource()


@pytest.fixture
def server(source):
    srv = serve(DatapathCollector(source), "127.0.0.1", 0)
    yield srv
    srv.shutdown()


def scrape(host, port):
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        return resp.read().decode()


def samples(body):
    """{(sample name, frozenset(labels)): value} over the whole exposition."""
    out = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(body_samples, name, **labels):
    return body_samples[(name, frozenset(labels.items()))]


def test_scrape_matches_the_source(server):
    got = samples(scrape("127.0.0.1", server.port))
    traffic = dict(tenant="blue", port="veth-vm1", verdict="allow", reason="rule")
    assert value(got, "xdpflow_packets_total", **traffic) == 1200
    assert value(got, "xdpflow_bytes_total", **traffic) == 96000
    assert value(got, "xdpflow_packets_total", tenant="blue", port="veth-vm1",
                 verdict="drop", reason="default") == 7
    assert value(got, "xdpflow_bytes_total", tenant="red", port="veth-vm2",
                 verdict="pass", reason="unparsed") == 180

    assert value(got, "xdpflow_flows", tenant="blue") == 200
    assert value(got, "xdpflow_flows", tenant="red") == 50
    assert value(got, "xdpflow_flow_table_capacity") == 1000
    assert value(got, "xdpflow_flow_table_fill_ratio") == pytest.approx(0.25)
    assert value(got, "xdpflow_flow_insert_failures_total") == 4
    assert value(got, "xdpflow_flow_quota_refusals_total", tenant="red") == 7

    assert value(got, "xdpflow_flow_evictions_total", reason="idle") == 30
    assert value(got, "xdpflow_flow_evictions_total", reason="closed") == 12
    assert value(got, "xdpflow_flow_evictions_total", reason="table_full") == 1
    # Reasons that have not happened yet are exported at 0.
    assert value(got, "xdpflow_flow_evictions_total", reason="flush") == 0
    assert value(got, "xdpflow_flow_evictions_total", reason="rule_change") == 0

    assert value(got, "xdpflow_tenant_generation", tenant="blue") == 3
    assert value(got, "xdpflow_rules", tenant="blue") == 5
    assert value(got, "xdpflow_endpoints", tenant="red") == 1

    assert value(got, "xdpflow_port_attached", port="veth-vm1", tenant="blue",
                 mode="native") == 1
    assert value(got, "xdpflow_port_attached", port="veth-vm2", tenant="red", mode="") == 0

    assert value(got, "xdpflow_agent_info", version="0.1.0") == 1
    assert value(got, "xdpflow_agent_start_time_seconds") == 1700000000.5
    assert value(got, "xdpflow_reconcile_duration_seconds") == 0.25
    assert value(got, "xdpflow_apply_duration_seconds") == 0.125
    assert value(got, "xdpflow_reconcile_errors_total") == 2
    assert value(got, "xdpflow_sweeps_total") == 40
    assert value(got, "xdpflow_sweep_duration_seconds_total") == 1.5
    assert value(got, "xdpflow_map_entries", map="xf_rules") == 5
    assert value(got, "xdpflow_map_capacity", map="xf_rules") == 4096
    assert value(got, "xdpflow_map_fill_ratio", map="xf_flows") == 0.25
    assert value(got, "xdpflow_datapath_run_time_seconds_total") == 2.5
    assert value(got, "xdpflow_datapath_runs_total") == 100_000_000
    assert value(got, "xdpflow_monitor_listeners") == 1
    assert value(got, "xdpflow_monitor_events_total") == 900
    assert value(got, "xdpflow_monitor_events_lost_total", reason="rate_cap") == 99100
    assert value(got, "xdpflow_monitor_events_lost_total", reason="ring_full") == 3
    assert value(got, "xdpflow_monitor_events_lost_total", reason="client") == 5
    assert value(got, "xdpflow_port_tx_packets_total", tenant="blue", port="veth-vm1") == 40
    assert value(got, "xdpflow_port_tx_bytes_total", tenant="red", port="veth-vm2") == 0
    assert value(got, "xdpflow_rule_packets_total", tenant="blue", rule="3") == 1200
    assert value(got, "xdpflow_rule_bytes_total", tenant="blue", rule="3") == 96000
    assert value(got, "xdpflow_scrape_errors_total") == 0
    assert value(got, "xdpflow_up") == 1
    # The agent's registry also carries the process collector.
    assert ("process_cpu_seconds_total", frozenset()) in got


def test_every_family_has_help_and_the_prefix(server):
    body = scrape("127.0.0.1", server.port)
    ours = [f for f in text_string_to_metric_families(body) if not f.name.startswith("process_")]
    assert len(ours) == len(_FAMILIES)
    for family in ours:
        assert family.name.startswith("xdpflow_")
        assert family.documentation and family.documentation != family.name


def test_promtool_check_metrics_is_clean(server):
    if not shutil.which(PROMTOOL):
        pytest.skip("promtool not installed")
    body = scrape("127.0.0.1", server.port)
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=body, text=True,
                            capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


def test_values_are_read_at_scrape_time(server, source):
    scrape("127.0.0.1", server.port)
    before = source.calls
    scrape("127.0.0.1", server.port)
    assert source.calls == before + 13      # ports() twice: its family, the uplinks


def test_raising_part_gives_up_0_and_the_rest_still_exports(server, source):
    source.broken = {"counters"}
    got = samples(scrape("127.0.0.1", server.port))
    assert value(got, "xdpflow_up") == 0
    assert value(got, "xdpflow_scrape_errors_total") == 1
    assert not any(name == "xdpflow_packets_total" for name, _ in got)
    assert value(got, "xdpflow_flow_table_capacity") == 1000
    assert value(got, "xdpflow_agent_info", version="0.1.0") == 1

    # The server is still answering, the error count accumulates, and recovery shows.
    got = samples(scrape("127.0.0.1", server.port))
    assert value(got, "xdpflow_scrape_errors_total") == 2
    source.broken = set()
    got = samples(scrape("127.0.0.1", server.port))
    assert value(got, "xdpflow_up") == 1
    assert value(got, "xdpflow_scrape_errors_total") == 2


def test_wholly_broken_source_still_answers():
    srv = serve(DatapathCollector(RaisingSource()), "127.0.0.1", 0)
    try:
        for expected_errors in (12, 24):
            body = scrape("127.0.0.1", srv.port)
            got = samples(body)
            assert value(got, "xdpflow_up") == 0
            assert value(got, "xdpflow_scrape_errors_total") == expected_errors
    finally:
        srv.shutdown()


def test_malformed_rows_count_as_scrape_errors(source):
    source.tenants = lambda: [dict(name="blue")]  # no generation, rules, endpoints
    collector = DatapathCollector(source)
    families = {f.name: f for f in collector.collect()}
    assert families["xdpflow_up"].samples[0].value == 0
    assert families["xdpflow_tenant_generation"].samples == []
    assert families["xdpflow_rules"].samples == []


def test_describe_does_not_touch_the_source():
    collector = DatapathCollector(RaisingSource())
    names = {f.name for f in collector.describe()}
    assert "xdpflow_packets" in names and "xdpflow_up" in names
    # Registering calls describe(); it must not read BPF.
    CollectorRegistry().register(collector)


def test_describe_and_collect_agree(source):
    collector = DatapathCollector(source)
    described = {(f.name, f.type) for f in collector.describe()}
    collected = {(f.name, f.type) for f in collector.collect()}
    assert described == collected


def test_eviction_reasons_are_the_documented_ones():
    assert set(EVICTION_REASONS) == {"idle", "closed", "rule_change", "flush", "table_full"}


def test_serve_on_ipv6_loopback(source):
    try:
        probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback")
    srv = serve(DatapathCollector(source), "::1", 0)
    try:
        got = samples(scrape("[::1]", srv.port))
        assert value(got, "xdpflow_up") == 1
    finally:
        srv.shutdown()
    # Bracketed, as written in a URL, is accepted too.
    srv = serve(DatapathCollector(source), "[::1]", 0)
    srv.shutdown()


def test_shutdown_releases_the_port(source):
    srv = serve(DatapathCollector(source), "127.0.0.1", 0)
    port = srv.port
    srv.shutdown()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    again = serve(DatapathCollector(source), "127.0.0.1", port)
    again.shutdown()


class OverlaySource(FakeSource):
    """A node with an uplink: what it sent (port_tx) and what arrived on it (counters)."""

    def ports(self):
        return super().ports() + [dict(name="eth1", tenant="", attached=True, ifindex=9,
                                       mode="native", uplink=True)]

    def counters(self):
        return super().counters() + [
            dict(tenant="", port="eth1", verdict="redirect", reason="flow", packets=40,
                 bytes=4000),
            dict(tenant="", port="eth1", verdict="drop", reason="spoof", packets=2, bytes=200),
            dict(tenant="", port="eth1", verdict="pass", reason="uplink_other", packets=9,
                 bytes=900),
            dict(tenant="", port="eth1", verdict="drop", reason="vni_unknown", packets=1,
                 bytes=100)]

    def port_tx(self):
        return super().port_tx() + [dict(tenant="", port="eth1", packets=30, bytes=3000)]


def test_overlay_encap_and_decap_counts():
    got = {s.labels["direction"]: s.value
           for fam in DatapathCollector(OverlaySource()).collect()
           if fam.name == "xdpflow_overlay_packets" for s in fam.samples}
    # Decapsulated: judged as a tenant's (forwarded or refused by its rules), not what
    # went to the kernel or was refused before decap.
    assert got == {"encap": 30, "decap": 42}
    got = {s.labels["direction"]: s.value
           for fam in DatapathCollector(FakeSource()).collect()
           if fam.name == "xdpflow_overlay_packets" for s in fam.samples}
    assert got == {"encap": 0, "decap": 0}


def test_nat_translations_and_exhaustions_are_exported(source):
    families = {f.name: f for f in DatapathCollector(source).collect()}
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in families.values() for s in f.samples}
    assert got[("xdpflow_nat_translations_total",
                (("direction", "out"), ("kind", "snat"), ("tenant", "blue")))] == 7
    assert got[("xdpflow_nat_port_exhaustions_total", (("tenant", "blue"),))] == 2


# -- a warm start's load: scrapes answer with what needs no state --------------------------

# Families read from the stored state: absent while a warm start loads it.
FROM_STATE = ("xdpflow_packets_total", "xdpflow_flows", "xdpflow_flow_table_capacity",
              "xdpflow_flow_evictions_total", "xdpflow_tenant_generation", "xdpflow_rules",
              "xdpflow_port_attached", "xdpflow_port_packets_total", "xdpflow_map_entries",
              "xdpflow_port_tx_packets_total", "xdpflow_rule_packets_total",
              "xdpflow_nat_translations_total", "xdpflow_overlay_packets_total")


class LoadingSource(FakeSource):
    """A warm start still loading its state: agent_info says so; every read is named."""

    def __init__(self):
        super().__init__()
        self.loaded = False
        self.read = []

    def _call(self, name):
        self.read.append(name)
        super()._call(name)

    def agent_info(self):
        return {**super().agent_info(), "state_loaded": self.loaded}


def test_while_the_state_loads_only_what_needs_no_state_is_exported():
    source = LoadingSource()
    srv = serve(DatapathCollector(source), "127.0.0.1", 0)
    try:
        body = scrape("127.0.0.1", srv.port)
        got = samples(body)
        assert value(got, "xdpflow_agent_state_loaded") == 0
        # Nothing failed: the parts left out were not read, and count as no error.
        assert value(got, "xdpflow_up") == 1
        assert value(got, "xdpflow_scrape_errors_total") == 0
        assert set(source.read) == {"agent_info", "datapath_runs", "monitor"}
        names = {name for name, _ in got}
        for name in FROM_STATE:
            assert name not in names, name
        assert value(got, "xdpflow_agent_info", version="0.1.0") == 1
        assert value(got, "xdpflow_agent_start_time_seconds") == 1700000000.5
        assert value(got, "xdpflow_datapath_runs_total") == 100_000_000
        assert value(got, "xdpflow_monitor_events_total") == 900
        if shutil.which(PROMTOOL):
            check = subprocess.run([PROMTOOL, "check", "metrics"], input=body, text=True,
                                   capture_output=True, timeout=30)
            assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), \
                check.stdout + check.stderr

        source.loaded, source.read = True, []
        got = samples(scrape("127.0.0.1", srv.port))
        assert value(got, "xdpflow_agent_state_loaded") == 1
        assert value(got, "xdpflow_rules", tenant="blue") == 5
        assert value(got, "xdpflow_port_attached", port="veth-vm1", tenant="blue",
                     mode="native") == 1
        assert len(set(source.read)) == 12      # every part of the source
    finally:
        srv.shutdown()


def test_a_source_that_says_nothing_of_the_state_is_loaded(source):
    families = {f.name: f for f in DatapathCollector(source).collect()}
    assert families["xdpflow_agent_state_loaded"].samples[0].value == 1
    assert families["xdpflow_rules"].samples


class _Controller:
    """What AgentSource reads of the controller, with the lock a warm start's start-up
    holds while it loads the state."""

    def __init__(self):
        from types import SimpleNamespace
        self.lock = threading.RLock()
        self.startup = {"done": False, "phase": "loading state"}
        self.cfg = SimpleNamespace(metrics=SimpleNamespace(rule_counters=False))
        self.monitor = SimpleNamespace(stats=lambda: dict(listeners=0, sent=0, rate_cap=0,
                                                          ring_full=0, client=0))
        self.evictions = SimpleNamespace(as_dict=dict)

    def agent_info(self):
        return dict(version="0.1.0", started_at=1700000000.5, last_reconcile_seconds=0.0,
                    last_apply_seconds=0.0, reconcile_errors=0, sweeps=0,
                    sweep_seconds_total=0.0, program_id=42)

    def datapath_runs(self):
        return {}

    def counter_rows(self):
        return []

    def flow_summary(self, rows):
        return dict(total=0, capacity=1000, by_tenant={}, insert_failures=0)

    def tenant_rows(self):
        return [dict(name="blue", id=1, generation=1, rules=3, endpoints=1)]

    def port_rows(self):
        return []

    def map_pressure(self):
        return {}

    def port_tx_rows(self):
        return []

    def nat_rows(self):
        return []


def test_agent_source_takes_no_lock_while_the_start_up_holds_it():
    """The start-up holds the controller's lock for as long as the load takes (seconds):
    a scrape then answers at once with what needs no state, without waiting for it."""
    from agent.metrics import AgentSource
    c = _Controller()
    collector = DatapathCollector(AgentSource(c))
    holding, release = threading.Event(), threading.Event()

    def start_up():
        with c.lock:
            holding.set()
            release.wait(60)
            c.startup = {"done": True, "phase": ""}

    t = threading.Thread(target=start_up)
    t.start()
    try:
        holding.wait(10)
        out = []
        scraper = threading.Thread(target=lambda: out.append(
            {f.name: f for f in collector.collect()}))
        scraper.start()
        scraper.join(30)
        assert out, "the scrape waited for the start-up's lock"
        fam = out[0]
        assert fam["xdpflow_agent_state_loaded"].samples[0].value == 0
        assert fam["xdpflow_up"].samples[0].value == 1
        assert fam["xdpflow_agent"].samples[0].labels["program_id"] == "42"
        assert not fam["xdpflow_rules"].samples
    finally:
        release.set()
        t.join(10)
    fam = {f.name: f for f in collector.collect()}
    assert fam["xdpflow_agent_state_loaded"].samples[0].value == 1
    assert fam["xdpflow_rules"].samples[0].value == 3
    assert fam["xdpflow_up"].samples[0].value == 1
