"""Live datapath events for `xdpflowctl monitor`: the datapath's ring buffer, read by one
thread, fanned out to every listening client, each with its own filter.

Cost is bounded on both sides. With no listener the datapath reads one flag. With
listeners it applies the union of their filters (tenant, port, verdicts, reasons) and a
per-CPU token bucket of `monitor.rate_limit` events a second; what the bucket or a full
ring refuses is counted per CPU (xf_mon_cpu). Here, each client has a bounded buffer: a
client that reads nothing loses events (counted for it), never blocks the agent.

Wire: after the command's reply, one JSON object per line:
    {"event": {time, tenant, port, verdict, reason, rule, len, out_port, flow_hit, packet}}
    {"lost": {rate_cap, ring_full, client}}     (about once a second, when they changed)
"packet" is the hex of the first bytes; the client decodes it (`describe_packet`), so the
agent never runs a packet dissector per event.
"""
from __future__ import annotations

import ctypes as ct
import json
import logging
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from . import abi, commands, model

log = logging.getLogger("xdpflow.monitor")

# --type: what each choice lets through ("all" includes tx: proxy ARP/ND replies).
TYPES = {"drop": (abi.V_DROP,), "pass": (abi.V_PASS,), "redirect": (abi.V_REDIRECT,),
         "all": (abi.V_DROP, abi.V_PASS, abi.V_REDIRECT, abi.V_TX)}
MAX_MONITORS = 16
CLIENT_BUFFER = 256 * 1024      # bytes of lines queued for one client before it loses events
TICK = 1.0                      # seconds between lost-count lines and config checks
ALL_REASONS = (1 << abi.R_ROWS) - 1


@dataclass(frozen=True)
class Filter:
    """One monitor's filter on ids: tenant id and port slot (0: any), bit sets of verdicts
    and reasons."""
    tenant: int = 0
    port: int = 0
    verdicts: int = sum(1 << v for v in TYPES["all"])
    reasons: int = ALL_REASONS

    def matches(self, ev: abi.Event) -> bool:
        return ((not self.tenant or ev.tenant == self.tenant)
                and (not self.port or ev.port == self.port)
                and bool(self.verdicts >> ev.verdict & 1)
                and bool(self.reasons >> ev.reason & 1))


def datapath_filter(filters: List[Filter]) -> Dict[str, int]:
    """The one filter the datapath applies for all listeners: their union (a tenant or
    port only when every listener names the same one)."""
    if not filters:
        return {"listeners": 0, "verdicts": 0, "reasons": 0, "tenant": 0, "port": 0}
    tenants = {f.tenant for f in filters}
    ports = {f.port for f in filters}
    v = r = 0
    for f in filters:
        v |= f.verdicts
        r |= f.reasons
    return {"listeners": len(filters), "verdicts": v, "reasons": r,
            "tenant": tenants.pop() if len(tenants) == 1 else 0,
            "port": ports.pop() if len(ports) == 1 else 0}


def bucket(rate: int) -> Dict[str, int]:
    """Token-bucket settings for `rate` events a second per CPU: the credit one event
    costs, and a depth of a tenth of a second (at least one event), so a flood gets about
    `rate` a second and a burst only a tenth of that on top."""
    cost = 1_000_000_000 // rate
    return {"cost_ns": cost, "burst_ns": max(cost, 100_000_000)}


def event_dict(ev: abi.Event, tenants: Dict[int, str], slots: Dict[int, str],
               mono_to_wall: float) -> Dict[str, Any]:
    return {
        "time": round(ev.ts_ns / 1e9 + mono_to_wall, 6),
        "tenant": tenants.get(ev.tenant, str(ev.tenant) if ev.tenant else ""),
        "port": slots.get(ev.port, f"slot{ev.port}" if ev.port else ""),
        "verdict": abi.VERDICTS.get(ev.verdict, str(ev.verdict)),
        "reason": abi.REASONS.get(ev.reason, str(ev.reason)),
        "rule": ev.rule_id or None,
        "len": ev.len,
        "out_port": slots.get(ev.out_port, "") if ev.out_port else "",
        "flow_hit": bool(ev.flow_hit),
        "packet": bytes(ev.data[:min(ev.cap_len, abi.EVENT_BYTES)]).hex(),
    }


