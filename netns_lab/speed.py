"""An indicative speed comparison of the lab's paths on the same traffic (the demo's): trafgen
pinned to CPU 0 sends 60-byte UDP frames (256 flows, an allowed rule) from one VM to
another, on the offloaded path and on each kernel variant, and the receiving VM counts
what arrives (its eth0 rx counter; a raw-table rule drops the frames there, the same on
every path, so the receiver answers nothing). A generator-only rate (the same trafgen into
a veth whose peer runs an XDP drop program) gives each path's cost per packet:
1e9/rate(path) - 1e9/rate(generator). Paths are measured in alternation (A B C A B C ...),
after a warm-up, and the median per path is reported: the figures are noisy on a shared
machine, and only ratios within one run carry any meaning (see ENVIRONMENT.md)."""
from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
import time
from typing import Callable, Dict, List

from .labfile import VM, VM_IFNAME
from .netns import in_netns, ip, run

DPORT = 7009                    # rule 5 of the demo lab allows it from blue1
FLOWS_NOTE = "256 flows (random UDP source port low byte)"
GENERATOR = "generator only"

XDP_DROP_PROG = "int xf_sink(struct xdp_md *ctx) { return XDP_DROP; }"
XDP_FLAGS_DRV_MODE = 4


def _mac(mac: str) -> str:
    return ", ".join(f"0x{b}" for b in mac.split(":"))


def _ip(addr: str) -> str:
    return ", ".join(addr.split("."))


def trafgen_config(src: VM, dst: VM) -> str:
    """A 60-byte Ethernet/IPv4/UDP frame from src to dst through src's gateway MAC."""
    return f"""{{
  {_mac(src.port_mac)},
  {_mac(src.mac)},
  0x08, 0x00,
  0x45, 0x00, 0x00, 0x2e, 0x00, 0x01, 0x40, 0x00, 0x40, 0x11, csumip(14, 33),
  {_ip(src.ip)},
  {_ip(dst.ip)},
  0x9c, drnd(1), {DPORT >> 8:#04x}, {DPORT & 0xff:#04x}, 0x00, 0x1a, 0x00, 0x00,
  fill(0x41, 18)
}}
"""


def _link_stats(ns: str) -> Dict[str, int]:
    link = json.loads(ip("-s", "-j", "link", "show", "dev", VM_IFNAME, ns=ns))[0]
    s = link["stats64"]
    return {"rx": s["rx"]["packets"], "tx": s["tx"]["packets"]}


def _blast(ns: str, conf: str, seconds: float) -> None:
    """trafgen for `seconds` (timeout's SIGINT ends it and its forked worker cleanly)."""
    p = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "--", "timeout", "-s", "INT",
                        f"{seconds}", "taskset", "-c", "0", "trafgen", "--dev", VM_IFNAME,
                        "--conf", conf, "--cpus", "1", "--no-cpu-stats"],
                       capture_output=True, text=True, timeout=seconds + 30)
    if p.returncode not in (0, 124):
        raise RuntimeError(f"trafgen in {ns} failed ({p.returncode}): {p.stderr.strip()}")


class _Target:
    def __init__(self, name: str, src_ns: str, count_ns: str, count: str):
        self.name, self.src_ns, self.count_ns, self.count = name, src_ns, count_ns, count

    def measure(self, conf: str, seconds: float, tries: int = 3) -> float:
        # trafgen now and then gives up on a full TX ring ("Flushing TX_RING failed:
        # Resource temporarily unavailable", seen on a fresh CI machine): measure again.
        for attempt in range(tries):
            before = _link_stats(self.count_ns)[self.count]
            t0 = time.monotonic()
            try:
                _blast(self.src_ns, conf, seconds)
            except RuntimeError as e:
                if "TX_RING" not in str(e) or attempt == tries - 1:
                    raise
                continue
            time.sleep(0.1)
            return (_link_stats(self.count_ns)[self.count] - before) / (time.monotonic() - t0 - 0.1)
        raise AssertionError("unreachable")


