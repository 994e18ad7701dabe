"""`xdpflow-lab compare`: every scenario's sends through the offloaded path and through each
kernel variant, and what every VM received, compared send by send.

How a send is observed: one AF_PACKET socket on every VM's eth0 (opened inside the VM's
namespace) both sends the scenario's frames and captures what arrives. After a send, the
sockets are read until nothing more has arrived for QUIET seconds (the whole chain,
forwarding and any answer from a VM's kernel, runs in softirq right behind the send, so
this is short). A frame carrying another send's nonce is that send's, whenever it comes.

The kernels' own start-up chatter (MLD reports, router solicitations) is not traffic of
any send: it is counted as `background` in the report, and never compared.

Outcome of a send on a path: the multiset of (VM, frame bytes) received. Two outcomes
match when equal: delivered to the same VMs and the same bytes (MAC rewrite and TTL
decrement included), with one exception: the IPv4 identification of a frame a VM's kernel
made (an echo reply, an ICMP error, a RST) is drawn at random per namespace, so in a frame
that is not one of the sent frames (its IPv4 payload is none of theirs) the identification
and the header checksum are masked. Every other byte counts."""
from __future__ import annotations

import json
import re
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import render
from .labfile import VM, VM_IFNAME, LabSpec
from .netns import in_netns
from .scenarios import Move, Scenario, Send

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SOL_PACKET, PACKET_AUXDATA = 263, 8
TP_STATUS_VLAN_VALID, TP_STATUS_VLAN_TPID_VALID = 0x10, 0x40
# Seconds without a frame that end a send's observation: generous for a loaded machine
# (frames without a nonce, a RST or an ARP reply, have only their timing to say whose
# they are).
QUIET = 0.05
MIN_WAIT = 0.06
MAX_WAIT = 1.0
NONCE_RE = re.compile(rb"xfn:[a-z0-9_]+:\d{3};")
# ICMPv6 a kernel sends on its own (MLD queries/reports, router solicitation).
BACKGROUND_ICMP6 = {130, 131, 132, 133, 143}

Frame = Tuple[str, bytes]          # (VM name, bytes)


class ScenarioError(ValueError):
    """A scenario that cannot be built (a bad expression, an unknown VM)."""


def nonce(scenario: str, index: int) -> bytes:
    return b"xfn:%s:%03d;" % (scenario.encode(), index)


@dataclass(frozen=True)
class VMView:
    """What a scenario expression sees of a VM."""
    name: str
    ip: str
    ip6: Optional[str]
    mac: str
    gw: str


def view(vm: VM) -> VMView:
    return VMView(vm.name, vm.ip, vm.ip6, vm.mac, vm.port_mac)


def snma(addr: str) -> str:
    """The solicited-node multicast address of an IPv6 address (ff02::1:ffXX:XXXX)."""
    import ipaddress
    low = int(ipaddress.IPv6Address(addr)) & 0xFFFFFF
    return str(ipaddress.IPv6Address((0xFF02 << 112) | (1 << 32) | (0xFF << 24) | low))


def snmac(addr: str) -> str:
    """Its Ethernet multicast MAC (33:33 + the address's low 32 bits)."""
    import ipaddress
    low = ipaddress.IPv6Address(snma(addr)).packed[-4:]
    return "33:33:" + ":".join(f"{b:02x}" for b in low)


def sender_view(spec: LabSpec, src: str):
    """`me` of a send: a VM, or a node's underlay end ("A.uplink", netns_lab/nodes.py)."""
    if spec.nodes and src.endswith(".uplink"):
        from .nodes import node_view
        try:
            return node_view(spec, src[:-len(".uplink")])
        except (KeyError, ValueError):
            raise KeyError(f"lab {spec.source}: no node for sender {src!r}") from None
    return view(spec.vm(src))


def build_frames(spec: LabSpec, scenario: str, index: int, send: Send) -> List[bytes]:
    """A send's frames as bytes: the same on every path."""
    import scapy.all as scapy
    names: Dict[str, Any] = {k: getattr(scapy, k) for k in dir(scapy) if not k.startswith("_")}
    try:
        me = sender_view(spec, send.src)
    except KeyError as e:
        raise ScenarioError(f"scenario {scenario}, send {index}: {e.args[0]}") from None

    def vm(name: str) -> VMView:
        return view(spec.vm(name))
    names.update(me=me, vm=vm, N=nonce(scenario, index), snma=snma, snmac=snmac)
    if spec.nodes:
        from .nodes import node_view
        names["node"] = lambda n: node_view(spec, n)
    try:
        got = eval(send.frames, names)    # scenario files are this project's own code
    except Exception as e:
        raise ScenarioError(f"scenario {scenario}, send {index} ({send.frames!r}): "
                            f"{type(e).__name__}: {e}") from None
    pkts = got if isinstance(got, (list, tuple)) else [got]
    return [bytes(p) for p in pkts]


