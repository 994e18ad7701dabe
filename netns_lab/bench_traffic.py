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
import socket
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
# The sink counts IPv4 UDP frames (the load) and drops every frame: the node's own chatter
# (IPv6 neighbour discovery, MLD) is never counted as load.
SINK_SRC = """
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
BPF_PERCPU_ARRAY(xf_sink_count, u64, %d);
static __always_inline int sink(struct xdp_md *ctx, u32 slot) {
    void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct iphdr *iph = data + sizeof(*eth);
    if ((void *)(iph + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP) ||
        iph->protocol != IPPROTO_UDP)
        return XDP_DROP;
    u64 *v = xf_sink_count.lookup(&slot);
    if (v)
        *v += 1;
    return XDP_DROP;
}
""" % SINK_SLOTS + "".join(f"int xf_sink{n}(struct xdp_md *ctx) {{ return sink(ctx, {n}); }}\n"
                           for n in range(SINK_SLOTS))
XDP_FLAGS_DRV_MODE = 4
# flows -> (source ports, destination ports): their product, coprime counts not needed
# (random ports: trafgen's drnd).
FLOW_SHAPES = {1: (1, 1), 1000: (1000, 1), 100000: (3125, 32)}
NEW_FLOWS = 0   # every packet a new flow: random source and destination ports


class BenchError(RuntimeError):
    """The rig does not measure what it should (nothing arrived, a tool failed)."""


# -- pure: the lab file, the rules, the trafgen frame ------------------------------------

def rules(n: int, first: int = 0) -> List[Dict[str, object]]:
    """The allow of the load (id 1, the lowest priority), then n rules that match none of
    the load and are walked before it (ids and hosts from `first` on: two batches with
    different `first` are two different rule sets)."""
    out: List[Dict[str, object]] = [
        {"id": 1, "tenant": TENANT, "priority": 100, "action": "allow", "dst": f"{DST_IP}/32",
         "proto": "udp", "comment": "the load"}]
    for i in range(first, first + n):
        host = (64 << 16) + i + 1                    # 10.64.0.1, 10.64.0.2, ... (10.64.0.0/10)
        a = f"10.{host >> 16 & 255}.{host >> 8 & 255}.{host & 255}"
        out.append({"id": i + 2, "tenant": TENANT, "priority": 200, "action": "allow",
                    "src": f"{a}/32", "proto": "udp", "dport": "9"})
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


@contextlib.contextmanager
def trafgen(src_ns: str, conf: str, rate: Optional[int] = None, cpu: int = 0,
            gap_ns: Optional[int] = None):
    """trafgen on CPU `cpu` in `src_ns` (full speed, or `rate` packets per second, or one
    packet every `gap_ns`) until the block ends; its own process group, ended by id.
    (--rate keeps the average, in bursts: a second's packets within the first tenth of it
    here. --gap spaces them, up to what one sendto a packet can do.)"""
    p = subprocess.Popen(["nsenter", f"--net=/run/netns/{src_ns}", "--", "taskset",
                          "-c", str(cpu), "trafgen", "--dev", VM_IFNAME, "--conf", conf, "--cpus",
                          "1", "--no-cpu-stats", "-q"] + (["--rate", f"{rate}pps"] if rate else []) +
                         (["--gap", f"{gap_ns}ns"] if gap_ns else []),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        yield p
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGINT)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def _running(p: subprocess.Popen, where: str) -> None:
    if p.poll() is not None:
        raise BenchError(f"trafgen in {where} exited {p.returncode}: {p.stderr.read().strip()}")


def blast(target: Target, sinks: Sinks, conf: str, seconds: float,
          settle: float = 0.25) -> Dict[str, float]:
    """The sink's rate over `seconds` of full-speed trafgen after `settle` (trafgen's
    start-up is not counted), and the rate the generator offered."""
    with trafgen(target.src_ns, conf) as p:
        time.sleep(settle)
        _running(p, target.src_ns)
        c0, tx0, t0 = sinks.count(target.slot), _tx_packets(target.src_ns), time.monotonic()
        time.sleep(seconds)
        c1, tx1, t1 = sinks.count(target.slot), _tx_packets(target.src_ns), time.monotonic()
    return {"pps": (c1 - c0) / (t1 - t0), "offered_pps": (tx1 - tx0) / (t1 - t0)}


