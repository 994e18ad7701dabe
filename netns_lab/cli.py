"""xdpflow-lab: the lab's command line (console script `xdpflow-lab`, netns_lab.cli:main).

    xdpflow-lab up [--lab FILE] [--prefix P]           build the lab, start the agent, leave it up
    xdpflow-lab down [--lab FILE] [--prefix P]         remove all it made (also after a killed up)
    xdpflow-lab compare [--lab FILE] [--prefix P] [--scenario S ...] [--exclude S ...]
                        [--variant iptables|nftables ...] [--json FILE]
    xdpflow-lab bench datapath [--json FILE] [--png FILE] [--plot DIR] [--quick] [--repeat N] [--rounds R]
    xdpflow-lab bench forward|setup|memory|control|all [--json FILE] [--plot DIR] [--quick]
    xdpflow-lab demo [DEMO OPTIONS ...]

Exit codes: 0 success, 1 the run failed (e.g. a benchmark measured the wrong path), 2 bad
usage or missing privileges.

Adding commands: top-level commands go in COMMANDS (name -> function that adds its
subparser), `bench` targets in BENCH_TARGETS (name -> (add_arguments, run)). Heavy modules
(bcc, scapy, the lab itself) are imported inside the run functions, so `--help` and the
unit tests never need them.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Callable, Dict, List, Optional, Tuple

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _need_root(what: str) -> Optional[str]:
    if os.geteuid() != 0:
        return f"{what} needs root (BPF, network namespaces)"
    return None


def _terminate_cleanly() -> None:
    """SIGTERM raises SystemExit, so try/finally teardown (namespaces, pins) still runs."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)
    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:        # not the main thread (e.g. called from a test helper)
        pass


# -- bench ------------------------------------------------------------------------------

def _add_bench_datapath(p: argparse.ArgumentParser) -> None:
    from netns_lab import bench as b   # pure module: no bcc at import
    p.add_argument("--json", metavar="FILE", default=b.DEFAULT_JSON,
                   help=f"write the results as JSON (default {b.DEFAULT_JSON})")
    p.add_argument("--png", metavar="FILE", help="also write a bar chart as PNG")
    p.add_argument("--repeat", metavar="N", type=_positive_int, default=1_000_000,
                   help="packets per case per round (default 1000000)")
    p.add_argument("--rounds", metavar="R", type=_positive_int, default=3,
                   help="rounds, cases interleaved; the median is reported (default 3)")
    p.add_argument("--cpu", metavar="N", type=int, default=-1,
                   help="pin the measuring thread to this CPU (default: the last allowed "
                        "one; -2: no pinning)")
    p.add_argument("--quiet", action="store_true", help="print only the table")
    _suite_args(p, json=False)


def _suite_args(p: argparse.ArgumentParser, json: bool = True,
                default_json: str = "") -> None:
    if json:
        p.add_argument("--json", metavar="FILE", default=default_json,
                       help=f"write the results as JSON (default {default_json})")
    p.add_argument("--plot", metavar="DIR", help="also draw the plots (PNG) into DIR")
    p.add_argument("--quick", action="store_true",
                   help="fewer and shorter rounds, smaller sizes (`all` within 10 minutes)")


