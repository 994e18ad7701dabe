"""What the operator kit (monitoring/) reads, from a real agent: map pressure that matches
the pinned maps, the kernel's run time and count of the XDP program when [metrics]
bpf_stats is on (and `status` saying how; off again on reload), every metric the
dashboard and the alert rules name present in a real scrape, and a real Prometheus that
answers every dashboard query and loads every rule."""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from agent.bpfsys import RawMap
from netns_lab import traffic
from netns_lab.lab import free_port
from netns_lab.netns import in_netns

pytestmark = pytest.mark.lab

KIT = Path(__file__).resolve().parents[2] / "monitoring"
# Series Prometheus makes itself, not the agent.
PROMETHEUS_MADE = {"up"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset",
                "and", "or", "unless", "bool", "inf", "nan"}


def metric_names(expr: str) -> set:
    """The metric names a PromQL expression reads: identifiers outside label matchers,
    ranges and grouping clauses that are not functions, keywords or Grafana variables."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)            # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)                      # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)                     # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\w+", "", expr)                          # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)\s*(\()?", expr):
        word, call = m.group(1), m.group(2)
        if not call and word.lower() not in PROMQL_WORDS:
            names.add(word)
    return names


def test_metric_names_reads_promql():
    assert metric_names('1e9 * sum by (instance) (rate(a_total{x="b c"}[5m])) / '
                        'sum(rate(b{instance=~"$instance"}[$__rate_interval]))') == {"a_total", "b"}
    assert metric_names("max by (m) (c offset 1h) and on (i) absent(up{job=\"x\"})") == {"c", "up"}


def kit_queries():
    dash = json.loads((KIT / "xdpflow-dashboard.json").read_text())
    out = [(f"panel {p['title']!r}", t["expr"]) for p in dash["panels"] for t in p["targets"]]
    rules = yaml.safe_load((KIT / "xdpflow-alerts.yml").read_text())
    out += [(f"alert {r['alert']}", r["expr"]) for g in rules["groups"] for r in g["rules"]]
    return out


def scrape(lab) -> dict:
    """{(sample name, frozenset(labels)): value} of one real scrape."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(lab.metrics()) for s in f.samples}


def by_name(samples: dict, name: str) -> dict:
    return {dict(labels).get("map", ""): v for (n, labels), v in samples.items() if n == name}


def pinned_entries(lab, name: str) -> int:
    m = RawMap.pinned(f"{lab.pin_dir}/{name}")
    try:
        if name == "xf_port_index":     # an array: rows in use have a slot
            return sum(1 for _, v in m.items() if any(v))
        return m.count()
    finally:
        m.close()


@pytest.fixture(scope="module")
def node(bpf_stats_to_ourselves, module_lab):
    """The agent holds BPF_ENABLE_STATS on: under the lock the bpf tier's statistics test
    takes (tests/conftest.py), asked for first so it outlives the lab's agent."""
    lab = module_lab
    vm1, vm2 = lab.add_vm("blue", 1), lab.add_vm("blue", 2)
    lab.write_config(
        state={**lab.base_state(),
               "rules": [{"id": 1, "tenant": "blue", "priority": 1, "proto": "icmp",
                          "action": "allow"},
                         {"id": 2, "tenant": "blue", "priority": 2, "proto": "tcp",
                          "dport": "22", "action": "deny"}],
               "routes": [{"tenant": "blue", "prefix": "10.9.0.0/16", "action": "kernel"}]},
        aging={"interval": 0.5})
    text = lab.config.read_text()
    lab.config.write_text(text.replace("[metrics]\n", "[metrics]\nbpf_stats = true\n", 1))
    lab.start_agent()
    assert traffic.ping(vm1, vm2.ip, count=3)
    return lab


def test_status_says_how_bpf_stats_are_on(node):
    st = node.ok("status")["bpf_stats"]
    assert st["enabled"] is True, st
    assert st["how"].startswith("BPF_ENABLE_STATS"), st


def test_datapath_run_time_and_count_are_exported(node):
    got = scrape(node)
    runs = got[("xdpflow_datapath_runs_total", frozenset())]
    secs = got[("xdpflow_datapath_run_time_seconds_total", frozenset())]
    packets = sum(v for (n, _), v in got.items() if n == "xdpflow_packets_total")
    # 3 echo requests and 3 replies at least, each one run of the program on its port;
    # every run counts one packet row.
    assert runs >= 6 and packets >= 6, (runs, packets)
    assert 0 < secs * 1e9 / runs < 1e6, (secs, runs)     # ns per run: something, < 1 ms
    assert runs >= packets - 2, (runs, packets)          # (ARP/ND may run in between)


def test_apply_latency_is_the_last_change(node):
    got = scrape(node)
    # The config's initial state was applied at start: one change, timed.
    first = got[("xdpflow_apply_duration_seconds", frozenset())]
    assert 0 < first < 60, first
    node.ok("rule", "add", "--tenant", "blue", "--id", "3", "--priority", "3", "--proto",
            "udp", "--dport", "53", "--action", "allow")
    again = scrape(node)[("xdpflow_apply_duration_seconds", frozenset())]
    assert again != first and 0 < again < 60, (first, again)