class _Client:
    __slots__ = ("sock", "filter", "out", "dropped", "base", "last_lost")

    def __init__(self, sock: socket.socket, filt: Filter, base: Dict[str, int]):
        self.sock = sock
        self.filter = filt
        self.out = bytearray()
        self.dropped = 0
        self.base = base              # the datapath's lost counts when it subscribed
        self.last_lost: Dict[str, int] = {}

    def queue(self, line: bytes) -> None:
        if len(self.out) + len(line) > CLIENT_BUFFER:
            self.dropped += 1
        else:
            self.out += line


class Monitor:
    """The agent's side of `monitor`. `controller` gives the live datapath (`.dp`, which a
    rebuild replaces), the settings (`.cfg.monitor.rate_limit`) and names (`_names()`)."""

    def __init__(self, controller):
        self.c = controller
        self._lock = threading.Lock()
        self._new: List[_Client] = []
        self._clients: List[_Client] = []
        self.client_dropped = 0       # events clients did not read in time, all clients
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._dp = None
        self._ring = None
        self._cfg_map = self._cpu_map = None
        self._written: Optional[bytes] = None
        self._names = ({}, {})
        self._mono_to_wall = time.time() - time.monotonic()

    # -- called from the API (under the controller lock) ----------------------------------
    def open(self, args: Dict[str, Any]) -> commands.Stream:
        """Check a monitor request's filter; returns what the API needs to stream."""
        tenants, slots, _ = self.c._names()
        filt = Filter()
        shown: Dict[str, Any] = {"type": args.get("type") or "all"}
        if args.get("tenant"):
            filt = Filter(tenant=self.c._tenant_id(args["tenant"]))
            shown["tenant"] = args["tenant"]
        if args.get("port"):
            name = model.parse_ifname(args["port"], "monitor: port")
            slot = {v: k for k, v in slots.items()}.get(name)
            if slot is None:
                raise model.Conflict(f"port {name}", "is not a configured port")
            filt = Filter(tenant=filt.tenant, port=slot)
            shown["port"] = name
        verdicts = sum(1 << v for v in TYPES[shown["type"]])
        reasons = ALL_REASONS
        if args.get("reason"):
            rid = abi.REASON_IDS.get(args["reason"])
            if rid is None or args["reason"] in abi.EVENT_REASONS:
                raise model.Invalid("monitor: reason", f"{args['reason']!r} is not one of "
                                    + ", ".join(n for n in abi.REASON_IDS
                                                if n not in abi.EVENT_REASONS))
            reasons = 1 << rid
            shown["reason"] = args["reason"]
        filt = Filter(filt.tenant, filt.port, verdicts, reasons)
        with self._lock:
            if len(self._clients) + len(self._new) >= MAX_MONITORS:
                raise model.Conflict("monitor", f"{MAX_MONITORS} monitors are already "
                                                "listening")
        names = ({k: v for k, v in tenants.items()}, dict(slots))
        rate = self.c.cfg.monitor.rate_limit
        head = {"filter": shown, "rate_limit": rate, "event_bytes": abi.EVENT_BYTES}
        return commands.Stream(head, lambda sock, reply: self.subscribe(sock, reply, filt,
                                                                         names))

    def subscribe(self, sock: socket.socket, reply: bytes, filt: Filter, names) -> None:
        """Take over a client's connection; its reply goes out once the datapath filter
        includes it, so a client that has the reply misses no event after it."""
        sock.setblocking(False)
        with self._lock:
            self._names = names
            cl = _Client(sock, filt, {})
            cl.out += reply
            self._new.append(cl)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="monitor",
                                                daemon=True)
                self._thread.start()
        self._wake()

    def use(self, dp) -> None:
        """A rebuilt datapath, before its program is attached: it gets the listeners'
        switch and filter now, so no packet between the swap and this thread's next round
        goes unreported (its events wait in the new ring)."""
        if self._thread is None:
            return
        dp.monitor_maps()[1].put(bytes(ct.c_uint32(0)), self._cfg_bytes())
        self._wake()

    def stats(self) -> Dict[str, int]:
        """Datapath sent/lost counts (this build's, summed over CPUs), client losses and
        the number of listeners."""
        out = self._datapath_counts()
        out["client"] = self.client_dropped
        out["listeners"] = len(self._clients) + len(self._new)
        return out

    def close(self) -> None:
        """Stop listening: the datapath goes back to reading one flag per packet."""
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for cl in self._clients + self._new:
            cl.sock.close()
        self._clients, self._new = [], []
        self._write_cfg()
        self._unbind()

    # -- the thread -------------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass          # full: a wake-up is pending anyway

    def _bind(self) -> None:
        """Read the ring of the datapath the controller has now (a rebuild replaces it)."""
        dp = self.c.dp
        if self._cfg_map is not None:       # the old build stops making events
            self._clients_cfg_off()
        self._unbind()
        ring_fd, cfg_map, cpu_map = dp.monitor_maps()
        from .bpfsys import RawMap, RingBuffer, prog_info_id as bpfsys_prog_id
        self._cfg_map = RawMap(os.dup(cfg_map.fd), "xf_mon", owned=True)
        self._cpu_map = RawMap(os.dup(cpu_map.fd), "xf_mon_cpu", owned=True)
        self._ring = RingBuffer(ring_fd, self._on_record)
        self._dp = dp
        self._written = None
        self._write_cfg()
        log.info("monitor: reading the events of program %d (%d listening)",
                 bpfsys_prog_id(dp.prog_fd), len(self._clients))

    def _clients_cfg_off(self) -> None:
        try:
            self._cfg_map.put(bytes(ct.c_uint32(0)), bytes(abi.MonCfg()))
        except OSError:
            pass

    def _unbind(self) -> None:
        if self._ring is not None:
            self._ring.close()
        for m in (self._cfg_map, self._cpu_map):
            if m is not None:
                m.close()
        self._ring = self._cfg_map = self._cpu_map = self._dp = None

    def _write_cfg(self) -> None:
        if self._cfg_map is None:
            return
        raw = self._cfg_bytes()
        if raw != self._written:
            self._cfg_map.put(bytes(ct.c_uint32(0)), raw)
            self._written = raw

    def _cfg_bytes(self) -> bytes:
        """The datapath's switch and filter for the listeners there are now."""
        filt = datapath_filter([cl.filter for cl in list(self._clients)])
        return bytes(abi.MonCfg(**filt, **bucket(self.c.cfg.monitor.rate_limit)))

    def _datapath_counts(self) -> Dict[str, int]:
        m = self._cpu_map
        out = {"sent": 0, "rate_cap": 0, "ring_full": 0}
        if m is None:
            return out
        raw = m.get(bytes(ct.c_uint32(0)))
        for c in m.per_cpu(raw) if raw else ():
            row = abi.MonCpu.from_buffer_copy(c)
            out["sent"] += row.sent
            out["rate_cap"] += row.lost_rate
            out["ring_full"] += row.lost_ring
        return out

    def _on_record(self, data: bytes) -> None:
        ev = abi.Event.from_buffer_copy(data.ljust(ct.sizeof(abi.Event), b"\0"))
        line = None
        for cl in self._clients:
            if cl.filter.matches(ev):
                if line is None:
                    doc = event_dict(ev, *self._names, self._mono_to_wall)
                    line = (json.dumps({"event": doc}, separators=(",", ":")) + "\n").encode()
                cl.queue(line)

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        ring_key = None
        next_tick = time.monotonic()
        try:
            while not self._stop.is_set():
                try:
                    if self.c.dp is not self._dp:     # (re)built: read the new one's ring
                        if ring_key is not None:
                            sel.unregister(self._ring)
                            ring_key = None
                        self._bind()
                        ring_key = sel.register(self._ring, selectors.EVENT_READ, "ring")
                    next_tick = self._serve(sel, next_tick)
                except Exception:
                    log.exception("monitor: serving events failed")
                    time.sleep(TICK)
        finally:
            sel.close()

    def _serve(self, sel, next_tick: float) -> float:
        """One round: new clients, events and client sockets, the tick. Returns when the
        next tick is due."""
        with self._lock:
            new, self._new = self._new, []
        base = self._datapath_counts()
        for cl in new:
            cl.base = base
            self._clients.append(cl)
            sel.register(cl.sock, selectors.EVENT_READ, cl)
        if new:
            self._write_cfg()
            for cl in new:
                self._flush(sel, cl)      # their replies: they are subscribed
        self._mono_to_wall = time.time() - time.monotonic()
        for key, mask in sel.select(max(0.0, next_tick - time.monotonic())):
            if key.data == "wake":
                try:
                    while self._wake_r.recv(4096):
                        pass
                except BlockingIOError:
                    pass
            elif key.data == "ring":
                self._ring.consume()
            elif mask & selectors.EVENT_READ:
                self._hear(sel, key.data)
        now = time.monotonic()
        if now >= next_tick:
            next_tick = now + TICK
            self._tick()
        for cl in list(self._clients):
            self._flush(sel, cl)
        return next_tick

    def _hear(self, sel, cl: _Client) -> None:
        """A client sends nothing after its request: data or EOF means it is leaving."""
        try:
            gone = not cl.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            gone = True
        if gone:
            self._drop(sel, cl)

    def _flush(self, sel, cl: _Client) -> None:
        if cl.out:
            try:
                n = cl.sock.send(cl.out)
                del cl.out[:n]
            except BlockingIOError:
                pass
            except OSError:
                self._drop(sel, cl)
                return
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if cl.out else 0)
        if sel.get_key(cl.sock).events != want:
            sel.modify(cl.sock, want, cl)

    def _drop(self, sel, cl: _Client) -> None:
        if cl in self._clients:
            self._clients.remove(cl)
            sel.unregister(cl.sock)
            cl.sock.close()
            self.client_dropped += cl.dropped
            self._write_cfg()

    def _tick(self) -> None:
        """Lost counts to each client (since it subscribed), and a changed rate setting
        to the datapath."""
        self._write_cfg()
        counts = self._datapath_counts()
        for cl in self._clients:
            lost = {"rate_cap": counts["rate_cap"] - cl.base.get("rate_cap", 0),
                    "ring_full": counts["ring_full"] - cl.base.get("ring_full", 0),
                    "client": cl.dropped}
            if lost != cl.last_lost:
                cl.last_lost = lost
                cl.out += (json.dumps({"lost": lost}, separators=(",", ":")) + "\n").encode()