def _run_bench_datapath(args: argparse.Namespace) -> int:
    err = _need_root("bench datapath")
    if err:
        print(f"xdpflow-lab: {err}", file=sys.stderr)
        return EXIT_USAGE
    from netns_lab import bench as b
    _terminate_cleanly()
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    if args.quick:
        args.repeat, args.rounds = min(args.repeat, 100_000), min(args.rounds, 3)
    try:
        report = b.run_datapath_bench(repeat=args.repeat, rounds=args.rounds,
                                      cpu=None if args.cpu == -2 else args.cpu, log=log)
    except b.BenchError as e:
        print(f"xdpflow-lab: bench datapath failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(b.format_table(report))
    b.write_json(report, args.json)
    print(f"\nwrote {args.json}")
    if args.png:
        b.write_png(report, args.png)
        print(f"wrote {args.png}")
    if args.plot:
        from netns_lab import bench_suites
        for path in bench_suites.SUITES["datapath"].plots(report, args.plot):
            print(f"wrote {path}")
    return EXIT_OK


def _bench_suite(name: str):
    """(add its arguments, run it) for a suite of netns_lab/bench_suites.py."""
    def add(p: argparse.ArgumentParser) -> None:
        _suite_args(p, default_json=f"results/bench-{name}.json")

    def run_it(args: argparse.Namespace) -> int:
        err = _need_root(f"bench {name}")
        if err:
            print(f"xdpflow-lab: {err}", file=sys.stderr)
            return EXIT_USAGE
        from netns_lab import bench_suites as bs
        from netns_lab import benchlib
        _terminate_cleanly()
        failed = False
        if name == "all":
            doc = bs.run_all(args.quick, _say)
            table = bs.all_table(doc)
            plots = bs.all_plots
            failed = bool(doc["errors"])
        else:
            try:
                doc = bs.run_suite(name, args.quick, _say)
            except Exception as e:       # the rig's own errors and tools that failed
                print(f"xdpflow-lab: bench {name} failed: {type(e).__name__}: {e}",
                      file=sys.stderr)
                return EXIT_FAILED
            table = bs.SUITES[name].table(doc)
            plots = bs.SUITES[name].plots
        print(table)
        benchlib.write_json(doc, args.json)
        print(f"\nwrote {args.json}")
        if args.plot:
            for path in plots(doc, args.plot):
                print(f"wrote {path}")
        return EXIT_FAILED if failed else EXIT_OK
    return add, run_it


# name -> (add its arguments, run it). Other targets (e.g. `forward`, the trafgen rates
# kernel path vs offloaded path) are added here.
BENCH_TARGETS: Dict[str, Tuple[Callable[[argparse.ArgumentParser], None],
                               Callable[[argparse.Namespace], int]]] = {
    "datapath": (_add_bench_datapath, _run_bench_datapath),
    "forward": _bench_suite("forward"),
    "setup": _bench_suite("setup"),
    "restart": _bench_suite("restart"),
    "churn": _bench_suite("churn"),
    "memory": _bench_suite("memory"),
    "ratelimit": _bench_suite("ratelimit"),
    "control": _bench_suite("control"),
    "flood": _bench_suite("flood"),
    "all": _bench_suite("all"),
}


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="measure and write JSON (and PNG) results",
                       description="Measure; results are numbers, not pass/fail.")
    targets = p.add_subparsers(dest="target", metavar="TARGET", required=True)
    from netns_lab.bench_suites import SUITES
    helps = {n: s.help for n, s in SUITES.items()}
    helps["all"] = "every suite in turn, one JSON document"
    for name, (add, run) in BENCH_TARGETS.items():
        tp = targets.add_parser(name, help=helps.get(name))
        add(tp)
        tp.set_defaults(func=run)


# -- demo (netns_lab/demo.py, by the lead) ------------------------------------------------

def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="build the lab and show the offloaded path at work",
                       description="Options after `demo` are the demo's own "
                                   "(netns_lab/demo.py: add_arguments(parser), main(args)).")
    p.set_defaults(func=_run_demo, accepts_extra=True)


def _run_demo(args: argparse.Namespace) -> int:
    import importlib
    try:
        demo = importlib.import_module("netns_lab.demo")
    except ImportError as e:
        if e.name in ("netns_lab.demo",):
            print("xdpflow-lab: demo is not available yet", file=sys.stderr)
            return EXIT_USAGE
        raise
    extra = list(getattr(args, "extra", []) or [])
    if hasattr(demo, "add_arguments"):
        dp = argparse.ArgumentParser(prog="xdpflow-lab demo")
        demo.add_arguments(dp)
        args = dp.parse_args(extra, namespace=args)
    elif extra:
        print(f"xdpflow-lab demo: unrecognized arguments: {' '.join(extra)}", file=sys.stderr)
        return EXIT_USAGE
    _terminate_cleanly()
    rc = demo.main(args)
    return EXIT_OK if rc is None else int(rc)