def is_background(frame: bytes) -> bool:
    """A kernel's own ICMPv6 housekeeping (see the module doc)."""
    if len(frame) < 14 + 40 + 1 or frame[12:14] != b"\x86\xdd":
        return False
    nh, off = frame[14 + 6], 14 + 40
    if nh == 0 and len(frame) > off + 8:             # MLD comes behind hop-by-hop options
        nh, off = frame[off], off + (frame[off + 1] + 1) * 8
    return nh == 58 and len(frame) > off and frame[off] in BACKGROUND_ICMP6


def with_vlan_tag(data: bytes, ancillary) -> bytes:
    """The frame as it was on the wire: the tag the kernel took out (PACKET_AUXDATA's
    tp_vlan_tci / tp_vlan_tpid) put back after the MAC addresses."""
    import struct
    for level, kind, blob in ancillary:
        if level != SOL_PACKET or kind != PACKET_AUXDATA or len(blob) < 20:
            continue
        status, _, _, _, _, tci, tpid = struct.unpack("=IIIHHHH", blob[:20])
        if status & TP_STATUS_VLAN_VALID:
            tpid = tpid if status & TP_STATUS_VLAN_TPID_VALID else 0x8100
            return data[:12] + struct.pack("!HH", tpid, tci) + data[12:]
    return data


class Wire:
    """One AF_PACKET socket on eth0 of every VM of a path; `senders`: name -> (namespace,
    interface) of sockets that only send (a node's underlay end: what crosses the
    underlay is the paths' own encapsulation, never compared)."""

    def __init__(self, vm_namespaces: Dict[str, str],
                 senders: Optional[Dict[str, Tuple[str, str]]] = None):
        self.socks: Dict[str, socket.socket] = {}
        self.send_only: Dict[str, socket.socket] = {}
        try:
            for name, ns in vm_namespaces.items():
                self.socks[name] = in_netns(ns, self._open)
            for name, (ns, ifname) in (senders or {}).items():
                self.send_only[name] = in_netns(ns, lambda i=ifname: self._open(i, 0))
        except BaseException:
            self.close()
            raise
        self.by_fd = {s.fileno(): n for n, s in self.socks.items()}
        self.background = 0

    @staticmethod
    def _open(ifname: str = VM_IFNAME, proto: int = ETH_P_ALL) -> socket.socket:
        # Protocol 0: a socket that receives nothing.
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        # The receive path takes a VLAN tag out of the frame into metadata: ask for it, to
        # put it back (a tagged frame must not compare equal to an untagged one).
        s.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        s.bind((ifname, proto))
        s.setblocking(False)
        return s

    def _read(self, timeout: float) -> List[Frame]:
        out: List[Frame] = []
        ready, _, _ = select.select(list(self.socks.values()), [], [], timeout)
        for s in ready:
            while True:
                try:
                    data, anc, _, addr = s.recvmsg(65535, socket.CMSG_SPACE(20))
                except BlockingIOError:
                    break
                if addr[2] == PACKET_OUTGOING:
                    continue
                data = with_vlan_tag(data, anc)
                if is_background(data):
                    self.background += 1
                    continue
                out.append((self.by_fd[s.fileno()], data))
        return out

    def drain(self) -> List[Frame]:
        return self._read(0)

    def exchange(self, src: str, frames: Sequence[bytes]) -> List[Frame]:
        """Send frames from VM `src`, return what every VM received until quiet."""
        sock = self.send_only.get(src) or self.socks[src]
        for f in frames:
            sock.send(f)
        got: List[Frame] = []
        start = last = time.monotonic()
        while True:
            now = time.monotonic()
            if now - start >= MAX_WAIT or (now - last >= QUIET and now - start >= MIN_WAIT):
                return got
            more = self._read(QUIET)
            if more:
                got += more
                last = time.monotonic()

    def close(self) -> None:
        for s in list(self.socks.values()) + list(self.send_only.values()):
            s.close()
        self.socks, self.send_only = {}, {}


# -- running ------------------------------------------------------------------------------