def describe_packet(hexstr: str, decode: bool = False) -> Dict[str, Any]:
    """Addresses, protocol and ports of an event's packet bytes, by Scapy; with `decode`
    also Scapy's one-line summary of the layers. What Scapy cannot find (the bytes are cut
    at abi.EVENT_BYTES, the packet may be malformed) is left out; it never raises."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import ARP, Ether
    out: Dict[str, Any] = {}
    try:
        pkt = Ether(bytes.fromhex(hexstr))
        if pkt.haslayer(IP):
            out.update(src=pkt[IP].src, dst=pkt[IP].dst, proto=pkt[IP].proto)
        elif pkt.haslayer(IPv6):
            out.update(src=pkt[IPv6].src, dst=pkt[IPv6].dst, proto=pkt[IPv6].nh)
        elif pkt.haslayer(ARP):
            out.update(proto="arp", src=pkt[ARP].psrc, dst=pkt[ARP].pdst)
        if isinstance(out.get("proto"), int):
            out["proto"] = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}.get(
                out["proto"], out["proto"])
        for l4 in (TCP, UDP):
            if pkt.haslayer(l4):        # (past IPv6 extension headers too)
                out["proto"] = l4.__name__.lower()
                out["sport"], out["dport"] = pkt[l4].sport, pkt[l4].dport
                break
        if pkt.haslayer(ICMP):
            out["icmp_type"], out["icmp_code"] = pkt[ICMP].type, pkt[ICMP].code
        if decode:
            out["decoded"] = pkt.summary()
    except Exception:      # a decoding nicety: the hex stays the answer
        pass
    return out
