"""Export the datapath's counters to Prometheus, read from the source at scrape time.

`DatapathCollector` keeps no copies: every scrape asks its source (`AgentSource` over the
controller in production, a fake in tests) for fresh numbers, so a metric is never staler
than the scrape. Each part of the source is read on its own; if one part raises, the others
are still exported, `xdpflow_up` drops to 0 and `xdpflow_scrape_errors_total` counts it. A
scrape never raises into the HTTP server.

The source provides:
  counters()     -> [{tenant, port, verdict, reason, packets, bytes}]   (summed over CPUs)
  flow_summary() -> {total, capacity, by_tenant: {tenant: count}, insert_failures}
  evictions()    -> {reason: count}
  tenants()      -> [{name, id, generation, rules, endpoints}]
  ports()        -> [{name, tenant, attached, ifindex, mode}]
  agent_info()   -> {version, started_at, last_reconcile_seconds, last_apply_seconds,
                     reconcile_errors, sweeps, sweep_seconds_total; optional:
                     program_id, kernel, config_sha256, last_change, state_loaded}
                     (read first: state_loaded False, while a warm start loads its
                     state, leaves out every part read from the state; see _FROM_STATE)
  map_pressure() -> {map: (entries in use, capacity)}   (every map the config sizes)
  datapath_runs() -> {run_time_ns, run_count} of the XDP program, or {} when the kernel's
                     BPF statistics are off ([metrics] bpf_stats)
  monitor()      -> {listeners, sent, rate_cap, ring_full, client}
  port_tx()      -> [{tenant, port, packets, bytes}]   what each port transmitted on redirect
                     (its VM received), every configured port
  rule_counters() -> [{tenant, rule, packets, bytes}], or [] unless [metrics] rule_counters
                     is on (a series per rule: opt-in, as `iptables -L -v` on demand)

A warm start serves scrapes from the moment it answers, before its stored state is loaded
and checked against the maps (seconds with 100,000 rules): `xdpflow_agent_state_loaded` is
0 then and the series read from the state (traffic, tenants, ports, flows, maps, NAT) are
absent, never numbers from a half-started agent; what needs no state (the agent's info and
start time, BPF statistics, the monitor, timings, the process) is there.

Every configured tenant and port has its series from the first scrape, at 0 until traffic
comes (`xdpflow_flows`, `xdpflow_port_packets_total` / `_bytes_total` per verdict), so
graphs have no gaps. Durations of reconciles, configuration changes and control-API
requests are histograms kept by a `Timings` the agent shares with the API server.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from prometheus_client import CollectorRegistry, start_wsgi_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector

log = logging.getLogger(__name__)

from agent.flows import EVICTION_REASONS
from agent.timings import BUCKETS, Timings  # noqa: F401  (their home before agent/timings.py)

__all__ = ["DatapathCollector", "MetricsServer", "serve", "AgentSource", "Timings",
           "EVICTION_REASONS"]

_TRAFFIC = ("tenant", "port", "verdict", "reason")
_PORT_TRAFFIC = ("tenant", "port", "verdict")
# The verdicts every configured port has a series for, 0 until a packet gets one.
PORT_VERDICTS = ("redirect", "pass", "drop")

# One table of every family: describe() builds from it without touching the source, and
# collect() fills the same families, so the two cannot disagree.
# name (without the _total/_info suffix the family class adds), kind, help, labels
_FAMILIES: Tuple[Tuple[str, str, str, Tuple[str, ...]], ...] = (
    ("xdpflow_packets", "counter",
     "Packets the datapath handled, by tenant, ingress port, verdict and reason.", _TRAFFIC),
    ("xdpflow_bytes", "counter",
     "Bytes the datapath handled, by tenant, ingress port, verdict and reason.", _TRAFFIC),
    ("xdpflow_flows", "gauge",
     "Entries in the flow table, by tenant.", ("tenant",)),
    ("xdpflow_flow_table_capacity", "gauge",
     "Maximum number of entries the flow table holds.", ()),
    ("xdpflow_flow_table_fill_ratio", "gauge",
     "Fraction of the flow table in use (entries / capacity).", ()),
    ("xdpflow_flow_insert_failures", "counter",
     "Flow-table inserts that failed (the packet was still classified and acted on).", ()),
    ("xdpflow_flow_evictions", "counter",
     "Flow-table entries removed, by reason.", ("reason",)),
    ("xdpflow_nat_translations", "counter",
     "Packets NAT translated, by tenant, kind (fip, snat) and direction (in: from the "
     "external network, out: to it); every tenant with a NAT, 0 until used.",
     ("tenant", "kind", "direction")),
    ("xdpflow_nat_port_exhaustions", "counter",
     "New SNAT flows dropped for want of a free port in the tenant's range (reason "
     "nat_exhausted); every tenant with a SNAT, 0 until it happens.", ("tenant",)),
    ("xdpflow_flow_quota_refusals", "counter",
     "Packets whose new flow was judged but not cached: the tenant held its flow quota.",
     ("tenant",)),
    ("xdpflow_tenant_generation", "gauge",
     "Rule-set generation currently active in the datapath, by tenant.", ("tenant",)),
    ("xdpflow_rules", "gauge",
     "Security rules programmed in the datapath, by tenant.", ("tenant",)),
    ("xdpflow_endpoints", "gauge",
     "Endpoints programmed in the datapath, by tenant.", ("tenant",)),
    ("xdpflow_port_attached", "gauge",
     "1 if the XDP program is attached to the port, else 0; mode is native or generic.",
     ("port", "tenant", "mode")),
    ("xdpflow_port_packets", "counter",
     "Packets that came in on a port, by verdict; every configured port, 0 until used.",
     _PORT_TRAFFIC),
    ("xdpflow_port_bytes", "counter",
     "Bytes that came in on a port, by verdict; every configured port, 0 until used.",
     _PORT_TRAFFIC),
    ("xdpflow_port_tx_packets", "counter",
     "Packets the datapath redirected out of a port (what its VM received); every "
     "configured port, 0 until used.", ("tenant", "port")),
    ("xdpflow_port_tx_bytes", "counter",
     "Bytes the datapath redirected out of a port (what its VM received).",
     ("tenant", "port")),
    ("xdpflow_overlay_packets", "counter",
     "Packets through the VXLAN overlay, by direction: encap (sent out of an uplink to a "
     "remote VTEP), decap (arrived over VXLAN from a known VTEP and judged as its "
     "tenant's). What the overlay refused is in xdpflow_packets by reason.", ("direction",)),
    # Opt-in ([metrics] rule_counters): one series per rule is a cardinality an operator
    # chooses, not a default.
    ("xdpflow_rule_packets", "counter",
     "Packets a security rule matched (flow-table hits included, replies not), by tenant "
     "and rule id.", ("tenant", "rule")),
    ("xdpflow_rule_bytes", "counter",
     "Bytes of the packets a security rule matched, by tenant and rule id.",
     ("tenant", "rule")),
    # Exported as xdpflow_agent_info{version="...",...} 1; the labels come with the value.
    ("xdpflow_agent", "info",
     "The running agent: version, program id, kernel release, config file SHA-256.", ()),
    ("xdpflow_last_config_change_timestamp_seconds", "gauge",
     "When the desired state last changed (a command, apply or reload), Unix seconds; "
     "0 if never.", ()),
    ("xdpflow_reconcile_seconds", "histogram",
     "How long reconciles of desired state into the datapath took.", ()),
    ("xdpflow_apply_seconds", "histogram",
     "How long configuration changes (store and datapath) took.", ()),
    ("xdpflow_api_requests", "counter",
     "Control-API requests, by command and result (ok, invalid, refused, denied, ...).",
     ("command", "result")),
    ("xdpflow_api_request_seconds", "histogram",
     "How long control-API requests took to serve, by command.", ("command",)),
    ("xdpflow_agent_start_time_seconds", "gauge",
     "When the agent started, in seconds since the Unix epoch.", ()),
    ("xdpflow_agent_state_loaded", "gauge",
     "1 once the agent has loaded its stored state and checked it against the maps; 0 "
     "while a warm start does (the pinned program forwards meanwhile): series read from "
     "the state (traffic, tenants, ports, flows, maps, NAT) are absent until then.", ()),
    ("xdpflow_reconcile_duration_seconds", "gauge",
     "How long the last reconcile of desired state into the datapath took.", ()),
    ("xdpflow_apply_duration_seconds", "gauge",
     "How long the last change (add, del, apply) took to reach the store and the "
     "datapath.", ()),
    ("xdpflow_reconcile_errors", "counter",
     "Reconciles of desired state into the datapath that failed.", ()),
    ("xdpflow_sweeps", "counter",
     "Flow-aging sweeps over the flow table.", ()),
    ("xdpflow_sweep_duration_seconds", "counter",
     "Time spent in flow-aging sweeps.", ()),
    ("xdpflow_map_entries", "gauge",
     "Entries in use in a datapath map whose size the configuration sets (ports: both "
     "port maps).", ("map",)),
    ("xdpflow_map_capacity", "gauge",
     "Maximum entries of a datapath map whose size the configuration sets.", ("map",)),
    ("xdpflow_map_fill_ratio", "gauge",
     "Fraction of a datapath map in use (entries / capacity).", ("map",)),
    # Only while the kernel's BPF statistics are on ([metrics] bpf_stats): ns per packet
    # is rate(run_time) / rate(runs).
    ("xdpflow_datapath_run_time_seconds", "counter",
     "Time the kernel spent running the XDP datapath program (BPF statistics).", ()),
    ("xdpflow_datapath_runs", "counter",
     "Runs of the XDP datapath program, one per packet (BPF statistics).", ()),
    ("xdpflow_monitor_listeners", "gauge",
     "Monitor clients (xdpflowctl monitor) listening now.", ()),
    ("xdpflow_monitor_events", "counter",
     "Events the datapath sent to monitor listeners.", ()),
    ("xdpflow_monitor_events_lost", "counter",
     "Monitor events lost, by reason: rate_cap (the per-CPU monitor.rate_limit), "
     "ring_full (the ring buffer had no room), client (a listener that did not read in "
     "time).", ("reason",)),
    ("xdpflow_scrape_errors", "counter",
     "Reads of the datapath that failed while serving a scrape.", ()),
    ("xdpflow_up", "gauge",
     "1 if this scrape read every part of the datapath, 0 if some part failed.", ()),
)

_KINDS: Dict[str, Callable[..., Metric]] = {
    "counter": CounterMetricFamily,
    "gauge": GaugeMetricFamily,
    "info": InfoMetricFamily,
    "histogram": HistogramMetricFamily,
}
# Families whose samples are summed per label set: zero rows for every configured
# tenant/port plus the real rows.
# Reasons of uplink packets that were not decapsulated (the kernel's, or refused).
NOT_DECAPSULATED = ("uplink_other", "vni_unknown", "vtep_unknown", "parse_vxlan",
                    # NAT's: to a NAT address, not decapsulated (but what NAT let in and
                    # the tenant's rules then judged is counted under their reasons)
                    "nat_no_flow", "nat_frag", "arp_reply")
_SUMMED = ("xdpflow_flows", "xdpflow_port_packets", "xdpflow_port_bytes")
# Parts read from the loaded state (port and tenant names, slots, flow counts of the
# start-up's sweep): left out while a warm start loads it (agent_info's state_loaded).
_FROM_STATE = frozenset(("counters", "flow_summary", "evictions", "tenants", "ports",
                         "map_pressure", "port_tx", "rule_counters", "nat"))


def _empty_families() -> Dict[str, Metric]:
    return {
        name: _KINDS[kind](name, help_text, labels=labels)
        for name, kind, help_text, labels in _FAMILIES
    }


def _label(value: Any) -> str:
    return "" if value is None else str(value)


class DatapathCollector:
    """A prometheus_client custom collector over a datapath `source` (see module doc)."""

    def __init__(self, source: Any, timings: Optional[Timings] = None):
        self._source = source
        self._timings = timings
        self._uplink_names: Optional[set] = None
        self._lock = threading.Lock()
        # Counted here, not in the source: it must survive the source being broken.
        self._scrape_errors = 0

    def describe(self) -> Iterable[Metric]:
        """The families, without samples; never touches the source (nor BPF)."""
        return list(_empty_families().values())

    def collect(self) -> Iterator[Metric]:
        families = _empty_families()
        self._uplink_names = None
        failed = 0
        for part, fill in (
            ("agent_info", self._fill_agent_info),
            ("counters", self._fill_counters),
            ("flow_summary", self._fill_flow_summary),
            ("evictions", self._fill_evictions),
            ("tenants", self._fill_tenants),
            ("ports", self._fill_ports),
            ("map_pressure", self._fill_map_pressure),
            ("datapath_runs", self._fill_datapath_runs),
            ("monitor", self._fill_monitor),
            ("port_tx", self._fill_port_tx),
            ("rule_counters", self._fill_rule_counters),
            ("nat", self._fill_nat),
            ("timings", self._fill_timings),
        ):
            if part in _FROM_STATE and not _state_loaded(families):
                continue
            # Fill into scratch families and merge only on success, so a part that fails
            # halfway exports nothing rather than a misleading subset.
            scratch = _empty_families()
            try:
                fill(scratch)
            except Exception:  # noqa: BLE001 - any failure of the source is a scrape error
                failed += 1
                log.warning("metrics: reading %s from the datapath failed", part,
                            exc_info=True)
                continue
            for name, family in scratch.items():
                families[name].samples.extend(family.samples)

        with self._lock:
            self._scrape_errors += failed
            errors = self._scrape_errors
        for name in _SUMMED:
            families[name].samples[:] = _summed(families[name].samples)
        families["xdpflow_scrape_errors"].add_metric([], errors)
        families["xdpflow_up"].add_metric([], 0 if failed else 1)
        # Families with no samples (e.g. no tenants yet) are still yielded: the exposition
        # then carries their HELP and TYPE, which is harmless and documents them.
        yield from families.values()

    def _uplinks(self) -> set:
        """The uplink ports, read once a scrape (encap and decap are counted on them)."""
        if self._uplink_names is None:
            self._uplink_names = {p["name"] for p in self._source.ports() if p.get("uplink")}
        return self._uplink_names

    def _fill_counters(self, f: Dict[str, Metric]) -> None:
        uplinks, decap = self._uplinks(), 0
        for row in self._source.counters():
            if row["port"] in uplinks and row["reason"] not in NOT_DECAPSULATED:
                decap += int(row["packets"])
            labels = [_label(row[k]) for k in _TRAFFIC]
            f["xdpflow_packets"].add_metric(labels, int(row["packets"]))
            f["xdpflow_bytes"].add_metric(labels, int(row["bytes"]))
            if row["port"]:
                labels = [_label(row[k]) for k in _PORT_TRAFFIC]
                f["xdpflow_port_packets"].add_metric(labels, int(row["packets"]))
                f["xdpflow_port_bytes"].add_metric(labels, int(row["bytes"]))
        f["xdpflow_overlay_packets"].add_metric(["decap"], decap)

    def _fill_flow_summary(self, f: Dict[str, Metric]) -> None:
        summary = self._source.flow_summary()
        total = int(summary["total"])
        capacity = int(summary["capacity"])
        for tenant, count in sorted(summary.get("by_tenant", {}).items()):
            f["xdpflow_flows"].add_metric([_label(tenant)], int(count))
        f["xdpflow_flow_table_capacity"].add_metric([], capacity)
        f["xdpflow_flow_table_fill_ratio"].add_metric(
            [], total / capacity if capacity > 0 else 0.0)
        f["xdpflow_flow_insert_failures"].add_metric([], int(summary["insert_failures"]))
        for tenant, n in sorted(summary.get("quota_refusals", {}).items()):
            f["xdpflow_flow_quota_refusals"].add_metric([_label(tenant)], int(n))

    def _fill_evictions(self, f: Dict[str, Metric]) -> None:
        # Every reason, at 0 until it happens, so rate() and alerts work from the first
        # scrape.
        counts = {reason: 0 for reason in EVICTION_REASONS}
        counts.update({str(k): int(v) for k, v in self._source.evictions().items()})
        for reason, count in counts.items():
            f["xdpflow_flow_evictions"].add_metric([reason], count)

    def _fill_tenants(self, f: Dict[str, Metric]) -> None:
        for tenant in self._source.tenants():
            name = [_label(tenant["name"])]
            f["xdpflow_tenant_generation"].add_metric(name, int(tenant["generation"]))
            f["xdpflow_rules"].add_metric(name, int(tenant["rules"]))
            f["xdpflow_endpoints"].add_metric(name, int(tenant["endpoints"]))
            f["xdpflow_flows"].add_metric(name, 0)

    def _fill_ports(self, f: Dict[str, Metric]) -> None:
        for port in self._source.ports():
            labels = [_label(port["name"]), _label(port["tenant"]), _label(port.get("mode"))]
            f["xdpflow_port_attached"].add_metric(labels, 1 if port["attached"] else 0)
            for verdict in PORT_VERDICTS:
                labels = [_label(port["tenant"]), _label(port["name"]), verdict]
                f["xdpflow_port_packets"].add_metric(labels, 0)
                f["xdpflow_port_bytes"].add_metric(labels, 0)

    def _fill_monitor(self, f: Dict[str, Metric]) -> None:
        m = self._source.monitor()
        f["xdpflow_monitor_listeners"].add_metric([], int(m["listeners"]))
        f["xdpflow_monitor_events"].add_metric([], int(m["sent"]))
        for reason in ("rate_cap", "ring_full", "client"):
            f["xdpflow_monitor_events_lost"].add_metric([reason], int(m[reason]))

    def _fill_port_tx(self, f: Dict[str, Metric]) -> None:
        uplinks, encap = self._uplinks(), 0
        for row in self._source.port_tx():
            if row["port"] in uplinks:
                encap += int(row["packets"])
            labels = [_label(row["tenant"]), _label(row["port"])]
            f["xdpflow_port_tx_packets"].add_metric(labels, int(row["packets"]))
            f["xdpflow_port_tx_bytes"].add_metric(labels, int(row["bytes"]))
        f["xdpflow_overlay_packets"].add_metric(["encap"], encap)

    def _fill_rule_counters(self, f: Dict[str, Metric]) -> None:
        for row in self._source.rule_counters():
            labels = [_label(row["tenant"]), _label(row["rule"])]
            f["xdpflow_rule_packets"].add_metric(labels, int(row["packets"]))
            f["xdpflow_rule_bytes"].add_metric(labels, int(row["bytes"]))

    def _fill_nat(self, f: Dict[str, Metric]) -> None:
        for row in self._source.nat():
            if row["direction"] == "exhausted":
                f["xdpflow_nat_port_exhaustions"].add_metric([_label(row["tenant"])],
                                                             int(row["packets"]))
            else:
                f["xdpflow_nat_translations"].add_metric(
                    [_label(row["tenant"]), row["kind"], row["direction"]], int(row["packets"]))

    def _fill_agent_info(self, f: Dict[str, Metric]) -> None:
        info = self._source.agent_info()
        f["xdpflow_agent"].add_metric([], {k: _label(info.get(k)) for k in (
            "version", "program_id", "kernel", "config_sha256") if k in info})
        f["xdpflow_last_config_change_timestamp_seconds"].add_metric(
            [], float(info.get("last_change") or 0))
        f["xdpflow_agent_start_time_seconds"].add_metric([], float(info["started_at"]))
        f["xdpflow_reconcile_duration_seconds"].add_metric(
            [], float(info["last_reconcile_seconds"]))
        f["xdpflow_apply_duration_seconds"].add_metric([], float(info["last_apply_seconds"]))
        f["xdpflow_reconcile_errors"].add_metric([], int(info["reconcile_errors"]))
        f["xdpflow_sweeps"].add_metric([], int(info["sweeps"]))
        f["xdpflow_sweep_duration_seconds"].add_metric(
            [], float(info["sweep_seconds_total"]))
        f["xdpflow_agent_state_loaded"].add_metric([], 1 if info.get("state_loaded", True)
                                                   else 0)

    def _fill_map_pressure(self, f: Dict[str, Metric]) -> None:
        for name, (used, capacity) in sorted(self._source.map_pressure().items()):
            f["xdpflow_map_entries"].add_metric([name], int(used))
            f["xdpflow_map_capacity"].add_metric([name], int(capacity))
            f["xdpflow_map_fill_ratio"].add_metric(
                [name], used / capacity if capacity > 0 else 0.0)

    def _fill_datapath_runs(self, f: Dict[str, Metric]) -> None:
        runs = self._source.datapath_runs()
        if runs:
            f["xdpflow_datapath_run_time_seconds"].add_metric(
                [], int(runs["run_time_ns"]) / 1e9)
            f["xdpflow_datapath_runs"].add_metric([], int(runs["run_count"]))


    def _fill_timings(self, f: Dict[str, Metric]) -> None:
        t = self._timings or Timings()
        for key, family in (("reconcile", "xdpflow_reconcile_seconds"),
                            ("apply", "xdpflow_apply_seconds"),
                            ("api", "xdpflow_api_request_seconds")):
            hists = t.histograms(key)
            if not hists and key != "api":
                # Never happened yet: an empty histogram, so the series exists from the start.
                hists = [((), [(repr(le), 0) for le in t.buckets] + [("+Inf", 0)], 0.0)]
            for labels, buckets, total in hists:
                f[family].add_metric(list(labels), buckets, total)
        for labels, n in t.counts("api"):
            f["xdpflow_api_requests"].add_metric(list(labels), n)


def _state_loaded(families: Dict[str, Metric]) -> bool:
    """What agent_info (read first) said of the state; loaded when it said nothing (a
    source without warm starts, or agent_info failed: each part then answers for itself)."""
    samples = families["xdpflow_agent_state_loaded"].samples
    return not samples or samples[0].value == 1


def _summed(samples: List[Any]) -> List[Any]:
    """One sample per (name, labels), the values added up, in first-seen order."""
    out: Dict[Tuple[str, Tuple[Tuple[str, str], ...]], Any] = {}
    for smp in samples:
        key = (smp.name, tuple(sorted(smp.labels.items())))
        prev = out.get(key)
        out[key] = smp if prev is None else prev._replace(value=prev.value + smp.value)
    return list(out.values())


class MetricsServer:
    """The running /metrics endpoint; `port` is the bound port (useful with port 0)."""

    def __init__(self, httpd, thread: threading.Thread):
        self._httpd = httpd
        self._thread = thread
        self.host = httpd.server_address[0]
        self.port = httpd.server_address[1]

    def shutdown(self) -> None:
        """Stop serving and release the port; returns once the server thread is gone."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def serve(collector: DatapathCollector, host: str, port: int) -> MetricsServer:
    """Serve /metrics on host:port (IPv4 or IPv6; port 0 picks one) in a daemon thread,
    with prometheus_client's own server (it picks the address family from the host, logs
    no access lines, and can do TLS).

    The registry is private to this server, so nothing registered by libraries in the
    global one leaks out; it holds the datapath collector and the process collector
    (CPU, memory, open fds of the agent itself).
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    httpd, thread = start_wsgi_server(port, addr=host.strip("[]"), registry=registry)
    return MetricsServer(httpd, thread)


class AgentSource:
    """The collector's source in the agent: the controller's reads, each taken under the
    controller's lock (the one every change of the datapath holds), except while a warm
    start loads its state: its start-up holds the lock for seconds then, and the collector
    reads only what needs no state (agent_info says state_loaded False)."""

    def __init__(self, controller):
        self.c = controller

    def _lock(self):
        if self.c.startup["done"]:
            return self.c.lock
        return contextlib.nullcontext()

    def counters(self):
        with self.c.lock:
            return [r for r in self.c.counter_rows() if r["verdict"] != "none"]

    def flow_summary(self):
        with self.c.lock:
            # Insert failures and quota refusals are event rows (verdict "none"), which
            # counters() leaves out.
            events = [r for r in self.c.counter_rows()
                      if r["reason"] in ("insert_failed", "flow_quota")]
            return self.c.flow_summary(events)

    def evictions(self):
        with self.c.lock:
            return self.c.evictions.as_dict()

    def tenants(self):
        with self.c.lock:
            return self.c.tenant_rows()

    def ports(self):
        with self.c.lock:
            return self.c.port_rows()

    def agent_info(self):
        loaded = self.c.startup["done"]
        with self._lock():
            return {**self.c.agent_info(), "state_loaded": loaded}

    def map_pressure(self):
        with self.c.lock:
            return self.c.map_pressure()

    def datapath_runs(self):
        with self._lock():
            return self.c.datapath_runs()

    def port_tx(self):
        with self.c.lock:
            return self.c.port_tx_rows()

    def rule_counters(self):
        if not self.c.cfg.metrics.rule_counters:
            return []
        with self.c.lock:
            return self.c.rule_counter_rows()

    def nat(self):
        with self.c.lock:
            return self.c.nat_rows()

    def monitor(self):
        # The monitor's own counters and maps: no controller lock needed.
        return self.c.monitor.stats()