@dataclass
class SendResult:
    scenario: str
    index: int
    send: Send
    frames: List[bytes]
    outcome: List[Frame] = field(default_factory=list)
    events: List[Dict[str, Any]] = field(default_factory=list)   # the datapath's (offload)


def run_path(spec: LabSpec, vm_namespaces: Dict[str, str], scenarios: List[Scenario],
             progress: Callable[[str], None] = lambda s: None,
             senders: Optional[Dict[str, Tuple[str, str]]] = None,
             change: Callable[[Move], None] = lambda m: None
             ) -> Tuple[List[SendResult], int]:
    """Every send of every scenario on one path (VM name -> namespace; `senders` see
    Wire), a scenario's moves done by `change` in their place; returns the results and
    the number of background frames seen."""
    steps: List[Any] = []
    for sc in scenarios:
        i = 0
        for st in sc.steps:
            if isinstance(st, Move):
                steps.append(st)
                continue
            steps.append(SendResult(sc.name, i, st, build_frames(spec, sc.name, i, st)))
            i += 1
    built = [r for r in steps if isinstance(r, SendResult)]
    by_nonce = {nonce(r.scenario, r.index): r for r in built}
    wire = Wire(vm_namespaces, senders)
    try:
        wire.drain()
        n = 0
        for r in steps:
            if isinstance(r, Move):
                change(r)
                wire.drain()      # what the move itself made (a port coming up) is no send's
                continue
            n += 1
            for vm, data in wire.exchange(r.send.src, r.frames):
                m = NONCE_RE.search(data)
                owner = by_nonce.get(m.group(0), r) if m else r
                owner.outcome.append((vm, data))
            if progress and n % 25 == 0:
                progress(f"{n}/{len(built)} sends")
        for vm, data in wire.drain():     # late frames still find their send by nonce
            m = NONCE_RE.search(data)
            if m and m.group(0) in by_nonce:
                by_nonce[m.group(0)].outcome.append((vm, data))
        return built, wire.background
    finally:
        wire.close()


# -- comparing ----------------------------------------------------------------------------

def _ipv4_payload(frame: bytes) -> Optional[bytes]:
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    return frame[14 + (frame[14] & 0x0F) * 4:]


