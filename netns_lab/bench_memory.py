"""`xdpflow-lab bench memory`: what the offloaded path costs in memory.

The agent runs as a process in its own namespace (netns_lab.lab.Lab) with a flow table
sized for FLOWS flows below the sweeper's watermark and a tenant of RULES rules (its
config's [state]); the benchmark then writes FLOWS flow entries into the pinned flow
table (each just seen, so the sweeper keeps them) and reads
- every pinned map's kernel memory from its fdinfo (`memlock`: what the kernel charges
  for the map), key and value sizes, max entries and entries in use;
- the agent's RSS (VmRSS, VmHWM) once it has swept the full table at least twice.
Per flow entry = the flow table's memlock / its max entries (a preallocated hash is
charged in full at creation) and, for a check, its growth from empty to FLOWS entries
over FLOWS. Per rule = the classifier maps' memlock over max_rule_entries, and the rule
entries the compiled rules use."""
from __future__ import annotations

import ctypes as ct
import os
import socket
import time
from typing import Callable, Dict, List

from . import benchlib
from .bench_traffic import TENANT, TENANT_ID, rules

FLOWS, RULES = 1_000_000, 100_000
QUICK_FLOWS, QUICK_RULES = 100_000, 10_000
GOAL_BYTES_PER_FLOW = 128


def fdinfo(fd: int) -> Dict[str, str]:
    out = {}
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k.strip()] = v.strip()
    return out


def pinned_maps(pin_dir: str) -> Dict[str, Dict[str, int]]:
    """name -> fdinfo numbers of every map pinned in pin_dir (entries counted for hashes)."""
    from agent import bpfsys
    out = {}
    for name in sorted(os.listdir(pin_dir)):
        path = os.path.join(pin_dir, name)
        if not os.path.isfile(path) and not name.startswith("xf_"):
            continue
        try:
            fd = bpfsys.obj_get(path)
        except OSError:
            continue
        try:
            info = fdinfo(fd)
            if "map_type" not in info:
                continue
            d = {k: int(info[k]) for k in ("map_type", "key_size", "value_size",
                                            "max_entries", "memlock", "map_flags")
                 if k in info and info[k].lstrip("-").isdigit()}
            d["map_flags"] = int(info.get("map_flags", "0"), 16) if "map_flags" in info else 0
            out[name] = d
        finally:
            os.close(fd)
    return out