# -- up / down / compare (netns_lab/topology.py, netns_lab/compare.py) ---------------------

def _lab_args(p: argparse.ArgumentParser) -> None:
    from netns_lab.labfile import DEMO_LAB
    p.add_argument("--lab", metavar="FILE", default=DEMO_LAB,
                   help="the lab file: the `xdpflowctl apply` schema plus [lab], [[vms]] and "
                        "[[external]] (default: the demo lab)")
    p.add_argument("--prefix", metavar="P",
                   help="name prefix of everything the lab makes (default: [lab] prefix)")


def _lab_for(args: argparse.Namespace, what: str, root: bool = True):
    """The lab file, checked first (bad input: exit 2 naming what is wrong, nothing
    changed), then root (unless `root` is false: the caller checks more input first);
    None after printing why not."""
    from netns_lab import labfile
    try:
        spec = labfile.load(args.lab, prefix=args.prefix)
    except labfile.LabFileError as e:
        print(f"xdpflow-lab: {e}", file=sys.stderr)
        return None
    err = _need_root(what) if root else None
    if err:
        print(f"xdpflow-lab: {err}", file=sys.stderr)
        return None
    return spec


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _add_up(sub) -> None:
    p = sub.add_parser("up", help="build the lab (every path) and leave it running",
                       description="Build the VMs on the offloaded path (the agent, "
                                   "configured with `xdpflowctl apply`) and on both kernel "
                                   "variants, and leave them up; `down` removes them.")
    _lab_args(p)
    p.set_defaults(func=_run_up)


