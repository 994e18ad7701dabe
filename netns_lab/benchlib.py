"""The arithmetic, the document, the table and the plots of `xdpflow-lab bench SUITE` for
the suites measured with real traffic (forward, setup) and the memory suite. Pure: no
root, no BPF; tests/unit/test_bench_report.py checks it on known samples.

Method (../shared/ENVIRONMENT.md, "Measuring the node's cost per packet"): trafgen pinned
to CPU 0 sends; an XDP drop-and-count sink at the destination counts what arrives; in the
same round the generator alone (its veth's peer drops in XDP) gives the generator's own
cost. The cost of a path per packet, per round, is
    1e9 / rate(path) - 1e9 / rate(generator only)        (ns)
and a case reports the median over rounds of that cost (rounds are paired: each round's
path rate with the same round's generator rate), the median rates, and every sample."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

GENERATOR = "generator"


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("no values")
    return float(statistics.median(values))


def cost_ns(rate_pps: float, generator_pps: float) -> Optional[float]:
    """1e9/rate(path) - 1e9/rate(generator): the node's cost per packet on this path, in ns.
    None when a rate is zero (nothing arrived: no cost can be said)."""
    if rate_pps <= 0 or generator_pps <= 0:
        return None
    return 1e9 / rate_pps - 1e9 / generator_pps


def summarize(rates: Sequence[float], generator: Sequence[float]) -> Dict[str, object]:
    """One case: paired per-round costs and their median, median rates, the samples."""
    if len(rates) != len(generator):
        raise ValueError(f"{len(rates)} path samples but {len(generator)} generator samples: "
                         f"rounds are paired")
    costs = [cost_ns(r, g) for r, g in zip(rates, generator)]
    known = [c for c in costs if c is not None]
    return {"pps": round(median(rates), 1),
            "generator_pps": round(median(generator), 1),
            "ns_per_packet": round(median(known), 1) if known else None,
            "samples_pps": [round(r, 1) for r in rates],
            "generator_samples_pps": [round(g, 1) for g in generator],
            "samples_ns": [None if c is None else round(c, 1) for c in costs]}


def ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def goal_entry(name: str, value: Optional[float], op: str, goal: float,
               note: str = "") -> Dict[str, object]:
    """A goal reported against (never asserted): value `op` goal, met or by how much not."""
    if op not in (">=", "<="):
        raise ValueError(f"op must be >= or <=, not {op!r}")
    met = None if value is None else (value >= goal if op == ">=" else value <= goal)
    out: Dict[str, object] = {"name": name, "value": None if value is None else round(value, 3),
                              "goal": f"{op} {goal:g}", "met": met}
    if value is not None and not met and value:
        out["missed_by"] = f"{goal / value:.2f}x" if op == ">=" else f"{value / goal:.2f}x"
    if note:
        out["note"] = note
    return out


# -- machine and document ---------------------------------------------------------------

def git_commit(where: Optional[str] = None) -> str:
    where = where or str(Path(__file__).resolve().parent.parent)
    try:
        p = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True,
                           text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return p.stdout.strip() + ("-dirty" if dirty else "") if p.returncode == 0 else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine() -> Dict[str, object]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"kernel": platform.release(), "arch": platform.machine(), "cpu_model": cpu,
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "commit": git_commit(),
            "loadavg_at_start": None if load is None else [round(x, 2) for x in load]}


def write_json(doc: Dict[str, object], path: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, p)


# -- tables ---------------------------------------------------------------------------------

def _num(v, fmt: str = "{:,.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def rate_table(cases: Iterable[Dict[str, object]], keys: Sequence[str]) -> str:
    """Rows of rate cases: the keys that name a case, Mpps, generator Mpps, ns/packet."""
    cases = list(cases)
    head = [f"{k:>9}" for k in keys] + [f"{'Mpps':>8}", f"{'gen Mpps':>9}", f"{'ns/pkt':>9}"]
    lines = [" ".join(head), "-" * (len(" ".join(head)) + 2)]
    for c in cases:
        row = [f"{str(c.get(k, '')):>9}" for k in keys]
        row += [f"{c['pps'] / 1e6:8.3f}", f"{c['generator_pps'] / 1e6:9.3f}",
                f"{_num(c['ns_per_packet']):>9}"]
        lines.append(" ".join(row))
    return "\n".join(lines)


def goals_table(goals: Iterable[Dict[str, object]]) -> str:
    lines = []
    for g in goals:
        state = {True: "met", False: "MISSED", None: "not measured"}[g["met"]]
        v = "-" if g["value"] is None else f"{g['value']:.2f}"
        extra = f" (by {g['missed_by']})" if g.get("missed_by") else ""
        lines.append(f"  {g['name']:<58} {v:>9}  goal {g['goal']:<9} {state}{extra}")
    return "\n".join(lines)


# -- plots (matplotlib, Agg) -------------------------------------------------------------------

PATH_STYLE = {  # path -> (label, colour, marker)
    "offload": ("xdpflow (offloaded)", "#2e7d32", "o"),
    "iptables": ("iptables + conntrack (Neutron-style)", "#c62828", "s"),
    "nftables": ("nftables (sets) + conntrack", "#ef6c00", "^"),
    "plain": ("plain kernel forwarding, no rules", "#1565c0", "D"),
}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_forward(report: Dict[str, object], path: str) -> str:
    """One panel per flow count: ns/packet (log) against the number of rules, a line per
    path; the goals' thresholds as the reader needs them are in the title of each panel."""
    plt = _plt()
    cases = report["cases"]
    flows = sorted({c["flows"] for c in cases})
    rules = sorted({c["rules"] for c in cases})
    fig, axes = plt.subplots(1, len(flows), figsize=(5.2 * len(flows), 4.6), sharey=True,
                             squeeze=False)
    from matplotlib.ticker import FuncFormatter
    for ax, nf in zip(axes[0], flows):
        for pth, (label, color, marker) in PATH_STYLE.items():
            pts = [(rules.index(c["rules"]), c["ns_per_packet"]) for c in cases
                   if c["flows"] == nf and c["path"] == pth and (c["ns_per_packet"] or 0) > 0]
            if not pts:
                continue
            if pth == "plain":          # no rules at all: a level across the panel
                ax.axhline(pts[0][1], color=color, linestyle="--", linewidth=1.5, label=label)
                continue
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker=marker, color=color, label=label, linewidth=2)
            for x, y in zip(xs, ys):
                if pth in ("offload", "iptables"):
                    ax.annotate(f"{y:,.0f}", (x, y), textcoords="offset points",
                                xytext=(5, -12 if pth == "offload" else 5), fontsize=8,
                                color=color)
        ax.set_xticks(range(len(rules)))
        ax.set_xticklabels([f"{r:,}" for r in rules])
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ys_all = [c["ns_per_packet"] for c in cases if (c["ns_per_packet"] or 0) > 0]
        if ys_all and max(ys_all) / min(ys_all) < 10:   # within a decade: label minor ticks
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
            ax.tick_params(axis="y", which="minor", labelsize=7)
        else:
            from matplotlib.ticker import NullFormatter
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(-0.35, len(rules) - 0.4)
        ax.set_xlabel("security rules (non-matching, walked before the allow)")
        ax.set_title(f"{nf:,} flow{'s' if nf != 1 else ''}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("node cost per packet, ns (log; lower is better)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9, frameon=False)
    fig.suptitle("forward: cost per packet = 1e9/rate(path) - 1e9/rate(generator only), "
                 "median of rounds", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bars(title: str, bars: Sequence[Tuple[str, float, str]], xlabel: str, path: str,
              goal: Optional[Tuple[float, str]] = None, log: bool = False) -> str:
    """Horizontal bars (label, value, colour) with the value printed on each; an optional
    vertical goal line (value, label)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(bars) + 1.6))
    labels = [b[0] for b in bars]
    values = [b[1] for b in bars]
    ax.barh(range(len(bars)), values, color=[b[2] for b in bars])
    ax.set_yticks(range(len(bars)))
    ax.set_yticklabels(labels, fontsize=9)
    ax.invert_yaxis()
    if log:
        from matplotlib.ticker import FuncFormatter
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:,.0f}" if v >= 10 else f" {v:,.2f}", va="center", fontsize=9)
    if goal:
        ax.axvline(goal[0], color="#1565c0", linestyle="--", linewidth=1.5, label=goal[1])
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel(xlabel)
    import textwrap
    ax.set_title(textwrap.fill(title, 80), fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_xlim(left=1 if log else 0,
                right=max(values + [goal[0] if goal else 0]) * (3 if log else 1.25))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
