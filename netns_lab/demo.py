"""`xdpflow-lab demo`: the demo lab (netns_lab/labs/demo.toml: two tenants with the same
addresses and MACs) built on the offloaded path (the agent, configured with `xdpflowctl
apply`) and on the kernel path the way clouds did it before offload (a router namespace
per tenant; iptables, and nftables); real traffic on every path; every shipped scenario
through both paths, compared packet by packet; an indicative speed comparison; what the
node did (flow dump, stats, a trace, metrics); then everything is removed (`--keep` leaves
it up and says how to reach it).

Exits 1 if a comparison finds a mismatch, except in scenarios waiting on datapath work,
which are named as such."""
from __future__ import annotations

import argparse
import sys
import time

from . import compare, render, scenarios, speed, topology
from .labfile import DEMO_LAB, LabFileError, load
from .traffic import tcp_transfer


def say(text: str = ""):
    print(text, flush=True)


def section(title: str):
    say()
    say(f"== {title} " + "=" * max(0, 70 - len(title)))


def ctl(lab, *args: str, limit_lines: int = 0):
    say(f"$ xdpflowctl {' '.join(args)}")
    r = lab.ctl(*args, json=False)
    lines = (r.stdout + r.stderr).rstrip().splitlines()
    for line in lines[:limit_lines or len(lines)]:
        say(f"  {line}")
    if limit_lines and len(lines) > limit_lines:
        say(f"  ... ({len(lines) - limit_lines} more lines)")
    if r.code != 0:
        raise RuntimeError(f"xdpflowctl {' '.join(args)} failed ({r.code})")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lab", metavar="FILE", default=DEMO_LAB, help="the lab file (default: "
                   "the demo lab; the scenarios are written for it)")
    p.add_argument("--prefix", metavar="P", help="name prefix (default: [lab] prefix)")
    p.add_argument("--keep", action="store_true",
                   help="leave the lab up afterwards and print how to reach it")
    p.add_argument("--seconds", type=float, default=1.5,
                   help="seconds per speed measurement (default 1.5; 0 skips it)")


def main(args=None) -> int:
    if args is None:
        p = argparse.ArgumentParser(prog="xdpflow-lab demo")
        add_arguments(p)
        args = p.parse_args()
    try:
        spec = load(args.lab, prefix=args.prefix)
    except LabFileError as e:
        print(f"xdpflow-lab demo: {e}", file=sys.stderr)
        return 2
    if topology.namespaces_of(spec.prefix):
        say(f"lab {spec.prefix} is left from an earlier run: removing it first")
        topology.down(spec.prefix, say=lambda s: say(f"  {s}"))

    section(f"the lab ({spec.source})")
    for t in spec.state.tenants:
        rules = sum(1 for r in spec.state.rules if r.tenant == t.name)
        say(f"  tenant {t.name} (id {t.id}, default {t.default}, {rules} rules)")
        for vm in spec.vms:
            if vm.tenant == t.name:
                say(f"    VM {vm.name:6} {', '.join(vm.addrs):22} {vm.mac}  behind port "
                    f"{vm.port} (gateway MAC {vm.port_mac})")
    say("  every VM exists once per path, with the same addresses and MACs:")
    say("    offload   the agent's XDP datapath in a node namespace, configured with "
        "`xdpflowctl apply`")
    say("    iptables  a router namespace per tenant: routes, proxy ARP/ND, iptables + "
        "conntrack")
    say("    nftables  the same with an nftables ruleset (sets, one chain per tenant)")

    t0 = time.monotonic()
    section("building the lab (the agent compiles its datapath with BCC: a few seconds)")
    topo = topology.Topology(spec, say=say).up(detach=args.keep)
    failed = 0
    try:
        failed = _show(topo, spec, args)
    finally:
        if args.keep:
            from .cli import reach_text
            section("the lab stays up (--keep)")
            say(reach_text(topo))
        else:
            section("teardown")
            topo.close()
            say(f"  the lab's namespaces, interfaces, programs and pins are removed "
                f"({time.monotonic() - t0:.0f}s in all)")
    return 1 if failed else 0


def _show(topo, spec, args) -> int:
    lab = topo.lab
    a, b = spec.vm("blue1"), spec.vm("blue2")

    section("the same real traffic on every path")
    for path in topo.paths:
        r = tcp_transfer(topo.vm_ns(path, a), topo.vm_ns(path, b), b.ip, 5001, 10_000_000)
        same = r["received"]["sha256"] == r["sent"]["sha256"]
        say(f"  {path:9} 10 MB over TCP {a.name} -> {b.name}:5001 in "
            f"{r['sent']['seconds']:.2f}s: {r['received']['bytes']:,} bytes received, "
            f"{'the same bytes' if same else 'DIFFERENT BYTES'} (sha256 "
            f"{r['received']['sha256'][:12]}...)")

    chosen = scenarios.load()
    section(f"{len(chosen)} scenarios through the offloaded path and both kernel variants")
    doc = compare.compare(topo, chosen, render.VARIANTS, progress=say)
    say()
    say(compare.format_table(doc))
    waiting = {n for n, s in doc["scenarios"].items() if s.get("waiting_on")}
    failed = sum(len(s["mismatches"]) for v in doc["variants"].values()
                 for n, s in v["scenarios"].items() if n not in waiting)
    held = sum(len(s["mismatches"]) for v in doc["variants"].values()
               for n, s in v["scenarios"].items() if n in waiting)
    if held:
        say(f"\n  {held} mismatches are in scenarios waiting on the datapath "
            f"({', '.join(sorted(waiting))}): they show what it does today")

    if args.seconds > 0:
        section("speed on the same traffic (indicative)")
        say("  trafgen on CPU 0; every path in turn, twice, after a warm-up ...")
        res = speed.measure(topo, seconds=args.seconds, say=say)
        say(speed.format_table(res))

    section("what the node did (offloaded path)")
    ctl(lab, "flow", "dump", "--limit", "12")
    ctl(lab, "stats", limit_lines=24)
    ctl(lab, "trace", "--port", a.port, "--scapy",
        f'Ether(src="{a.mac}", dst="{a.port_mac}")/IP(src="{a.ip}", dst="{b.ip}")'
        f'/TCP(sport=40000, dport=5050, flags="S")')

    section(f"Prometheus metrics (http://127.0.0.1:{lab.metrics_port}/metrics in the node "
            f"namespace, excerpt)")
    counters = 0
    for line in lab.metrics().splitlines():
        if line.startswith("xdpflow_packets_total{"):
            counters += 1
            if counters > 6:
                continue
        elif not line.startswith(("xdpflow_flows{", "xdpflow_port_attached{", "xdpflow_rules{",
                                  "xdpflow_flow_table_capacity ")):
            continue
        say(f"  {line}")
    say(f"  ... ({counters} xdpflow_packets_total series in all)")

    section("summary")
    t = doc["total"]
    say(f"  {t['packets_compared']} packets compared: {t['matches']} match, "
        f"{t['mismatches']} mismatch ({held} of them waiting on the datapath), "
        f"{t['expected_differences']} expected differences, each with its reason")
    return failed


if __name__ == "__main__":
    sys.exit(main())