def test_map_pressure_matches_the_pinned_maps(node):
    deadline = time.monotonic() + 20
    while True:
        got = scrape(node)
        entries = by_name(got, "xdpflow_map_entries")
        real = {name: pinned_entries(node, name)
                for name in ("xf_flows", "xf_rules", "xf_masks", "xf_endpoints", "xf_routes")}
        real["xf_ports"] = pinned_entries(node, "xf_ports") + pinned_entries(node,
                                                                             "xf_port_index")
        # The flow count is the last sweep's: wait for one after the pings.
        if entries.get("xf_flows") == real["xf_flows"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert entries == real, (entries, real)
    # (endpoints also hold the node's own addresses on its ports)
    assert real["xf_flows"] >= 2 and real["xf_ports"] == 2 and real["xf_routes"] == 1
    assert real["xf_rules"] >= 2 and real["xf_endpoints"] >= 2
    capacity = by_name(got, "xdpflow_map_capacity")
    for name in real:
        m = RawMap.pinned(f"{node.pin_dir}/{name}")
        try:
            assert capacity[name] == m.max_entries, name
        finally:
            m.close()
        assert by_name(got, "xdpflow_map_fill_ratio")[name] == pytest.approx(
            entries[name] / capacity[name])


def test_every_metric_the_kit_names_is_scraped(node):
    exported = {name for name, _ in scrape(node)}
    queries = kit_queries()
    assert len(queries) >= 20
    missing = []
    for where, expr in queries:
        names = metric_names(expr)
        assert names, f"{where} names no metric: {expr}"
        missing += [(where, n) for n in sorted(names - exported - PROMETHEUS_MADE)]
    assert not missing, f"named by the kit, not exported by the agent: {missing}"


class Prometheus:
    """A real Prometheus in the node's namespace scraping the agent every second (job
    xdpflow, as the rules expect) with the kit's alert rules loaded."""

    def __init__(self, lab, workdir: Path):
        self.lab, self.web = lab, free_port()
        conf = workdir / "prometheus.yml"
        conf.write_text(json.dumps({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(KIT / "xdpflow-alerts.yml")],
            "scrape_configs": [{"job_name": "xdpflow", "static_configs": [
                {"targets": [f"127.0.0.1:{lab.metrics_port}"]}]}]}))
        self.log = workdir / "prometheus.log"
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{lab.node}", shutil.which("prometheus"),
             f"--config.file={conf}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.web}"],
            stdout=subprocess.DEVNULL, stderr=self.log.open("w"))

    def get(self, path: str):
        def fetch():
            with urllib.request.urlopen(f"http://127.0.0.1:{self.web}{path}", timeout=5) as r:
                return json.loads(r.read())["data"]
        return in_netns(self.lab.node, fetch)

    def query(self, expr: str):
        return self.get("/api/v1/query?query=" + urllib.parse.quote(expr))["result"]

    def close(self):
        self.proc.terminate()
        self.proc.wait(10)


def test_prometheus_answers_every_dashboard_query_and_loads_the_rules(node, tmp_path):
    """Each panel's query gives a series from a real agent (through Grafana's variables
    as Grafana would fill them), and Prometheus loads every alert rule healthy."""
    assert shutil.which("prometheus"), "setup.sh installs Debian's prometheus package"
    dash = json.loads((KIT / "xdpflow-dashboard.json").read_text())
    prom = Prometheus(node, tmp_path)
    try:
        empty, deadline = ["(not asked yet)"], time.monotonic() + 60
        while empty and time.monotonic() < deadline:
            time.sleep(1)
            try:
                empty = [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]
                         if not prom.query(t["expr"].replace("$__rate_interval", "10s")
                                           .replace("$instance", ".*"))]
            except OSError as e:           # not listening yet
                empty = [str(e)]
        assert not empty, (empty, prom.log.read_text()[-2000:])
        rules = [r for g in prom.get("/api/v1/rules")["groups"] for r in g["rules"]]
        kit = yaml.safe_load((KIT / "xdpflow-alerts.yml").read_text())
        want = sum(len(g["rules"]) for g in kit["groups"])
        assert len(rules) == want and all(r["health"] == "ok" for r in rules), rules
    finally:
        prom.close()


def test_reload_turns_bpf_stats_off(node):
    text = node.config.read_text()
    node.config.write_text(text.replace("bpf_stats = true", "bpf_stats = false"))
    node.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while node.ok("status")["bpf_stats"]["enabled"] and time.monotonic() < deadline:
        time.sleep(0.2)
    st = node.ok("status")["bpf_stats"]
    assert st == {"enabled": False, "how": "off ([metrics] bpf_stats = false)"}, st
    # A [metrics] change also restarts the metrics server: scrape once it answers again.
    while True:
        try:
            names = {name for name, _ in scrape(node)}
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert "xdpflow_datapath_runs_total" not in names
    assert "xdpflow_map_entries" in names
