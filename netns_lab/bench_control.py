"""`xdpflow-lab bench control`: the control plane's speed and size, in one run (issue 12).

The agent runs as a process in a namespace (netns_lab.lab.Lab), one tenant, and
`xdpflowctl` (a process per command, as an operator runs it) drives it:
- `apply` of a state of 1,000 / 10,000 / 100,000 rules (4 rule shapes: 4 masks) into an
  empty tenant: rules/s end to end (the median of 3; the samples kept); the same file's `apply --dry-run` beforehand; at
  10,000, `apply` again with 1 rule changed;
- one `rule add` and one `rule del` beside each size: end to end (the ctl process) and
  agent side (the agent's own clock of the change, `xdpflow_apply_duration_seconds`);
- restart to ready (the socket answers `status` with the new pid; polled every 20 ms
  in-process): warm (SIGTERM, start again, pins and programs in place) and cold (torn
  down, then started), with the largest state in the store;
- the agent's RSS (VmRSS) started empty and with the largest state;
- the classifier's cost on a flow-table miss with 1 / 4 / 16 / 32 masks through
  BPF_PROG_TEST_RUN (netns_lab/bench.py's method): the best match in the
  highest-priority mask (a deny: classified on every packet), and no match at all (every
  mask visited: the worst case).
Goals are reported, never asserted. Timings on a shared machine are noisy: compare
ratios within one run."""
from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import socket
import time
from typing import Callable, Dict, List, Optional, Sequence

from . import benchlib

Say = Callable[[str], None]
TENANT, TENANT_ID = "ctl", 12
SIZES, QUICK_SIZES = (1_000, 10_000, 100_000), (1_000, 10_000)
SINGLE_CHANGES = 5          # rule add + del pairs timed beside each size
APPLY_SAMPLES = 3           # applies timed per size and format (the median is the figure)
MASK_COUNTS = (1, 4, 16, 32)
GOALS = {"apply_rules_per_s": 50_000, "single_agent_ms": 20, "single_e2e_ms": 250,
         "warm_ready_s": 1.0, "miss_16_over_1": 2.0}


# -- pure: the states ------------------------------------------------------------------------

def host(i: int, base: str) -> str:
    return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address(base)) + i))


def shaped_rules(n: int, first_id: int = 1, salt: int = 0) -> List[Dict[str, object]]:
    """n distinct rules in 4 shapes (4 masks): src /32 udp dport 9; src /24 tcp dport 22;
    dst /32 tcp dport 443; src /32 any protocol. `salt` moves every address (a different
    rule set with the same ids)."""
    out = []
    for i in range(n):
        k, shape = divmod(i, 4)
        r: Dict[str, object] = {"id": first_id + i, "tenant": TENANT,
                                "priority": 100 + i % 50, "action": "allow"}
        if shape == 0:
            r.update(src=f"{host(k + salt, '10.64.0.0')}/32", proto="udp", dport="9")
        elif shape == 1:
            r.update(src=f"{host((k + salt) << 8, '20.0.0.0')}/24", proto="tcp", dport="22")
        elif shape == 2:
            r.update(dst=f"{host(k + salt, '172.20.0.0')}/32", proto="tcp", dport="443")
        else:
            r.update(src=f"{host(k + salt, '192.168.0.0')}/32", action="deny")
        out.append(r)
    return out


def state(rules: Sequence[Dict[str, object]]) -> Dict[str, List[Dict[str, object]]]:
    return {"tenants": [{"name": TENANT, "id": TENANT_ID, "default": "drop"}],
            "rules": list(rules)}


