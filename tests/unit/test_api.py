"""The control API over a real unix socket: wire format, error codes, slow and oversized
clients, peer credentials and the admin check, serialized controller calls."""
import base64
import grp
import json
import logging
import os
import socket
import stat
import threading
import time
import zlib

import pytest

from agent import model
from agent.api import ApiClient, ApiError, ApiServer, Peer, is_admin, peer_credentials
from test_commands import FakeController, populated

pytestmark = pytest.mark.unit

NOBODY = Peer(pid=0, uid=4242, gid=4242)      # not root, in no group we name
NO_GROUP = "xdpflow-test-no-such-group"


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "run" / "agent.sock")


@pytest.fixture
def server(sock_path):
    # This process's own group is the admin group, so it may change state as any user.
    srv = ApiServer(populated(), sock_path, request_timeout=0.5,
                    admin_group=grp.getgrgid(os.getgid()).gr_name)
    srv.start()
    yield srv
    srv.stop()


def raw(path, payload: bytes, timeout=5.0):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    s.sendall(payload)
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    s.close()
    return json.loads(buf)


def test_ok_reply(server, sock_path):
    r = raw(sock_path, b'{"command": "tenant list", "args": {}}\n')
    assert r == {"ok": True, "result": [{"name": "blue", "id": 10, "vni": None,
                                         "default": "drop", "max_flows": None}]}