def _generator_pair(prefix: str, src: VM):
    """Two namespaces of the lab (PREFIX-g-...): a VM-like sender and a sink whose veth
    drops everything in XDP."""
    from bcc import BPF
    gen, sink = f"{prefix}-g-gen", f"{prefix}-g-sink"
    for ns in (gen, sink):
        ip("netns", "add", ns)
    ip("-n", gen, "link", "add", VM_IFNAME, "address", src.mac, "type", "veth", "peer", "name",
       VM_IFNAME, "address", src.port_mac, "netns", sink)
    for ns in (gen, sink):
        ip("-n", ns, "link", "set", VM_IFNAME, "up")
    run(["ethtool", "-K", VM_IFNAME, "tx", "off"], ns=gen)
    bpf = BPF(text=XDP_DROP_PROG)
    fd = bpf.load_func(b"xf_sink", BPF.XDP).fd

    def attach():
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=VM_IFNAME)[0]
            ipr.link("set", index=idx, xdp={"attrs": [("IFLA_XDP_FD", fd),
                                                      ("IFLA_XDP_FLAGS", XDP_FLAGS_DRV_MODE)]})
    in_netns(sink, attach)
    return gen, sink, bpf


def measure(topo, src_name: str = "blue1", dst_name: str = "blue2", seconds: float = 1.5,
            rounds: int = 2, say: Callable[[str], None] = lambda s: None) -> Dict[str, object]:
    spec = topo.spec
    src, dst = spec.vm(src_name), spec.vm(dst_name)
    gen, sink, bpf = _generator_pair(topo.prefix, src)
    targets = [_Target(GENERATOR, gen, gen, "tx")]
    for path in topo.paths:
        dns = topo.vm_ns(path, dst)
        # The receiver drops the load before its UDP layer, the same way on every path.
        run(["iptables", "-t", "raw", "-I", "PREROUTING", "-p", "udp", "--dport", str(DPORT),
             "-j", "DROP"], ns=dns)
        targets.append(_Target(path, topo.vm_ns(path, src), dns, "rx"))
    rates: Dict[str, List[float]] = {t.name: [] for t in targets}
    with tempfile.NamedTemporaryFile("w", suffix=".cfg") as f:
        f.write(trafgen_config(src, dst))
        f.flush()
        try:
            for t in targets:                       # warm-up: the first run is slow
                t.measure(f.name, 0.5)
            for r in range(rounds):
                for t in targets:
                    rates[t.name].append(t.measure(f.name, seconds))
                    say(f"  round {r + 1}/{rounds}: {t.name:15} {rates[t.name][-1] / 1e6:.3f} Mpps")
        finally:
            for path in topo.paths:
                run(["iptables", "-t", "raw", "-D", "PREROUTING", "-p", "udp", "--dport",
                     str(DPORT), "-j", "DROP"], ns=topo.vm_ns(path, dst), check=False)
            for ns in (gen, sink):
                run(["ip", "netns", "del", ns], check=False)
            bpf.cleanup()
    med = {k: statistics.median(v) for k, v in rates.items()}
    base = med[GENERATOR]
    rows = []
    for name, rate in med.items():
        cost = None
        if name != GENERATOR and rate > 0 and base > 0:
            cost = max(0.0, 1e9 / rate - 1e9 / base)
        rows.append({"path": name, "mpps": round(rate / 1e6, 3),
                     "ns_per_packet": None if cost is None else round(cost)})
    return {"seconds": seconds, "rounds": rounds, "traffic": f"60-byte UDP {src.name} -> "
            f"{dst.name}, {FLOWS_NOTE}", "rows": rows}


def format_table(res: Dict[str, object]) -> str:
    lines = [f"{'path':16} {'Mpps':>7} {'cost/packet':>12}"]
    for r in res["rows"]:
        cost = "-" if r["ns_per_packet"] is None else f"{r['ns_per_packet']} ns"
        lines.append(f"{r['path']:16} {r['mpps']:7.3f} {cost:>12}")
    lines.append(f"({res['traffic']}; {res['rounds']} rounds of {res['seconds']}s, medians; "
                 f"cost = 1e9/rate - 1e9/generator rate. Indicative only: a shared, noisy "
                 f"machine; compare ratios within this run)")
    return "\n".join(lines)