class Rig:
    """The labs, the sinks, the generator pair; apply a rule count to every path."""

    def __init__(self, paths: Sequence[str] = PATHS, say: Callable[[str], None] = print,
                 datapath: Optional[Dict[str, int]] = None):
        self.datapath = datapath or BENCH_DATAPATH
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
                                      datapath=self.datapath)
        self.stack.callback(self.topo.close)
        self.topo.up()
        self._agent_off_cpu0()
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

    def _agent_off_cpu0(self) -> None:
        """Every thread of the agent onto the other CPUs: its sweeper and API work would
        otherwise take turns with the generator on CPU 0 and count as the offloaded
        path's cost (a node runs its agent on a control core)."""
        others = os.sched_getaffinity(0) - {0}
        if self.topo.lab is None or not others:
            return
        pid = self.topo.lab.proc.pid
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(int(tid), others)

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
            setup = render.router_setup(spec, TENANT, path, nft_sets=True)
            if path == "nftables":
                run(["nft", "flush", "ruleset"], ns=setup.name)
            for argv, text in setup.firewall:
                run(argv, ns=setup.name, input=text, timeout=600)
        return time.monotonic() - t0

    @contextlib.contextmanager
    def conf(self, name: str, flows: int):
        with tempfile.NamedTemporaryFile("w", suffix=".trafgen") as f:
            f.write(trafgen_conf(SRC_MAC, self.targets[name].conf_gw, flows))
            f.flush()
            yield f.name

    def measure(self, name: str, flows: int, seconds: float) -> Dict[str, float]:
        with self.conf(name, flows) as conf:
            return blast(self.targets[name], self.sinks, conf, seconds)

    def steady_loss(self, name: str, flows: int, rate: int, event: Callable[[], None],
                    before: float = 0.5, after: float = 0.5) -> Dict[str, float]:
        """Paced load; `event` in the middle; packets the sender sent that the sink did
        not count (after a moment to drain)."""
        t = self.targets[name]
        with self.conf(name, flows) as conf:
            c0, tx0 = self.sinks.count(t.slot), _tx_packets(t.src_ns)
            with trafgen(t.src_ns, conf, rate) as p:
                time.sleep(before)
                _running(p, t.src_ns)
                event()
                time.sleep(after)
                _running(p, t.src_ns)
            time.sleep(0.2)
            sent = _tx_packets(t.src_ns) - tx0
            got = self.sinks.count(t.slot) - c0
        return {"sent": sent, "received": got, "lost": sent - got}

    def agent_counters(self) -> Dict[str, float]:
        """Entries in the flow table now (read from its pin: the agent's gauge is only as
        fresh as its last sweep), insert failures and evictions from the agent's metrics."""
        from agent import bpfsys
        from .topology import pin_dir
        out: Dict[str, float] = {}
        if self.topo is None or self.topo.lab is None:
            return out
        m = bpfsys.RawMap.pinned(os.path.join(pin_dir(self.prefix), "xf_flows"))
        try:
            out["flow_entries"] = m.count()
        finally:
            m.close()
        for line in self.topo.lab.metrics().splitlines():
            for key in ("xdpflow_flow_insert_failures_total",
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
    seconds: float = 0.6             # 12 cells x 5 targets x 5 rounds: `all` within ~15 min
    warmup: float = 0.3

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
        doc["prefix"] = rig.prefix
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
                      "keeps port security in sets and folds the N rules (alike but for their "
                      "source) into one statement over a set (render.py, nft_sets=True).")
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

# The lab's small flow table: the new-flow load fills it within the first round.
SETUP_DATAPATH = {"flow_table_size": 65536, "max_rule_entries": 4096}


@dataclass
class SetupPlan:
    rounds: int = 5
    seconds: float = 1.0
    rules: int = 100
    testrun_packets: int = 45_000      # past the 32,768 flows the table holds

    @classmethod
    def quick(cls) -> "SetupPlan":
        return cls(rounds=2, seconds=0.6)


