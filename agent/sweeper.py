"""Flow aging: the one job of evicting flow-table entries that went idle (per protocol; TCP
after FIN/RST on the short timeout), keeping the table under its high watermark, and
counting every eviction by reason. It works over the datapath's raw flow entries (read and
deleted through agent/datapath.py, unpacked with agent/flows.py), never over the controller.

A flow made under an older generation of its tenant's rules is not evicted for that: the
datapath already treats it as a miss and judges it again (a stale reply entry keeps its
connection when the new rules still allow the forward direction), so an idle connection
survives an unrelated change and its server may speak first. Only flows of a tenant that
no longer exists go at once ("rule_change")."""
from __future__ import annotations

import heapq
import time
from typing import Dict, List, Optional, Tuple

from . import abi
from .flows import EVICTION_REASONS, flow_age, flow_head, now_coarse_ns, reverse_flow_key

_NS = 1_000_000_000


class Evictions:
    """Eviction counts by reason, kept in the store's meta table so they survive a
    restart (a counter that goes back to zero looks like a reset to Prometheus)."""

    META_KEY = "evictions"

    def __init__(self, store):
        self.store = store
        self.counts: Dict[str, int] = {r: 0 for r in EVICTION_REASONS}
        for part in (store.get_meta(self.META_KEY) or "").split(","):
            k, _, v = part.partition("=")
            if k in self.counts and v.isdigit():
                self.counts[k] = int(v)

    def add(self, reason: str, n: int) -> None:
        if reason not in self.counts:
            raise ValueError(f"unknown eviction reason {reason!r}")
        if n:
            self.counts[reason] += n
            self.store.set_meta(self.META_KEY,
                                ",".join(f"{k}={v}" for k, v in self.counts.items()))

    def as_dict(self) -> Dict[str, int]:
        return dict(self.counts)


class Sweeper:
    """Ages the flow table of `dp` by the `[aging]` settings of `cfg`."""

    def __init__(self, cfg, dp, evictions: Evictions):
        self.cfg = cfg
        self.dp = dp
        self.evictions = evictions
        self.flow_counts: Dict[int, int] = {}      # tenant id -> entries, as of the last sweep
        self.sweeps = 0
        self.last_seconds = 0.0
        self.seconds_total = 0.0

    def use(self, cfg, dp) -> None:
        """Age under a new config and datapath (a reload that rebuilt it)."""
        self.cfg, self.dp = cfg, dp

    def _limits(self) -> Tuple[Dict[int, int], int, int]:
        a = self.cfg.aging
        by_proto = {6: a.tcp_established, 17: a.udp, 1: a.icmp, 58: a.icmp}
        return ({p: v * _NS for p, v in by_proto.items()}, a.other * _NS,
                a.tcp_closed * _NS)

    def sweep(self) -> Dict[str, int]:
        """Evict idle and closed flows (and those of removed tenants); keep the table
        under its high watermark. The two directions of a flow go together: a one-way
        stream keeps its reply entry as long as the forward one is busy. Returns the
        evictions of this sweep by reason."""
        t0 = time.monotonic()
        now = now_coarse_ns()
        limit_ns, other_ns, closed_ns = self._limits()
        flows = self.dp.flow_entries()
        live_tenant: Dict[int, bool] = {}
        counts: Dict[int, int] = {}
        evict: Dict[str, List[bytes]] = {r: [] for r in EVICTION_REASONS}
        seen = set()
        keep: List[Tuple[int, bytes, Optional[bytes]]] = []   # (last seen, key, pair key)
        for kb, fb in flows.items():
            if kb in seen:
                continue
            tenant, proto = flow_head(kb)
            rkb = reverse_flow_key(kb)
            pair = flows.get(rkb) if rkb is not None and rkb != kb else None
            last, _, flags = flow_age(fb)
            group = [kb]
            if pair is not None:
                group.append(rkb)
                seen.add(rkb)
                plast, _, pflags = flow_age(pair)
                last, flags = max(last, plast), flags | pflags
            live = live_tenant.get(tenant)
            if live is None:
                live = live_tenant[tenant] = self.dp.generation(tenant) != 0
            if not live:
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
        self._over_watermark(keep, counts, evict["table_full"])
        done = {}
        for reason, keys in evict.items():
            if keys:
                n = self.dp.delete_flows(keys)
                self.evictions.add(reason, n)
                done[reason] = n
        self.flow_counts = {t: n for t, n in counts.items() if n}
        self.sweeps += 1
        self.last_seconds = time.monotonic() - t0
        self.seconds_total += self.last_seconds
        return done

    def _over_watermark(self, keep, counts: Dict[int, int], out: List[bytes]) -> None:
        """Over the high watermark the longest-idle flows go first: enough pairs to get
        under the mark (a heap, not a full sort)."""
        high = int(self.cfg.datapath.flow_table_size * self.cfg.aging.high_watermark)
        total = sum(counts.values())
        if total <= high:
            return
        for _, kb, rkb in heapq.nsmallest(total - high, keep):
            if total <= high:
                break
            group = [kb] + ([rkb] if rkb else [])
            out += group
            counts[flow_head(kb)[0]] -= len(group)
            total -= len(group)
