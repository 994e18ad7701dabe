"""How long the agent's work takes (reconciles, changes, API requests), recorded as it
goes and read by the metrics collector (agent/metrics.py) at scrape time. Apart from the
collector so that the agent records from its first moment without importing
prometheus_client (a warm start answers before its metrics server starts)."""
from __future__ import annotations

import threading
from typing import Dict, List, Tuple

# Seconds; a reconcile of a big state or a first trace build takes seconds.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
           30.0)


class Timings:
    """Histograms and counts the agent records as it works (reconciles, changes, API
    requests), read by the collector at scrape time. Thread-safe."""

    def __init__(self, buckets: Tuple[float, ...] = BUCKETS):
        self.buckets = tuple(buckets)
        self._lock = threading.Lock()
        self._hist: Dict[Tuple[str, Tuple[str, ...]], list] = {}
        self._counts: Dict[Tuple[str, Tuple[str, ...]], int] = {}

    def observe(self, name: str, seconds: float, *labels: str) -> None:
        with self._lock:
            h = self._hist.setdefault((name, labels), [[0] * len(self.buckets), 0.0, 0])
            for i, le in enumerate(self.buckets):
                if seconds <= le:
                    h[0][i] += 1
            h[1] += seconds
            h[2] += 1

    def count(self, name: str, *labels: str) -> None:
        with self._lock:
            self._counts[(name, labels)] = self._counts.get((name, labels), 0) + 1

    def histograms(self, name: str) -> List[Tuple[Tuple[str, ...], List[Tuple[str, int]], float]]:
        """[(labels, [(le, cumulative count)...,("+Inf", n)], sum)] of histogram `name`."""
        with self._lock:
            out = []
            for (n, labels), (counts, total, num) in sorted(self._hist.items()):
                if n == name:
                    buckets = [(repr(le), c) for le, c in zip(self.buckets, counts)]
                    out.append((labels, buckets + [("+Inf", num)], total))
            return out

    def counts(self, name: str) -> List[Tuple[Tuple[str, ...], int]]:
        with self._lock:
            return [(labels, v) for (n, labels), v in sorted(self._counts.items()) if n == name]
