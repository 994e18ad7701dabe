"""The controller: the one place that changes the node. It keeps the desired state (store)
and the datapath (maps, attached programs) in step: every change is validated, compiled,
written to SQLite and to the maps inside one transaction, and rolled back in both if either
fails. The API, the sweeper, reloads and link events all come through here, one at a time
(the daemon's lock)."""
from __future__ import annotations

import heapq
import logging
import os
import struct
import time
from typing import Any, Dict, List, Optional, Tuple

from . import VERSION, abi, compiler, model
from .links import Link, LinkError, Links
from .monitor import Monitor
from .top import FlowRates

log = logging.getLogger("xdpflow.control")

PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
EVICTION_REASONS = ("idle", "closed", "rule_change", "flush", "table_full")
CLOCK_MONOTONIC_COARSE = 6


def now_coarse_ns() -> int:
    """The clock bpf_ktime_get_coarse_ns() reads."""
    return time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)


class Controller:
    def __init__(self, cfg, store, datapath, links: Optional[Links], pass_fd: int = -1,
                 config_path: str = ""):
        self.cfg = cfg
        self.store = store
        self.dp = datapath
        self.links = links
        self.pass_fd = pass_fd
        self.config_path = config_path
        self.state = store.load()
        self.started_at = time.time()
        self.last_reconcile_seconds = 0.0
        self.reconcile_errors = 0
        self.sweeps = 0
        self.sweep_seconds_total = 0.0
        self.last_sweep_seconds = 0.0
        self.flow_counts: Dict[int, int] = {}
        self.evicted: Dict[str, int] = {r: 0 for r in EVICTION_REASONS}
        saved = store.get_meta("evictions")
        if saved:
            for part in saved.split(","):
                k, _, v = part.partition("=")
                if k in self.evicted and v.isdigit():
                    self.evicted[k] = int(v)
        self.attached: Dict[str, Link] = {}     # port name -> link with our program
        self.port_notes: Dict[str, str] = {}    # port name -> why it is not attached
        self._prog_id = 0
        self.monitor = Monitor(self)            # `monitor`'s event streams
        self.rates = FlowRates()                # `top`'s samples

    # -- building the datapath image -----------------------------------------------------
    def _live_links(self, state: model.State) -> Dict[str, Link]:
        """The interfaces of the configured ports that exist now (one netlink query each)."""
        if self.links is None:
            return {}
        found = {p.name: self.links.get(p.name) for p in state.ports}
        return {name: link for name, link in found.items() if link is not None}

    def _links_for(self, state: model.State, slots: Dict[str, int],
                   live: Dict[str, Link]) -> Dict[str, compiler.PortLink]:
        out = {}
        for p in state.ports:
            link = live.get(p.name)
            if link is None:
                continue
            slot = slots.get(p.name, 0)
            if not 0 < slot < self.cfg.datapath.max_ports:
                raise model.Conflict(f"port {p.name}", f"slot {slot} is beyond datapath."
                                     f"max_ports={self.cfg.datapath.max_ports}")
            out[p.name] = compiler.PortLink(p.name, link.ifindex, link.mac, slot, link.addrs)
        return out

    def _program(self, state: model.State, slots: Dict[str, int]) -> Dict[str, Any]:
        live = self._live_links(state)
        links = self._links_for(state, slots, live)
        img = compiler.compile_state(state, links, self.cfg.datapath.max_masks)
        summary = self.dp.sync(img)
        self._attach_ports(state, live)
        return summary

    def _attach_ports(self, state: model.State, live: Dict[str, Link]):
        """Our program on every port that exists; off every interface we no longer own."""
        wanted = {p.name for p in state.ports}
        for name in list(self.attached):
            if name not in wanted:
                link = self.links.get(name)
                if link is not None and link.xdp_prog_id == self.prog_id():
                    self.links.detach(link)
                    log.info("port %s: detached (no longer configured)", name)
                del self.attached[name]
        self.port_notes = {}
        for p in state.ports:
            link = live.get(p.name)
            if link is None:
                self.port_notes[p.name] = "interface missing"
                self.attached.pop(p.name, None)
                continue
            if link.xdp_prog_id != self.prog_id():
                try:
                    how = self.links.attach(link, self.dp.prog_fd, self.cfg.datapath.xdp_mode)
                    log.info("port %s (ifindex %d): %s", p.name, link.ifindex, how)
                    link = self.links.get(p.name) or link
                except LinkError as e:
                    self.port_notes[p.name] = str(e)
                    log.error("%s", e)
                    continue
                if self.pass_fd >= 0:
                    note = self.links.prepare_peer(link, self.pass_fd)
                    log.info("port %s: %s", p.name, note)
            self.attached[p.name] = link

    def prog_id(self) -> int:
        if not self._prog_id and self.dp.prog_fd >= 0:
            from .bpfsys import prog_info_id
            self._prog_id = prog_info_id(self.dp.prog_fd)
        return self._prog_id

    def reconcile(self, reason: str = "") -> Dict[str, Any]:
        """Make the datapath match the stored state and the interfaces as they are now
        (start-up, link events, reloads). Changes nothing in the store."""
        t0 = time.monotonic()
        try:
            summary = self._program(self.state, self.store.port_slots())
        except Exception:
            self.reconcile_errors += 1
            raise
        finally:
            self.last_reconcile_seconds = time.monotonic() - t0
        if summary.get("flipped") or reason == "start":
            log.info("reconciled (%s) in %.3fs: %s", reason or "request",
                     self.last_reconcile_seconds, summary)
        return summary

    def _commit(self, new: model.State) -> Dict[str, Any]:
        """Store and datapath both get `new`, or neither does."""
        new.validate()
        old = self.state
        old_slots = self.store.port_slots()
        try:
            with self.store.transaction() as tx:
                tx.write(old, new)
                slots = self.store.port_slots()
                for name, slot in slots.items():
                    if old_slots.get(name) != slot:
                        self.dp.clear_counters(slot)   # a reused slot starts from zero
                summary = self._program(new, slots)
        except Exception:
            # The store rolled back; put the maps back as the old state wants them.
            try:
                self._program(old, old_slots)
            except Exception:
                log.exception("restoring the datapath after a failed change")
                self.reconcile_errors += 1
            raise
        self.state = new
        return summary

    # -- the API's commands ---------------------------------------------------------------
    def status(self) -> Dict[str, Any]:
        flows = sum(self.flow_counts.values())
        return {
            "version": VERSION, "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "config": self.config_path, "pin_dir": self.dp.pin_dir,
            "program_id": self.prog_id(),
            "maps": [{"map": s.name, "action": s.action, "detail": s.detail}
                     for s in self.dp.pin_report],
            "tenants": [{"name": t.name, "id": t.id, "generation": self.dp.generation(t.id)}
                        for t in self.state.sorted("tenants")],
            "ports": [{"name": p.name, "tenant": p.tenant,
                       "attached": p.name in self.attached,
                       "ifindex": self.attached[p.name].ifindex if p.name in self.attached else 0,
                       "note": self.port_notes.get(p.name, "")}
                      for p in self.state.sorted("ports")],
            "flows": flows, "flow_capacity": self.cfg.datapath.flow_table_size,
            "rules": len(self.state.rules),
        }

    def list(self, kind: str, tenant: Optional[str] = None) -> List[Dict[str, Any]]:
        if kind not in model.KINDS:
            raise model.Invalid("list", f"unknown kind {kind!r}")
        items = self.state.sorted(kind)
        if tenant is not None:
            if kind == "tenants":
                items = [t for t in items if t.name == tenant]
            else:
                items = [o for o in items if o.tenant == tenant]
        out = [o.to_dict() for o in items]
        if kind == "rules":
            hits = self.dp.rule_hits()
            for d in out:
                d["hits"] = hits.get(d["id"], 0)
        return out

    def add(self, kind: str, obj: Dict[str, Any]) -> Dict[str, Any]:
        typ = model.KINDS.get(kind)
        if typ is None:
            raise model.Invalid("add", f"unknown kind {kind!r}")
        item = typ.from_dict(obj)
        self._commit(self.state.with_added(kind, item))
        return item.to_dict()

    def delete(self, kind: str, ident) -> None:
        if kind not in model.KINDS:
            raise model.Invalid("delete", f"unknown kind {kind!r}")
        self._commit(self.state.with_removed(kind, tuple(ident)))

    def apply(self, state: Dict[str, Any], dry_run: bool) -> Dict[str, Any]:
        new = model.State.from_dict(state)
        new.validate()
        # Compile before anything is written: a state the datapath cannot hold (too many
        # masks) is refused whole.
        compiler.compile_state(new, {}, self.cfg.datapath.max_masks)
        d = model.diff(self.state, new)
        if not dry_run and any(v for k in d.values() for v in k.values()):
            self._commit(new)
        return d

    def _names(self):
        tenants = {t.id: t.name for t in self.state.tenants}
        slots = {slot: name for name, slot in self.store.port_slots().items()}
        port_tenant = {p.name: p.tenant for p in self.state.ports}
        return tenants, slots, port_tenant

    def flow_dump(self, tenant: Optional[str] = None, limit: int = 1000) -> List[Dict[str, Any]]:
        tenants, slots, _ = self._names()
        tid = self._tenant_id(tenant) if tenant else None
        now = now_coarse_ns()
        out = []
        for k, f in self.dp.flows():
            if tid is not None and k.tenant != tid:
                continue
            out.append(flow_dict(k, f, tenants, slots, now, self.dp.generation(k.tenant)))
            if limit and len(out) >= limit:
                break
        return out

    def top(self, tenant: Optional[str], by: str, limit: int) -> Dict[str, Any]:
        tenants, slots, _ = self._names()
        tid = self._tenant_id(tenant) if tenant else None
        now = now_coarse_ns()
        rows, sampled = self.rates.sample(self.dp.maps["xf_flows"], now, tid, by, limit)
        flows = []
        for kb, fb, pps, bps in rows:
            k, f = abi.FlowKey.from_buffer_copy(kb), abi.Flow.from_buffer_copy(fb)
            d = flow_dict(k, f, tenants, slots, now, self.dp.generation(k.tenant))
            d.update(pps=round(pps, 1), bps=round(bps * 8, 1))
            flows.append(d)
        return {"by": by, "sampled": sampled, "flows": flows}

    def add_rule_stats(self, rules: List[Dict[str, Any]]) -> None:
        """Each rule's hits and the wall-clock time of its last one (None: never hit)."""
        stats = self.dp.rule_stats()
        now, wall = now_coarse_ns(), time.time()
        for d in rules:
            hits, last = stats.get(d["id"], (0, 0))
            d["hits"] = hits
            d["last_hit"] = round(wall - (now - last) / 1e9, 3) if hits else None

    def flow_flush(self, tenant: Optional[str] = None) -> int:
        tid = self._tenant_id(tenant) if tenant else None
        n = self.dp.flush_flows(tid)
        self._evicted("flush", n)
        return n

    def _tenant_id(self, name: str) -> int:
        t = self.state.tenant(name)
        if t is None:
            raise model.Conflict(f"tenant {name}", "does not exist")
        return t.id

    def counter_rows(self) -> List[Dict[str, Any]]:
        _, slots, port_tenant = self._names()
        rows = []
        top = max(self.store.port_slots().values(), default=0)
        for slot, verdict, reason, packets, nbytes in self.dp.counters(max_slot=top):
            port = slots.get(slot, "" if slot == 0 else f"slot{slot}")
            rows.append({"tenant": port_tenant.get(port, ""), "port": port,
                         "verdict": abi.VERDICTS.get(verdict, str(verdict)),
                         "reason": abi.REASONS.get(reason, str(reason)),
                         "packets": packets, "bytes": nbytes})
        return rows

    def flow_summary(self, rows: List[Dict[str, Any]]) -> Dict[str, Any]:
        """Flow-table fill as of the last sweep, and insert failures from counter rows."""
        tenants, _, _ = self._names()
        return {"total": sum(self.flow_counts.values()),
                "capacity": self.cfg.datapath.flow_table_size,
                "by_tenant": {tenants.get(t, str(t)): n
                              for t, n in sorted(self.flow_counts.items())},
                "insert_failures": sum(r["packets"] for r in rows
                                       if r["reason"] == "insert_failed")}

    def stats(self) -> Dict[str, Any]:
        rows = self.counter_rows()
        return {
            "counters": rows,
            "flows": self.flow_summary(rows),
            "evictions": dict(self.evicted),
            "rule_hits": {str(k): v for k, v in sorted(self.dp.rule_hits().items())},
        }

    def trace(self, port: str, packet: bytes) -> Dict[str, Any]:
        if not any(p.name == port for p in self.state.ports):
            raise model.Conflict(f"port {port}", "is not a configured port")
        link = self.links.get(port) if self.links else None
        if link is None:
            raise model.Conflict(f"port {port}", "has no interface on this node")
        if len(packet) < 14:
            raise model.Invalid("packet", f"{len(packet)} bytes is shorter than an Ethernet "
                                          "header (14)")
        tenants, slots, _ = self._names()
        rc, out, rec = self.dp.trace(packet, link.ifindex)
        actions = {0: "aborted", 1: "drop", 2: "pass", 3: "tx", 4: "redirect"}
        return {
            "port": port, "action": actions.get(rc, str(rc)),
            "verdict": abi.VERDICTS.get(rec.verdict, str(rec.verdict)),
            "reason": abi.REASONS.get(rec.reason, str(rec.reason)),
            "tenant": tenants.get(rec.tenant, "") if rec.tenant else "",
            "rule": rec.rule_id or None,
            "out_port": slots.get(rec.out_port, "") if rec.out_port else "",
            "out_ifindex": rec.out_ifindex,
            "flow_hit": bool(rec.flow_hit), "stale_flow": bool(rec.stale),
            "packet_in": packet.hex(),
            "packet_out": out.hex() if rc in (3, 4) else packet.hex(),
            "modified": rc in (3, 4) and out != packet,
        }

    # -- flow aging -------------------------------------------------------------------------
    def _evicted(self, reason: str, n: int):
        if n:
            self.evicted[reason] = self.evicted.get(reason, 0) + n
            self.store.set_meta("evictions", ",".join(f"{k}={v}"
                                                      for k, v in self.evicted.items()))

    def sweep(self) -> Dict[str, int]:
        """Evict idle, closed and stale flows; keep the table under its high watermark.
        The two directions of a flow go together: a one-way stream keeps its reply entry
        as long as the forward one is busy. Works on the raw entries (a million of them
        are read every interval), unpacking only the fields it needs."""
        t0 = time.monotonic()
        aging = self.cfg.aging
        now = now_coarse_ns()
        limit_ns = {6: aging.tcp_established, 17: aging.udp, 1: aging.icmp, 58: aging.icmp}
        limit_ns = {p: v * 1_000_000_000 for p, v in limit_ns.items()}
        other_ns = aging.other * 1_000_000_000
        closed_ns = aging.tcp_closed * 1_000_000_000
        gens: Dict[int, int] = {}
        flows = dict(self.dp.maps["xf_flows"].items())
        counts: Dict[int, int] = {}
        evict: Dict[str, List[bytes]] = {r: [] for r in EVICTION_REASONS}
        seen = set()
        keep: List[Tuple[int, bytes, Optional[bytes]]] = []   # (last seen, key, pair key)
        for kb, fb in flows.items():
            if kb in seen:
                continue
            tenant, proto = _KEY_HEAD.unpack_from(kb)
            rkb = reverse_key_bytes(kb)
            pair = flows.get(rkb) if rkb is not None and rkb != kb else None
            last, gen, flags = _FLOW_AGE.unpack_from(fb, _AGE_AT)
            group = [kb]
            if pair is not None:
                group.append(rkb)
                seen.add(rkb)
                plast, pgen, pflags = _FLOW_AGE.unpack_from(pair, _AGE_AT)
                last, flags = max(last, plast), flags | pflags
                gen_ok = gen == pgen
            else:
                gen_ok = True
            cur = gens.get(tenant)
            if cur is None:
                cur = gens[tenant] = self.dp.generation(tenant)
            if not gen_ok or gen != cur or cur == 0:
                evict["rule_change"] += group
                continue
            if flags & abi.FLOW_CLOSING:
                limit, reason = closed_ns, "closed"
            else:
                limit, reason = limit_ns.get(proto, other_ns), "idle"
            if now - last > limit:
                evict[reason] += group
                continue
            keep.append((last, kb, rkb if pair is not None else None))
            counts[tenant] = counts.get(tenant, 0) + len(group)
        # Over the high watermark: the longest-idle flows go first.
        high = int(self.cfg.datapath.flow_table_size * aging.high_watermark)
        total = sum(counts.values())
        if total > high:
            # The oldest first; enough pairs to get under the mark (heap, not a full sort).
            oldest = heapq.nsmallest(total - high, keep)
            for last, kb, rkb in oldest:
                if total <= high:
                    break
                group = [kb] + ([rkb] if rkb else [])
                evict["table_full"] += group
                tenant = _KEY_HEAD.unpack_from(kb)[0]
                counts[tenant] -= len(group)
                total -= len(group)
        done = {}
        for reason, keys in evict.items():
            if keys:
                n = self.dp.maps["xf_flows"].delete_many(keys)
                self._evicted(reason, n)
                done[reason] = n
        self.flow_counts = {t: n for t, n in counts.items() if n}
        self.sweeps += 1
        self.last_sweep_seconds = time.monotonic() - t0
        self.sweep_seconds_total += self.last_sweep_seconds
        return done


