"""The controller: the one place that changes the node. It keeps the desired state (store)
and the datapath (maps, attached programs) in step: every change is validated, compiled,
written to SQLite and to the maps inside one transaction, and rolled back in both if either
fails. The API, reloads and link events all come through here, one at a time (the daemon's
lock). Flow aging is the sweeper's (agent/sweeper.py); the controller only reads what it
counted."""
from __future__ import annotations

import ctypes as ct
import functools
import hashlib
import heapq
import ipaddress
import logging
import os
import platform
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from . import VERSION, abi, compiler, digest, model
from .bulk import no_collector_passes
from .commands import MAX_FLOW_DUMP
from .flows import flow_dict, now_coarse_ns
from .monitor import Monitor
from .store import change_rows as store_change_rows, changes as store_changes
from .storewriter import Writer
from .sweeper import Evictions, Sweeper
from .top import FlowRates

if TYPE_CHECKING:       # pyroute2 (agent.links) is imported once netlink is needed
    from .links import Link, Links

log = logging.getLogger("xdpflow.control")


def _locked(fn: Callable) -> Callable:
    """A reading command that takes the controller's lock for the whole (short) call."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kw):
        with self.lock:
            return fn(self, *args, **kw)
    return wrapper


# A change of at least this many objects has its store rows written by the store writer
# process (agent/storewriter.py) while this one compiles and writes the maps.
WRITER_ABOVE = 1000


def _size(changes: Dict[str, Tuple[list, list, list]]) -> int:
    """Objects a change adds, removes and changes."""
    return sum(len(x) for parts in changes.values() for x in parts)


class Controller:
    def __init__(self, cfg, store, datapath, links: Optional[Links], pass_fd: int = -1,
                 config_path: str = "", lock=None, load: bool = True):
        """`load=False`: the stored state is loaded later, by load_state() (a warm start
        answers before it; see `startup`)."""
        self.cfg = cfg
        # Held by whoever changes the node (the API around a change, the daemon's loop);
        # reading commands hold it only while they take their snapshot.
        self.lock = lock or threading.RLock()
        self.store = store
        self.dp = datapath
        self.links = links
        self.pass_fd = pass_fd
        self.config_path = config_path
        # Of the config as loaded (the daemon sets it again on reload).
        self.config_sha256 = file_sha256(config_path) if config_path else ""
        self.state, rows = store.load_with_digest() if load else (model.State(), None)
        # A warm start's progress (status shows it until done): the state loaded, then
        # checked against the maps (the pinned digest, or a reconcile).
        self.startup: Dict[str, Any] = {"done": load, "phase": "" if load else "loading state",
                                        "reconcile": "", "seconds": 0.0}
        self._rows = rows       # digest.rows_digest(self.state), when known
        self._context = None    # digest.context of what the maps were last programmed from
        self.started_at = time.time()
        self.last_reconcile_seconds = 0.0
        self.last_apply_seconds = 0.0     # the last change that reached store and maps
        self.reconcile_errors = 0
        self.evictions = Evictions(store)
        self.sweeper = Sweeper(cfg, datapath, self.evictions)
        self.attached: Dict[str, Link] = {}     # port name -> link with our program
        self.port_notes: Dict[str, str] = {}    # port name -> why it is not attached
        self._prog_id = 0
        # Histograms of reconcile and change durations (agent.metrics.Timings); the daemon
        # shares one with the API server, tests may leave it out.
        self.timings = None
        last = store.get_meta("last_change")
        self.last_change = float(last) if last else 0.0
        self.monitor = Monitor(self)            # `monitor`'s event streams
        self.rates = FlowRates()                # `top`'s samples
        self.bpf_stats = None   # agent.bpfstats.BpfStats, set by the daemon
        self.writer = Writer(store)

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
                 live: Dict[str, Link], keep: Tuple[str, ...] = (),
                 neighbours: Optional[Dict[str, str]] = None) -> compiler.Image:
        """The image for `state`: rules name ports by their stored slots (every configured
        port), forwarding entries exist only for ports whose interface is here now.
        Tenants in `keep` have the rules the datapath holds: their classifier is taken
        from it, not compiled again."""
        self._check_slots(state, slots)
        links = self._port_links(state, slots, live)
        held: Dict[str, compiler.Classifier] = {}
        for t in state.tenants:
            cls = self.dp.classifier(t.id) if t.name in keep else None
            if cls is not None:
                held[t.name] = cls
        if neighbours is None:
            neighbours = self._neighbours(state)
        # Every state programmed here is validated: self.state always is, a change's new
        # state is checked before _commit (State.with_added/with_removed, apply) or in it.
        return compiler.compile_state(state, links, self.cfg.datapath.max_masks, slots=slots,
                                      max_entries=self.cfg.datapath.max_rule_entries,
                                      classifiers=held, neighbours=neighbours,
                                      max_flows=self.cfg.flows.max_per_tenant, validated=True)

    @staticmethod
    def _port_links(state: model.State, slots: Dict[str, int],
                    live: Dict[str, Link]) -> Dict[str, compiler.PortLink]:
        return {p.name: compiler.PortLink(p.name, live[p.name].ifindex, live[p.name].mac,
                                          slots[p.name], live[p.name].addrs, live[p.name].mtu)
                for p in state.ports if p.name in live}

    def _neighbours(self, state: model.State) -> Dict[str, str]:
        vteps = {str(e.vtep) for e in state.endpoints if e.vtep is not None}
        return self.links.neighbours(vteps) if self.links and vteps else {}

    def _image_context(self, state: model.State, slots: Dict[str, int],
                       live: Dict[str, Link], neighbours: Dict[str, str]) -> bytes:
        """digest.context of programming `state` with these interfaces, now."""
        self._check_slots(state, slots)
        d = self.cfg.datapath
        return digest.context(self.dp.build, slots,
                              self._port_links(state, slots, live).values(), neighbours,
                              (("max_masks", d.max_masks), ("max_entries", d.max_rule_entries),
                               ("max_flows", self.cfg.flows.max_per_tenant)))

    def _rows_now(self) -> int:
        """The rows digest of the current state (hashed whole when not known: after a
        big change, see digest.MAX_CHANGED_ROWS)."""
        if self._rows is None:
            self._rows = digest.rows_digest(self.state)
        return self._rows

    def _record_digest(self, rows: Optional[int]) -> None:
        """Pin the digest of the image just programmed (after its last map write, before
        the store commits: see agent/digest.py for the crash order); rows None: not
        known, the digest stays cleared."""
        if self._context is not None and rows is not None:
            self.dp.record_digest(digest.image(rows, self._context, self.dp.maps_summary()))

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

    def _program(self, state: model.State, slots: Dict[str, int],
                 keep: Tuple[str, ...] = ()) -> Dict[str, Any]:
        live = self._live_links(state)
        neighbours = self._neighbours(state)
        img = self._compile(state, slots, live, keep, neighbours)
        # Off a removed port before its entry goes: our program never runs on an
        # interface it has no port for (it would hand the VM's traffic to the kernel).
        self._detach_removed(state)
        self._context = None
        summary = self.dp.sync(img)
        self._context = self._image_context(state, slots, live, neighbours)
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
        from .links import LinkError
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
            rows = self._rows_now()
            self.dp.forget_digest()
            summary = self._program(self.state, self.store.port_slots())
            self._record_digest(rows)
        except Exception:
            self.reconcile_errors += 1
            raise
        finally:
            self.last_reconcile_seconds = time.monotonic() - t0
        if self.timings is not None:
            self.timings.observe("reconcile", self.last_reconcile_seconds)
        if summary.get("flipped") or reason == "start":
            log.info("reconciled (%s) in %.3fs: %s", reason or "request",
                     self.last_reconcile_seconds, describe_summary(summary))
        return summary

    def _commit(self, new: model.State,
                changes: Optional[Dict[str, Tuple[list, list, list]]] = None) -> Dict[str, Any]:
        """Store and datapath both get `new`, or neither does. `changes`: what differs
        from the current state ({kind: (added, removed, changed)}), given by a caller
        that made `new` by one checked change (one rule); otherwise `new` is validated
        and diffed whole.

        Order, so that the store and the maps agree after a crash at any point: the
        store's transaction is opened and written (not committed), the maps are changed,
        then the transaction commits. A crash before the commit leaves the old state
        stored and the maps partly or wholly changed: the next agent's start-up reconcile
        compiles the stored state and rewrites whatever differs (a tenant whose
        classifier differs in any entry gets it whole under a new generation). A crash
        after the commit leaves both new. The store is the truth; the maps follow it."""
        t0 = time.monotonic()
        old = self.state
        if changes is None:
            new.validate()
            changes = store_changes(old, new)
        old_slots = self.store.port_slots()
        old_rows = self._rows
        new_rows = digest.changed_rows(old_rows, old, changes)
        # Recorded with the change, in its transaction.
        when = time.time()
        meta = {"last_change": repr(when)}
        # In both ways below, the pinned digest goes before the first map write, the new
        # one comes after the last, the store commits last (agent/digest.py).
        size = _size(changes)
        try:
            if size >= WRITER_ABOVE and "ports" not in changes:
                # No port added or removed: the slots are the stored ones. The store's
                # rows go to the writer process first and are written there while the
                # maps are (both wait for the commit, as in the order above).
                with self.writer.transaction(store_change_rows(changes), meta):
                    self.dp.forget_digest()
                    summary = self._program_change(old, new, old_slots, changes)
                    self._record_digest(new_rows)
                log.info("a change of %d objects stored and programmed in %.3fs (%.3fs of "
                         "it waiting for the store writer at the end)", size,
                         time.monotonic() - t0, self.writer.last_wait)
            else:
                with self.store.transaction() as tx:
                    self.dp.forget_digest()
                    tx.write_changes(changes, meta)
                    slots = self.store.port_slots()
                    for name, slot in slots.items():
                        if old_slots.get(name) != slot:
                            self.dp.clear_counters(slot)   # a reused slot starts from zero
                    summary = self._program_change(old, new, slots, changes)
                    self._record_digest(new_rows)
        except Exception:
            # The store rolled back; put the maps back as the old state wants them.
            try:
                self._program(old, old_slots)
                self._record_digest(old_rows)
            except Exception:
                log.exception("restoring the datapath after a failed change")
                self.reconcile_errors += 1
            raise
        self.state, self._rows = new, new_rows
        self.last_change = when
        self.last_apply_seconds = time.monotonic() - t0
        if self.timings is not None:
            self.timings.observe("apply", self.last_apply_seconds)
        return summary

    def _program_change(self, old: model.State, new: model.State, slots: Dict[str, int],
                        changes: Dict[str, Tuple[list, list, list]]) -> Dict[str, Any]:
        """Program the datapath for a change from `old` to `new`, touching what it
        affects: one rule (added, removed or replaced) is written in place under the
        tenant's classifier generation; anything else compiles the whole image but
        takes the classifier of every tenant whose rules did not change from the
        datapath, so only tenants with changed rules get a new classifier generation
        (written whole, then flipped to: a whole-state apply's atomicity), and tenants
        whose endpoints, routes or ports changed a new flow generation."""
        added, removed, changed = changes.get("rules", ([], [], []))
        by_id = old.rule_index() if changed else {}
        before = removed + [by_id[r.id] for r in changed]
        after = added + changed
        touched = {r.tenant for r in before + after}
        # A rate-limited rule also needs its bucket written first: the whole image does
        # that (xf_policers before the entries that name it).
        if set(changes) == {"rules"} and len(added) + len(removed) + len(changed) == 1 \
                and all(r.rate is None for r in before + after):
            (tenant,) = touched
            tid = new.tenant(tenant).id
            if self.dp.classifier(tid) is None and getattr(old.tenant(tenant), "id", 0) == tid:
                # After a start that trusted the pinned digest: compiled once, compared.
                self.dp.hold(tid, compiler.compile_rules(
                    tenant, [r for r in old.rules if r.tenant == tenant], slots,
                    self.cfg.datapath.max_masks))
            try:
                return self.dp.change_rules(tid, before, after, slots, tenant)
            except LookupError:
                pass            # not held by this process: the whole image below
        # The datapath holds `old`'s classifiers: a tenant new to `old` (or given another
        # id) is compiled, whatever a datapath programmed by someone else may hold.
        was = {t.name: t.id for t in old.tenants}
        keep = tuple(t.name for t in new.tenants
                     if t.name not in touched and was.get(t.name) == t.id)
        return self._program(new, slots, keep)

    # -- start-up -------------------------------------------------------------------------
    def load_state(self, loaded: Optional[Tuple[model.State, int]] = None) -> None:
        """The stored state, every row checked (a warm start's, after it answers); or
        `loaded`, what store.load_with_digest() gave (a cold start's, read while the
        datapath compiles)."""
        self.state, self._rows = loaded or self.store.load_with_digest()

    def check_start(self) -> str:
        """At start, with the maps adopted: when the pinned digest equals the digest of
        the stored state, the interfaces and sizes now and the maps as read, the maps hold
        the stored state's image and nothing is compiled or compared; otherwise (no
        digest: a change died while writing, a first start of this version; a different
        one: the store, an interface or the maps changed) a reconcile compiles the image
        and rewrites whatever differs. Returns what it did, in words."""
        t0 = time.monotonic()
        state = self.state
        slots = self.store.port_slots()
        live = self._live_links(state)
        have = self.dp.pinned_digest()
        try:
            ctx = self._image_context(state, slots, live, self._neighbours(state))
        except model.Invalid:
            ctx = None              # the reconcile below names what is wrong
        if have is not None and ctx is not None and have == digest.image(
                self._rows_now(), ctx, self.dp.maps_summary()):
            self._context = ctx
            self._attach_ports(state, live)     # programs found attached: only noted
            self.last_reconcile_seconds = time.monotonic() - t0
            log.info("start: the pinned digest matches the stored state (%d rules), the "
                     "interfaces and the maps: nothing compiled or compared (%.3fs)",
                     len(state.rules), self.last_reconcile_seconds)
            return "skipped: the pinned digest matches"
        why = "no pinned digest" if have is None else "the pinned digest differs"
        log.info("start: %s: compiling the stored state and comparing it with the maps", why)
        self.reconcile("start")
        return f"reconciled: {why}"

    def start_done(self, how: str, seconds: float) -> None:
        self.startup = {"done": True, "phase": "", "reconcile": how,
                        "seconds": round(seconds, 3)}

    # -- the API's commands ---------------------------------------------------------------
    def status(self) -> Dict[str, Any]:
        """Answered during a warm start's loading too, without the lock (the start-up
        holds it): then only what is known before the state ("startup" says how far)."""
        if not self.startup["done"]:
            return {**self._status_head(), "startup": dict(self.startup)}
        with self.lock:
            return {**self._status_head(), **self._status_state(),
                    "startup": dict(self.startup)}

    def _status_head(self) -> Dict[str, Any]:
        return {
            "version": VERSION, "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "config": self.config_path, "pin_dir": self.dp.pin_dir,
            "program_id": self.prog_id(),
            # adopted: a warm start took the pinned program (nothing compiled)
            "program": {"how": self.dp.how, "build_id": f"{self.dp.build:016x}",
                        "load_seconds": round(self.dp.load_seconds, 3)},
            "maps": [{"map": s.name, "action": s.action, "detail": s.detail}
                     for s in self.dp.pin_report],
        }

    def _status_state(self) -> Dict[str, Any]:
        flows = sum(self.sweeper.flow_counts.values())
        return {
            "tenants": self.tenant_rows(),
            "ports": self.port_rows(),
            "flows": flows, "flow_capacity": self.cfg.datapath.flow_table_size,
            "rules": len(self.state.rules),
            "bpf_stats": self._bpf_stats().describe(),
            "trace_program": "built" if self.dp.trace_fd >= 0 else "not built",
            # local_writes: big changes the agent wrote itself (its writer would not
            # start, died or hung)
            "store_writer": {"pid": self.writer.pid, "started": self.writer.started,
                             "local_writes": self.writer.local_writes,
                             "last_wait_s": round(self.writer.last_wait, 3)},
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

    def port_status(self, name: str) -> Dict[str, Any]:
        """What became of a configured port: attached (and how), waiting for its interface,
        or failed (and why)."""
        link = self.attached.get(name)
        note = self.port_notes.get(name, "")
        if link is not None:
            state = "attached"
        elif note == "interface missing":
            state, note = "waiting", "no such interface yet; attached when it appears"
        else:
            state = "failed"
            note = note[len(name) + 2:] if note.startswith(name + ": ") else note
        return {"attached": link is not None, "state": state,
                "mode": (link.xdp_mode or self.cfg.datapath.xdp_mode) if link else "",
                "ifindex": link.ifindex if link else 0, "note": note}

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
            out.append({"name": p.name, "tenant": p.tenant or "", "attached": link is not None,
                        "ifindex": link.ifindex if link else 0,
                        "mode": self.cfg.datapath.xdp_mode if link else "",
                        "note": self.port_notes.get(p.name, "")})
            if p.uplink:        # a tenant port's row is as it was before uplinks
                out[-1]["uplink"] = True
        return out

    def agent_info(self) -> Dict[str, Any]:
        sw = self.sweeper
        return {"version": VERSION, "started_at": self.started_at,
                "last_reconcile_seconds": self.last_reconcile_seconds,
                "last_apply_seconds": self.last_apply_seconds,
                "reconcile_errors": self.reconcile_errors, "sweeps": sw.sweeps,
                "sweep_seconds_total": sw.seconds_total,
                "program_id": self.prog_id(), "kernel": platform.release(),
                "config_sha256": self.config_sha256, "last_change": self.last_change}

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
        if kind == "ports":
            for d in out:
                d.update(self.port_status(d["name"]))   # after the fields the model has
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
        new = self.state.with_added(kind, item)
        # One rule: checked on its own as it was added, and its change known.
        self._commit(new, {"rules": ([item], [], [])} if kind == "rules" else None)
        out = item.to_dict()
        if kind == "ports":
            out.update(self.port_status(item.name))
        return out

    def delete(self, kind: str, ident, cascade: bool = False) -> Dict[str, int]:
        """Delete one object; returns what a cascade took with it ({kind: count})."""
        if kind not in model.KINDS:
            raise model.Invalid("delete", f"unknown kind {kind!r}")
        if kind == "tenants":
            name = tuple(ident)[0]
            gone = self.state.users_of_tenant(name) if cascade else {}
            self._commit(self.state.without_tenant(name, cascade))
            return gone
        ident = tuple(ident)
        gone = self.state.rule_index().get(ident[0]) if kind == "rules" else None
        new = self.state.with_removed(kind, ident)
        self._commit(new, None if gone is None else {"rules": ([], [gone], [])})
        return {}

    def apply(self, state: Dict[str, Any], dry_run: bool, prune: bool = False,
              diff_limit: Optional[int] = None, no_duplicates: bool = False
              ) -> Dict[str, Any]:
        """A desired state, as a diff. With `prune` it is the whole state (objects it does
        not name are removed); without, objects it does not name are kept and listed under
        "keep". Parsing and checking a client's big state happen outside the lock; a dry
        run holds it only to take the current state and slots (its compile, bounded by
        the datapath's sizes, and diff are outside too). `diff_limit`: model.diff's
        `limit`; `no_duplicates`: State.from_apply's."""
        with no_collector_passes():
            return self._apply(state, dry_run, prune, diff_limit, no_duplicates)

    def _apply(self, state: Dict[str, Any], dry_run: bool, prune: bool,
               diff_limit: Optional[int], no_duplicates: bool) -> Dict[str, Any]:
        rules = state.get("rules") if isinstance(state, dict) else None
        if not dry_run and isinstance(rules, list) and len(rules) >= WRITER_ABOVE:
            with self.lock:     # its start-up overlaps the building below
                self.writer.start()
        given = model.State.from_apply(state, no_duplicates)
        kept = None if prune else given
        with self.lock:
            cur = self.state
        new = given if prune else cur.merged(given)
        new.validate()
        if dry_run:
            with self.lock:
                slots = self.planned_slots(new)
            # A state the datapath cannot hold (too many masks, entries or ports) is
            # refused by the dry run as by the apply.
            self._compile(new, slots, {})
            return model.diff(cur, new, kept=kept, limit=diff_limit)
        with self.lock:
            if self.state is not cur and not prune:
                # Changed meanwhile: keep what the file does not name as it is now.
                new = self.state.merged(given)
                new.validate()
            d = model.diff(self.state, new, kept=kept, limit=diff_limit)
            if model.count_changes(d):
                # `new` is validated above (either way): _commit need not again. It
                # compiles the changed tenants while a big change's store rows are
                # written (a thread: SQLite leaves the GIL), before any map write: a
                # state the datapath cannot hold is refused whole, nothing written.
                self._commit(new, store_changes(self.state, new))
        return d

    def _names(self):
        tenants = {t.id: t.name for t in self.state.tenants}
        slots = {slot: name for name, slot in self.store.port_slots().items()}
        port_tenant = {p.name: p.tenant or "" for p in self.state.ports}   # "": an uplink
        return tenants, slots, port_tenant

    def flow_dump(self, tenant: Optional[str] = None, limit: int = 1000,
                  port: Optional[str] = None, proto: Optional[int] = None,
                  ip=None, cursor: Optional[str] = None):
        """The first `limit` (at most MAX_FLOW_DUMP) flows, sorted (tenant, protocol,
        addresses, ports), of those that match every filter given: tenant, port (in or
        out), protocol number, address (source or destination). Read outside the lock.
        With `cursor` ("start", or a page's next_cursor) a page: {"flows": the `limit`
        flows after the cursor, "next_cursor": where the next page starts, or None}. Each
        page streams the table and holds `limit` rows, whatever the table's size."""
        after = parse_flow_cursor(cursor) if cursor is not None else None
        if limit > MAX_FLOW_DUMP:
            raise model.Invalid("flow dump: limit", f"{limit} is more than one reply holds "
                                f"(at most {MAX_FLOW_DUMP}; use --tenant to narrow it)")
        with self.lock:
            tenants, slots, _ = self._names()
            tid = self._tenant_id(tenant) if tenant else None
            if port is not None and not any(p.name == port for p in self.state.ports):
                raise model.Conflict(f"port {port}", "is not a configured port")
            dp = self.dp
            gens = {t: dp.generation(t) for t in tenants}
        now = now_coarse_ns()

        def matching():
            for k, f in dp.flows():
                # NAT's external-side entries are their VM tenant's (f.vni).
                owner = f.vni if f.flags & abi.FLOW_DNAT else k.tenant
                if tid is not None and owner != tid:
                    continue
                if proto is not None and k.proto != proto:
                    continue
                d = flow_dict(k, f, tenants, slots, now, gens.get(owner, 0))
                if port is not None and port not in (d["in_port"], d["out_port"]):
                    continue
                if ip is not None and str(ip) not in (d["src"], d["dst"]):
                    continue
                if after is not None and flow_order(d) <= after:
                    continue
                yield d

        # Only `limit` rows are ever held, whatever the table's size.
        if cursor is None:
            return heapq.nsmallest(limit, matching(), key=flow_order)
        rows = heapq.nsmallest(limit + 1, matching(), key=flow_order)
        more = len(rows) > limit
        return {"flows": rows[:limit],
                "next_cursor": flow_cursor(rows[limit - 1]) if more else None}

    def top(self, tenant: Optional[str], by: str, limit: int) -> Dict[str, Any]:
        with self.lock:     # names of the loaded state (a warm start loads it behind the lock)
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
        """Flow-table fill as of the last sweep; insert failures and quota refusals (by
        tenant) from counter rows."""
        tenants, _, _ = self._names()
        counts = self.sweeper.flow_counts
        # Every tenant at 0 until it is refused, so rate() and the quota alert work from
        # the first scrape.
        refused: Dict[str, int] = {t.name: 0 for t in self.state.tenants}
        for r in rows:
            if r["reason"] == "flow_quota":
                refused[r["tenant"]] = refused.get(r["tenant"], 0) + r["packets"]
        return {"total": sum(counts.values()),
                "capacity": self.cfg.datapath.flow_table_size,
                "by_tenant": {tenants.get(t, str(t)): n for t, n in sorted(counts.items())},
                "insert_failures": sum(r["packets"] for r in rows
                                       if r["reason"] == "insert_failed"),
                "quota_refusals": refused}

    @_locked
    def stats(self, tenant: Optional[str] = None) -> Dict[str, Any]:
        rows = self.counter_rows()
        out = {
            "counters": rows,
            "flows": self.flow_summary(rows),
            "evictions": self.evictions.as_dict(),
            "rule_hits": {str(k): v for k, v in sorted(self.dp.rule_hits().items())},
            "rule_counters": {str(k): {"packets": p, "bytes": b}
                              for k, (p, b) in sorted(self.dp.rule_counters().items())},
            "port_tx": self.port_tx_rows(),
        }
        if tenant is not None:
            # Counters, flows and rule hits of one tenant; evictions are node-wide.
            self._tenant_id(tenant)
            ids = {str(r.id) for r in self.state.rules if r.tenant == tenant}
            out["counters"] = [r for r in rows if r["tenant"] == tenant]
            fl = out["flows"]
            fl["by_tenant"] = {t: n for t, n in fl["by_tenant"].items() if t == tenant}
            fl["insert_failures"] = sum(r["packets"] for r in out["counters"]
                                        if r["reason"] == "insert_failed")
            out["rule_hits"] = {k: v for k, v in out["rule_hits"].items() if k in ids}
        return out

    def rule_counter_rows(self) -> List[Dict[str, Any]]:
        """Packets and bytes per configured rule (0 until it matches), with its tenant."""
        counts = self.dp.rule_counters()
        return [{"tenant": r.tenant, "rule": r.id, "packets": counts.get(r.id, (0, 0))[0],
                 "bytes": counts.get(r.id, (0, 0))[1]} for r in self.state.rules]

    def nat_rows(self) -> List[Dict[str, Any]]:
        """NAT per tenant that has some: packets translated by kind (fip, snat) and
        direction (in: from the external network), and new SNAT flows refused for want of
        a port ("exhausted"); 0 until they happen."""
        counts = self.dp.nat_counters()
        rows = []
        for t in self.state.sorted("tenants"):
            kinds = ({"fip"} if any(f.tenant == t.name for f in self.state.fips) else set()) | \
                ({"snat"} if any(n.tenant == t.name for n in self.state.snats) else set())
            for kid, (kind, direction) in abi.NAT_KINDS.items():
                if kind in kinds:
                    rows.append({"tenant": t.name, "kind": kind, "direction": direction,
                                 "packets": counts.get((t.id, kid), (0, 0))[0]})
            if "snat" in kinds:
                rows.append({"tenant": t.name, "kind": "snat", "direction": "exhausted",
                             "packets": counts.get((t.id, abi.NATC_EXHAUSTED), (0, 0))[0]})
        return rows

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
        building = self.dp.trace_fd < 0
        t0 = time.monotonic()
        rc, out, rec = self.dp.trace(packet, link.ifindex)
        actions = {0: "aborted", 1: "drop", 2: "pass", 3: "tx", 4: "redirect"}
        tenant = tenants.get(rec.tenant, "") if rec.tenant else ""
        # Through an uplink, a packet with a tenant was decapsulated: its route is the
        # inner packet's.
        uplink = any(p.uplink and p.name == port for p in self.state.ports)
        decap = bool(uplink and tenant and not rec.nat_flags & abi.FLOW_DNAT)
        inner = packet[abi.ENCAP_LEN:] if decap else packet
        return {
            # The first trace builds the trace program (seconds); later ones reuse it.
            "built_trace_program": building,
            "seconds": round(time.monotonic() - t0, 3),
            "route": route_for(self.state, tenant, inner) if rec.reason in _ROUTED else None,
            "decapsulated": decap,
            "nat": trace_nat(rec, packet),
            "port": port, "action": actions.get(rc, str(rc)),
            "verdict": abi.VERDICTS.get(rec.verdict, str(rec.verdict)),
            "reason": abi.REASONS.get(rec.reason, str(rec.reason)),
            "tenant": tenants.get(rec.tenant, "") if rec.tenant else "",
            "rule": rec.rule_id or None,
            "out_port": slots.get(rec.out_port, "") if rec.out_port else "",
            "out_ifindex": rec.out_ifindex,
            "flow_hit": bool(rec.flow_hit), "stale_flow": bool(rec.stale),
            "packet_in": packet.hex(),
            # A dropped packet goes nowhere; a passed one goes to the kernel unchanged.
            "packet_out": out.hex() if rc in (3, 4) else packet.hex() if rc == 2 else None,
            "modified": rc in (3, 4) and out != packet,
            "rate_limits": trace_buckets(self.state, rec, len(packet)),
        }


def trace_nat(rec, packet: bytes) -> Optional[Dict[str, Any]]:
    """The translation a traced packet got: a floating IP's or a SNAT's, in (from the
    external network: its destination) or out (its source), the address and port before
    (the input's) and after (a SNAT port as the datapath allocated it); None if none."""
    if not rec.nat_flags & (abi.FLOW_SNAT | abi.FLOW_DNAT):
        return None
    dnat = bool(rec.nat_flags & abi.FLOW_DNAT)
    before = None
    if len(packet) >= 34 and packet[12:14] == b"\x08\x00":
        l4 = 14 + (packet[14] & 0x0F) * 4
        addr = ipaddress.IPv4Address(packet[30:34] if dnat else packet[26:30])
        at = l4 + 4 if packet[23] == 1 else l4 + (2 if dnat else 0)
        port = int.from_bytes(packet[at:at + 2], "big") if len(packet) >= at + 2 else None
        before = f"{addr}:{port}"
    after = ipaddress.IPv4Address(bytes(ct.c_uint32(rec.nat_addr)))
    return {"kind": "fip" if rec.nat_flags & abi.FLOW_FIP else "snat",
            "direction": "in" if dnat else "out", "from": before,
            "to": f"{after}:{rec.nat_port}"}


def trace_buckets(state: model.State, rec, length: int) -> List[Dict[str, Any]]:
    """The rate limits a traced packet met (the rule's, then the tenant's): which bucket,
    its rate and burst, the tokens it held before the packet (packets, or bytes for a bit
    rate), what the packet costs, and whether it conformed."""
    out = []
    for i in range(2):
        key = rec.pol_key[i]
        if not key:
            continue
        if key & abi.POLICER_RULE:
            rid = key & ~abi.POLICER_RULE
            obj = next((r for r in state.rules if r.id == rid), None)
            name = f"rule {rid}"
        else:
            obj = next((t for t in state.tenants if t.id == key), None)
            name = f"tenant {obj.name if obj else key}"
        if obj is None or obj.rate is None:
            continue
        unit, _ = model.rate_value(obj.rate)
        units = 1 if unit == "pps" else length
        cost_ns = rec.pol_cost_ns[i]
        tokens = rec.pol_credit_ns[i] * units // cost_ns if cost_ns else None
        out.append({"bucket": name, "rate": obj.rate, "burst": model.burst_of(obj.rate, obj.burst),
                    "unit": "packets" if unit == "pps" else "bytes", "tokens": tokens,
                    "cost": units, "conformed": bool(rec.pol_ok[i])})
    return out


def file_sha256(path: str) -> str:
    """The SHA-256 of a file ("" if it cannot be read): which config a node runs,
    comparable across nodes."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return ""


def describe_summary(summary: Dict[str, Any]) -> str:
    """A datapath sync summary for the log: "flipped=blue,red written=12" (no braces)."""
    def text(v):
        if isinstance(v, dict):
            return ",".join(f"{k}:{text(x)}" for k, x in v.items()) or "-"
        if isinstance(v, (list, tuple, set)):
            return ",".join(str(x) for x in v) or "-"
        return str(v)
    return " ".join(f"{k}={text(v)}" for k, v in summary.items()) or "nothing to do"


def flow_order(d: Dict[str, Any]):
    return (d["tenant"], d["proto"], _addr_order(d["src"]), d["sport"], _addr_order(d["dst"]),
            d["dport"])


def flow_cursor(d: Dict[str, Any]) -> str:
    """Where a page of `flow dump` ended: the last row's sort key, readable."""
    return "|".join(str(d[k]) for k in ("tenant", "proto", "src", "sport", "dst", "dport"))


def parse_flow_cursor(text: Any):
    """A cursor back to a sort key (flow_order's); "start": before every flow."""
    if text == "start":
        return ()
    parts = text.split("|") if isinstance(text, str) else []
    try:
        if len(parts) != 6:
            raise ValueError
        return (parts[0], parts[1], _addr_order(parts[2]), int(parts[3]),
                _addr_order(parts[4]), int(parts[5]))
    except ValueError:
        raise model.Invalid("flow dump: cursor", f"{text!r} is not a cursor (\"start\", "
                            "or the next_cursor of the page before)") from None


def _addr_order(text: str):
    a = ipaddress.ip_address(text)
    return (a.version, int(a))


# Trace reasons that mean the route lookup decided (a route, or an endpoint as next hop).
_ROUTED = {abi.REASON_IDS[r] for r in ("rule_allow", "flow", "route_kernel", "route_drop",
                                       "no_route")}


def packet_dst(packet: bytes):
    """The destination address of an Ethernet frame (up to 2 VLAN tags), or None."""
    off, etype = 12, int.from_bytes(packet[12:14], "big")
    for _ in range(2):
        if etype not in (0x8100, 0x88A8):
            break
        off += 4
        etype = int.from_bytes(packet[off:off + 2], "big")
    l3 = off + 2
    if etype == 0x0800 and len(packet) >= l3 + 20:
        return ipaddress.ip_address(packet[l3 + 16:l3 + 20])
    if etype == 0x86DD and len(packet) >= l3 + 40:
        return ipaddress.ip_address(packet[l3 + 24:l3 + 40])
    return None


def route_for(state: model.State, tenant: str, packet: bytes) -> Optional[str]:
    """Which of the tenant's endpoints or routes the datapath's longest-prefix lookup
    picks for the packet's destination, in words."""
    dst = packet_dst(packet)
    if dst is None or not tenant:
        return None
    for e in state.endpoints:
        if e.tenant == tenant and e.ip == dst and e.vtep is not None:
            return f"endpoint {e.ip} behind VTEP {e.vtep} (VXLAN)"
        if e.tenant == tenant and e.ip == dst:
            return f"endpoint {e.ip} on port {e.port}"
    best = None
    for r in state.routes:
        if r.tenant == tenant and r.prefix.version == dst.version and dst in r.prefix:
            if best is None or r.prefix.prefixlen > best.prefix.prefixlen:
                best = r
    if best is None:
        return f"no route to {dst}"
    how = f"via {best.via}" if best.action == "via" else best.action
    return f"route {best.prefix} {how}"
