"""xdpflow-lab: the lab's command line (console script `xdpflow-lab`, netns_lab.cli:main).

    xdpflow-lab bench datapath [--json FILE] [--png FILE] [--repeat N] [--rounds R]
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


def _run_bench_datapath(args: argparse.Namespace) -> int:
    err = _need_root("bench datapath")
    if err:
        print(f"xdpflow-lab: {err}", file=sys.stderr)
        return EXIT_USAGE
    from netns_lab import bench as b
    _terminate_cleanly()
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
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
    return EXIT_OK


# name -> (add its arguments, run it). Other targets (e.g. `forward`, the trafgen rates
# kernel path vs offloaded path) are added here.
BENCH_TARGETS: Dict[str, Tuple[Callable[[argparse.ArgumentParser], None],
                               Callable[[argparse.Namespace], int]]] = {
    "datapath": (_add_bench_datapath, _run_bench_datapath),
}


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="measure and write JSON (and PNG) results",
                       description="Measure; results are numbers, not pass/fail.")
    targets = p.add_subparsers(dest="target", metavar="TARGET", required=True)
    helps = {"datapath": "ns/packet of the XDP datapath with BPF_PROG_TEST_RUN, against "
                         "bare baselines"}
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


# Top-level commands: name -> add its subparser. `compare` (both paths, packet by packet)
# and others are added here.
COMMANDS: Dict[str, Callable] = {
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
