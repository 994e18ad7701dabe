"""A big change's store rows written by another process, on another core, while the agent
compiles and writes the maps (issue 12: apply of 100,000 rules).

Why a process: SQLite gives up the GIL only inside each row's step, so a thread writing
100,000 rows mostly waited for the compile beside it (measured: a thread gave no gain);
here the rows are written under another interpreter's lock. The agent sends the change as
plain rows (store.change_rows: 0.08 s to make and 0.06 s to pickle for 100,000 rules,
against about 0.5 s of SQLite writes) and carries on.

The order of a change stays the controller's (agent/control.py): the writer opens the
transaction and writes, the agent writes the maps and its digest, then tells the writer to
commit, and the change succeeds only once it is committed. The writer never
commits on its own: if the agent ends, the writer reads the end of its socket (or is
killed by the kernel: PR_SET_PDEATHSIG) and its transaction is rolled back. A writer that
ends or stops answering (killed, stuck: ANSWER_TIMEOUT) is killed and the agent's own
connection writes the change and commits it, still last; if it ended after being asked to
commit, whether it did is read from the store (the change's `last_change`, written in its
transaction). Only the store's refusal of a change (as the agent's connection would
refuse it) fails the change, and the agent then puts the maps back.

One writer per agent, started at the first big change and kept; started again after it
ends. If it cannot be started at all, the change is written by the agent's own connection
(slower, never refused for that; `status` counts such changes: store_writer.local_writes).

Run as `python -m agent.storewriter DB FD PARENT_PID` by the agent only.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from typing import Dict, Iterator, List, Optional, Tuple

from .child import die_with
from .store import Store, StoreError

log = logging.getLogger("xdpflow.storewriter")

Rows = Dict[str, Tuple[List[Tuple], List[Tuple], List[Tuple]]]

# Seconds the agent waits for each answer of its writer. 100,000 rows take well under a
# second, and SQLite gives up on a lock after 10 s (Store.open): a writer silent this long
# is stuck (stopped, swapped out). It is killed and the agent writes the change itself,
# rather than the stuck writer holding the agent's lock, and every change after it.
ANSWER_TIMEOUT = 120.0

# The agent's package, for the writer's `-m` wherever the agent runs from (an installed
# package, a source tree, a unit's ExecStart).
_TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Writer:
    """The agent's end: one change at a time, under the controller's lock."""

    def __init__(self, store: Store):
        self.store = store
        self._proc: Optional[subprocess.Popen] = None
        self._conn: Optional[Connection] = None
        self.started = 0            # writers started (the first, then after each that ended)
        self.local_writes = 0       # changes written by the agent's own connection instead
        self.last_wait = 0.0        # seconds the last change waited for the writer at its end

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None \
            else None

    def start(self) -> None:
        """A running writer (started now unless one runs)."""
        if self.pid is not None:
            return
        self.close()
        mine, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_TOP, env.get("PYTHONPATH", "")) if p)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "agent.storewriter", self.store.path,
                 str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self._conn = Connection(mine.detach())
        self.started += 1

    def close(self) -> None:
        """The writer told to end (the end of its socket) and waited for; killed if it
        does not end within 10 s."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    @contextlib.contextmanager
    def transaction(self, rows: Rows, meta: Dict[str, str]) -> Iterator[None]:
        """Store.transaction() with its writes (Transaction.write_rows(rows, meta)) done by
        the writer process while the block runs: committed when the block ends, rolled
        back if it raises. Raises StoreError if the store refuses the change (as the
        agent's own connection would). A writer that cannot be started, or ends or stops
        answering before its commit, is no reason to fail the change: the agent's
        connection writes it instead (first, or after the block: the store still
        commits last). `meta` must hold "last_change" (what tells whether a writer that
        ended after being asked to commit did)."""
        try:
            self.start()
            self._conn.send(("write", rows, meta))
        except OSError as e:
            self._lost(f"could not be started or sent the change ({e})")
            self.local_writes += 1
            with self.store.transaction() as tx:
                tx.write_rows(rows, meta)
                yield
            return
        try:
            yield
        except BaseException:
            self._roll_back()
            raise
        t0 = time.monotonic()
        try:
            self._commit(rows, meta)
        finally:
            self.last_wait = time.monotonic() - t0

    def _commit(self, rows: Rows, meta: Dict[str, str]) -> None:
        try:
            said = self._answer()
            if said[0] == "written":
                self._conn.send("commit")
                said = self._answer()
        except (EOFError, OSError) as e:
            # Killed and waited for: its transaction is gone, committed or not, for good.
            self._lost(_why(e))
            if self.store.get_meta("last_change") != meta["last_change"]:
                self.local_writes += 1
                with self.store.transaction() as tx:
                    tx.write_rows(rows, meta)
            return      # else: it committed, then ended before saying so
        if said[0] != "committed":
            raise StoreError(said[1])   # its SQLite refused the change: rolled back

    def _roll_back(self) -> None:
        """The change is abandoned: the writer's transaction rolled back (a writer that
        fails meanwhile is killed, which rolls it back as well)."""
        try:
            if self._answer()[0] == "written":
                self._conn.send("rollback")
                self._answer()
        except (EOFError, OSError) as e:
            self._lost(_why(e))

    def _lost(self, why: str) -> None:
        """The writer killed (it cannot commit after this returns); the change goes on
        without it."""
        pid = self._proc.pid if self._proc else None
        self._kill()
        log.warning("the store writer%s %s: this change goes on without it",
                    f" (pid {pid})" if pid else "", why)

    def _answer(self):
        if not self._conn.poll(ANSWER_TIMEOUT):
            raise TimeoutError
        return self._conn.recv()

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
        self.close()


def _why(e: BaseException) -> str:
    return (f"did not answer within {ANSWER_TIMEOUT:g} s and was killed"
            if isinstance(e, TimeoutError) else f"ended during the change ({type(e).__name__})")


class _RollBack(Exception):
    pass


def serve(conn: Connection, store: Store) -> None:
    """Changes, one at a time, until the agent's end of the socket closes."""
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg[0] != "write":
            conn.send(("error", f"store writer: expected a change, got {msg[0]!r}"))
            continue
        _, rows, meta = msg
        try:
            with store.transaction() as tx:
                n = tx.write_rows(rows, meta)
                conn.send(("written", n))
                if conn.recv() != "commit":
                    raise _RollBack
        except _RollBack:
            conn.send(("rolled back", ""))
        except EOFError:
            return          # the agent ended in the middle: rolled back
        except Exception as e:  # noqa: BLE001 - said to the agent, which raises it
            conn.send(("error", str(e) if isinstance(e, StoreError) else
                       f"{store.path}: store writer: {type(e).__name__}: {e}"))
        else:
            conn.send(("committed", ""))
        del rows, msg


def main(argv: List[str]) -> int:
    path, fd, parent = argv[0], int(argv[1]), int(argv[2])
    die_with(parent)
    # Acyclic rows only: no collector passes over a 100,000-row change as it is unpickled.
    gc.disable()
    conn = Connection(fd)
    try:
        store = Store.open(path)
    except StoreError as e:
        print(f"xdpflow store writer: {e}", file=sys.stderr)
        return 1
    try:
        serve(conn, store)
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
