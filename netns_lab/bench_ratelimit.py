"""`xdpflow-lab bench ratelimit`: how close the datapath's rate limits hold to their rate
under twice as much load. The rig of netns_lab/bench_traffic.py (offloaded path only):
the load's allow rule gets a limit of half what the generators send (one flow of 60-byte
UDP frames, spaced), and the receiving VM's XDP sink counts what was delivered. Cases: a
packets-per-second limit, a bits-per-second limit (the datapath charges frame bytes: 60
a frame), and the pps limit with the load split over two generators on two CPUs (one
bucket charged from both: what a per-CPU share would get wrong). Reported, not asserted."""
from __future__ import annotations

import contextlib
import os
import time
from typing import Callable, Dict, List, Tuple

from . import benchlib
from .bench_traffic import Rig, _running, _tx_packets, lab_dict, rules, trafgen
from .labfile import parse

FRAME_BYTES = 60                  # trafgen_conf's frame, as XDP sees it (no FCS)
GAP_NS = 100_000                  # trafgen's gap between frames (see measure)
# (case, unit of the limit, generators)
CASES = (("pps", "pps", 1), ("bps", "bit", 1), ("pps, 2 CPUs", "pps", 2))


def _apply_limit(rig: Rig, rate: str) -> None:
    """The rig's state with the load's rule (id 1) limited to `rate` (burst: the default,
    a tenth of a second)."""
    from .lab import toml_tables
    d = lab_dict(rig.prefix, 0)
    rs = rules(0)
    rs[0].update(rate=rate)
    d["rules"] = rs
    spec = parse(d, source=f"<bench ratelimit {rate}>")
    f = rig.topo.dir / "state-ratelimit.toml"
    f.write_text(toml_tables("", spec.apply_dict()))
    r = rig.topo.lab.ctl("apply", str(f), timeout=120)
    if r.code != 0:
        raise RuntimeError(f"xdpflowctl apply failed: {r.stderr.strip()}")


def measure(rig: Rig, generators: int, seconds: float, settle: float = 0.3) -> Dict[str, float]:
    """Delivered and offered frames per second over `seconds` of load from `generators`
    trafgens (on CPUs 0, 1, ...), after `settle`. Spaced with --gap: trafgen's --rate
    keeps the average in bursts (a second's frames in the first tenth of it), which a
    bucket a tenth of a second deep cannot tell from a flood."""
    t = rig.targets["offload"]
    cpus = sorted(os.sched_getaffinity(0))[:generators]
    with rig.conf("offload", 1) as conf, contextlib.ExitStack() as stack:
        procs = [stack.enter_context(trafgen(t.src_ns, conf, cpu=cpu, gap_ns=GAP_NS))
                 for cpu in cpus]
        time.sleep(settle)
        for p in procs:
            _running(p, t.src_ns)
        c0, tx0, t0 = rig.sinks.count(t.slot), _tx_packets(t.src_ns), time.monotonic()
        time.sleep(seconds)
        c1, tx1, t1 = rig.sinks.count(t.slot), _tx_packets(t.src_ns), time.monotonic()
    return {"delivered_pps": (c1 - c0) / (t1 - t0), "offered_pps": (tx1 - tx0) / (t1 - t0),
            "generators": len(cpus)}


def limit_for(unit: str, offered_pps: float) -> Tuple[str, int]:
    """A limit of half the offered load: its rate text and the frames per second it
    allows."""
    half = max(1, int(offered_pps / 2))
    if unit == "pps":
        return f"{half}pps", half
    kbit = max(1, half * FRAME_BYTES * 8 // 1000)
    return f"{kbit}kbit", kbit * 1000 // (FRAME_BYTES * 8)


def run_ratelimit(quick: bool = False, say: Callable[[str], None] = print) -> Dict[str, object]:
    """Per case: the generators' rate unlimited (the rule's limit far above it), then a
    limit of half that and the same load: offered at twice the limit."""
    seconds, rounds = (1.0, 1) if quick else (3.0, 3)
    doc: Dict[str, object] = {"suite": "ratelimit", "machine": benchlib.machine(),
                              "seconds": seconds, "rounds": rounds}
    cases: List[Dict[str, object]] = []
    with Rig(("offload",), say=say) as rig:
        doc["prefix"] = rig.prefix
        for name, unit, gens in CASES:
            _apply_limit(rig, "1000000pps")
            free = benchlib.median([measure(rig, gens, seconds)["offered_pps"]
                                    for _ in range(rounds)])
            rate, limit_pps = limit_for(unit, free)
            _apply_limit(rig, rate)
            samples = [measure(rig, gens, seconds) for _ in range(rounds)]
            delivered = benchlib.median([s["delivered_pps"] for s in samples])
            offered = benchlib.median([s["offered_pps"] for s in samples])
            c = {"case": name, "rate": rate, "limit_pps": limit_pps,
                 "offered_pps": round(offered), "delivered_pps": round(delivered),
                 "offered_over_limit": round(offered / limit_pps, 3),
                 "delivered_over_limit": round(delivered / limit_pps, 4),
                 "generators": samples[0]["generators"], "samples": samples}
            cases.append(c)
            say(f"  {name:12} limit {rate:>9} ({limit_pps:,} frames/s): offered "
                f"{offered:,.0f}/s, delivered {delivered:,.0f}/s = "
                f"{delivered / limit_pps:.3f} of the limit")
    doc["cases"] = cases
    doc["goals"] = [benchlib.goal_entry(f"{c['case']}: delivered within 10% of the limit",
                                        abs(c["delivered_over_limit"] - 1), "<=", 0.10)
                    for c in cases]
    doc["method"] = (f"offloaded path, the load's rule limited to half of what the "
                     f"generators send unlimited (burst: a tenth of a second); trafgen with "
                     f"a {GAP_NS // 1000} us gap ({FRAME_BYTES}-byte UDP frames, one flow), "
                     f"{seconds:g} s windows after a settle, median of {rounds}; delivered = "
                     f"the receiving VM's XDP sink count")
    return doc


def ratelimit_table(doc: Dict[str, object]) -> str:
    lines = [f"{'case':<12} {'limit':>9} {'limit fr/s':>11} {'offered/s':>10} "
             f"{'delivered/s':>12} {'of limit':>9}", "-" * 68]
    for c in doc["cases"]:
        lines.append(f"{c['case']:<12} {c['rate']:>9} {c['limit_pps']:>11,} "
                     f"{c['offered_pps']:>10,} {c['delivered_pps']:>12,} "
                     f"{c['delivered_over_limit']:>9.3f}")
    lines += ["", "goals (reported, not asserted)", benchlib.goals_table(doc["goals"])]
    return "\n".join(lines)


def ratelimit_plots(doc: Dict[str, object], outdir: str) -> List[str]:
    os.makedirs(outdir, exist_ok=True)
    bars = [(f"{c['case']} ({c['rate']}): offered {c['offered_pps']:,}/s",
             c["delivered_over_limit"],
             "#2e7d32" if abs(c["delivered_over_limit"] - 1) <= 0.1 else "#c62828")
            for c in doc["cases"]]
    return [benchlib.plot_bars("rate limits under twice the load: delivered / limit", bars,
                               "delivered / limit (1 = exact)",
                               os.path.join(outdir, "ratelimit.png"), goal=(1.0, "the limit"))]