# Raw views of the abi structs, offsets taken from the mirror (checked against the C).
_KEY_HEAD = struct.Struct("<HB")                                  # tenant, proto
_PORTS = struct.Struct("<HH")                                     # sport, dport
_PORTS_AT = abi.FlowKey.sport.offset
_AGE_AT = abi.Flow.last_seen_ns.offset
_FLOW_AGE = struct.Struct(                                        # last_seen, generation, flags
    f"<QI{abi.Flow.flags.offset - abi.Flow.generation.offset - 4}xB")
assert abi.Flow.generation.offset == _AGE_AT + 8
_REPLY_TYPE = {1: {8: 0, 0: 8}, 58: {128: 129, 129: 128}}


def reverse_key_bytes(kb: bytes) -> Optional[bytes]:
    """The reply direction's key, as the datapath makes it (bpf xf_reverse_key)."""
    proto = kb[2]
    sport, dport = _PORTS.unpack_from(kb, _PORTS_AT)
    if proto in (6, 17):
        ports = _PORTS.pack(dport, sport)
    else:
        t = _REPLY_TYPE.get(proto, {}).get(dport >> 8)
        if t is None:
            return None
        ports = _PORTS.pack(sport, t << 8)
    return kb[:4] + kb[20:36] + kb[4:20] + ports   # head, dst<->src, ports