def testrun_inserts(rig: "Rig", n: int) -> Dict[str, object]:
    """`n` packets, each a new flow, through the agent's attached program with
    BPF_PROG_TEST_RUN (one call each, no generator, no veth): the kernel's ns for each.
    The lab's table of 65,536 entries holds 32,768 flows (the reply entry and the forward
    one): the first packets install, the last ones run into the full table."""
    from agent import bpfsys
    from .bench import XDP_NAMES, XDP_REDIRECT, udp_packet
    from .netns import entered
    lab = rig.topo.lab
    lab.ok("flow", "flush")
    prog_fd = bpfsys.prog_fd_by_id(lab.ok("status")["program_id"])
    src = rig.spec.vm("src")
    ns_each: List[int] = []
    try:
        with entered(lab.node):
            ifindex = socket.if_nametoindex(src.port)
            for i in range(n):
                pkt = udp_packet(SRC_MAC, src.port_mac, SRC_IP, DST_IP, 1024 + i % 60000,
                                 20000 + i // 60000, ttl=64)
                rc, _, ns = bpfsys.test_run(prog_fd, pkt, ifindex, 1)
                if rc != XDP_REDIRECT:
                    raise BenchError(f"test-run new flow {i}: {XDP_NAMES.get(rc, rc)}, "
                                     f"expected XDP_REDIRECT")
                ns_each.append(ns)
        # The same calls on a flow now in the table: what one call costs besides the
        # install (a repeat of 1 is timed with the kernel's clock around one run).
        hit = udp_packet(SRC_MAC, src.port_mac, SRC_IP, DST_IP, 1024, 20000, ttl=64)
        with entered(lab.node):
            hits = [bpfsys.test_run(prog_fd, hit, ifindex, 1)[2] for _ in range(2000)]
    finally:
        os.close(prog_fd)
    counters = rig.agent_counters()
    cap = SETUP_DATAPATH["flow_table_size"] // 2
    filling, full = ns_each[:int(cap * 0.75)], ns_each[cap + 2000:]
    out = {"packets": n, "flow_entries_after": counters.get("flow_entries"),
           "insert_failures_total": counters.get("xdpflow_flow_insert_failures_total"),
           "ns_median_installing": benchlib.median(filling),
           "ns_mean_installing": round(sum(filling) / len(filling), 1),
           "ns_median_table_full": benchlib.median(full) if full else None,
           "ns_median_hit_same_calls": benchlib.median(hits),
           "ns_each": ns_each}
    out["new_flows_per_s"] = round(1e9 / out["ns_mean_installing"])
    return out


def run_setup(plan: SetupPlan, say: Callable[[str], None] = print) -> Dict[str, object]:
    """Every packet a new flow (random source and destination ports) on the offloaded path
    and the conntrack kernel paths: rates, what the flow table and conntrack hold, insert
    failures and evictions, round after round as the tables fill past capacity."""
    t_start = time.monotonic()
    doc: Dict[str, object] = {"suite": "setup", "machine": benchlib.machine()}
    paths = ("offload", "iptables", "nftables")
    targets = (benchlib.GENERATOR,) + paths
    with Rig(paths, say=say, datapath=SETUP_DATAPATH) as rig:
        doc["prefix"] = rig.prefix
        rig.apply_rules(plan.rules)
        tr = testrun_inserts(rig, plan.testrun_packets)
        doc["testrun"] = tr
        say(f"  test-run: {tr['new_flows_per_s']:,} new flows/s installing (median "
            f"{tr['ns_median_installing']:.0f} ns), {tr['ns_median_table_full']} ns/packet "
            f"with the table full; {tr['insert_failures_total']:,.0f} insert failures")
        rig.topo.lab.ok("flow", "flush")
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
                f"flow entries {samples['offload'][-1].get('flow_entries', 0):,.0f}, insert "
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
    installed_first = off_first.get("flow_entries")
    goals = [benchlib.goal_entry("offload new flows/s installed, test-run (table filling)",
                                 doc["testrun"]["new_flows_per_s"], ">=", 1e6,
                                 "one test-run call per packet; the kernel's time per run"),
             benchlib.goal_entry("offload new flows/s, live (median of rounds)",
                                 by["offload"]["pps"], ">=", 1e6,
                                 "bounded by the generator: the load is one trafgen core"),
             benchlib.goal_entry("offload/iptables new-flow rate (live beats conntrack)",
                                 benchlib.ratio(by["offload"]["pps"], by["iptables"]["pps"]),
                                 ">=", 1)]
    doc.update(cases=cases, goals=goals, plan=plan.__dict__,
               flow_table_capacity=off_first.get("xdpflow_flow_table_capacity"),
               flow_entries_after_first_round=installed_first,
               seconds=round(time.monotonic() - t_start, 1),
               method="every packet a new flow: trafgen drnd(0, 65535) on both UDP ports; "
                      "rounds alternate generator, offload, iptables, nftables; the agent's "
                      "metrics (flows, insert failures, evictions) and conntrack's count read "
                      "after each round. The flow table fills within the first round: later "
                      "rounds run past capacity (inserts fail; the sweeper evicts above its "
                      "watermark), as conntrack runs into nf_conntrack_max.",
               limits="The live rate is bounded by the generator (one trafgen core, which "
                      "also runs the receive work). The test-run rate is the kernel's time for "
                      "each run of the attached program on one new flow (miss, port security, "
                      "classify, route, two inserts), no generator and no veth.")
    return doc


def setup_table(doc: Dict[str, object]) -> str:
    lines = [benchlib.rate_table(doc["cases"], ("path", "flows", "rules")), ""]
    lines.append(f"{'round':>5} {'offload Mpps':>12} {'entries':>9} {'ins.fail':>10} "
                 f"{'evicted':>9} {'ipt Mpps':>9} {'ct ipt':>8} {'nft Mpps':>9} {'ct nft':>8}")
    by = {c["path"]: c for c in doc["cases"]}
    for i, o in enumerate(by["offload"]["rounds"]):
        it, nt = by["iptables"]["rounds"][i], by["nftables"]["rounds"][i]
        lines.append(f"{i + 1:>5} {o['pps'] / 1e6:12.3f} {o.get('flow_entries', 0):9,.0f} "
                     f"{o.get('xdpflow_flow_insert_failures_total', 0):10,.0f} "
                     f"{o.get('xdpflow_flow_evictions_total', 0):9,.0f} {it['pps'] / 1e6:9.3f} "
                     f"{it.get('conntrack_entries') or 0:8,} {nt['pps'] / 1e6:9.3f} "
                     f"{nt.get('conntrack_entries') or 0:8,}")
    tr = doc["testrun"]
    lines += ["", f"test-run, one new flow per run: {tr['ns_median_installing']:.0f} ns median "
              f"({tr['new_flows_per_s']:,} flows/s) while installing; "
              f"{tr['ns_median_table_full']} ns with the table full, "
              f"{tr.get('ns_median_hit_same_calls', '?')} ns for a flow-table hit in the same kind of "
              f"call "
              f"({tr['insert_failures_total']:,.0f} insert failures, "
              f"{tr['flow_entries_after']:,} entries)"]
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


# -- restart: packets lost across agent restarts under steady load ------------------------------

RESTART_RATE = 50_000            # pps, paced: well below what the path carries


def run_restart(quick: bool = False, say: Callable[[str], None] = print) -> Dict[str, object]:
    """Under a paced load of 1,000 flows through the offloaded path: a control window with
    no event, then the agent killed -9 and started again, stopped with SIGTERM and started
    again, and started as another program build (an upgrade: -DXF_BUILD_ID); packets lost
    in each window and the time from the start of the new agent to `status` answering
    (warm: maps pinned, program attached). Cold: the agent stopped, torn down (programs
    detached, maps unpinned), started again with no load."""
    t_start = time.monotonic()
    rounds = 1 if quick else 2       # a warm restart takes 10-30 s here
    doc: Dict[str, object] = {"suite": "restart", "machine": benchlib.machine(),
                              "rate_pps": RESTART_RATE, "rounds": rounds}
    events: Dict[str, List[Dict[str, float]]] = {}
    with Rig(("offload",), say=say) as rig:
        doc["prefix"] = rig.prefix
        rig.apply_rules(100)
        lab = rig.topo.lab
        build = [0]

        def restart(how: str):
            def event():
                if how == "kill -9":
                    lab.proc.send_signal(signal.SIGKILL)
                    lab.proc.wait(10)
                elif how != "none":
                    lab.stop_agent(signal.SIGTERM)
                if how == "none":
                    return
                env = None
                if how == "upgrade":
                    build[0] += 1
                    env = {"XDPFLOW_CFLAGS": f"-DXF_BUILD_ID={100 + build[0]}"}
                t0 = time.monotonic()
                lab.start_agent(env=env, timeout=120)
                events[how][-1]["ready_s"] = round(time.monotonic() - t0, 3)
            return event
        for how in ("none", "kill -9", "SIGTERM", "upgrade"):
            events[how] = []
        rig.measure("offload", 1000, 0.3)                          # flows installed
        for r in range(rounds):
            for how in events:
                events[how].append({})
                res = rig.steady_loss("offload", 1000, RESTART_RATE, restart(how))
                events[how][-1].update(res)
                say(f"  restart round {r + 1}/{rounds}: {how:8} sent {res['sent']:,} lost "
                    f"{res['lost']:,}" + (f", ready in {events[how][-1]['ready_s']:.2f}s"
                                          if "ready_s" in events[how][-1] else ""))
        lab.stop_agent(signal.SIGTERM)
        from .lab import AGENT
        run(["nsenter", f"--net=/run/netns/{lab.node}", AGENT, "--config", str(lab.config),
             "--teardown"], timeout=120)
        t0 = time.monotonic()
        lab.start_agent(timeout=120)
        ready = time.monotonic() - t0
        while not all(p["attached"] for p in lab.ok("status")["ports"]):
            if time.monotonic() - t0 > 60:
                raise BenchError("the agent did not attach its ports after a cold start")
            time.sleep(0.05)
        cold = {"ready_s": round(ready, 3), "attached_s": round(time.monotonic() - t0, 3)}
    cases = []
    for how, rs in events.items():
        c = {"event": how, "lost": sum(x["lost"] for x in rs), "sent": sum(x["sent"] for x in rs),
             "samples": rs}
        if how != "none":
            c["ready_s_median"] = round(benchlib.median([x["ready_s"] for x in rs]), 3)
        cases.append(c)
    doc.update(cases=cases, cold=cold, seconds=round(time.monotonic() - t_start, 1),
               goals=[benchlib.goal_entry(f"packets lost across {c['event']}", c["lost"], "<=",
                                          0) for c in cases if c["event"] != "none"],
               method=f"trafgen paced at {RESTART_RATE:,} pps (1,000 flows) through the "
                      f"offloaded path; per window: sent = the sender's tx counter, received "
                      f"= the XDP sink's count; ready = start of the new agent until it "
                      f"answers `status` (warm). 'none' is the control window.")
    return doc


def restart_table(doc: Dict[str, object]) -> str:
    lines = [f"{'event':<9} {'sent':>10} {'lost':>8} {'ready s (median)':>17}", "-" * 48]
    for c in doc["cases"]:
        lines.append(f"{c['event']:<9} {c['sent']:>10,} {c['lost']:>8,} "
                     f"{c.get('ready_s_median', '-'):>17}")
    lines += [f"cold start (torn down, no pins): ready in {doc['cold']['ready_s']}s, ports "
              f"attached in {doc['cold']['attached_s']}s", "",
              "goals (reported, not asserted)", benchlib.goals_table(doc["goals"])]
    return "\n".join(lines)


def restart_plots(doc: Dict[str, object], outdir: str) -> List[str]:
    os.makedirs(outdir, exist_ok=True)
    bars = [(f"{c['event']}: lost {c['lost']:,} of {c['sent']:,}", c["ready_s_median"],
             "#2e7d32" if c["lost"] == 0 else "#c62828")
            for c in doc["cases"] if c["event"] != "none"]
    bars.append(("cold start (no pins): lost -, no load", doc["cold"]["ready_s"], "#9e9e9e"))
    return [benchlib.plot_bars(
        f"restart under {doc['rate_pps']:,} pps: seconds until the new agent answers "
        f"(green: no packet lost)", bars, "seconds to ready; lower is better",
        os.path.join(outdir, "restart.png"))]


# -- churn: rules applied while traffic runs ------------------------------------------------------

CHURN_RATE = 50_000              # pps, paced


def run_churn(quick: bool = False, say: Callable[[str], None] = print) -> Dict[str, object]:
    """Under a paced load through the offloaded path, the rule set is replaced again and
    again (`apply` of a whole state: a batch of rules out, another batch in, the allow of
    the load in both): rules per second applied, and packets that got a verdict from
    neither set — every packet is allowed by both, so each one the sink did not count."""
    from agent.api import ApiClient
    t_start = time.monotonic()
    plan = ((1, 4), (100, 4)) if quick else ((1, 10), (100, 10), (10000, 4))
    doc: Dict[str, object] = {"suite": "churn", "machine": benchlib.machine(),
                              "rate_pps": CHURN_RATE}
    cases = []
    with Rig(("offload",), say=say) as rig:
        doc["prefix"] = rig.prefix
        rig.apply_rules(0)
        lab = rig.topo.lab
        client = ApiClient(lab.socket, timeout=600)
        rig.measure("offload", 1000, 0.3)
        for batch, applies in plan:
            base = {k: v for k, v in spec_for(rig.prefix, 0).apply_dict().items() if k != "rules"}
            states = [dict(base, rules=rules(batch, first)) for first in (0, batch)]
            client.call("apply", {"state": states[1], "dry_run": False})     # the B batch in
            took: List[float] = []

            def event():
                for k in range(applies):
                    t0 = time.monotonic()
                    client.call("apply", {"state": states[k % 2], "dry_run": False})
                    took.append(time.monotonic() - t0)
            res = rig.steady_loss("offload", 1000, CHURN_RATE, event)
            changed = 2 * batch             # each apply: a batch out, the other batch in
            rps = [changed / t for t in took]
            c = {"batch": batch, "applies": applies, "rule_changes_per_apply": changed,
                 "apply_seconds": [round(t, 4) for t in took],
                 "rules_per_s": round(benchlib.median(rps), 1), "sent": res["sent"],
                 "received": res["received"], "neither": res["lost"]}
            cases.append(c)
            say(f"  churn batch {batch:,}: {c['rules_per_s']:,.0f} rules/s (median of "
                f"{applies}), {res['sent']:,} packets, {res['lost']:,} from neither set")
    doc.update(cases=cases, seconds=round(time.monotonic() - t_start, 1),
               goals=[benchlib.goal_entry(f"packets from neither rule set, batch {c['batch']:,}",
                                          c["neither"], "<=", 0) for c in cases],
               method=f"trafgen paced at {CHURN_RATE:,} pps (1,000 flows) through the "
                      f"offloaded path while `apply` (the agent's API, one request per whole "
                      f"state) swaps batch A for batch B and back; rules/s = (batch out + "
                      f"batch in) / the request's round trip; neither = sent - received.")
    return doc


def churn_table(doc: Dict[str, object]) -> str:
    lines = [f"{'batch':>7} {'applies':>8} {'rules/s':>10} {'sent':>10} {'neither':>8}",
             "-" * 48]
    for c in doc["cases"]:
        lines.append(f"{c['batch']:>7,} {c['applies']:>8} {c['rules_per_s']:>10,.0f} "
                     f"{c['sent']:>10,} {c['neither']:>8,}")
    lines += ["", "goals (reported, not asserted)", benchlib.goals_table(doc["goals"])]
    return "\n".join(lines)


def churn_plots(doc: Dict[str, object], outdir: str) -> List[str]:
    os.makedirs(outdir, exist_ok=True)
    bars = [(f"batch {c['batch']:,}: {c['neither']:,} packets from neither set",
             c["rules_per_s"], "#2e7d32" if c["neither"] == 0 else "#c62828")
            for c in doc["cases"]]
    return [benchlib.plot_bars(f"churn under {doc['rate_pps']:,} pps: rule changes applied "
                               f"per second (green: no packet missed both rule sets)", bars,
                               "rule changes per second (log; higher is better)",
                               os.path.join(outdir, "churn.png"), log=True)]
