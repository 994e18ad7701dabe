"""The controller: the one place that changes the node. It keeps the desired state (store)
and the datapath (maps, attached programs) in step: every change is validated, compiled,
written to SQLite and to the maps inside one transaction, and rolled back in both if either
fails. The API, reloads and link events all come through here, one at a time (the daemon's
lock). Flow aging is the sweeper's (agent/sweeper.py); the controller only reads what it
counted."""
from __future__ import annotations

import functools
import logging
import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import VERSION, abi, compiler, model
from .flows import flow_dict, now_coarse_ns
from .links import Link, LinkError, Links
from .monitor import Monitor
from .sweeper import Evictions, Sweeper
from .top import FlowRates

log = logging.getLogger("xdpflow.control")

# What one `flow dump` may return: a client pages with --tenant/--limit, and a reply of a
# million flows would be hundreds of megabytes of JSON built by the agent.
MAX_FLOW_DUMP = 100_000


def _locked(fn: Callable) -> Callable:
    """A reading command that takes the controller's lock for the whole (short) call."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kw):
        with self.lock:
            return fn(self, *args, **kw)
    return wrapper


class Controller:
    def __init__(self, cfg, store, datapath, links: Optional[Links], pass_fd: int = -1,
                 config_path: str = "", lock=None):
        self.cfg = cfg
        # Held by whoever changes the node (the API around a change, the daemon's loop);
        # reading commands hold it only while they take their snapshot.
        self.lock = lock or threading.RLock()
        self.store = store
        self.dp = datapath
        self.links = links
        self.pass_fd = pass_fd
        self.config_path = config_path
        self.state = store.load()
        self.started_at = time.time()
        self.last_reconcile_seconds = 0.0
        self.last_apply_seconds = 0.0     # the last change that reached store and maps
        self.reconcile_errors = 0
        self.evictions = Evictions(store)
        self.sweeper = Sweeper(cfg, datapath, self.evictions)
        self.attached: Dict[str, Link] = {}     # port name -> link with our program
        self.port_notes: Dict[str, str] = {}    # port name -> why it is not attached
        self._prog_id = 0
        self.monitor = Monitor(self)            # `monitor`'s event streams
        self.rates = FlowRates()                # `top`'s samples
        self.bpf_stats = None   # agent.bpfstats.BpfStats, set by the daemon

    # -- building the datapath image -----------------------------------------------------
    def _live_links(self, state: model.State) -> Dict[str, Link]:
        """The interfaces of the configured ports that exist now (one netlink query each)."""
        if self.links is None:
            return {}
        found = {p.name: self.links.get(p.name) for p in state.ports}
        return {name: link for name, link in found.items() if link is not None}

    def _check_slots(self, state: model.State, slots: Dict[str, int]) -> None:
        for p in state.ports:
            slot = slots.get(p.name, 0)
            if not 0 < slot < self.cfg.datapath.max_ports:
                raise model.Conflict(f"port {p.name}", f"slot {slot} is beyond datapath."
                                     f"max_ports={self.cfg.datapath.max_ports}")

    def _compile(self, state: model.State, slots: Dict[str, int],
                 live: Dict[str, Link]) -> compiler.Image:
        """The image for `state`: rules name ports by their stored slots (every configured
        port), forwarding entries exist only for ports whose interface is here now."""
        self._check_slots(state, slots)
        links = {p.name: compiler.PortLink(p.name, live[p.name].ifindex, live[p.name].mac,
                                           slots[p.name], live[p.name].addrs)
                 for p in state.ports if p.name in live}
        return compiler.compile_state(state, links, self.cfg.datapath.max_masks, slots=slots,
                                      max_entries=self.cfg.datapath.max_rule_entries)

    def planned_slots(self, state: model.State) -> Dict[str, int]:
        """The slots `state`'s ports would get: kept ones from the store, the smallest free
        ones for new ports (as the store hands them out). For a compile before commit."""
        have = self.store.port_slots()
        out = {p.name: have[p.name] for p in state.ports if p.name in have}
        used, nxt = set(out.values()), 1
        for p in state.sorted("ports"):
            if p.name not in out:
                while nxt in used:
                    nxt += 1
                out[p.name] = nxt
                used.add(nxt)
        return out

    def _program(self, state: model.State, slots: Dict[str, int]) -> Dict[str, Any]:
        live = self._live_links(state)
        img = self._compile(state, slots, live)
        # Off a removed port before its entry goes: our program never runs on an
        # interface it has no port for (it would hand the VM's traffic to the kernel).
        self._detach_removed(state)
        summary = self.dp.sync(img)
        self._attach_ports(state, live)
        return summary

    def _detach_removed(self, state: model.State) -> None:
        """Our program off every interface we no longer own."""
        wanted = {p.name for p in state.ports}
        for name in list(self.attached):
            if name not in wanted:
                link = self.links.get(name)
                if link is not None and link.xdp_prog_id == self.prog_id():
                    self.links.detach(link)
                    log.info("port %s: detached (no longer configured)", name)
                del self.attached[name]

    def _attach_ports(self, state: model.State, live: Dict[str, Link]):
        """Our program on every configured port whose interface exists (after its
        entries were written)."""
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

    def use_config(self, cfg) -> None:
        """A reload's config (same datapath sizes): timeouts, modes and limits from now on."""
        self.cfg = cfg
        self.sweeper.use(cfg, self.dp)

    def use_datapath(self, dp, cfg) -> Dict[str, Any]:
        """A rebuilt datapath (new sizes): program it from the stored state and move every
        port onto its program (one atomic replace each). The caller closes the old one."""
        self.dp, self.cfg = dp, cfg
        self.monitor.use(dp)
        self.sweeper.use(cfg, dp)
        self._prog_id = 0
        self.attached = {}
        return self.reconcile("datapath rebuilt")

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
        t0 = time.monotonic()
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
        self.last_apply_seconds = time.monotonic() - t0
        return summary

    # -- the API's commands ---------------------------------------------------------------
    @_locked
    def status(self) -> Dict[str, Any]:
        flows = sum(self.sweeper.flow_counts.values())
        return {
            "version": VERSION, "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "config": self.config_path, "pin_dir": self.dp.pin_dir,
            "program_id": self.prog_id(),
            "maps": [{"map": s.name, "action": s.action, "detail": s.detail}
                     for s in self.dp.pin_report],
            "tenants": self.tenant_rows(),
            "ports": self.port_rows(),
            "flows": flows, "flow_capacity": self.cfg.datapath.flow_table_size,
            "rules": len(self.state.rules),
            "bpf_stats": self._bpf_stats().describe(),
        }

    def _bpf_stats(self):
        if self.bpf_stats is None:
            from .bpfstats import BpfStats
            self.bpf_stats = BpfStats(False)
        return self.bpf_stats

    def map_pressure(self) -> Dict[str, Tuple[int, int]]:
        return self.dp.map_pressure(sum(self.sweeper.flow_counts.values()))

    def datapath_runs(self) -> Dict[str, int]:
        """The kernel's run time and count of the XDP program; {} while not enabled."""
        if not self._bpf_stats().enabled or self.dp.prog_fd < 0:
            return {}
        from .bpfstats import run_stats
        return run_stats(self.dp.prog_fd)

    def tenant_rows(self) -> List[Dict[str, Any]]:
        st = self.state
        return [{"name": t.name, "id": t.id, "generation": self.dp.generation(t.id),
                 "rules": sum(1 for r in st.rules if r.tenant == t.name),
                 "endpoints": sum(1 for e in st.endpoints if e.tenant == t.name)}
                for t in st.sorted("tenants")]

    def port_rows(self) -> List[Dict[str, Any]]:
        out = []
        for p in self.state.sorted("ports"):
            link = self.attached.get(p.name)
            out.append({"name": p.name, "tenant": p.tenant, "attached": link is not None,
                        "ifindex": link.ifindex if link else 0,
                        "mode": self.cfg.datapath.xdp_mode if link else "",
                        "note": self.port_notes.get(p.name, "")})
        return out

    def agent_info(self) -> Dict[str, Any]:
        sw = self.sweeper
        return {"version": VERSION, "started_at": self.started_at,
                "last_reconcile_seconds": self.last_reconcile_seconds,
                "last_apply_seconds": self.last_apply_seconds,
                "reconcile_errors": self.reconcile_errors, "sweeps": sw.sweeps,
                "sweep_seconds_total": sw.seconds_total}

    @_locked
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
            hits, counts = self.dp.rule_hits(), self.dp.rule_counters()
            for d in out:
                d["hits"] = hits.get(d["id"], 0)
                d["packets"], d["bytes"] = counts.get(d["id"], (0, 0))
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
        """A whole desired state, as a diff. A dry run holds the lock only to take the
        current state and slots; parsing, compiling (bounded by the datapath's sizes) and
        diffing a client's big state happen outside it."""
        new = model.State.from_dict(state)
        new.validate()
        with self.lock:
            cur, slots = self.state, self.planned_slots(new)
        # Compile before anything is written: a state the datapath cannot hold (too many
        # masks, entries or ports) is refused whole.
        self._compile(new, slots, {})
        if dry_run:
            return model.diff(cur, new)
        with self.lock:
            d = model.diff(self.state, new)
            if any(v for k in d.values() for v in k.values()):
                self._commit(new)
        return d

    def _names(self):
        tenants = {t.id: t.name for t in self.state.tenants}
        slots = {slot: name for name, slot in self.store.port_slots().items()}
        port_tenant = {p.name: p.tenant for p in self.state.ports}
        return tenants, slots, port_tenant

    def flow_dump(self, tenant: Optional[str] = None, limit: int = 1000) -> List[Dict[str, Any]]:
        """Up to `limit` flows (at most MAX_FLOW_DUMP), read from the map outside the lock."""
        if limit > MAX_FLOW_DUMP:
            raise model.Invalid("flow dump: limit", f"{limit} is more than one reply holds "
                                f"(at most {MAX_FLOW_DUMP}; use --tenant to narrow it)")
        with self.lock:
            tenants, slots, _ = self._names()
            tid = self._tenant_id(tenant) if tenant else None
            dp = self.dp
            gens = {t: dp.generation(t) for t in tenants}
        now = now_coarse_ns()
        out = []
        for k, f in dp.flows():
            if tid is not None and k.tenant != tid:
                continue
            out.append(flow_dict(k, f, tenants, slots, now, gens.get(k.tenant, 0)))
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
        """The wall-clock time of each rule's last hit, a flow set up or a packet judged
        (None: never)."""
        stats = self.dp.rule_stats()
        now, wall = now_coarse_ns(), time.time()
        for d in rules:
            hits, last = stats.get(d["id"], (0, 0))
            d["last_hit"] = round(wall - (now - last) / 1e9, 3) if hits else None

    def flow_flush(self, tenant: Optional[str] = None) -> int:
        tid = self._tenant_id(tenant) if tenant else None
        n = self.dp.flush_flows(tid)
        self.evictions.add("flush", n)
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
        counts = self.sweeper.flow_counts
        return {"total": sum(counts.values()),
                "capacity": self.cfg.datapath.flow_table_size,
                "by_tenant": {tenants.get(t, str(t)): n for t, n in sorted(counts.items())},
                "insert_failures": sum(r["packets"] for r in rows
                                       if r["reason"] == "insert_failed")}

    @_locked
    def stats(self) -> Dict[str, Any]:
        rows = self.counter_rows()
        return {
            "counters": rows,
            "flows": self.flow_summary(rows),
            "evictions": self.evictions.as_dict(),
            "rule_hits": {str(k): v for k, v in sorted(self.dp.rule_hits().items())},
            "rule_counters": {str(k): {"packets": p, "bytes": b}
                              for k, (p, b) in sorted(self.dp.rule_counters().items())},
            "port_tx": self.port_tx_rows(),
        }

    def port_tx_rows(self) -> List[Dict[str, Any]]:
        """What each port transmitted on redirect (per VM, its receive)."""
        _, slots, port_tenant = self._names()
        tx = self.dp.port_tx(set(slots))
        return [{"tenant": port_tenant.get(port, ""), "port": port, "packets": p, "bytes": b}
                for slot, (p, b) in sorted(tx.items()) for port in [slots[slot]]]

    @_locked
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