def flow_dict(k: abi.FlowKey, f: abi.Flow, tenants: Dict[int, str], slots: Dict[int, str],
              now: int, generation: int) -> Dict[str, Any]:
    icmp = k.proto in (1, 58)
    flags = []
    if f.flags & abi.FLOW_REVERSE:
        flags.append("reply")
    if f.flags & abi.FLOW_CLOSING:
        flags.append("closing")
    if f.generation != generation:
        flags.append("stale")
    d = {
        "tenant": tenants.get(k.tenant, str(k.tenant)),
        "proto": PROTO_NAMES.get(k.proto, str(k.proto)),
        "src": str(abi.get_addr(k.src)), "dst": str(abi.get_addr(k.dst)),
        "sport": k.sport, "dport": k.dport,
        "verdict": abi.VERDICTS.get(f.verdict, str(f.verdict)),
        "in_port": slots.get(f.in_port, ""), "out_port": slots.get(f.out_port, ""),
        "rule": f.rule_id or None, "packets": f.packets, "bytes": f.bytes,
        "idle_s": round(max(0, now - f.last_seen_ns) / 1e9, 1),
        "age_s": round(max(0, now - f.created_ns) / 1e9, 1),
        "flags": ",".join(flags),
    }
    if icmp:
        d["icmp_type"], d["icmp_code"], d["icmp_id"] = k.dport >> 8, k.dport & 0xFF, k.sport
    return d


