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

import contextlib
import heapq
import itertools
import time
from typing import Dict, Iterable, Iterator, List, Set, Tuple

from . import abi
from .flows import EVICTION_REASONS, flow_age, flow_head, flow_tenant, now_coarse_ns, pair_key

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

    def add(self, reason: str, n: int, save: bool = True) -> None:
        """Count `n` evictions; `save=False` leaves them for save() (a sweep saves once:
        a store write is a synchronous commit, far dearer than a slice)."""
        if reason not in self.counts:
            raise ValueError(f"unknown eviction reason {reason!r}")
        if n:
            self.counts[reason] += n
            if save:
                self.save()

    def save(self) -> None:
        self.store.set_meta(self.META_KEY, ",".join(f"{k}={v}" for k, v in self.counts.items()))

    def as_dict(self) -> Dict[str, int]:
        return dict(self.counts)


class Sweeper:
    """Ages the flow table of `dp` by the `[aging]` settings of `cfg`.

    A sweep reads the table a slice (`slice_entries`) at a time and holds the caller's
    lock only for a slice, so the control socket answers between slices however big the
    table is. Memory is bounded by a slice, the evictions of one slice and, over the high
    watermark, the entries chosen to go: never the whole table."""

    slice_entries = 512
    # Between slices: long enough for a waiting API request to take the lock (a lock
    # let go and taken straight back is not offered to the waiter), 0.1 s a million flows.
    pause = 0.001

    def __init__(self, cfg, dp, evictions: Evictions):
        self.cfg = cfg
        self.dp = dp
        self.evictions = evictions
        self.flow_counts: Dict[int, int] = {}      # tenant id -> entries, as of the last sweep
        self.sweeps = 0
        self.slices = 0                             # slices of every sweep so far
        self.longest_hold = 0.0     # the last sweep's longest hold of the lock (a slice), s
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

    def _slices(self, lock, items: Iterable) -> Iterator[List]:
        """`items` in slices, each handed out with `lock` held; the lock is let go (and
        the GIL offered to the API's thread) between slices."""
        it = iter(items)
        while True:
            with lock:
                t0 = time.monotonic()
                part = list(itertools.islice(it, self.slice_entries))
                if not part:
                    return
                self.slices += 1
                yield part
                self.longest_hold = max(self.longest_hold, time.monotonic() - t0)
            time.sleep(self.pause)

    def sweep(self, lock=None) -> Dict[str, int]:
        """Evict idle and closed flows (and those of removed tenants); keep the table
        under its high watermark, taking from the tenants that hold the most. The two
        directions of a flow go together: a one-way stream keeps its reply entry as long
        as the forward one is busy. Re-bases each tenant's flow count (its quota's). With
        `lock`, it is held a slice at a time. Returns the evictions by reason."""
        lock = lock if lock is not None else contextlib.nullcontext()
        t0 = time.monotonic()
        self.longest_hold = 0.0
        with lock:
            dp = self.dp
            before = dp.tenant_flow_counts()
        now = now_coarse_ns()
        limit_ns, other_ns, closed_ns = self._limits()
        live_tenant: Dict[int, bool] = {}
        counts: Dict[int, int] = {}
        done: Dict[str, int] = {}
        gone: Set[bytes] = set()        # evicted this sweep (a pair's second half may follow)
        for part in self._slices(lock, dp.flow_items()):
            if dp is not self.dp:       # a reload rebuilt the datapath: the next sweep ages it
                break
            evict: Dict[str, List[bytes]] = {r: [] for r in EVICTION_REASONS}
            for kb, fb in part:
                if kb in gone:
                    gone.discard(kb)
                    continue
                proto = flow_head(kb)[1]
                tenant = flow_tenant(kb, fb)     # NAT's external-side entries: the VM's
                live = live_tenant.get(tenant)
                if live is None:
                    live = live_tenant[tenant] = dp.generation(tenant) != 0
                last, _, flags = flow_age(fb)
                idle = now - last
                # Within its own timeout the pair cannot make it expire (the pair's last
                # packet is as late or later) unless the pair closed a TCP connection
                # this entry has not seen close: only then is the pair worth a read.
                if live and idle <= (closed_ns if flags & abi.FLOW_CLOSING else
                                     limit_ns.get(proto, other_ns)) and \
                        (proto != 6 or flags & abi.FLOW_CLOSING or idle <= closed_ns):
                    counts[tenant] = counts.get(tenant, 0) + 1
                    continue
                group = [kb]
                rkb = pair_key(kb, fb)      # (a SNAT port is freed with its pair, never alone)
                pair = dp.flow_entry(rkb) if rkb is not None and rkb != kb else None
                if pair is not None:
                    group.append(rkb)
                    plast, _, pflags = flow_age(pair)
                    last, flags = max(last, plast), flags | pflags
                if not live:
                    reason = "rule_change"
                elif flags & abi.FLOW_CLOSING:
                    reason = "closed" if now - last > closed_ns else None
                else:
                    reason = "idle" if now - last > limit_ns.get(proto, other_ns) else None
                if reason is None:
                    counts[tenant] = counts.get(tenant, 0) + 1
                    continue
                evict[reason] += group
                gone.update(group)
            self._delete(dp, evict, done)           # still within the slice's lock
        self._over_watermark(lock, dp, counts, done)
        with lock:
            if done:
                self.evictions.save()
            if dp is self.dp:
                dp.rebase_flow_counts(counts, before)
        self.flow_counts = {t: n for t, n in counts.items() if n}
        self.sweeps += 1
        self.last_seconds = time.monotonic() - t0
        self.seconds_total += self.last_seconds
        return done

    def _delete(self, dp, evict: Dict[str, List[bytes]], done: Dict[str, int]) -> None:
        for reason, keys in evict.items():
            if keys:
                n = dp.delete_flows(keys)
                self.evictions.add(reason, n, save=False)
                done[reason] = done.get(reason, 0) + n

    def _over_watermark(self, lock, dp, counts: Dict[int, int], done: Dict[str, int]) -> None:
        """Over the high watermark, the tenants holding the most entries give back the
        excess, each its longest-idle flows first (with their pairs): cut down to one
        level (water-filling), so a tenant flooding the table with new flows pays for it,
        never the steady tenants whose established flows merely idle longest. A second
        pass over the table, in slices, holding only the chosen entries."""
        high = int(self.cfg.datapath.flow_table_size * self.cfg.aging.high_watermark)
        over = shares_over(counts, sum(counts.values()) - high)
        if not over:
            return
        chosen: Dict[int, List[Tuple[int, bytes, bytes]]] = {t: [] for t in over}
        for part in self._slices(lock, dp.flow_items()):
            for kb, fb in part:
                tenant = flow_tenant(kb, fb)
                heap = chosen.get(tenant)
                if heap is None:
                    continue
                # A max-heap of the longest idle, each with its pair's key.
                item = (-flow_age(fb)[0], kb, pair_key(kb, fb) or b"")
                if len(heap) < over[tenant]:
                    heapq.heappush(heap, item)
                elif item > heap[0]:
                    heapq.heapreplace(heap, item)
        keys: List[bytes] = []
        taken: Set[bytes] = set()
        for tenant, heap in chosen.items():
            n = 0
            for _, kb, rkb in sorted(heap, reverse=True):     # longest idle first
                if n >= over[tenant]:
                    break
                if kb in taken:
                    continue
                group = [kb]
                if rkb and rkb != kb and rkb not in taken and \
                        dp.flow_entry(rkb) is not None:
                    group.append(rkb)
                keys += group
                taken.update(group)
                n += len(group)
            counts[tenant] -= n
        with lock:
            self._delete(dp, {"table_full": keys}, done)


def shares_over(counts: Dict[int, int], excess: int) -> Dict[int, int]:
    """How many entries each tenant gives back so that `excess` go in all, taking from the
    biggest holders down to one common level (water-filling): {tenant: entries}."""
    if excess <= 0:
        return {}
    lo, hi = 0, max(counts.values())
    # The highest level L at which the holdings above L still cover the excess.
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(max(0, n - mid) for n in counts.values()) >= excess:
            lo = mid
        else:
            hi = mid - 1
    out = {t: n - lo for t, n in counts.items() if n > lo}
    # Above level lo the sum may overshoot: give the surplus back to the biggest holders.
    surplus = sum(out.values()) - excess
    for t in sorted(out, key=lambda t: -counts[t]):
        if surplus <= 0:
            break
        if out[t] > 0:
            out[t] -= 1
            surplus -= 1
    return {t: n for t, n in out.items() if n > 0}
