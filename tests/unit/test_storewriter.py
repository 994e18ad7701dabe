"""The store writer process (agent/storewriter.py): a big change's rows written by another
process while the agent writes the maps. Each test drives a real writer process on a real
database: what it commits equals what the agent's own connection writes; nothing is
committed unless the agent asks; a writer that ends or stops answering leaves the change
to the agent; a writer that loses its agent leaves the last committed state and no lock
behind."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from agent import storewriter
from agent.model import Rule, State
from agent.store import Store, StoreError, change_rows, changes
from agent.storewriter import Writer

from test_store import REPO, _state

pytestmark = pytest.mark.unit


def _rows(store: Store):
    """Every table's rows, as the database holds them."""
    db = store._db
    return {t: [tuple(r) for r in db.execute(f"SELECT * FROM {t} ORDER BY rowid")]
            for t in ("tenants", "ports", "endpoints", "routes", "rules", "fips", "snats")}


@pytest.fixture
def stores(tmp_path):
    """A store with _state() in it and its writer; the writer is closed after the test."""
    store = Store.open(tmp_path / "state.db")
    with store.transaction() as tx:
        tx.write(State(), _state())
    writer = Writer(store)
    yield store, writer
    writer.close()
    store.close()


def _bigger(n: int) -> State:
    """_state() and n more rules of tenant blue (ports left alone: the writer's case)."""
    st = _state()
    new = State(**{k: list(getattr(st, k)) for k in ("tenants", "ports", "endpoints",
                                                        "routes", "rules", "fips", "snats")})
    new.rules += [Rule(id=100 + i, tenant="blue", priority=i % 1000, action="allow",
                       proto=17, dport=(i % 65536, i % 65536), in_port="vm1" if i % 2 else None)
                  for i in range(n)]
    return new


def test_a_change_committed_by_the_writer_is_the_one_the_agent_would_write(stores, tmp_path):
    store, writer = stores
    old, new = _state(), _bigger(5000)
    d = changes(old, new)
    d["rules"][1].append(old.rules[0])      # and a removal
    with writer.transaction(change_rows(d), {"last_change": "1.5"}):
        assert writer.pid is not None and writer.pid != os.getpid()
    # The same change by the agent's own connection, on a copy of the old database.
    with Store.open(tmp_path / "local.db") as local:
        with local.transaction() as tx:
            tx.write(State(), old)
        with local.transaction() as tx:
            tx.write_changes(d, {"last_change": "1.5"})
        assert _rows(store) == _rows(local)
    assert store.get_meta("last_change") == "1.5"
    assert len(_rows(store)["rules"]) == len(old.rules) + 5000 - 1


def test_nothing_is_committed_until_the_block_ends(stores):
    store, writer = stores
    before = _rows(store)
    with writer.transaction(change_rows(changes(_state(), _bigger(2000))), {}):
        time.sleep(0.5)     # the writer has written by now, and not committed
        assert _rows(store) == before
    assert len(_rows(store)["rules"]) == len(before["rules"]) + 2000


def test_a_block_that_raises_rolls_the_writer_back_and_it_writes_again(stores):
    store, writer = stores
    before = _rows(store)
    with pytest.raises(RuntimeError, match="map write failed"):
        with writer.transaction(change_rows(changes(_state(), _bigger(2000))), {}):
            raise RuntimeError("map write failed")
    assert _rows(store) == before
    pid = writer.pid
    with writer.transaction(change_rows(changes(_state(), _bigger(10))), {}):
        pass
    assert writer.pid == pid and writer.started == 1
    assert len(_rows(store)["rules"]) == len(before["rules"]) + 10


def test_writes_the_writer_refuses_are_the_agents_errors_and_change_nothing(stores):
    store, writer = stores
    before = _rows(store)
    # Adding a rule that is stored already: `old` is not what is stored.
    d = changes(_state(), _bigger(1000))
    d["rules"][0].append(_state().rules[0])
    with pytest.raises(StoreError, match=r"insert in table rules: UNIQUE constraint"):
        with writer.transaction(change_rows(d), {}):
            pass
    # Many rules of a tenant that does not exist: refused at the commit, naming a row.
    ghosts = [Rule(id=5000 + i, tenant="ghost", priority=1, action="allow")
              for i in range(100)]
    with pytest.raises(StoreError, match=r"table rules: row \{'id': 50\d\d.*table tenants"):
        with writer.transaction(change_rows({"rules": (ghosts, [], [])}), {}):
            pass
    assert _rows(store) == before
    assert writer.started == 1      # the same writer, still serving


def test_a_writer_killed_during_the_change_leaves_it_to_the_agent(stores):
    """Killed (the OOM killer, an operator) before its commit: the change is not failed
    for that; the agent's connection writes it, and the next change starts a writer."""
    store, writer = stores
    before = _rows(store)
    with writer.transaction(change_rows(changes(_state(), _bigger(2000))),
                            {"last_change": "2.5"}):
        os.kill(writer.pid, signal.SIGKILL)
        time.sleep(0.2)
    assert writer.local_writes == 1 and writer.pid is None
    assert store.get_meta("last_change") == "2.5"
    assert len(_rows(store)["rules"]) == len(before["rules"]) + 2000
    with writer.transaction(change_rows(changes(_bigger(2000), _bigger(2003))),
                            {"last_change": "2.6"}):
        pass
    assert writer.started == 2 and writer.local_writes == 1
    assert len(_rows(store)["rules"]) == len(before["rules"]) + 2003