def flow_items(n: int, now_ns: int) -> List[tuple]:
    """n distinct flow entries of the benchmark's tenant, just seen."""
    from agent import abi
    items = []
    v = abi.Flow(packets=1, bytes=60, created_ns=now_ns, last_seen_ns=now_ns, verdict=1)
    value = bytes(v)
    for i in range(n):
        k = abi.FlowKey(tenant=TENANT_ID, proto=17, sport=socket.htons(1024 + i % 50000),
                        dport=socket.htons(7000 + i // 50000))
        k.src[0] = int.from_bytes(socket.inet_aton("10.77.0.1"), "little")
        k.dst[0] = int.from_bytes(socket.inet_aton("10.77.0.2"), "little")
        items.append((bytes(k), value))
    return items


def rss_kib(pid: int) -> Dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def run_memory(quick: bool = False, say: Callable[[str], None] = print) -> Dict[str, object]:
    from agent import bpfsys
    from .lab import Lab
    t_start = time.monotonic()
    n_flows, n_rules = (QUICK_FLOWS, QUICK_RULES) if quick else (FLOWS, RULES)
    # Room for n_flows below the sweeper's 90% watermark; two generations of the rules.
    size = int(n_flows / 0.8)
    dp = {"flow_table_size": size, "max_rule_entries": max(4096, 2 * n_rules + 4096)}
    state = {"tenants": [{"name": TENANT, "id": TENANT_ID, "default": "drop"}],
             "rules": rules(n_rules - 1)}
    doc: Dict[str, object] = {"suite": "memory", "machine": benchlib.machine(),
                              "flows": n_flows, "rules": n_rules, "datapath": dp}
    lab = Lab(prefix="xbm")
    try:
        lab.write_config(datapath=dp, state=state, aging={"interval": 1.0})
        t0 = time.monotonic()
        lab.start_agent(timeout=600)
        say(f"agent up with {n_rules:,} rules in {time.monotonic() - t0:.1f}s "
            f"(flow table {size:,})")
        rss_empty = rss_kib(lab.proc.pid)
        maps_empty = pinned_maps(lab.pin_dir)
        flows_map = bpfsys.RawMap.pinned(os.path.join(lab.pin_dir, "xf_flows"))
        t0 = time.monotonic()
        flows_map.update_many(flow_items(n_flows, time.monotonic_ns()))
        say(f"{n_flows:,} flow entries written in {time.monotonic() - t0:.1f}s")
        # The sweeper reads the whole table each sweep (a few seconds of Python at 1M
        # entries, then waits twice that): let it do so at least twice; its buffers count.
        time.sleep(6.0 if quick else 25.0)
        in_table = flows_map.count()
        rss_full = rss_kib(lab.proc.pid)
        maps_full = pinned_maps(lab.pin_dir)
        flows_map.close()
    finally:
        lab.close()
    fm = maps_full["xf_flows"]
    per_flow = fm["memlock"] / fm["max_entries"]
    growth = (fm["memlock"] - maps_empty["xf_flows"]["memlock"]) / n_flows
    rule_maps = {n: m for n, m in maps_full.items()
                 if m["max_entries"] == dp["max_rule_entries"]}
    rule_bytes = sum(m["memlock"] for m in rule_maps.values())
    total = sum(m["memlock"] for m in maps_full.values())
    doc.update(
        maps=maps_full, maps_empty=maps_empty, flows_in_table=in_table,
        flow_entry={"key_size": fm["key_size"], "value_size": fm["value_size"],
                    "memlock_bytes_per_entry": round(per_flow, 1),
                    "memlock_growth_per_written_flow": round(growth, 1)},
        rule={"maps": sorted(rule_maps), "memlock_bytes_per_rule_entry":
              round(rule_bytes / dp["max_rule_entries"], 1)},
        maps_memlock_total=total,
        agent_rss_kib={"empty_flow_table": rss_empty, "full": rss_full},
        goals=[benchlib.goal_entry("map memory per flow entry (bytes)", per_flow, "<=",
                                   GOAL_BYTES_PER_FLOW,
                                   f"key {fm['key_size']} + value {fm['value_size']} bytes "
                                   f"plus the kernel's per-element header in a "
                                   f"preallocated hash")],
        seconds=round(time.monotonic() - t_start, 1),
        method="memlock from /proc/self/fdinfo of every pinned map (opened from its pin); "
               "agent RSS from /proc/PID/status after the sweeper read the full table")
    return doc


def memory_table(doc: Dict[str, object]) -> str:
    lines = [f"{'map':<24} {'key':>5} {'value':>6} {'max entries':>12} {'memlock':>14}",
             "-" * 66]
    for name, m in sorted(doc["maps"].items(), key=lambda kv: -kv[1]["memlock"]):
        lines.append(f"{name:<24} {m['key_size']:>5} {m['value_size']:>6} "
                     f"{m['max_entries']:>12,} {m['memlock']:>14,}")
    fe, r, rss = doc["flow_entry"], doc["rule"], doc["agent_rss_kib"]["full"]
    lines += ["", f"maps in all: {doc['maps_memlock_total'] / 2**20:,.1f} MiB; flow entry: "
              f"{fe['memlock_bytes_per_entry']} bytes (key {fe['key_size']} + value "
              f"{fe['value_size']}); rule entry: {r['memlock_bytes_per_rule_entry']} bytes",
              f"agent RSS with {doc['flows_in_table']:,} flows in the table and "
              f"{doc['rules']:,} rules: {rss.get('VmRSS', 0) / 1024:,.1f} MiB "
              f"(peak {rss.get('VmHWM', 0) / 1024:,.1f} MiB)", "",
              "goals (reported, not asserted)", benchlib.goals_table(doc["goals"])]
    return "\n".join(lines)


def memory_plots(doc: Dict[str, object], outdir: str) -> List[str]:
    os.makedirs(outdir, exist_ok=True)
    top = sorted(doc["maps"].items(), key=lambda kv: -kv[1]["memlock"])[:8]
    bars = [(f"{n} ({m['max_entries']:,} max)", m["memlock"] / 2**20, "#2e7d32")
            for n, m in top]
    rss = doc["agent_rss_kib"]["full"].get("VmRSS", 0) / 1024
    bars.append(("agent RSS", rss, "#6a1b9a"))
    return [benchlib.plot_bars(
        f"memory: kernel map memory (memlock) and agent RSS, {doc['flows']:,} flows, "
        f"{doc['rules']:,} rules; flow entry {doc['flow_entry']['memlock_bytes_per_entry']:.0f}"
        f" bytes (goal <= {GOAL_BYTES_PER_FLOW})", bars, "MiB",
        os.path.join(outdir, "memory.png"))]