def _ipv4_header_ok(frame: bytes) -> bool:
    hdr = frame[14:14 + (frame[14] & 0x0F) * 4]
    total = sum(int.from_bytes(hdr[i:i + 2], "big") for i in range(0, len(hdr) - 1, 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


def canonical(frame: bytes, sent: Sequence[bytes]) -> bytes:
    """A frame as compared: a kernel-made (or translated) IPv4 frame without its random
    identification (see the module doc), its header checksum checked instead."""
    payload = _ipv4_payload(frame)
    if payload is None or payload in {_ipv4_payload(f) for f in sent}:
        return frame
    return (frame[:18] + b"\0\0" + frame[20:24] + b"\0\0" + frame[26:]
            + (b"" if _ipv4_header_ok(frame) else b"|bad IPv4 header checksum"))


def normalise_snat(spec: LabSpec, results: Dict[str, List["SendResult"]]) -> None:
    """Each path's SNAT allocations as labels (netns_lab/external.py), in place: ports
    allocated on their own may differ between paths, their use may not."""
    from . import external
    hosts = [h.name for h in spec.external]
    if not hosts or not spec.state.snats:
        return
    for path_results in results.values():
        norm = external.snat_normaliser(spec, hosts)
        for r in path_results:
            r.outcome = [(vm, norm(vm, data)) for vm, data in r.outcome]


def _canon(outcome: List[Frame], sent: Sequence[bytes]) -> List[Tuple[str, str]]:
    return sorted((vm, canonical(data, sent).hex()) for vm, data in outcome)


def describe(outcome: List[Frame]) -> List[Dict[str, str]]:
    from scapy.layers.l2 import Ether
    out = []
    for vm, data in sorted(outcome, key=lambda f: (f[0], f[1])):
        frame, _, label = data.partition(b"|snat port ")      # normalise_snat's
        try:
            summary = Ether(frame).summary()
        except Exception:
            summary = f"{len(frame)} bytes"
        if label:
            summary += f" [SNAT port {label.decode()}]"
        out.append({"vm": vm, "summary": summary, "bytes": data.hex()})
    return out


def delivered(outcome: List[Frame]) -> List[str]:
    return sorted({vm for vm, _ in outcome})


def compare_results(offload: List[SendResult], kernel: List[SendResult]
                    ) -> Dict[str, Dict[str, Any]]:
    """Per scenario: packets_compared (frames sent), sends, matches, mismatches and
    expected differences (each with the packet and both outcomes), and per_send: for every
    send, the VMs it reached on each path, same VMs or not, same bytes or not, result."""
    out: Dict[str, Dict[str, Any]] = {}
    for a, b in zip(offload, kernel):
        assert (a.scenario, a.index) == (b.scenario, b.index)
        sc = out.setdefault(a.scenario, {"packets_compared": 0, "sends": 0, "matches": 0,
                                         "mismatches": [], "expected": [], "per_send": []})
        sc["packets_compared"] += len(a.frames)
        sc["sends"] += 1
        same = _canon(a.outcome, a.frames) == _canon(b.outcome, b.frames)
        exp = a.send.expect
        row = {"index": a.index, "from": a.send.src, "what": a.send.what,
               "offload_to": delivered(a.outcome), "kernel_to": delivered(b.outcome),
               "same_vms": delivered(a.outcome) == delivered(b.outcome), "same_bytes": same}
        sc["per_send"].append(row)
        entry = {"index": a.index, "from": a.send.src, "what": a.send.what,
                 "packet": a.send.frames, "frames": [f.hex() for f in a.frames],
                 "offload": describe(a.outcome), "kernel": describe(b.outcome),
                 "offload_events": a.events}
        if exp is None and same:
            sc["matches"] += 1
            row["result"] = "match"
        elif exp is not None and not same and (
                not exp.same_delivery or delivered(a.outcome) == delivered(b.outcome)):
            sc["expected"].append({**entry, "reason": exp.reason})
            row["result"] = "expected"
        else:
            row["result"] = "mismatch"
            if exp is not None and same:
                entry["why"] = (f"expected a difference ({exp.reason}) but both paths did "
                                f"the same: the scenario is out of date")
            elif exp is not None:
                entry["why"] = (f"expected only the bytes to differ ({exp.reason}), but "
                                f"delivered to {delivered(a.outcome)} vs "
                                f"{delivered(b.outcome)}")
            elif delivered(a.outcome) != delivered(b.outcome):
                entry["why"] = (f"delivered to {delivered(a.outcome) or 'nobody'} (offload) "
                                f"vs {delivered(b.outcome) or 'nobody'} (kernel)")
            else:
                entry["why"] = "delivered to the same VMs, different bytes"
            sc["mismatches"].append(entry)
    return out


def totals(per_scenario: Dict[str, Dict[str, Any]]) -> Dict[str, int]:
    return {"packets_compared": sum(s["packets_compared"] for s in per_scenario.values()),
            "sends": sum(s["sends"] for s in per_scenario.values()),
            "matches": sum(s["matches"] for s in per_scenario.values()),
            "mismatches": sum(len(s["mismatches"]) for s in per_scenario.values()),
            "expected": sum(len(s["expected"]) for s in per_scenario.values())}


def report(spec: LabSpec, scenarios: List[Scenario], results: Dict[str, List[SendResult]],
           background: Dict[str, int]) -> Dict[str, Any]:
    """The JSON document: per kernel variant, per scenario and in total."""
    doc: Dict[str, Any] = {"lab": spec.source, "prefix": spec.prefix,
                           "scenarios": {s.name: {"description": s.description,
                                                  "waiting_on": s.waiting_on}
                                         for s in scenarios},
                           "background_frames": background, "variants": {}}
    normalise_snat(spec, results)
    grand = {"packets_compared": 0, "sends": 0, "matches": 0, "mismatches": 0, "expected": 0}
    for variant in render.VARIANTS:
        if variant not in results:
            continue
        per = compare_results(results["offload"], results[variant])
        tot = totals(per)
        doc["variants"][variant] = {"scenarios": per, "total": tot}
        for k in grand:
            grand[k] += tot[k]
    doc["total"] = {"packets_compared": grand["packets_compared"], "sends": grand["sends"],
                    "matches": grand["matches"], "mismatches": grand["mismatches"],
                    "expected_differences": grand["expected"]}
    return doc


def format_table(doc: Dict[str, Any]) -> str:
    variants = list(doc["variants"])
    head = ["scenario", "packets"] + [f"{v}: match/mismatch/expected" for v in variants]
    rows = []
    for name in doc["scenarios"]:
        first = doc["variants"][variants[0]]["scenarios"].get(name) if variants else None
        if first is None:
            continue
        row = [name, str(first["packets_compared"])]
        for v in variants:
            s = doc["variants"][v]["scenarios"][name]
            mark = "" if not s["mismatches"] else "  <-- MISMATCH"
            row.append(f"{s['matches']}/{len(s['mismatches'])}/{len(s['expected'])}{mark}")
        rows.append(row)
    tot = ["total", str(doc["variants"][variants[0]]["total"]["packets_compared"])
           if variants else "0"]
    for v in variants:
        t = doc["variants"][v]["total"]
        tot.append(f"{t['matches']}/{t['mismatches']}/{t['expected']}")
    rows.append(tot)
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, "  ".join("-" * w for w in widths))
    out = ["\n".join(lines)]
    for v in variants:
        for name, s in doc["variants"][v]["scenarios"].items():
            for m in s["mismatches"]:
                out.append(f"\nMISMATCH {v} / {name} #{m['index']} from {m['from']}: "
                           f"{m['what'] or m['packet']}\n  packet:  {m['packet']}\n"
                           f"  why:     {m['why']}\n"
                           f"  offload: {_brief(m['offload'])}\n  {v}: {_brief(m['kernel'])}"
                           f"\n  datapath: {_events_brief(m.get('offload_events') or [])}")
    exp = sorted({(name, e["index"], e["reason"]) for v in variants
                  for name, s in doc["variants"][v]["scenarios"].items() for e in s["expected"]})
    if exp:
        out.append("\nexpected differences (listed in the scenarios):")
        out += [f"  {name} #{i}: {reason}" for name, i, reason in exp]
    waiting = {n: s["waiting_on"] for n, s in doc["scenarios"].items() if s.get("waiting_on")}
    if waiting:
        out.append("\nwaiting on the datapath: " + "; ".join(f"{n} ({w})" for n, w in
                                                             waiting.items()))
    t = doc["total"]
    out.append(f"\n{t['packets_compared']} packets compared ({t['sends']} sends) over "
               f"{len(variants)} kernel variant(s): {t['matches']} match, "
               f"{t['mismatches']} mismatch, {t['expected_differences']} expected differences")
    return "\n".join(out)


def _events_brief(events: List[Dict[str, Any]]) -> str:
    """What the offloaded datapath said it did with the send's frames (monitor events)."""
    if not events:
        return "no monitor event"
    return "; ".join(f"{e['port']} {e['verdict']} {e['reason']}"
                     + (f" rule {e['rule']}" if e.get("rule") else "")
                     + (f" -> {e['out_port']}" if e.get("out_port") else "") for e in events)


def _brief(frames: List[Dict[str, str]]) -> str:
    if not frames:
        return "nothing delivered"
    return "; ".join(f"{f['vm']}: {f['summary']}" for f in frames)


def write_json(doc: Dict[str, Any], path: str) -> None:
    from pathlib import Path
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True)
    p.write_text(json.dumps(doc, indent=2) + "\n")


