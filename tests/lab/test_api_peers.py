"""Who the API thinks a client is, with real processes: the groups are the ones the
kernel recorded when the client connected (SO_PEERGROUPS), not what /proc says when the
request is handled, so a client that changes its groups (or exits and has its pid
reused) after connecting changes nothing."""
from __future__ import annotations

import grp
import json
import os
import shutil
import socket
import tempfile

import pytest

from agent.api import ApiServer

pytestmark = pytest.mark.lab

NOBODY_UID = 65534


class Tenants:
    """Just the controller call `tenant add` makes."""

    def add(self, kind, obj):
        return obj


def _client(path: str, groups_at_connect, groups_at_request) -> dict:
    """A child that connects with one set of groups as an unprivileged user, switches to
    another set, then sends `tenant add` and returns the reply."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # the child: never returns
        try:
            os.close(r)
            os.setgroups(list(groups_at_connect))
            os.setresgid(NOBODY_UID, NOBODY_UID, 0)
            os.setresuid(NOBODY_UID, NOBODY_UID, 0)  # saved uid 0: may come back below
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            os.seteuid(0)
            os.setgroups(list(groups_at_request))
            os.seteuid(NOBODY_UID)
            s.sendall(b'{"command": "tenant add", "args": {"name": "red", "id": 20}}\n')
            os.write(w, s.makefile("rb").readline())
        except BaseException as e:
            os.write(w, json.dumps({"child": repr(e)}).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


@pytest.fixture
def admins():
    if os.geteuid() != 0:
        pytest.skip("needs root (the client switches users and groups)")
    group = grp.getgrnam("daemon")          # any existing group that is not root's
    # Under /tmp itself: pytest's tmp_path is in a directory only root may enter.
    d = tempfile.mkdtemp(prefix="xf-peers-", dir="/tmp")
    try:
        os.chmod(d, 0o755)
        path = f"{d}/agent.sock"
        with ApiServer(Tenants(), path, admin_group=group.gr_name):
            os.chmod(path, 0o666)           # the unprivileged client must reach it
            yield path, group.gr_gid
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_groups_are_taken_at_connect_time(admins):
    path, gid = admins
    # In the admin group when connecting, out of it when asking: still an admin's request.
    assert _client(path, [gid], [])["ok"] is True
    # Out of it when connecting, in it (via the saved root) when asking: denied.
    reply = _client(path, [], [gid])
    assert reply["ok"] is False and reply["error"]["code"] == "denied"
