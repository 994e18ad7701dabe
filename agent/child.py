"""Child processes that must not outlive their parent: the agent's compile (agent/daemon.py)
and store writer (agent/storewriter.py), xdpflowctl's parse of half a big file
(ctl/cli.py). Nothing of them (a compile racing the next agent for the pins, a store
transaction, a parse) may go on behind a parent that ended."""
from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with(parent: int) -> None:
    """This process gets SIGKILL when `parent` ends; it exits at once if `parent` has
    already ended (or the kernel refuses the request)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
        os._exit(1)