def compare(topo, scenarios: List[Scenario], variants: Sequence[str] = render.VARIANTS,
            progress: Callable[[str], None] = lambda s: None) -> Dict[str, Any]:
    """Run the scenarios on the offloaded path and on every kernel variant of an up
    Topology, and compare."""
    results: Dict[str, List[SendResult]] = {}
    background: Dict[str, int] = {}
    monitor: Dict[str, Any] = {}
    for path in ["offload"] + [v for v in render.VARIANTS if v in variants]:
        t0 = time.monotonic()
        nss = {vm.name: topo.vm_ns(path, vm) for vm in topo.spec.vms + topo.spec.external}
        rec = _recorder(topo, monitor) if path == "offload" else None
        try:
            results[path], background[path] = run_path(
                topo.spec, nss, scenarios, lambda s, p=path: progress(f"  {p}: {s}"),
                topo.senders(path), lambda m, p=path: topo.change(p, m))
        finally:
            if rec is not None:
                rec.stop()
                monitor.update(events=len(rec.events), lost=rec.lost, error=rec.error)
        if rec is not None:
            for r in results[path]:
                r.events = rec.events_for(nonce(r.scenario, r.index), r.frames)
        progress(f"  {path}: {len(results[path])} sends in {time.monotonic() - t0:.1f}s")
    doc = report(topo.spec, scenarios, results, background)
    doc["monitor"] = monitor
    return doc


def _recorder(topo, monitor: Dict[str, Any]):
    """The offloaded path's monitor events while it runs (netns_lab.events); a compare
    without them (an agent that cannot stream) says why and goes on."""
    from agent.api import ApiError
    from .events import EventRecorder
    try:
        return EventRecorder(topo.lab.socket)
    except ApiError as e:
        monitor["error"] = e.message
        return None
