"""The offloaded path's own account of each packet, for the lab's comparisons: a monitor
stream (`xdpflowctl monitor`'s API) recorded while the offloaded path runs a scenario, and
the events of one packet, found by bytes it carries (a send's nonce, its payload).

    with EventRecorder(lab.socket) as rec:
        ... run the sends on the offloaded path ...
    for mismatch in mismatches:
        mismatch["monitor"] = rec.events_for(nonce_bytes)

Events carry the packet's first bytes (agent.abi.EVENT_BYTES): a needle must sit within
them. The datapath caps events at monitor.rate_limit a second per CPU; `lost` says how many
the recording missed, so a comparison can tell "no event" from "event lost"."""
from __future__ import annotations

import threading
from typing import Any, Dict, List, Optional, Sequence

from agent.api import ApiClient, ApiError


def events_for(events: List[Dict[str, Any]], needle: bytes,
               frames: Sequence[bytes] = ()) -> List[Dict[str, Any]]:
    """The events whose packet bytes contain `needle` or are the start of one of `frames`
    as sent (a packet whose needle lies beyond the bytes an event carries, dropped or
    passed untouched), each with its addresses, protocol and ports decoded."""
    from agent.monitor import describe_packet
    out = []
    for ev in events:
        data = bytes.fromhex(ev.get("packet", ""))
        if (needle and needle in data) or any(data and f.startswith(data) for f in frames):
            out.append({**ev, **describe_packet(ev["packet"])})
    return out


class EventRecorder:
    """Every datapath event (all verdicts, or `filters` as `monitor` takes them) from the
    agent at `socket`, recorded by a thread until stop()."""

    def __init__(self, socket: str, **filters: Any):
        args = {"type": "all", **filters}
        self.stream = ApiClient(socket, timeout=10).stream("monitor", args)
        self.events: List[Dict[str, Any]] = []
        self.lost: Dict[str, int] = {}
        self.error: Optional[str] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="lab-events", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while not self._stop.is_set():
                msg = self.stream.next(0.2)
                if not msg:
                    continue
                if "event" in msg:
                    self.events.append(msg["event"])
                elif "lost" in msg:
                    self.lost = msg["lost"]
        except ApiError as e:
            if not self._stop.is_set():
                self.error = e.message

    def stop(self, settle: float = 0.3) -> List[Dict[str, Any]]:
        """Stop recording (after `settle` seconds for events still on their way)."""
        if not self._stop.is_set():
            self._stop.wait(settle)
            self._stop.set()
            self._thread.join(5)
            self.stream.close()
        return self.events

    def events_for(self, needle: bytes, frames: Sequence[bytes] = ()) -> List[Dict[str, Any]]:
        return events_for(self.events, needle, frames)

    def __enter__(self) -> "EventRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