def test_request_without_newline_ended_by_shutdown(server, sock_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(sock_path)
    s.sendall(b'{"command": "status"}')
    s.shutdown(socket.SHUT_WR)
    assert json.loads(s.makefile().readline())["ok"] is True
    s.close()


@pytest.mark.parametrize("payload,match", [
    (b"not json\n", "not JSON"),
    (b"\xff\xfe\n", "not JSON"),
    (b"[1, 2]\n", "request must be"),
    (b'{"args": {}}\n', "request must be"),
    (b'{"command": "tenant list", "colour": 1}\n', "unknown request field"),
    (b'{"command": "frobnicate", "args": {}}\n', "unknown command"),
    (b'{"command": "tenant add", "args": {"name": "x"}}\n', "required"),
    (b'{"command": "tenant add", "args": "blue"}\n', "JSON object"),
    (b"[" * 100_000 + b"\n", "not JSON"),
])
def test_bad_requests(server, sock_path, payload, match):
    r = raw(sock_path, payload)
    assert r["ok"] is False and r["error"]["code"] == "bad-request"
    assert match in r["error"]["message"]


def test_error_codes(server, sock_path):
    c = ApiClient(sock_path)
    with pytest.raises(ApiError) as e:
        c.call("tenant add", {"name": "blue", "id": 11})
    assert e.value.code == "refused" and "already exists" in e.value.message
    with pytest.raises(ApiError) as e:
        c.call("tenant add", {"name": "9blue", "id": 11})
    assert e.value.code == "invalid" and "name" in e.value.message


def test_internal_error_logs_traceback_but_never_sends_it(sock_path, caplog):
    ctl = FakeController()
    ctl.fail = RuntimeError("map update failed: secret detail")
    with ApiServer(ctl, sock_path, logger=logging.getLogger("t.api")):
        with caplog.at_level(logging.ERROR, logger="t.api"):
            with pytest.raises(ApiError) as e:
                ApiClient(sock_path).call("status")
    assert e.value.code == "internal"
    assert "secret" not in e.value.message and "Traceback" not in e.value.message
    assert "status" in e.value.message
    assert any(r.exc_info and "secret detail" in str(r.exc_info[1]) for r in caplog.records)


def test_unencodable_result_is_internal(sock_path):
    ctl = FakeController()
    ctl.stats = lambda: {"counters": object()}
    with ApiServer(ctl, sock_path):
        with pytest.raises(ApiError) as e:
            ApiClient(sock_path).call("stats")
    assert e.value.code == "internal"


def test_silent_client_does_not_block_others(sock_path):
    with ApiServer(populated(), sock_path, request_timeout=1.0):
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.connect(sock_path)
        half = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        half.connect(sock_path)
        half.sendall(b'{"command": "sta')
        t0 = time.monotonic()
        assert ApiClient(sock_path, timeout=2).call("status")["version"] == "test"
        assert time.monotonic() - t0 < 0.5
        # The slow ones are told why and closed once their time is up.
        for s in (silent, half):
            s.settimeout(3)
            data = s.makefile("rb").read()
            assert json.loads(data)["error"]["code"] == "bad-request"
            assert b"within" in data
            s.close()


def test_oversized_request_is_rejected_at_once(sock_path):
    with ApiServer(populated(), sock_path, max_request_bytes=1000, request_timeout=5):
        big = json.dumps({"command": "apply", "args": {"state": {"tenants": [
            {"name": f"t{i}", "id": i} for i in range(1, 200)]}}}).encode() + b"\n"
        t0 = time.monotonic()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(3)
        s.connect(sock_path)
        try:
            s.sendall(big)
        except OSError:
            pass  # the server may close before taking it all
        r = json.loads(s.makefile("rb").readline())
        s.close()
        assert r["error"]["code"] == "bad-request" and "larger than 1000" in r["error"]["message"]
        assert time.monotonic() - t0 < 2
        # and the server still serves
        assert ApiClient(sock_path).call("status")


def big_state(n):
    return {"tenants": [{"name": "blue", "id": 10}],
            "rules": [{"id": i, "tenant": "blue", "priority": 100, "action": "allow",
                       "src": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32",
                       "proto": "udp", "dport": "9"} for i in range(1, n + 1)]}


def test_a_state_larger_than_the_limit_goes_compressed_and_arrives_whole(sock_path):
    """30,000 rules are about 3 MB of JSON, past the 1 MiB the client sends plain and
    past this server's 2 MiB limit: compressed, the request fits, and the controller
    gets every rule."""
    ctl = populated()
    state = big_state(30_000)
    plain = len(json.dumps({"command": "apply", "args": {"state": state}}))
    assert plain > 2 * 2**20
    with ApiServer(ctl, sock_path, max_request_bytes=2 * 2**20, request_timeout=5,
                   admin_group=grp.getgrgid(os.getgid()).gr_name):
        d = ApiClient(sock_path).call("apply", {"state": state, "dry_run": False})
    assert len(d["rules"]["add"]) == 30_000 and len(ctl.state.rules) == 30_000


def test_a_big_request_leaves_its_state_frozen_and_the_collector_on(sock_path):
    """A compressed request (a big apply) runs without collector passes and freezes what
    it leaves (bulk.state_building): the new state's objects are out of every later
    pass. A plain request freezes nothing; the collector is on after both."""
    import gc
    ctl = populated()
    gc.unfreeze()
    with ApiServer(ctl, sock_path, admin_group=grp.getgrgid(os.getgid()).gr_name):
        ApiClient(sock_path).call("apply", {"state": big_state(10)})
        assert gc.get_freeze_count() == 0 and gc.isenabled()
        d = ApiClient(sock_path).call("apply", {"state": big_state(20_000)})
        frozen = gc.get_freeze_count()
    gc.unfreeze()
    assert len(d["rules"]["add"]) == 19_990 and len(ctl.state.rules) == 20_000
    assert frozen > 20_000 and gc.isenabled()


@pytest.mark.parametrize("payload,match", [
    (b"!!", "not base64"),
    (base64.b64encode(b"not zlib"), "not zlib"),
    (base64.b64encode(zlib.compress(b"[" * 50_000)), "not JSON"),
    (base64.b64encode(zlib.compress(b" " * 200_000)), "expands to more than 64000 bytes"),
    (base64.b64encode(zlib.compress(b'{"state": {}}')[:-4]), "cut short"),
])
def test_compressed_args_that_are_wrong_are_refused_naming_why(sock_path, payload, match):
    with ApiServer(populated(), sock_path, max_request_bytes=1000, request_timeout=5):
        r = raw(sock_path, json.dumps({"command": "apply", "args_zlib": payload.decode()})
                .encode() + b"\n")
    assert r["error"]["code"] == "bad-request"
    assert r["error"]["message"].startswith("args_zlib: ") and match in r["error"]["message"]


def test_controller_calls_are_serialized(sock_path):
    ctl = populated()
    ctl.slow = 0.05
    with ApiServer(ctl, sock_path):
        errors = []

        def go():
            try:
                ApiClient(sock_path).call("tenant list")
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)
        ts = [threading.Thread(target=go) for _ in range(6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert not errors and ctl.max_inside == 1 and len(ctl.calls) == 6


def test_many_clients_in_parallel(server, sock_path):
    results = []
    ts = [threading.Thread(target=lambda: results.append(
        ApiClient(sock_path).call("tenant list"))) for _ in range(30)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(results) == 30


# -- socket file ---------------------------------------------------------------------------

def test_socket_dir_and_mode(tmp_path):
    path = tmp_path / "run" / "xdpflow" / "agent.sock"
    group = grp.getgrgid(os.getgid()).gr_name
    with ApiServer(FakeController(), str(path), socket_group=group):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == os.getgid()
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o750
        assert sorted(os.listdir(path.parent)) == ["agent.sock"]   # no temporary left
    assert not path.exists()


def test_missing_socket_group_is_not_fatal(sock_path):
    with ApiServer(FakeController(), sock_path, socket_group=NO_GROUP):
        assert ApiClient(sock_path).call("status")


def test_stale_socket_is_replaced_live_one_is_not(sock_path):
    os.makedirs(os.path.dirname(sock_path))
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()  # the file stays, nobody listens: what a crashed agent leaves
    with ApiServer(FakeController(), sock_path):
        assert ApiClient(sock_path).call("status")
        with pytest.raises(OSError, match="another agent"):
            ApiServer(FakeController(), sock_path).start()
        assert ApiClient(sock_path).call("status")


def test_regular_file_is_not_removed(sock_path):
    os.makedirs(os.path.dirname(sock_path))
    open(sock_path, "w").close()
    with pytest.raises(OSError, match="not a socket"):
        ApiServer(FakeController(), sock_path).start()
    assert os.path.isfile(sock_path)


def test_client_unreachable_names_the_path(tmp_path):
    path = str(tmp_path / "nope.sock")
    with pytest.raises(ApiError) as e:
        ApiClient(path).call("status")
    assert e.value.code == "unreachable" and path in e.value.message


# -- who may do what -----------------------------------------------------------------------

def test_so_peercred_is_the_real_peer():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert peer_credentials(a) == Peer(os.getpid(), os.getuid(), os.getgid(),
                                           frozenset(os.getgroups()))


def test_production_path_uses_so_peercred(sock_path):
    # No hooks: the server reads SO_PEERCRED. This process is the peer, and its primary
    # group is the admin group, so it may change state whether or not it runs as root.
    seen = []
    srv = ApiServer(populated(), sock_path,
                    admin_group=grp.getgrgid(os.getgid()).gr_name)
    real = srv.peercred
    srv.peercred = lambda s: seen.append(real(s)) or seen[-1]
    with srv:
        ApiClient(sock_path).call("tenant add", {"name": "red", "id": 20})
    assert seen == [Peer(os.getpid(), os.getuid(), os.getgid(), frozenset(os.getgroups()))]


def test_non_admin_is_denied_mutating_commands(sock_path):
    ctl = populated()
    with ApiServer(ctl, sock_path, admin_group="xdpflow", peercred=lambda s: NOBODY):
        c = ApiClient(sock_path)
        for cmd, args in (("tenant add", {"name": "red", "id": 20}),
                          ("rule del", {"id": 1}),
                          ("apply", {"state": {}}),
                          ("flow flush", {})):
            with pytest.raises(ApiError) as e:
                c.call(cmd, args)
            assert e.value.code == "denied"
            assert repr(cmd) in e.value.message and "'xdpflow'" in e.value.message
        # reading is for anyone who reaches the socket, and so is a dry run
        assert c.call("tenant list")[0]["name"] == "blue"
        assert c.call("stats")["counters"]
        assert c.call("apply", {"state": {}, "dry_run": True,
                                   "prune": True})["tenants"]["remove"]
    assert [x[0] for x in ctl.calls] == ["list", "stats", "apply"]   # nothing else reached it
    assert ctl.state.tenant("red") is None


def test_admin_check():
    primary = grp.getgrgid(os.getgid())
    assert is_admin(Peer(1, 0, 0), None)                       # root, always
    assert not is_admin(NOBODY, None)                          # no admin group: root only
    assert not is_admin(NOBODY, NO_GROUP)                      # unknown group admits no one
    assert not is_admin(NOBODY, primary.gr_name)
    assert is_admin(Peer(1, 4242, primary.gr_gid), primary.gr_name)
    assert is_admin(Peer(1, 4242, 4242, frozenset({primary.gr_gid})), primary.gr_name)  # supplementary


def test_reading_commands_never_hold_the_changes_lock(sock_path):
    """A client's read (a long flow dump, a big dry run) runs without the lock that
    forwarding changes, flow aging and the watchdog's loop take: the lock stays free."""
    ctl = populated()
    inside, release = threading.Event(), threading.Event()

    def slow_dump(tenant, limit):
        inside.set()
        release.wait(10)
        return []
    ctl.flow_dump = slow_dump
    lock = threading.RLock()
    with ApiServer(ctl, sock_path, lock=lock):
        t = threading.Thread(target=lambda: ApiClient(sock_path).call("flow dump"))
        t.start()
        try:
            assert inside.wait(5)
            assert lock.acquire(timeout=1), "a reading client holds the changes lock"
            lock.release()
        finally:
            release.set()
            t.join()


def test_handle_without_a_socket():
    srv = ApiServer(populated(), "/nonexistent/agent.sock", admin_group=NO_GROUP)
    assert srv.handle(b'{"command": "tenant add", "args": {"name": "r", "id": 2}}',
                      NOBODY)["error"]["code"] == "denied"
    assert srv.handle(b'{"command": "tenant add", "args": {"name": "r", "id": 2}}',
                      None)["error"]["code"] == "denied"
    assert srv.handle(b'{"command": "tenant add", "args": {"name": "r", "id": 2}}',
                      Peer(1, 0, 0))["ok"] is True
    assert srv.handle(b'{"command": "rule add", "args": {"tenant": "r", "priority": 1, '
                      b'"action": "deny"}}', Peer(1, 0, 0))["result"]["id"] == 1
    assert isinstance(model.Conflict("a", "b"), model.Invalid)


def test_connection_cap_refuses_the_extra_client(sock_path):
    with ApiServer(populated(), sock_path, max_connections=2, request_timeout=5):
        held = []
        for _ in range(2):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(sock_path)
            held.append(s)
        with pytest.raises(ApiError) as e:
            ApiClient(sock_path, timeout=3).call("status")
        assert e.value.code == "refused" and "busy" in e.value.message
        for s in held:
            s.close()
        deadline = time.monotonic() + 3
        while True:  # the server notices the closed ones on its next loop
            try:
                assert ApiClient(sock_path, timeout=3).call("status")
                break
            except ApiError:
                assert time.monotonic() < deadline
                time.sleep(0.05)


def test_the_default_config_keeps_changes_for_root():
    # The socket's group reads; changing is root's unless an admin group is configured.
    from agent import config
    a = config.Config().agent
    assert a.admin_group == "" and a.socket_group
    member = Peer(1, 4242, 4242, frozenset({grp.getgrgid(os.getgid()).gr_gid}))
    assert not is_admin(member, a.admin_group)
    srv = ApiServer(populated(), "/nonexistent/agent.sock", socket_group=a.socket_group,
                    admin_group=a.admin_group)
    assert srv.handle(b'{"command": "tenant add", "args": {"name": "r", "id": 2}}',
                      member)["error"]["code"] == "denied"


def test_monitor_shows_packets_so_it_is_for_admins_only():
    # monitor changes nothing, but it streams tenants' packet bytes: like tcpdump on the
    # node, it is root's (or the admin group's), not every reader's.
    member = Peer(1, 4242, 4242, frozenset({grp.getgrgid(os.getgid()).gr_gid}))
    srv = ApiServer(populated(), "/nonexistent/agent.sock", admin_group="")
    assert "result" in srv.handle(b'{"command": "status"}', member)
    err = srv.handle(b'{"command": "monitor", "args": {}}', member)["error"]
    assert err["code"] == "denied" and "packets" in err["message"]
