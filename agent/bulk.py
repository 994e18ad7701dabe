"""Building many objects at once (a 100,000-rule apply: a million tracked objects) without
the cyclic garbage collector's passes: each full pass walks every object the process
holds, and such an apply set off 5-6 of them (0.5-0.8 s of about 5 s, measured), finding
nothing to free: the objects are the new state, not garbage."""
from __future__ import annotations

import contextlib
import gc
from typing import Iterator


@contextlib.contextmanager
def no_collector_passes() -> Iterator[None]:
    """The collector off for the block (the whole process: cycles made meanwhile by other
    threads wait for the next pass), on again after it, unless it was off before."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@contextlib.contextmanager
def state_building() -> Iterator[None]:
    """For a request that may build the agent's next state (an apply of a big file): no
    collector pass while it runs, and what it leaves alive frozen at its end (gc.freeze:
    the new state, long-lived, which no later pass need walk). Without the freeze the
    first passes after such a request walked its million objects, 0.3-0.5 s (measured)
    before its reply went out. Its temporaries are freed by their reference counts
    before the freeze; a cycle made meanwhile stays frozen (none is expected)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was:
            gc.enable()