def _run_up(args: argparse.Namespace) -> int:
    spec = _lab_for(args, "up")
    if spec is None:
        return EXIT_USAGE
    from netns_lab import topology
    _terminate_cleanly()
    try:
        topo = topology.topology_for(spec)(spec, say=_say).up(detach=True)
    except topology.LabError as e:
        print(f"xdpflow-lab: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(reach_text(topo))
    return EXIT_OK


def reach_text(topo) -> str:
    """How to reach an up lab (printed by `up` and `demo --keep`)."""
    spec = topo.spec
    lines = [f"lab {spec.prefix} is up ({spec.source}); namespaces:"]
    for path in topo.paths:
        vms = ", ".join(topo.vm_ns(path, vm) for vm in spec.vms)
        lines.append(f"  {path:9} VMs: {vms}")
        sides = ", ".join(sorted({topo.side_ns(path, v) for v in spec.vms}))
        lines.append(f"  {'':9} {'node(s)' if path == 'offload' else 'routers'}: {sides}")
        if spec.external:
            from netns_lab import render
            if path != "offload":
                lines.append(f"  {'':9} NAT gateway: {render.ns_name(spec.prefix, path, 'gw')}")
            lines.append(f"  {'':9} external hosts: " + ", ".join(
                topo.vm_ns(path, h) for h in spec.external))
    vm = spec.vms[0]
    other = next((v for v in spec.vms[1:] if v.tenant == vm.tenant), vm)
    lines += [
        "try:",
        f"  ip netns exec {topo.vm_ns('offload', vm)} ping -c 2 {other.ip}",
    ]
    if topo.lab is not None:
        lines += [
            f"  xdpflowctl --socket {topo.lab.socket} flow dump",
            f"  nsenter --net=/run/netns/{topo.lab.node} curl -s "
            f"http://127.0.0.1:{topo.lab.metrics_port}/metrics | grep ^xdpflow_packets",
        ]
    if "iptables" in topo.paths:
        lines.append(f"  ip netns exec {topo.side_ns('iptables', vm)} iptables -L -v -n")
    lines += [f"  xdpflow-lab compare --lab {spec.source} --prefix {spec.prefix}",
              f"  xdpflow-lab down --prefix {spec.prefix}      # removes all of it"]
    return "\n".join(lines)


def _add_down(sub) -> None:
    p = sub.add_parser("down", help="remove every namespace, interface, process and pin of "
                                    "a lab (also after a killed `up`)")
    _lab_args(p)
    p.set_defaults(func=_run_down)


def _run_down(args: argparse.Namespace) -> int:
    # Needs only the prefix: a lab file that no longer loads must not keep a lab up.
    if args.prefix is None:
        spec = _lab_for(args, "down")
        if spec is None:
            return EXIT_USAGE
        args.prefix = spec.prefix
    from netns_lab import labfile, topology
    err = labfile.check_prefix(args.prefix) or _need_root("down")
    if err:
        print(f"xdpflow-lab: {err}", file=sys.stderr)
        return EXIT_USAGE
    topology.down(args.prefix, say=print)
    return EXIT_OK


def _add_compare(sub) -> None:
    from netns_lab import render
    p = sub.add_parser("compare", help="send every scenario through the offloaded path and "
                                       "the kernel path; compare what every VM receives",
                       description="Uses the lab if it is up, or builds it for the run and "
                                   "removes it after. Exit 1 on any mismatch.")
    _lab_args(p)
    p.add_argument("--scenario", metavar="S", action="append",
                   help="only this scenario (repeatable; default: all shipped ones)")
    p.add_argument("--exclude", metavar="S", action="append", help="leave this scenario out")
    p.add_argument("--variant", choices=render.VARIANTS, action="append",
                   help="kernel variant(s) to compare with (default: both)")
    p.add_argument("--json", metavar="FILE", help="also write the comparison as JSON")
    p.set_defaults(func=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    from netns_lab import compare, render, scenarios, topology
    spec = _lab_for(args, "compare", root=False)
    if spec is None:
        return EXIT_USAGE
    try:
        chosen = scenarios.load(args.scenario, args.exclude, spec.scenarios)
    except ValueError as e:
        print(f"xdpflow-lab: {e}", file=sys.stderr)
        return EXIT_USAGE
    err = _need_root("compare")
    if err:
        print(f"xdpflow-lab: {err}", file=sys.stderr)
        return EXIT_USAGE
    variants = args.variant or list(render.VARIANTS)
    _terminate_cleanly()
    try:
        doc = run_compare(spec, chosen, variants)
    except (topology.LabError, compare.ScenarioError) as e:
        print(f"xdpflow-lab: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(compare.format_table(doc))
    if args.json:
        compare.write_json(doc, args.json)
        print(f"wrote {args.json}")
    return EXIT_FAILED if doc["total"]["mismatches"] else EXIT_OK


def run_compare(spec, chosen, variants, say: Callable[[str], None] = _say):
    """Compare on the lab if it is up, else on one built for the run (and removed)."""
    from netns_lab import compare, topology
    cls = topology.topology_for(spec)
    if cls.is_up(spec.prefix):
        say(f"using lab {spec.prefix}, which is up")
        return compare.compare(cls.attach(spec), chosen, variants, say)
    say(f"building lab {spec.prefix} for this run")
    with cls(spec, ["offload"] + list(variants), say=say).up() as topo:
        return compare.compare(topo, chosen, variants, say)


# Top-level commands: name -> add its subparser.
COMMANDS: Dict[str, Callable] = {
    "up": _add_up,
    "down": _add_down,
    "compare": _add_compare,
    "bench": _add_bench,
    "demo": _add_demo,
}


# -- main -------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    try:
        v = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be positive")
    return v


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xdpflow-lab",
        description="xdpflow's network-namespace lab: build, compare, measure.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS.values():
        add(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not getattr(args, "accepts_extra", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.extra = extra
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("xdpflow-lab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