def test_a_writer_that_stops_answering_is_killed_and_the_agent_writes(stores, monkeypatch):
    store, writer = stores
    before = _rows(store)
    monkeypatch.setattr(storewriter, "ANSWER_TIMEOUT", 1.0)
    with writer.transaction(change_rows(changes(_state(), _bigger(2000))),
                            {"last_change": "5.5"}):
        time.sleep(0.3)             # written by now, and waiting to be told
        proc = writer._proc
        os.kill(proc.pid, signal.SIGSTOP)
    # Killed before the agent wrote: a stopped writer's transaction can never commit.
    assert proc.returncode == -signal.SIGKILL
    assert writer.local_writes == 1 and store.get_meta("last_change") == "5.5"
    assert len(_rows(store)["rules"]) == len(before["rules"]) + 2000


def test_a_change_abandoned_while_its_writer_died_raises_its_own_error(stores):
    store, writer = stores
    before = _rows(store)
    with pytest.raises(RuntimeError, match="map write failed"):
        with writer.transaction(change_rows(changes(_state(), _bigger(2000))),
                                {"last_change": "6.5"}):
            os.kill(writer.pid, signal.SIGKILL)
            raise RuntimeError("map write failed")
    assert _rows(store) == before and writer.local_writes == 0


def test_a_commit_whose_answer_is_lost_is_read_from_the_store(stores, monkeypatch):
    """The writer committed, and its answer never came (it ended right after): the change
    is the store's, and the agent must not undo its maps. The commit is real; only the
    agent's read of the answer fails."""
    store, writer = stores
    real = writer._commit

    def commit_lost(rows, meta):
        conn = writer._conn
        recv = conn.recv
        answers = iter([None, EOFError()])

        def recv_then_lose():
            if next(answers) is None:
                return recv()       # "written"
            time.sleep(0.3)         # the commit happens meanwhile
            raise EOFError
        monkeypatch.setattr(conn, "recv", recv_then_lose)
        return real(rows, meta)
    monkeypatch.setattr(writer, "_commit", commit_lost)
    with writer.transaction(change_rows(changes(_state(), _bigger(1000))),
                            {"last_change": "3.5"}):
        pass
    assert store.get_meta("last_change") == "3.5"
    assert writer.pid is None       # killed: a writer out of step is not kept
    # Committed once, by the writer: written again here, its rows would be refused.
    assert writer.local_writes == 0


def test_a_writer_that_cannot_start_leaves_the_change_to_the_agent(stores, monkeypatch):
    store, writer = stores
    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")
    with writer.transaction(change_rows(changes(_state(), _bigger(1000))),
                            {"last_change": "4.5"}):
        pass
    assert writer.local_writes == 1 and writer.pid is None
    assert store.get_meta("last_change") == "4.5"
    assert len(_rows(store)["rules"]) == len(_state().rules) + 1000


_AGENT = textwrap.dedent("""
    import os, signal, sys
    from agent.model import State
    from agent.store import Store, change_rows, changes
    from agent.storewriter import Writer
    sys.path.insert(0, os.path.join(sys.argv[2], "tests", "unit"))
    from test_storewriter import _bigger
    from test_store import _state
    store = Store.open(sys.argv[1])
    writer = Writer(store)
    with writer.transaction(change_rows(changes(_state(), _bigger(20000))), {}):
        print(writer.pid, flush=True)
        sys.stdin.readline()
        os.kill(os.getpid(), signal.SIGKILL)
""")


def test_an_agent_killed_mid_change_takes_its_writer_and_the_change_with_it(stores, tmp_path):
    store, _ = stores
    before = _rows(store)
    env = dict(os.environ, PYTHONPATH=REPO)
    agent = subprocess.Popen([sys.executable, "-c", _AGENT, store.path, REPO],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO, env=env)
    try:
        pid = int(agent.stdout.readline())
        time.sleep(0.5)             # the writer has the transaction open and written
        assert os.path.exists(f"/proc/{pid}")
        agent.stdin.write(b"\n")
        agent.stdin.flush()
        agent.wait(10)
    finally:
        agent.kill()
        agent.wait()
        agent.stdin.close()
        agent.stdout.close()
    assert agent.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), "the store writer outlived its agent"
    # Nothing of the change, and no lock left: a write goes through at once.
    assert _rows(store) == before
    store._db.execute("PRAGMA busy_timeout = 0")
    with store.transaction() as tx:
        tx.write(_state(), _bigger(1))


def _alive(pid: int) -> bool:
    """A process that has not ended (a zombie has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_writer_ends_when_its_agent_closes_it(stores):
    store, writer = stores
    with writer.transaction(change_rows(changes(_state(), _bigger(10))), {}):
        pass
    proc = writer._proc
    writer.close()
    assert proc.returncode == 0 and writer.pid is None


def test_the_writer_is_run_as_a_module_of_the_agent_package():
    """Wherever the agent runs from, its writer finds the same package."""
    assert os.path.samefile(os.path.join(storewriter._TOP, "agent", "storewriter.py"),
                            storewriter.__file__)