def metric_value(text: str, name: str) -> Optional[float]:
    """The value of an unlabelled sample `name` in a Prometheus text exposition."""
    m = re.search(rf"^{re.escape(name)} ([0-9.eE+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def goals(doc: Dict[str, object]) -> List[Dict[str, object]]:
    """The issue's goals against what was measured (None: not measured in this run)."""
    ap = {c["rules"]: c for c in doc["apply"]}
    big = max(ap) if ap else None
    single = {c["beside"]: c for c in doc["single"]}
    sb = single.get(big, {})
    masks = {c["masks"]: c for c in doc.get("masks", [])}

    def rps(n, key="rules_per_s"):
        c = ap.get(n)
        return c.get(key) if c and c.get("ok") else None

    def ms(c, key):
        return c.get(key) if c else None
    ratio = None
    if masks.get(16) and masks.get(1):
        ratio = benchlib.ratio(masks[16]["best_in_top_mask_ns"], masks[1]["best_in_top_mask_ns"])
    return [
        benchlib.goal_entry(f"apply of {big:,} rules, rules/s end to end" if big else "apply",
                            rps(big), ">=", GOALS["apply_rules_per_s"]),
        benchlib.goal_entry(f"apply of {big:,} rules from JSON, rules/s end to end" if big
                            else "apply from JSON", rps(big, "json_rules_per_s"), ">=",
                            GOALS["apply_rules_per_s"]),
        benchlib.goal_entry(f"rule add beside {big:,} rules, agent side (ms)" if big else "add",
                            ms(sb, "add_agent_ms"), "<=", GOALS["single_agent_ms"]),
        benchlib.goal_entry(f"rule del beside {big:,} rules, agent side (ms)" if big else "del",
                            ms(sb, "del_agent_ms"), "<=", GOALS["single_agent_ms"]),
        benchlib.goal_entry(f"rule add beside {big:,} rules, end to end (ms)" if big else "add",
                            ms(sb, "add_e2e_ms"), "<=", GOALS["single_e2e_ms"]),
        benchlib.goal_entry(f"rule del beside {big:,} rules, end to end (ms)" if big else "del",
                            ms(sb, "del_e2e_ms"), "<=", GOALS["single_e2e_ms"]),
        benchlib.goal_entry("warm restart to ready (s)",
                            (doc.get("restart") or {}).get("warm_ready_s"), "<=",
                            GOALS["warm_ready_s"]),
        benchlib.goal_entry("miss, best match in the top mask: 16 masks / 1 mask", ratio,
                            "<=", GOALS["miss_16_over_1"]),
    ]


def control_table(doc: Dict[str, object]) -> str:
    lines = [f"{'apply':<34} {'seconds':>9} {'rules/s':>10} {'dry run s':>10}", "-" * 66]
    for c in doc["apply"]:
        if c.get("ok"):
            lines.append(f"{c['rules']:>7,} rules{'':<22} {c['seconds']:>9.3f} "
                         f"{c['rules_per_s']:>10,.0f} {c.get('dry_run_seconds', '-'):>10}")
            if "json_seconds" in c:
                lines.append(f"{c['rules']:>7,} rules from JSON{'':<12} "
                             f"{c['json_seconds']:>9.3f} {c['json_rules_per_s']:>10,.0f} "
                             f"{c.get('json_dry_run_seconds', '-'):>10}")
        else:
            lines.append(f"{c['rules']:>7,} rules: FAILED {c.get('error', '')[:60]}")
    if doc.get("apply_one_changed"):
        c = doc["apply_one_changed"]
        lines.append(f"apply again, 1 of {c['rules']:,} changed: {c['seconds']:.3f} s")
    lines += ["", f"{'one rule beside':<18} {'add e2e ms':>11} {'add agent ms':>13} "
                  f"{'del e2e ms':>11} {'del agent ms':>13}", "-" * 70]
    for c in doc["single"]:
        lines.append(f"{c['beside']:>10,} rules {c['add_e2e_ms']:>11} {c['add_agent_ms']:>13} "
                     f"{c['del_e2e_ms']:>11} {c['del_agent_ms']:>13}")
    restarts = [doc[k] for k in ("restart_small", "restart") if doc.get(k)]
    lines += [""] if restarts else []
    for r in restarts:
        done = (f" (start-up done: warm {r['warm_started_s']} s, cold {r['cold_started_s']} s)"
                if "warm_started_s" in r else "")
        lines.append(f"restart to ready with {r['rules']:,} rules: warm {r['warm_ready_s']} s, "
                     f"cold {r['cold_ready_s']} s{done}")
    rss = doc.get("agent_rss_mib") or {}
    if rss:
        lines.append("agent RSS (MiB): " + ", ".join(f"{k} {v}" for k, v in rss.items()))
    if doc.get("masks"):
        lines += ["", f"{'masks':>5} {'best in top mask ns':>20} {'no match ns':>12}"]
        for c in doc["masks"]:
            lines.append(f"{c['masks']:>5} {c['best_in_top_mask_ns']:>20.1f} "
                         f"{c['no_match_ns']:>12.1f}")
    if doc.get("masks_error"):
        lines.append(f"masks: FAILED {doc['masks_error']}")
    lines += ["", "goals (reported, not asserted)", benchlib.goals_table(doc["goals"])]
    return "\n".join(lines)


def control_plots(doc: Dict[str, object], outdir: str) -> List[str]:
    os.makedirs(outdir, exist_ok=True)
    bars = [(f"apply {c['rules']:,} rules", c["rules_per_s"], "#2e7d32")
            for c in doc["apply"] if c.get("ok")]
    return [benchlib.plot_bars("control: apply, rules per second end to end", bars,
                               "rules per second (log; higher is better)",
                               os.path.join(outdir, "control.png"), log=True)]


# -- measuring -------------------------------------------------------------------------------

class _Agent:
    """The lab's agent and the two ways of talking to it: xdpflowctl (end to end) and
    an in-process client (polling for readiness without a process per poll)."""

    def __init__(self, lab, say: Say):
        self.lab, self.say = lab, say

    def ctl(self, *args: str) -> "tuple[float, object]":
        t0 = time.monotonic()
        r = self.lab.ctl(*args, timeout=900)
        took = time.monotonic() - t0
        if r.code != 0:
            raise RuntimeError(f"xdpflowctl {' '.join(args[:3])}: exit {r.code}: "
                               f"{r.stderr.strip()[:300]}")
        return took, r.data

    def agent_seconds(self) -> Optional[float]:
        """The agent's own clock of its last change (store + maps, under its lock)."""
        return metric_value(self.lab.metrics(), "xdpflow_apply_duration_seconds")

    def apply_file(self, name: str, st: Dict[str, object], *flags: str) -> "tuple[float, object]":
        from .lab import toml_tables
        path = self.lab.dir / name
        if not path.exists():   # *.json: the same state as xdpflowctl's JSON apply file
            path.write_text(json.dumps(st) if name.endswith(".json") else toml_tables("", st))
        return self.ctl("apply", str(path), *flags)

    def wait_ready(self, pid: int, timeout: float = 300,
                   started: bool = False) -> None:
        """Until the socket answers `status` with `pid`; with `started`, until its
        start-up is also done (the stored state loaded and checked against the maps: an
        agent without a "startup" field is done when it answers)."""
        from agent.api import ApiClient, ApiError
        client = ApiClient(self.lab.socket, timeout=5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.lab.proc.poll() is not None:
                raise RuntimeError(f"the agent exited: {self.lab.log_text()[-2000:]}")
            try:
                st = client.call("status")
                if st.get("pid") == pid and (
                        not started or (st.get("startup") or {}).get("done", True)):
                    return
            except (ApiError, OSError):
                pass
            time.sleep(0.02)
        raise RuntimeError("the agent did not become ready")

    def restart(self, cold: bool) -> "tuple[float, float]":
        """(seconds to ready, seconds until its start-up is done) from the start."""
        from .lab import AGENT
        from .netns import run
        self.lab.stop_agent(signal.SIGTERM, timeout=120)
        if cold:
            run(["nsenter", f"--net=/run/netns/{self.lab.node}", AGENT, "--config",
                 str(self.lab.config), "--teardown"], timeout=300)
        t0 = time.monotonic()
        proc = self.lab.start_agent(wait=False)
        self.wait_ready(proc.pid)
        ready = round(time.monotonic() - t0, 3)
        self.wait_ready(proc.pid, started=True)
        return ready, round(time.monotonic() - t0, 3)


def measure_restart(agent: _Agent, rules: int, warm_samples: int, say: Say) -> Dict[str, object]:
    """Warm restarts (SIGTERM, start again: pins and programs in place), then one cold
    (torn down, then started), with the state the agent holds: seconds to ready and
    seconds until the start-up is done (state loaded and checked against the maps)."""
    warm = [agent.restart(cold=False) for _ in range(warm_samples)]
    rss = rss_mib(agent.lab.proc.pid)
    cold = agent.restart(cold=True)
    out = {"rules": rules, "warm_ready_s": round(benchlib.median([w[0] for w in warm]), 3),
           "warm_samples_s": [w[0] for w in warm],
           "warm_started_s": round(benchlib.median([w[1] for w in warm]), 3),
           "warm_started_samples_s": [w[1] for w in warm],
           "cold_ready_s": cold[0], "cold_started_s": cold[1], "warm_rss_mib": rss}
    say(f"  restart with {rules:,} rules: warm {out['warm_samples_s']} s (start-up done "
        f"{out['warm_started_samples_s']} s), cold {cold[0]} s (done {cold[1]} s)")
    return out


def measure_apply(agent: _Agent, sizes: Sequence[int], say: Say,
                  doc: Dict[str, object]) -> None:
    base = state([])
    agent.apply_file("empty.toml", base, "--prune")
    for n in sizes:
        st = state(shaped_rules(n))
        case: Dict[str, object] = {"rules": n, "samples": APPLY_SAMPLES}
        doc["apply"].append(case)
        try:
            case["dry_run_seconds"] = round(agent.apply_file(f"s{n}.toml", st, "--dry-run")[0], 3)
            took, agent_s = sample_apply(agent, f"s{n}.toml", st, base)
        except RuntimeError as e:
            case.update(ok=False, error=str(e))
            say(f"  apply {n:,}: {e}")
            continue
        case.update(ok=True, seconds=benchlib.median(took), rules_per_s=round(
            n / benchlib.median(took), 1), agent_seconds=_median(agent_s),
            samples_s=took)
        say(f"  apply {n:,} rules: {case['seconds']:.2f}s ({case['rules_per_s']:,.0f} rules/s, "
            f"median of {took}; dry run {case['dry_run_seconds']:.2f}s)")
        # The same state from a JSON file (json's C parser instead of tomllib), again
        # into an empty tenant; it leaves the same state behind as the TOML apply.
        agent.apply_file("empty.toml", base, "--prune")
        case["json_dry_run_seconds"] = round(
            agent.apply_file(f"s{n}.json", st, "--dry-run")[0], 3)
        took, agent_s = sample_apply(agent, f"s{n}.json", st, base)
        case.update(json_seconds=benchlib.median(took), json_rules_per_s=round(
            n / benchlib.median(took), 1), json_agent_seconds=_median(agent_s),
            json_samples_s=took)
        say(f"  apply {n:,} rules from JSON: {case['json_seconds']:.2f}s "
            f"({case['json_rules_per_s']:,.0f} rules/s, median of {took}; dry run "
            f"{case['json_dry_run_seconds']:.2f}s)")
        if n == 10_000:
            changed = shaped_rules(n)
            changed[-1]["priority"] = 7
            took1, _ = agent.apply_file(f"s{n}-1.toml", state(changed))
            doc["apply_one_changed"] = {"rules": n, "seconds": round(took1, 3),
                                        "agent_seconds": agent.agent_seconds()}
            agent.apply_file(f"s{n}.toml", st)
        doc["single"].append(measure_single(agent, n))
        s = doc["single"][-1]
        say(f"  one rule beside {n:,}: add {s['add_e2e_ms']} ms ({s['add_agent_ms']} agent), "
            f"del {s['del_e2e_ms']} ms ({s['del_agent_ms']} agent)")
        doc["largest_applied"] = n
        if n != sizes[-1]:
            agent.apply_file("empty.toml", base, "--prune")


def _median(values: List[Optional[float]]) -> Optional[float]:
    known = [v for v in values if v is not None]
    return benchlib.median(known) if known else None


def sample_apply(agent: _Agent, name: str, st: Dict[str, object], base: Dict[str, object]
                 ) -> "tuple[List[float], List[float]]":
    """APPLY_SAMPLES applies of `st` from file `name`, each into the tenant emptied first:
    (end to end seconds, agent seconds) of each. It leaves `st` applied."""
    took: List[float] = []
    agent_s: List[Optional[float]] = []
    for _ in range(APPLY_SAMPLES):
        agent.apply_file("empty.toml", base, "--prune")
        took.append(round(agent.apply_file(name, st)[0], 3))
        agent_s.append(agent.agent_seconds())
    return took, agent_s


def measure_single(agent: _Agent, beside: int) -> Dict[str, object]:
    add_e2e, add_agent, del_e2e, del_agent = [], [], [], []
    for k in range(SINGLE_CHANGES):
        rid = 5_000_000 + k
        took, _ = agent.ctl("rule", "add", "--tenant", TENANT, "--id", str(rid), "--priority",
                            "60000", "--src", f"{host(k, '198.18.0.0')}/32", "--proto", "udp",
                            "--dport", "53", "--action", "deny")
        add_e2e.append(took * 1000)
        add_agent.append((agent.agent_seconds() or 0) * 1000)
        took, _ = agent.ctl("rule", "del", str(rid))
        del_e2e.append(took * 1000)
        del_agent.append((agent.agent_seconds() or 0) * 1000)
    med = lambda xs: round(benchlib.median(xs), 2)   # noqa: E731
    return {"beside": beside, "add_e2e_ms": med(add_e2e), "add_agent_ms": med(add_agent),
            "del_e2e_ms": med(del_e2e), "del_agent_ms": med(del_agent),
            "samples_ms": {"add_e2e": add_e2e, "add_agent": add_agent, "del_e2e": del_e2e,
                           "del_agent": del_agent}}


def run_control(quick: bool = False, say: Say = print) -> Dict[str, object]:
    from .lab import Lab
    t_start = time.monotonic()
    sizes = QUICK_SIZES if quick else SIZES
    # Two generations of the largest state, and room for the single changes.
    dp = {"max_rule_entries": max(8192, 2 * max(sizes) + 8192), "flow_table_size": 65536,
          "max_masks": 32}
    doc: Dict[str, object] = {"suite": "control", "machine": benchlib.machine(),
                              "sizes": list(sizes), "datapath": dp, "apply": [],
                              "single": []}
    doc["machine"]["commit"] = benchlib.git_commit()
    lab = Lab(prefix="xbc")
    try:
        lab.write_config(datapath=dp)
        lab.start_agent(timeout=300)
        agent = _Agent(lab, say)
        doc["agent_rss_mib"] = {"started_empty": rss_mib(lab.proc.pid)}
        # A small state first: one tenant, no rules (Python's start and the adoption).
        agent.apply_file("empty.toml", state([]), "--prune")
        doc["restart_small"] = measure_restart(agent, 0, 1 if quick else 3, say)
        measure_apply(agent, sizes, say, doc)
        n = doc.get("largest_applied", 0)
        doc["agent_rss_mib"][f"with_{n}_rules"] = rss_mib(lab.proc.pid)
        doc["restart"] = measure_restart(agent, n, 1 if quick else 3, say)
        doc["agent_rss_mib"][f"warm_started_with_{n}_rules"] = doc["restart"]["warm_rss_mib"]
    finally:
        lab.close()
    try:
        doc["masks"] = measure_masks(100_000 if quick else 1_000_000, 3 if quick else 5, say)
    except Exception as e:      # the other figures stand without this one
        doc["masks_error"] = f"{type(e).__name__}: {e}"
        say(f"  masks: {doc['masks_error']}")
    doc["goals"] = goals(doc)
    doc["seconds"] = round(time.monotonic() - t_start, 1)
    doc["method"] = ("agent in a namespace, one tenant, xdpflowctl per command (its process "
                     "start included); agent side = xdpflow_apply_duration_seconds after the "
                     "change; ready = the socket answers status with the new pid (20 ms "
                     "polls); masks: BPF_PROG_TEST_RUN, calls of 250, median of rounds")
    return doc


# -- the classifier's cost in masks -------------------------------------------------------------

def mask_rules(tenant: str, masks: int, first_id: int):
    """A deny of the sender (src /32 udp, the highest priority: the best match, in the
    highest-ranked mask) and allow rules of lower priority in masks-1 more masks that match
    nothing the bench sends (src 172.16.0.0/16../31, udp, without and with dport 9)."""
    from agent import model
    out = [model.Rule(id=first_id, tenant=tenant, priority=1000, action="deny",
                      src=ipaddress.ip_network("10.0.0.3/32"), proto=17)]
    shapes = [(plen, dport) for dport in ((0, 65535), (9, 9)) for plen in range(16, 32)]
    for i, (plen, dport) in enumerate(shapes[:masks - 1], start=1):
        out.append(model.Rule(id=first_id + i, tenant=tenant, priority=100, action="allow",
                              src=ipaddress.ip_network(f"172.16.0.0/{plen}"), proto=17,
                              dport=dport))
    return out


def measure_masks(repeat: int, rounds: int, say: Say) -> List[Dict[str, object]]:
    """ns per packet of a miss classified against 1/4/16/32 masks (one tenant each, one
    datapath): the best match in the top mask (deny), and no match (default drop)."""
    import contextlib
    from agent import abi, compiler, model
    from agent.datapath import Datapath
    from . import bench
    from .netns import Namespaces, entered, unique

    tag = unique("xfbcm-", maxlen=40)
    with contextlib.ExitStack() as stack:
        nss = Namespaces()
        stack.callback(nss.close)
        node, vm = nss.add("xfcn"), nss.add("xfcv")
        st = model.State()
        names = {}
        for i, n in enumerate(MASK_COUNTS, start=1):
            t, port = f"m{n}", f"m{n}p"
            names[n] = (t, port, i)
            nss.veth(port, node, f"v{port}", vm, a_mac=f"02:bb:00:00:00:{i:02x}")
            st.tenants.append(model.Tenant(name=t, id=100 + i))
            st.ports.append(model.Port(name=port, tenant=t, port_security=False))
            st.rules += mask_rules(t, n, 1000 * i)
        with entered(node):
            links = {port: compiler.PortLink(port, socket.if_nametoindex(port),
                                             f"02:bb:00:00:00:{i:02x}", i)
                     for _, (t, port, i) in names.items()}
            d = Datapath(f"/sys/fs/bpf/{tag}")
            stack.callback(d.unpin)
            stack.callback(d.close)
            d.load()
            img = compiler.compile_state(st, links, d.max_masks)
            d.sync(img)
            cases = []
            for n, (t, port, i) in names.items():
                got = len(img.tenants[100 + i].classifier.masks)
                if got != n:
                    raise bench.BenchError(f"tenant {t}: {got} masks, wanted {n}")
                link = links[port]
                for kind, src, reason in (("best", "10.0.0.3", "rule_deny"),
                                          ("none", "10.0.0.4", "default")):
                    p = bench.udp_packet("02:00:00:00:00:01", link.mac, src, "10.0.0.2",
                                         bench.SPORT, bench.DPORT)
                    row = (d.maps["xf_stats"], link.slot, abi.V_DROP, abi.REASON_IDS[reason])
                    cases.append((n, kind, bench.Case(f"m{n}_{kind}", d.prog_fd, p,
                                                      link.ifindex, bench.XDP_DROP, row)))
            stack.enter_context(bench._attached(node, vm, nss, {"datapath": d.prog_fd}))
            for _, _, c in cases:
                bench.measure(c, min(repeat, 100_000))
            for r in range(rounds):
                for _, _, c in cases:
                    c.samples.append(bench.measure(c, repeat))
            say("  masks: " + ", ".join(f"{c.name} {benchlib.median(c.samples):.1f} ns"
                                        for _, _, c in cases))
    out = []
    for n in MASK_COUNTS:
        got = {kind: c for m, kind, c in cases if m == n}
        out.append({"masks": n,
                    "best_in_top_mask_ns": round(benchlib.median(got["best"].samples), 1),
                    "no_match_ns": round(benchlib.median(got["none"].samples), 1),
                    "samples_ns": {k: [round(x, 1) for x in c.samples] for k, c in got.items()}})
    return out
