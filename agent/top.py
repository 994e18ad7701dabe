"""Flow rates for `xdpflowctl top`: the busiest flows, from the flow table's own counters,
sampled so that a refresh never costs a full read of a million-flow table.

Each sample reads the flows that were busiest last time (by key: exact rates for what the
operator is looking at) and the next `scan` entries of the table, going on where the last
sample stopped (a small table is read whole every time). A flow's rate is the change of
its counters since the sample that last saw it, or, the first time, its counters over its
age."""
from __future__ import annotations

import itertools
import struct
import time
from typing import Dict, Iterator, List, Optional, Tuple

from . import abi

_COUNTS = struct.Struct("<QQQ")       # packets, bytes, created_ns (the entry's head)
assert abi.Flow.created_ns.offset == 16 and abi.Flow.bytes.offset == 8
_TENANT = struct.Struct("<H")


class FlowRates:
    def __init__(self, scan: int = 65536, hot: int = 256):
        self.scan = scan
        self.hot_size = hot
        self._cursor: Optional[Iterator[Tuple[bytes, bytes]]] = None
        self._prev: Dict[bytes, Tuple[float, int, int]] = {}   # key -> (t, packets, bytes)
        self._hot: List[bytes] = []

    def _slice(self, flows) -> Dict[bytes, bytes]:
        """The next `scan` entries, wrapping around to the start of the table once."""
        out: Dict[bytes, bytes] = {}
        for _ in range(2):
            if self._cursor is None:
                self._cursor = flows.items()
            want = self.scan - len(out)
            got = dict(itertools.islice(self._cursor, want))
            out.update(got)
            if len(got) == want:
                break
            self._cursor = None         # the end of the table: next time from the start
            if len(out) >= flows.max_entries:
                break
        return out

    def sample(self, flows, now_ns: int, tenant: Optional[int], by: str,
               limit: int) -> Tuple[List[Tuple[bytes, bytes, float, float]], int]:
        """The `limit` busiest flows of `tenant` (None: all) by "pps" or "bps", as (key,
        value, pps, bps), and how many entries this sample read."""
        t = time.monotonic()
        seen: Dict[bytes, bytes] = {}
        for k in self._hot:
            v = flows.get(k)
            if v is not None:
                seen[k] = v
        seen.update(self._slice(flows))
        rows = []
        for k, v in seen.items():
            if tenant is not None and _TENANT.unpack_from(k)[0] != tenant:
                continue
            packets, nbytes, created = _COUNTS.unpack_from(v)
            prev = self._prev.get(k)
            if prev is not None and prev[1] <= packets and t > prev[0]:
                dt = t - prev[0]
                pps, bps = (packets - prev[1]) / dt, (nbytes - prev[2]) / dt
            else:
                age = max(now_ns - created, 1_000_000) / 1e9
                pps, bps = packets / age, nbytes / age
            self._prev[k] = (t, packets, nbytes)
            rows.append((k, v, pps, bps))
        col = 2 if by == "pps" else 3
        rows.sort(key=lambda r: r[col], reverse=True)
        self._hot = [r[0] for r in rows[:max(self.hot_size, limit)]]
        if len(self._prev) > 4 * self.scan:   # forget flows no sample has seen lately
            keep = set(seen) | set(self._hot)
            self._prev = {k: p for k, p in self._prev.items() if k in keep}
        return rows[:limit], len(seen)
