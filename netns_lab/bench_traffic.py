"""`xdpflow-lab bench forward` and `bench setup`: real traffic through the lab's paths.

The rig (one run, everything named after a unique lab prefix and removed at the end):
- a lab (netns_lab/topology.py) built from a generated lab file: one tenant, a sending VM
  and a receiving VM, and the tenant's security rules; every path of the lab (offload: the
  agent as a process; iptables + conntrack, Neutron-style; nftables with sets), plus a
  second lab of the iptables shape with no firewall at all: plain kernel forwarding;
- N security rules come from the lab's own rule model, rendered by netns_lab/render.py for
  the kernel paths and applied with `xdpflowctl apply` on the offloaded path: N rules that
  match nothing the load sends (udp from 10.64.0.0/10 hosts to port 9, a higher priority,
  so every kernel path walks all of them), then the one that allows the load;
- the receiving VM's eth0 runs an XDP drop-and-count program (the sink, the same on every
  path); the routers have permanent neighbour entries, so a sink that eats ARP costs the
  kernel path nothing;
- a generator-only pair (PREFIX-g-gen -> PREFIX-g-sink, the sink's veth dropping and
  counting in XDP) gives the generator's own rate in the same round;
- trafgen, pinned to CPU 0 (`taskset -c 0`), sends 60-byte UDP frames for `seconds` after
  a short settle; the rate is the sink's count over that window.
Paths are measured in alternation (generator, offload, iptables, nftables, plain, then
again) after a warm-up run of each, per (flows, rules) cell."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import benchlib, render
from .labfile import VM_IFNAME, LabSpec, parse
from .netns import in_netns, ip, run, unique

TENANT, TENANT_ID = "bench", 77
SRC_IP, DST_IP = "10.77.0.1", "10.77.0.2"
SRC_MAC, DST_MAC = "02:00:00:00:4d:01", "02:00:00:00:4d:02"
SPORT0, DPORT0 = 1024, 7000
PATHS = ("offload", "iptables", "nftables", "plain")
TARGETS = (benchlib.GENERATOR,) + PATHS
# The agent's datapath for the benchmark: room for 100,000 flows (two entries each, the
# reply path first) below the sweeper's 90% watermark, and two generations of 10,000 rules.
BENCH_DATAPATH = {"flow_table_size": 524288, "max_rule_entries": 65536}
SINK_SLOTS = 8
SINK_SRC = "BPF_PERCPU_ARRAY(xf_sink_count, u64, %d);\n" % SINK_SLOTS + "".join(
    f"int xf_sink{n}(struct xdp_md *ctx) {{ u32 k = {n}; u64 *v = xf_sink_count.lookup(&k);"
    f" if (v) *v += 1; return XDP_DROP; }}\n" for n in range(SINK_SLOTS))
XDP_FLAGS_DRV_MODE = 4
# flows -> (source ports, destination ports): their product, coprime counts not needed
# (random ports: trafgen's drnd).
FLOW_SHAPES = {1: (1, 1), 1000: (1000, 1), 100000: (3125, 32)}
NEW_FLOWS = 0   # every packet a new flow: random source and destination ports


class BenchError(RuntimeError):
    """The rig does not measure what it should (nothing arrived, a tool failed)."""


# -- pure: the lab file, the rules, the trafgen frame ------------------------------------

def rules(n: int) -> List[Dict[str, object]]:
    """n rules that match none of the load, walked first, then the allow of the load."""
    out = []
    for i in range(n):
        host = (64 << 24) + i + 1                    # 64.x.y.z -> 10.64.0.0/10
        a = f"10.{host >> 16 & 255}.{host >> 8 & 255}.{host & 255}"
        out.append({"id": i + 1, "tenant": TENANT, "priority": 200, "action": "allow",
                    "src": f"{a}/32", "proto": "udp", "dport": "9"})
    out.append({"id": n + 1, "tenant": TENANT, "priority": 100, "action": "allow",
                "dst": f"{DST_IP}/32", "proto": "udp", "comment": "the load"})
    return out


def lab_dict(prefix: str, n_rules: int) -> Dict[str, object]:
    return {
        "lab": {"prefix": prefix},
        "tenants": [{"name": TENANT, "id": TENANT_ID, "default": "drop"}],
        "ports": [{"name": "xbp1", "tenant": TENANT}, {"name": "xbp2", "tenant": TENANT}],
        "endpoints": [{"tenant": TENANT, "ip": SRC_IP, "port": "xbp1", "mac": SRC_MAC},
                      {"tenant": TENANT, "ip": DST_IP, "port": "xbp2", "mac": DST_MAC}],
        "rules": rules(n_rules),
        "vms": [{"name": "src", "port": "xbp1"}, {"name": "dst", "port": "xbp2"}],
    }


def spec_for(prefix: str, n_rules: int) -> LabSpec:
    return parse(lab_dict(prefix, n_rules), source=f"<bench, {n_rules} rules>")


def _ports(first: int, count: int) -> str:
    return str(first) if count == 1 else f"drnd({first}, {first + count - 1})"


def trafgen_conf(src_mac: str, gw_mac: str, flows: int) -> str:
    """A 60-byte Ethernet/IPv4/UDP frame SRC -> DST through the gateway MAC; `flows`
    distinct (source port, destination port) pairs drawn at random per packet
    (NEW_FLOWS: both ports random over 0..65535, in effect a new flow every packet)."""
    if flows == NEW_FLOWS:
        sp, dp = "drnd(0, 65535)", "drnd(0, 65535)"
    else:
        if flows not in FLOW_SHAPES:
            raise ValueError(f"flows must be one of {sorted(FLOW_SHAPES)} or {NEW_FLOWS}")
        ns, nd = FLOW_SHAPES[flows]
        sp, dp = _ports(SPORT0, ns), _ports(DPORT0, nd)
    return (f"{{ eth(da={gw_mac}, sa={src_mac}), ipv4(sa={SRC_IP}, da={DST_IP}, ttl=64), "
            f"udp(sp={sp}, dp={dp}, csum=0), fill(0x41, 18) }}\n")


# -- the rig -------------------------------------------------------------------------------

class Sinks:
    """XDP drop-and-count programs (one BCC object, one slot per sink)."""

    def __init__(self):
        from bcc import BPF
        self.bpf = BPF(text=SINK_SRC)
        self.table = self.bpf[b"xf_sink_count"]
        self.used = 0

    def attach(self, ns: str, ifname: str) -> int:
        if self.used >= SINK_SLOTS:
            raise BenchError("out of sink slots")
        slot = self.used
        fd = self.bpf.load_func(f"xf_sink{slot}".encode(), self.bpf.XDP).fd

        def work():
            from pyroute2 import IPRoute
            with IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=ifname)[0]
                ipr.link("set", index=idx, xdp={"attrs": [
                    ("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", XDP_FLAGS_DRV_MODE)]})
        in_netns(ns, work)
        self.used += 1
        return slot

    def count(self, slot: int) -> int:
        import ctypes as ct
        return sum(self.table[ct.c_int(slot)])

    def close(self):
        self.bpf.cleanup()


@dataclass
class Target:
    name: str
    src_ns: str          # where trafgen runs
    slot: int            # the sink that counts
    conf_gw: str         # the MAC the frame goes to


def _tx_packets(ns: str) -> int:
    import json
    link = json.loads(ip("-s", "-j", "link", "show", "dev", VM_IFNAME, ns=ns))[0]
    return link["stats64"]["tx"]["packets"]


def blast(target: Target, sinks: Sinks, conf: str, seconds: float,
          settle: float = 0.25) -> Dict[str, float]:
    """Run trafgen on CPU 0 in the target's sender; the sink's rate over `seconds` after
    `settle` (trafgen's start-up is not counted), and the rate the generator offered."""
    p = subprocess.Popen(["nsenter", f"--net=/run/netns/{target.src_ns}", "--", "taskset",
                          "-c", "0", "trafgen", "--dev", VM_IFNAME, "--conf", conf, "--cpus",
                          "1", "--no-cpu-stats", "-q"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        time.sleep(settle)
        if p.poll() is not None:
            raise BenchError(f"trafgen in {target.src_ns} exited {p.returncode}: "
                             f"{p.stderr.read().strip()}")
        c0, tx0, t0 = sinks.count(target.slot), _tx_packets(target.src_ns), time.monotonic()
        time.sleep(seconds)
        c1, tx1, t1 = sinks.count(target.slot), _tx_packets(target.src_ns), time.monotonic()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGINT)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
    return {"pps": (c1 - c0) / (t1 - t0), "offered_pps": (tx1 - tx0) / (t1 - t0)}


class Rig:
    """The labs, the sinks, the generator pair; apply a rule count to every path."""

    def __init__(self, paths: Sequence[str] = PATHS, say: Callable[[str], None] = print):
        self.paths = [p for p in PATHS if p in paths]
        self.say = say
        self.prefix = unique("xb", maxlen=7).lower()   # + "p" for plain: 8 at most
        self.stack = contextlib.ExitStack()
        self.targets: Dict[str, Target] = {}
        self.topo = self.plain = None
        self.spec = spec_for(self.prefix, 0)

    def __enter__(self):
        try:
            self._build()
        except BaseException:
            self.stack.close()
            raise
        return self

    def __exit__(self, *exc):
        self.stack.close()

    def _build(self):
        from . import topology
        self.sinks = Sinks()
        self.stack.callback(self.sinks.close)
        lab_paths = [p for p in self.paths if p in render.PATHS]
        self.say(f"bench lab {self.prefix}: paths {', '.join(self.paths)}")
        self.topo = topology.Topology(self.spec, lab_paths, say=self.say,
                                      datapath=BENCH_DATAPATH)
        self.stack.callback(self.topo.close)
        self.topo.up()
        src, dst = self.spec.vm("src"), self.spec.vm("dst")
        for path in lab_paths:
            self._add_target(path, self.topo.vm_ns(path, src), self.topo.vm_ns(path, dst),
                             src.port_mac)
            if path != "offload":
                # Unreplied UDP entries from an earlier cell go sooner (not part of a cost).
                run(["sysctl", "-q", "-w", "net.netfilter.nf_conntrack_udp_timeout=10"],
                    ns=self.topo.side_ns(path, src), check=False)
        if "plain" in self.paths:
            pspec = spec_for(self.prefix + "p", 0)
            self.plain = topology.Topology(pspec, ["iptables"], say=self.say, firewall=False)
            self.stack.callback(self.plain.close)
            self.plain.up()
            self._add_target("plain", self.plain.vm_ns("iptables", src),
                             self.plain.vm_ns("iptables", dst), src.port_mac)
        gen, gsink = f"{self.prefix}-g-gen", f"{self.prefix}-g-sink"
        for ns in (gen, gsink):
            ip("netns", "add", ns)
        self.stack.callback(lambda: [run(["ip", "netns", "del", n], check=False)
                                     for n in (gen, gsink)])
        ip("-n", gen, "link", "add", VM_IFNAME, "address", src.mac, "type", "veth", "peer",
           "name", VM_IFNAME, "address", src.port_mac, "netns", gsink)
        for ns in (gen, gsink):
            ip("-n", ns, "link", "set", VM_IFNAME, "up")
        run(["ethtool", "-K", VM_IFNAME, "tx", "off"], ns=gen)
        self._add_target(benchlib.GENERATOR, gen, gsink, src.port_mac)

    def _add_target(self, name: str, src_ns: str, sink_ns: str, gw: str) -> None:
        self.targets[name] = Target(name, src_ns, self.sinks.attach(sink_ns, VM_IFNAME), gw)

    def apply_rules(self, n: int) -> float:
        """Every path with n non-matching rules + the allow of the load; seconds taken."""
        t0 = time.monotonic()
        spec = spec_for(self.prefix, n)
        for path in self.topo.paths:
            if path == "offload":
                from .lab import toml_tables
                f = self.topo.dir / f"state-{n}.toml"
                f.write_text(toml_tables("", spec.apply_dict()))
                r = self.topo.lab.ctl("apply", str(f), timeout=600)
                if r.code != 0:
                    raise BenchError(f"xdpflowctl apply ({n} rules) failed: {r.stderr.strip()}")
                continue
            setup = render.router_setup(spec, TENANT, path)
            if path == "nftables":
                run(["nft", "flush", "ruleset"], ns=setup.name)
            for argv, text in setup.firewall:
                run(argv, ns=setup.name, input=text, timeout=600)
        return time.monotonic() - t0

    def measure(self, name: str, flows: int, seconds: float) -> Dict[str, float]:
        t = self.targets[name]
        with tempfile.NamedTemporaryFile("w", suffix=".trafgen") as f:
            f.write(trafgen_conf(SRC_MAC, t.conf_gw, flows))
            f.flush()
            return blast(t, self.sinks, f.name, seconds)

    def agent_counters(self) -> Dict[str, float]:
        """Flows in the table, insert failures and evictions, from the agent's metrics."""
        out: Dict[str, float] = {}
        if self.topo is None or self.topo.lab is None:
            return out
        for line in self.topo.lab.metrics().splitlines():
            for key in ("xdpflow_flows{", "xdpflow_flow_insert_failures_total",
                        "xdpflow_flow_evictions_total", "xdpflow_flow_table_capacity"):
                if line.startswith(key):
                    name = line.split("{")[0].split(" ")[0]
                    out[name] = out.get(name, 0) + float(line.rsplit(" ", 1)[1])
        return out

    def conntrack_count(self, path: str) -> Optional[int]:
        if path not in ("iptables", "nftables") or path not in self.topo.paths:
            return None
        p = run(["cat", "/proc/sys/net/netfilter/nf_conntrack_count"],
                ns=self.topo.side_ns(path, self.spec.vm("src")), check=False)
        return int(p.stdout.strip()) if p.returncode == 0 and p.stdout.strip() else None


# -- forward ---------------------------------------------------------------------------------

@dataclass
class ForwardPlan:
    flows: Tuple[int, ...] = (1, 1000, 100000)
    rules: Tuple[int, ...] = (0, 100, 1000, 10000)
    rounds: int = 5
    seconds: float = 0.8
    warmup: float = 0.4

    @classmethod
    def quick(cls) -> "ForwardPlan":
        return cls(flows=(1, 1000), rules=(0, 100), rounds=2, seconds=0.4, warmup=0.3)


def forward_goals(cases: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """The issue's goals, each from the cases of one run: a kernel path's cost over the
    offloaded path's at the same flows and rules."""
    by = {(c["path"], c["flows"], c["rules"]): c["ns_per_packet"] for c in cases}
    flows = sorted({c["flows"] for c in cases})
    goals = []

    def add(name, kernel, nrules, op, goal, note=""):
        for nf in flows:
            v = benchlib.ratio(by.get((kernel, nf, nrules)), by.get(("offload", nf, nrules)))
            if (kernel, nf, nrules) in by and ("offload", nf, nrules) in by:
                goals.append(benchlib.goal_entry(f"{name}, {nf:,} flows", v, op, goal, note))
    add("iptables/offload cost, 100 rules", "iptables", 100, ">=", 10)
    add("iptables/offload cost, 10,000 rules", "iptables", 10000, ">=", 100)
    for nr in sorted({c["rules"] for c in cases}):
        add(f"nftables/offload cost, {nr:,} rules", "nftables", nr, ">=", 2)
    add("plain/offload cost (offload at most plain), 0 rules", "plain", 0, ">=", 1,
        "veth: XDP pays for converting the skb the veth made; the generator shares CPU 0")
    return goals


def run_forward(plan: ForwardPlan, say: Callable[[str], None] = print) -> Dict[str, object]:
    t_start = time.monotonic()
    doc: Dict[str, object] = {"suite": "forward", "machine": benchlib.machine()}
    cases = []
    apply_s: Dict[str, float] = {}
    with Rig(PATHS, say=say) as rig:
        for nr in plan.rules:
            apply_s[str(nr)] = round(rig.apply_rules(nr), 2)
            say(f"{nr:,} rules applied on every path in {apply_s[str(nr)]:.1f}s")
            for nf in plan.flows:
                for t in TARGETS:                       # warm-up: flows, conntrack, caches
                    rig.measure(t, nf, plan.warmup)
                samples: Dict[str, List[Dict[str, float]]] = {t: [] for t in TARGETS}
                for r in range(plan.rounds):
                    for t in TARGETS:
                        samples[t].append(rig.measure(t, nf, plan.seconds))
                    say(f"  {nf:,} flows, {nr:,} rules, round {r + 1}/{plan.rounds}: " +
                        ", ".join(f"{t} {samples[t][-1]['pps'] / 1e6:.3f}" for t in TARGETS)
                        + " Mpps")
                gen = [s["pps"] for s in samples[benchlib.GENERATOR]]
                if not all(gen):
                    raise BenchError("the generator-only sink counted nothing")
                for t in PATHS:
                    rates = [s["pps"] for s in samples[t]]
                    if not any(rates):
                        raise BenchError(f"{t}: nothing arrived at the sink ({nf} flows, "
                                         f"{nr} rules): the path is broken, not slow")
                    c = {"path": t, "flows": nf, "rules": 0 if t == "plain" else nr,
                         "rules_set": nr}
                    c.update(benchlib.summarize(rates, gen))
                    c["offered_samples_pps"] = [round(s["offered_pps"], 1) for s in samples[t]]
                    cases.append(c)
        # plain has no rules: keep its cases once per flow count, measured in the 0-rule cell
        cases = [c for c in cases if c["path"] != "plain" or c["rules_set"] == plan.rules[0]]
    doc.update(cases=cases, goals=forward_goals(cases), rule_apply_seconds=apply_s,
               plan=plan.__dict__, seconds=round(time.monotonic() - t_start, 1),
               method="trafgen on CPU 0, 60-byte UDP, XDP drop-and-count sink at the "
                      "receiving VM; per round generator, offload, iptables, nftables, plain "
                      "in turn after a warm-up; ns_per_packet = median over rounds of "
                      "1e9/rate(path) - 1e9/rate(generator only) (same round)",
               limits="Rates are bounded by the generator (trafgen on one core, which also "
                      "runs the receive work of the veths: every path's cost lands on CPU 0). "
                      "The offloaded path redirects between veths: XDP runs on the skb the "
                      "sending veth built (no driver-level XDP on real NICs here), so it pays "
                      "the skb conversion plain forwarding also pays. Kernel paths walk their "
                      "rules for every packet of one-way UDP (conntrack keeps it NEW until a "
                      "reply). The rules: N that match nothing (udp from other /32 sources), "
                      "then the allow of the load; `0 rules` = only that allow. nftables "
                      "keeps port security in sets; the security rules are a chain, as "
                      "render.py writes them.")
    return doc


def forward_table(doc: Dict[str, object]) -> str:
    cases = sorted(doc["cases"], key=lambda c: (c["flows"], c["rules"], PATHS.index(c["path"])))
    lines = [benchlib.rate_table(cases, ("flows", "rules", "path")), "", "goals (reported, "
             "not asserted)", benchlib.goals_table(doc["goals"]), "",
             f"{doc['plan']['rounds']} rounds of {doc['plan']['seconds']}s per path and cell, "
             f"medians; {doc['seconds']}s in all"]
    return "\n".join(lines)


def forward_plots(doc: Dict[str, object], outdir: str) -> List[str]:
    os.makedirs(outdir, exist_ok=True)
    return [benchlib.plot_forward(doc, os.path.join(outdir, "forward.png"))]


# -- setup: every packet a new flow ------------------------------------------------------------

@dataclass
class SetupPlan:
    rounds: int = 5
    seconds: float = 1.0
    rules: int = 100

    @classmethod
    def quick(cls) -> "SetupPlan":
        return cls(rounds=2, seconds=0.6)


def run_setup(plan: SetupPlan, say: Callable[[str], None] = print) -> Dict[str, object]:
    """Every packet a new flow (random source and destination ports) on the offloaded path
    and the conntrack kernel paths: rates, what the flow table and conntrack hold, insert
    failures and evictions, round after round as the tables fill past capacity."""
    t_start = time.monotonic()
    doc: Dict[str, object] = {"suite": "setup", "machine": benchlib.machine()}
    paths = ("offload", "iptables", "nftables")
    targets = (benchlib.GENERATOR,) + paths
    with Rig(paths, say=say) as rig:
        rig.apply_rules(plan.rules)
        for t in targets:
            rig.measure(t, 1, 0.3)           # warm-up on one flow: the new-flow rounds start empty
        samples: Dict[str, List[Dict[str, float]]] = {t: [] for t in targets}
        timeline = []
        for r in range(plan.rounds):
            for t in targets:
                s = rig.measure(t, NEW_FLOWS, plan.seconds)
                if t == "offload":
                    s.update(rig.agent_counters())
                elif t in ("iptables", "nftables"):
                    s["conntrack_entries"] = rig.conntrack_count(t)
                samples[t].append(s)
            timeline.append({t: samples[t][-1] for t in targets})
            say(f"  new flows, round {r + 1}/{plan.rounds}: " + ", ".join(
                f"{t} {samples[t][-1]['pps'] / 1e6:.3f}" for t in targets) + " Mpps; offload "
                f"flows {samples['offload'][-1].get('xdpflow_flows', '?'):,.0f}, insert "
                f"failures {samples['offload'][-1].get('xdpflow_flow_insert_failures_total', 0):,.0f}")
    gen = [s["pps"] for s in samples[benchlib.GENERATOR]]
    cases = []
    for t in paths:
        c = {"path": t, "flows": "new", "rules": plan.rules}
        c.update(benchlib.summarize([s["pps"] for s in samples[t]], gen))
        c["rounds"] = samples[t]
        cases.append(c)
    by = {c["path"]: c for c in cases}
    off_first = samples["offload"][0]
    installed_first = off_first.get("xdpflow_flows")
    goals = [benchlib.goal_entry("offload new flows/s, live (first round, table filling)",
                                 by["offload"]["pps"], ">=", 1e6,
                                 "bounded by the generator: the load is one trafgen core"),
             benchlib.goal_entry("offload/iptables new-flow rate (live beats conntrack)",
                                 benchlib.ratio(by["offload"]["pps"], by["iptables"]["pps"]),
                                 ">=", 1)]
    doc.update(cases=cases, goals=goals, plan=plan.__dict__,
               flow_table_capacity=off_first.get("xdpflow_flow_table_capacity"),
               flows_after_first_round=installed_first,
               seconds=round(time.monotonic() - t_start, 1),
               method="every packet a new flow: trafgen drnd(0, 65535) on both UDP ports; "
                      "rounds alternate generator, offload, iptables, nftables; the agent's "
                      "metrics (flows, insert failures, evictions) and conntrack's count read "
                      "after each round. The flow table fills within the first round: later "
                      "rounds run past capacity (inserts fail; the sweeper evicts above its "
                      "watermark), as conntrack runs into nf_conntrack_max.",
               limits="The live rate is bounded by the generator (one trafgen core, which "
                      "also runs the receive work). The test-run insert rate (no generator) "
                      "is not measured here: see BENCHMARKS.md.")
    return doc


def setup_table(doc: Dict[str, object]) -> str:
    lines = [benchlib.rate_table(doc["cases"], ("path", "flows", "rules")), ""]
    lines.append(f"{'round':>5} {'offload Mpps':>12} {'flows':>9} {'ins.fail':>10} "
                 f"{'evicted':>9} {'ipt Mpps':>9} {'ct ipt':>8} {'nft Mpps':>9} {'ct nft':>8}")
    by = {c["path"]: c for c in doc["cases"]}
    for i, o in enumerate(by["offload"]["rounds"]):
        it, nt = by["iptables"]["rounds"][i], by["nftables"]["rounds"][i]
        lines.append(f"{i + 1:>5} {o['pps'] / 1e6:12.3f} {o.get('xdpflow_flows', 0):9,.0f} "
                     f"{o.get('xdpflow_flow_insert_failures_total', 0):10,.0f} "
                     f"{o.get('xdpflow_flow_evictions_total', 0):9,.0f} {it['pps'] / 1e6:9.3f} "
                     f"{it.get('conntrack_entries') or 0:8,} {nt['pps'] / 1e6:9.3f} "
                     f"{nt.get('conntrack_entries') or 0:8,}")
    lines += ["", "goals (reported, not asserted)", benchlib.goals_table(doc["goals"])]
    return "\n".join(lines)


def setup_plots(doc: Dict[str, object], outdir: str) -> List[str]:
    os.makedirs(outdir, exist_ok=True)
    bars = [(benchlib.PATH_STYLE[c["path"]][0], c["pps"] / 1e3,
             benchlib.PATH_STYLE[c["path"]][1]) for c in doc["cases"]]
    gen = doc["cases"][0]["generator_pps"] / 1e3
    return [benchlib.plot_bars("setup: every packet a new flow, delivered rate (median of "
                               "rounds; tables fill, then run past capacity)", bars,
                               "thousand new flows (packets) per second delivered; higher is "
                               "better", os.path.join(outdir, "setup.png"),
                               goal=(gen, f"generator alone: {gen:,.0f} kpps"))]
