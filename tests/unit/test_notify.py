"""sd_notify over real AF_UNIX datagram sockets, path and abstract namespace."""
import os
import socket
import uuid

import pytest

from agent import notify

pytestmark = pytest.mark.unit


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _recv(sock):
    return sock.recv(4096).decode()


@pytest.fixture
def path_socket(tmp_path, clean_env):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    clean_env.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


@pytest.fixture
def abstract_socket(clean_env):
    name = f"xdpflow-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    clean_env.setenv("NOTIFY_SOCKET", "@" + name)
    yield sock
    sock.close()


def test_ready_watchdog_status_reach_a_path_socket(path_socket):
    assert notify.ready() is True
    assert _recv(path_socket) == "READY=1"
    assert notify.watchdog() is True
    assert _recv(path_socket) == "WATCHDOG=1"
    assert notify.status("3 tenants, 12 ports") is True
    assert _recv(path_socket) == "STATUS=3 tenants, 12 ports"


def test_abstract_namespace_socket(abstract_socket):
    assert notify.ready() is True
    assert _recv(abstract_socket) == "READY=1"
    assert notify.watchdog() is True
    assert _recv(abstract_socket) == "WATCHDOG=1"
    assert notify.status("applying state") is True
    assert _recv(abstract_socket) == "STATUS=applying state"


def test_stopping_reloading_and_ready_with_status(path_socket):
    assert notify.stopping()
    assert _recv(path_socket) == "STOPPING=1"
    assert notify.reloading()
    lines = _recv(path_socket).split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC" and int(value) > 0
    assert notify.ready("serving")
    assert _recv(path_socket) == "READY=1\nSTATUS=serving"


def test_status_newlines_cannot_inject_assignments(path_socket):
    notify.status("line one\nREADY=1")
    assert _recv(path_socket) == "STATUS=line one READY=1"


def test_unset_notify_socket_is_a_noop(clean_env):
    assert notify.notify("READY=1") is False
    assert notify.ready() is False
    assert notify.watchdog() is False
    assert notify.stopping() is False


def test_unreachable_socket_returns_false(tmp_path, clean_env):
    clean_env.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert notify.ready() is False
    clean_env.setenv("NOTIFY_SOCKET", "relative/path")
    assert notify.ready() is False


def test_watchdog_interval(clean_env):
    assert notify.watchdog_interval() is None
    clean_env.setenv("WATCHDOG_USEC", "30000000")
    assert notify.watchdog_interval() == 30.0
    clean_env.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notify.watchdog_interval() == 30.0


def test_watchdog_interval_for_another_pid_is_none(clean_env):
    clean_env.setenv("WATCHDOG_USEC", "30000000")
    clean_env.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert notify.watchdog_interval() is None


@pytest.mark.parametrize("usec", ["0", "-5", "soon", ""])
def test_watchdog_interval_rejects_bad_values(clean_env, usec):
    clean_env.setenv("WATCHDOG_USEC", usec)
    assert notify.watchdog_interval() is None