class MetricsSource:
    """What the Prometheus collector reads, taken under the controller's lock."""

    def __init__(self, controller: Controller, lock):
        self.c = controller
        self.lock = lock

    def counters(self):
        with self.lock:
            return [r for r in self.c.counter_rows() if r["verdict"] != "none"]

    def flow_summary(self):
        with self.lock:
            # Insert failures are event rows (verdict "none"), which counters() leaves out.
            events = [r for r in self.c.counter_rows() if r["reason"] == "insert_failed"]
            return self.c.flow_summary(events)

    def evictions(self):
        with self.lock:
            return dict(self.c.evicted)

    def tenants(self):
        with self.lock:
            st = self.c.state
            return [{"name": t.name, "id": t.id, "generation": self.c.dp.generation(t.id),
                     "rules": sum(1 for r in st.rules if r.tenant == t.name),
                     "endpoints": sum(1 for e in st.endpoints if e.tenant == t.name)}
                    for t in st.tenants]

    def ports(self):
        with self.lock:
            return [{"name": p.name, "tenant": p.tenant, "attached": p.name in self.c.attached,
                     "ifindex": self.c.attached[p.name].ifindex if p.name in self.c.attached else 0,
                     "mode": self.c.cfg.datapath.xdp_mode if p.name in self.c.attached else ""}
                    for p in self.c.state.ports]

    def monitor(self):
        return self.c.monitor.stats()

    def agent_info(self):
        with self.lock:
            return {"version": VERSION, "started_at": self.c.started_at,
                    "last_reconcile_seconds": self.c.last_reconcile_seconds,
                    "reconcile_errors": self.c.reconcile_errors, "sweeps": self.c.sweeps,
                    "sweep_seconds_total": self.c.sweep_seconds_total}
