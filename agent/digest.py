"""The digest of what the configuration maps were last programmed from, kept with the pins
(issue 12: warm restart), so that a starting agent whose stored state, interfaces and
sizes give the same digest knows the maps already hold their image and skips compiling
and comparing it (seconds with 100,000 rules).

What it covers, in two parts hashed together:
- the inputs of the image: every stored row (a sum of per-row hashes, so a change of a
  few rows updates it without reading the others), the port slots, the interfaces of the
  ports (ifindex, MAC, addresses, MTU), the underlay neighbours, the compile parameters
  and the pinned program's build id (its sizes);
- a summary of the maps as the agent holds them: each tenant's entry (generations), each
  mask set, and the number of entries of every configuration map. A change the agent did
  not finish (or an entry added or removed by someone else) shows there.

Crash order of a change (agent.control): the pinned digest is cleared before the first
map write, written after the last, and the store commits after it. A crash before the
new digest leaves none (the next start compiles and compares); a crash between the
digest and the store's commit leaves a digest of the new state beside the old stored
state (it differs from the store's: compared and repaired). A corrupt or foreign value
equals nothing computed. Not covered: a foreign writer changing a value in place in a
big map (rules, endpoints, routes) without changing how many there are."""
from __future__ import annotations

import ctypes as ct
import hashlib
from typing import Any, Dict, Iterable, Optional, Tuple

from . import model

# The pin beside the maps: an array of one entry, MAGIC then the 32-byte digest. Made by
# the agent (no program uses it); gone with the pin directory.
PIN = "xf_digest"
MAGIC = 0x5846444947535431          # "XFDIGST1"
SIZE = 32
_MOD = 1 << 256


class Record(ct.Structure):
    _fields_ = [("magic", ct.c_uint64), ("digest", ct.c_uint8 * SIZE)]


def _h(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=SIZE).digest()


def add_row(digest: int, kind: str, row: Tuple) -> int:
    """`digest` with one stored row (its columns as agent.store writes them, slots aside)."""
    return (digest + int.from_bytes(_h(f"{kind}\0{row!r}".encode()), "little")) % _MOD


def rows_digest(state: model.State) -> int:
    """Every object of a state as its row: a sum of row hashes (order does not matter)."""
    from .store import row_of
    out = 0
    for kind in model.KINDS:
        for o in getattr(state, kind):
            out = add_row(out, kind, row_of(kind, o))
    return out


# A change of more rows than this is not hashed row by row while the lock is held (100,000
# rows take about a second): its digest is left cleared, and the next start or reconcile
# compares the maps instead.
MAX_CHANGED_ROWS = 2000


def changed_rows(digest: Optional[int], old: model.State,
                 changes: Dict[str, Tuple[list, list, list]]) -> Optional[int]:
    """`digest` (of `old`) after a change given as {kind: (added, removed, changed)} (the
    new versions of changed objects; their old ones are found in `old`). None when not
    known (`digest` None, or a change of more than MAX_CHANGED_ROWS rows)."""
    from .store import row_of
    n = sum(len(a) + len(r) + 2 * len(c) for a, r, c in changes.values())
    if digest is None or n > MAX_CHANGED_ROWS:
        return None
    for kind, (added, removed, changed) in changes.items():
        if not (added or removed or changed):
            continue
        was: Dict[Tuple, Any] = {}
        if changed:
            was = ({(i,): r for i, r in old.rule_index().items()} if kind == "rules" else
                   {model.identity(kind, o): o for o in getattr(old, kind)})
        for o in added + changed:
            digest = add_row(digest, kind, row_of(kind, o))
        for o in removed + [was[model.identity(kind, o)] for o in changed]:
            digest = (digest - add_row(0, kind, row_of(kind, o))) % _MOD
    return digest


def context(build_id: int, slots: Dict[str, int], links: Iterable[Any],
            neighbours: Optional[Dict[str, str]], params: Iterable[Tuple[str, Any]]) -> bytes:
    """What else the image is compiled from: the program's build (its sizes), the port
    slots, the ports' interfaces (compiler.PortLink), the neighbours and the compile
    parameters."""
    parts = (build_id, sorted(slots.items()),
             sorted((lk.name, lk.ifindex, lk.mac, lk.slot, tuple(lk.addrs), lk.mtu)
                    for lk in links),
             sorted((neighbours or {}).items()), sorted(params))
    return _h(repr(parts).encode())


def maps_summary(tenants: Dict[int, bytes], masks: Dict[Tuple[int, int], bytes],
                 counts: Dict[str, int]) -> bytes:
    """The maps as the agent holds them: tenant entries, mask sets, entry counts."""
    return _h(repr((sorted(tenants.items()), sorted(masks.items()),
                    sorted(counts.items()))).encode())


def image(rows: int, ctx: bytes, maps: bytes) -> bytes:
    return _h(rows.to_bytes(SIZE, "little") + ctx + maps)


def pack(digest: bytes) -> bytes:
    rec = Record(magic=MAGIC)
    ct.memmove(rec.digest, digest, SIZE)
    return bytes(rec)


def unpack(value: Optional[bytes]) -> Optional[bytes]:
    """The digest a pinned value holds; None for none (cleared, foreign or corrupt)."""
    if value is None or len(value) != ct.sizeof(Record):
        return None
    rec = Record.from_buffer_copy(value)
    digest = bytes(rec.digest)
    return digest if rec.magic == MAGIC and any(digest) else None
