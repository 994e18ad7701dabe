"""The agent's control API: JSON over a unix socket, dispatched through the command table
(agent.commands), with peer credentials deciding who may change state.

Wire format, one request per connection:
    -> {"command": "tenant add", "args": {...}}\\n
    <- {"ok": true, "result": ...}\\n
    <- {"ok": false, "error": {"code": CODE, "message": "..."}}\\n
CODE is "invalid" (a bad value), "refused" (at odds with the current state), "denied"
(the peer may not run the command), "bad-request" (not JSON, unknown command, arguments that
do not fit) or "internal" (a bug or a kernel failure; the traceback goes to the log only).

Large requests go compressed (a whole state of 100,000 rules is about 10 MB of JSON,
1.1 MB compressed):
    -> {"command": "apply", "args_zlib": BASE64(ZLIB(JSON(args)))}\n
which the client does above COMPRESS_ABOVE bytes, and always for an apply of a JSON file,
whose text goes as it is (RawJSON). Compression, not a larger limit or a
stream: every connection may hold up to `max_request_bytes` while its request arrives
(up to max_connections of them), so the limit stays small (4 MiB: about 350,000 such
rules compressed), and the one expansion happens in the worker that runs the commands one
at a time, bounded by INFLATE_FACTOR x the limit. Past either bound the error names it.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import grp
import json
import logging
import os
import pwd
import queue
import selectors
import socket
import stat
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, Optional

from agent import commands, model
from agent.bulk import no_collector_passes, state_building

DEFAULT_SOCKET = "/run/xdpflow/agent.sock"
COMPRESS_ABOVE = 1 << 20           # bytes of a plain request the client sends compressed
INFLATE_FACTOR = 64                # compressed args may expand to this x max_request_bytes

# One line per attempted change (who, what, result), under its own name so it can be
# routed or kept apart from the rest of the log.
audit_log = logging.getLogger("xdpflow.audit")

# Codes on the wire; the CLI maps them to exit codes.
INVALID, REFUSED, DENIED, BAD_REQUEST, INTERNAL = (
    "invalid", "refused", "denied", "bad-request", "internal")


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a connection, as the kernel recorded it when the peer
    connected (SO_PEERCRED, SO_PEERGROUPS): what the peer does later (change its groups,
    exit and have its pid reused) changes nothing."""
    pid: int
    uid: int
    gid: int
    groups: FrozenSet[int] = frozenset()   # supplementary groups at connect time


_UCRED = struct.Struct("3i")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)   # Linux 4.13; not in every Python


def _peer_groups(sock: socket.socket) -> FrozenSet[int]:
    size = 64 * 4
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as e:
            if e.errno == errno.ERANGE and size < 65536 * 4:   # NGROUPS_MAX gids
                size *= 16
                continue
            raise
        return frozenset(struct.unpack(f"{len(raw) // 4}I", raw))


def peer_credentials(sock: socket.socket) -> Peer:
    """The connecting process's credentials and groups, taken by the kernel at connect()
    time, so a client cannot claim to be someone else."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return Peer(*_UCRED.unpack(raw), groups=_peer_groups(sock))


def is_admin(peer: Peer, admin_group: Optional[str]) -> bool:
    """Root, or a member of admin_group (primary or supplementary, as of connect time).
    No admin group: root only. A group that does not exist admits no one else."""
    if peer.uid == 0:
        return True
    if not admin_group:
        return False
    try:
        gid = grp.getgrnam(admin_group).gr_gid
    except KeyError:
        return False
    return gid == peer.gid or gid in peer.groups


def reply_ok(result: Any) -> Dict[str, Any]:
    return {"ok": True, "result": result}


def reply_error(code: str, message: str, **place: Optional[str]) -> Dict[str, Any]:
    """An error reply; `place`: where in the request's apply file the object it is about
    sits ("at": "rules[3].dport", and "first_at" for an object given twice), left out
    when not known."""
    err = {"code": code, "message": message}
    err.update((k, v) for k, v in place.items() if v is not None)
    return {"ok": False, "error": err}


def _encode(doc: Dict[str, Any]) -> bytes:
    return (json.dumps(doc, separators=(",", ":")) + "\n").encode()


class _Conn:
    """One client connection as the server loop sees it."""
    __slots__ = ("sock", "peer", "buf", "out", "deadline", "state", "stream")

    def __init__(self, sock: socket.socket, peer: Optional[Peer], deadline: float):
        self.stream: Optional[commands.Stream] = None   # a streaming command's hand-over
        self.sock = sock
        self.peer = peer
        self.buf = bytearray()
        self.out = b""
        self.deadline = deadline
        self.state = "reading"  # -> "working" (queued for the controller) -> "writing"


class ApiServer:
    """Serves the command table on a unix socket.

    One thread runs a selector loop that accepts, reads and writes for every client without
    ever blocking on one; each request must arrive whole, within `max_request_bytes` and
    `request_timeout` seconds, or the connection is answered "bad-request" (when possible)
    and closed. A second thread makes the controller calls one at a time, holding `lock`
    (pass the daemon's lock so other users of the controller are serialized with the API).

    Reading commands run without `lock`: the controller takes it itself only for a
    snapshot of what it reads, so a client asking for much (a big dry run, a long flow
    dump) never holds up forwarding changes, flow aging or the watchdog.

    `peercred(sock) -> Peer` may be replaced for tests; production uses SO_PEERCRED and
    SO_PEERGROUPS."""

    def __init__(self, controller, path: str = DEFAULT_SOCKET, *,
                 socket_group: Optional[str] = None, admin_group: Optional[str] = None,
                 max_request_bytes: int = 4 * 2**20, request_timeout: float = 5.0,
                 logger: Optional[logging.Logger] = None, lock=None,
                 peercred: Callable[[socket.socket], Peer] = peer_credentials,
                 max_connections: int = 128, timings=None):
        self.controller = controller
        self.path = path
        self.socket_group = socket_group
        self.admin_group = admin_group
        self.max_request_bytes = max_request_bytes
        self.request_timeout = request_timeout
        self.log = logger or logging.getLogger("xdpflow.api")
        self.lock = lock or threading.Lock()
        self.peercred = peercred
        self.max_connections = max_connections
        self.timings = timings     # agent.metrics.Timings: request counts and latency
        self._listen: Optional[socket.socket] = None
        self._ino: Optional[int] = None
        self._sel: Optional[selectors.BaseSelector] = None
        self._wake_r = self._wake_w = None
        self._conns: Dict[int, _Conn] = {}
        self._work: "queue.Queue[Optional[_Conn]]" = queue.Queue()
        self._done: "queue.Queue[_Conn]" = queue.Queue()
        self._stopping = threading.Event()
        self._threads = []

    # -- socket set-up ---------------------------------------------------------------------
    def _group_gid(self, name: Optional[str]) -> Optional[int]:
        if not name:
            return None
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            self.log.warning("socket group %r does not exist; leaving the socket's group as is",
                             name)
            return None

    def _chgrp(self, path: str, gid: Optional[int]) -> None:
        if gid is None:
            return
        try:
            os.chown(path, -1, gid)
        except OSError as e:
            self.log.warning("cannot give %s to group %d: %s", path, gid, e)

    def _check_stale(self) -> None:
        """Refuse to take over a socket another live agent answers on; a socket nobody
        answers is a leftover of a crash and is replaced."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(0.5)
        try:
            probe.connect(self.path)
        except OSError:
            self.log.info("removing stale socket %s", self.path)
            return
        finally:
            probe.close()
        raise OSError(errno.EADDRINUSE, f"another agent is serving {self.path}")

    def start(self) -> None:
        gid = self._group_gid(self.socket_group)
        d = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(d):
            os.makedirs(d, mode=0o750, exist_ok=True)
            os.chmod(d, 0o750)  # makedirs' mode is filtered by the umask
            self._chgrp(d, gid)
        self._check_stale()
        # Bind under a temporary name, set mode and group, then rename into place: clients
        # never see the socket with the umask's mode, and a stale socket is replaced
        # atomically.
        tmp = f"{self.path}.{os.getpid()}.tmp"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(tmp)
            os.chmod(tmp, 0o660)
            self._chgrp(tmp, gid)
            os.rename(tmp, self.path)
            s.listen(64)
            s.setblocking(False)
        except BaseException:
            s.close()
            if os.path.lexists(tmp):
                os.unlink(tmp)
            raise
        self._ino = os.lstat(self.path).st_ino
        self._listen = s
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(s, selectors.EVENT_READ, "accept")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._stopping.clear()
        self._threads = [threading.Thread(target=self._loop, name="api-io", daemon=True),
                         threading.Thread(target=self._worker, name="api-worker", daemon=True)]
        for t in self._threads:
            t.start()
        self.log.info("control API listening on %s", self.path)

    def stop(self) -> None:
        if self._listen is None:
            return
        self._stopping.set()
        self._work.put(None)
        self._wake()
        for t in self._threads:
            t.join(timeout=10)
        for c in list(self._conns.values()):
            self._close(c)
        self._sel.close()
        self._listen.close()
        self._wake_r.close()
        self._wake_w.close()
        self._listen = None
        try:
            # Only our own socket: a newer agent may already have replaced it.
            if os.lstat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- the I/O loop ----------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a full pipe already means "wake up"

    def _loop(self) -> None:
        while not self._stopping.is_set():
            now = time.monotonic()
            deadlines = [c.deadline for c in self._conns.values() if c.state != "working"]
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            try:
                events = self._sel.select(timeout)
            except OSError:
                if self._stopping.is_set():
                    return
                raise
            for key, mask in events:
                try:
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._drain_wake()
                    elif mask & selectors.EVENT_READ:
                        self._read(key.data)
                    elif mask & selectors.EVENT_WRITE:
                        self._write(key.data)
                except Exception:
                    self.log.exception("control API: unexpected error serving a client")
                    if isinstance(key.data, _Conn):
                        self._close(key.data)
            self._expire(time.monotonic())

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listen.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: try again on the next event
                self.log.warning("control API: accept failed: %s", e)
                return
            sock.setblocking(False)
            if len(self._conns) >= self.max_connections:
                # The agent's state, not the request, is the reason: "refused" (ctl exit 1).
                self._try_send(sock, reply_error(REFUSED, "agent busy: too many connections"))
                sock.close()
                continue
            try:
                peer = self.peercred(sock)
            except OSError as e:
                self.log.warning("control API: no peer credentials: %s", e)
                peer = None  # treated as nobody: may read, may not change
            c = _Conn(sock, peer, time.monotonic() + self.request_timeout)
            self._conns[sock.fileno()] = c
            self._sel.register(sock, selectors.EVENT_READ, c)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while True:
            try:
                c = self._done.get_nowait()
            except queue.Empty:
                return
            if c.sock.fileno() in self._conns and c.stream is not None:
                self._hand_over(c)
            elif c.sock.fileno() in self._conns:
                c.state = "writing"
                c.deadline = time.monotonic() + self.request_timeout
                self._sel.register(c.sock, selectors.EVENT_WRITE, c)
                self._write(c)

    def _read(self, c: _Conn) -> None:
        try:
            chunk = c.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(c)
            return
        eof = not chunk
        c.buf += chunk
        nl = c.buf.find(b"\n", len(c.buf) - len(chunk))  # a trickling client costs no rescans
        if (nl < 0 and len(c.buf) > self.max_request_bytes) or nl > self.max_request_bytes:
            # Answered at once, not at the deadline: the client learns why, and the agent
            # holds no more than the limit (plus one read) per client.
            self._reply_now(c, reply_error(
                BAD_REQUEST, f"request larger than {self.max_request_bytes} bytes (the "
                             f"agent's [agent] max_request_bytes, after compression)"))
            return
        if nl >= 0:
            del c.buf[nl:]
        elif not eof:
            return
        elif not c.buf:
            self._close(c)  # connected and left without a word
            return
        # A request ended by the client closing its side, without the newline, is taken
        # as whole: if it was cut short, the JSON parse says so.
        c.state = "working"
        self._sel.unregister(c.sock)
        self._work.put(c)

    def _reply_now(self, c: _Conn, doc: Dict[str, Any]) -> None:
        c.out = _encode(doc)
        c.state = "writing"
        c.deadline = time.monotonic() + self.request_timeout
        self._sel.modify(c.sock, selectors.EVENT_WRITE, c)
        self._write(c)

    def _write(self, c: _Conn) -> None:
        try:
            n = c.sock.send(c.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(c)
            return
        c.out = c.out[n:]
        if not c.out:
            self._close(c)

    def _hand_over(self, c: _Conn) -> None:
        """A streaming command was accepted: the connection leaves this loop for the
        streamer, which writes the reply and then the stream (so the client never sees
        the reply before it is subscribed)."""
        del self._conns[c.sock.fileno()]
        try:
            c.stream.adopt(c.sock, c.out)
        except Exception:
            self.log.exception("control API: cannot start a stream")
            c.sock.close()

    @staticmethod
    def _try_send(sock: socket.socket, doc: Dict[str, Any]) -> None:
        try:
            sock.send(_encode(doc))
        except OSError:
            pass

    def _expire(self, now: float) -> None:
        for c in list(self._conns.values()):
            if c.state == "working" or c.deadline > now:
                continue
            if c.state == "reading":
                self.log.info("control API: closing a client that sent no whole request in "
                              "%.1fs", self.request_timeout)
                self._try_send(c.sock, reply_error(
                    BAD_REQUEST, f"no whole request within {self.request_timeout:g}s"))
            else:
                self.log.info("control API: closing a client that does not read its reply")
            self._close(c)

    def _close(self, c: _Conn) -> None:
        fd = c.sock.fileno()
        if fd >= 0 and self._conns.get(fd) is c:
            del self._conns[fd]
            if c.state != "working":
                try:
                    self._sel.unregister(c.sock)
                except (KeyError, ValueError):
                    pass
        c.sock.close()

    # -- the controller side ---------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            c = self._work.get()
            if c is None:
                return
            # A compressed request is a big one (an apply of a big file): see state_building.
            big = b'"args_zlib"' in c.buf[:64]
            try:
                with state_building() if big else contextlib.nullcontext():
                    reply = self.handle(bytes(c.buf), c.peer)
                    if isinstance(reply, commands.Stream):
                        c.stream, reply = reply, reply_ok(reply.head)
                    c.out = _encode(reply)
            except Exception:  # a result JSON cannot carry: a bug in the controller
                self.log.exception("control API: cannot encode the reply")
                c.out = _encode(reply_error(INTERNAL, "the reply could not be encoded "
                                                      "(see the agent's log)"))
            self._done.put(c)
            self._wake()

    def authorize(self, cmd: commands.Command, args: Any, peer: Optional[Peer]) -> None:
        """Raise PermissionError if `peer` may not run `cmd` with `args`. Reading is for
        anyone who can reach the socket (its mode and group decide who that is)."""
        if not cmd.needs_admin(args):
            return
        if peer is not None and is_admin(peer, self.admin_group):
            return
        who = "unknown peer" if peer is None else f"uid {peer.uid}"
        need = (f"root or membership in group {self.admin_group!r}" if self.admin_group
                else "root")
        what = "changes state" if cmd.changes_state(args) else "shows tenants' packets"
        raise PermissionError(f"permission denied: {cmd.name!r} {what} and needs {need} "
                              f"({who})")

    def handle(self, data: bytes, peer: Optional[Peer]) -> Any:
        """One request's bytes -> the reply document (or, for a streaming command that
        was accepted, its commands.Stream); counted, timed, and audited when it asks for a
        change."""
        t0 = time.monotonic()
        seen: Dict[str, Any] = {}
        reply = self._reply(data, peer, seen)
        cmd = commands.get(seen["name"]) if "name" in seen else None
        args = seen.get("args")
        label = cmd.name if cmd else "unknown"
        stream = isinstance(reply, commands.Stream)
        result = "ok" if stream or reply["ok"] else reply["error"]["code"]
        if self.timings is not None:
            self.timings.observe("api", time.monotonic() - t0, label)
            self.timings.count("api", label, result)
        if cmd is not None and not stream and cmd.changes_state(args):
            audit_log.info("%s: %s: %s", describe_peer(peer), describe_request(cmd, args),
                           describe_result(cmd, reply))
        return reply

    def _reply(self, data: bytes, peer: Optional[Peer], seen: Dict[str, Any]) -> Any:
        """The reply; `seen` gets the request's command name and args once parsed."""
        try:
            req = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            return reply_error(BAD_REQUEST, f"request is not JSON: {e}")
        except RecursionError:
            # json recurses per nested array or object: a request of thousands of "["
            # ended here as RecursionError, logged as a traceback and answered "internal"
            # (found by the hostile-client tests, issue 14).
            return reply_error(BAD_REQUEST, "request is not JSON we take: arrays or objects "
                                            "nested too deeply")
        if not isinstance(req, dict) or not isinstance(req.get("command"), str):
            return reply_error(BAD_REQUEST, 'request must be {"command": NAME, "args": {...}}')
        extra = set(req) - {"command", "args", "args_zlib"}
        if extra:
            return reply_error(BAD_REQUEST, f"unknown request field(s) {', '.join(sorted(extra))}")
        name, args = req["command"], req.get("args")
        if "args_zlib" in req:
            try:
                args = inflate_args(req["args_zlib"], INFLATE_FACTOR * self.max_request_bytes)
            except ValueError as e:
                return reply_error(BAD_REQUEST, f"args_zlib: {e}")
        seen.update(name=name, args=args)
        cmd = commands.get(name)
        if cmd is None:
            return reply_error(BAD_REQUEST, f"unknown command {name!r}")
        try:
            self.authorize(cmd, args, peer)
        except PermissionError as e:
            self.log.warning("control API: denied %s to %s", name, describe_peer(peer))
            return reply_error(DENIED, str(e))
        # Changes hold the lock throughout; reading commands lock only their snapshot.
        held = self.lock if cmd.changes_state(args) else contextlib.nullcontext()
        try:
            with held:
                result = commands.dispatch(self.controller, name, args)
            return result if isinstance(result, commands.Stream) else reply_ok(result)
        except commands.BadArgs as e:
            return reply_error(BAD_REQUEST, str(e))
        except model.Conflict as e:
            return reply_error(REFUSED, str(e), at=e.at, first_at=e.first_at)
        except model.Invalid as e:
            return reply_error(INVALID, str(e), at=e.at, first_at=e.first_at)
        except PermissionError as e:
            return reply_error(DENIED, str(e))
        except Exception as e:
            self.log.exception("control API: %s failed", name)
            return reply_error(INTERNAL, f"{name} failed: {type(e).__name__} (see the "
                                         "agent's log)")


class RawJSON(str):
    """Text that is already JSON, sent in a request's args as it is (an apply file of
    *.json: the agent parses it; the client need not parse and encode it again). A
    value at the args' top level only; such a request is always sent compressed. Text
    that is not JSON is the agent's to refuse."""


def encode_args(args: Dict[str, Any]) -> str:
    """A request's args as JSON text, RawJSON values as they are."""
    if not any(type(v) is RawJSON for v in args.values()):
        return json.dumps(args, separators=(",", ":"))
    return "{" + ",".join(json.dumps(k) + ":" + (
        v if type(v) is RawJSON else json.dumps(v, separators=(",", ":")))
        for k, v in args.items()) + "}"


def deflate_text(text: str) -> str:
    return base64.b64encode(zlib.compress(text.encode(), 1)).decode()


def inflate_args(text: Any, limit: int) -> Any:
    """The args of a compressed request; ValueError naming what is wrong (not base64, not
    zlib, expanding past `limit` bytes, not JSON)."""
    if not isinstance(text, str):
        raise ValueError("must be base64 text")
    try:
        packed = base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        raise ValueError("not base64") from None
    z = zlib.decompressobj()
    try:
        raw = z.decompress(packed, limit)
    except zlib.error as e:
        raise ValueError(f"not zlib data: {e}") from None
    if z.unconsumed_tail or not z.eof:
        raise ValueError(f"expands to more than {limit} bytes ({INFLATE_FACTOR} x the "
                         f"agent's [agent] max_request_bytes), or is cut short")
    try:
        with no_collector_passes():     # a large state: many objects at once
            return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"not JSON: {e}") from None


def describe_peer(peer: Optional[Peer]) -> str:
    """"uid 1000 (alice) pid 4242" for the audit log."""
    if peer is None:
        return "unknown peer"
    try:
        user = pwd.getpwuid(peer.uid).pw_name
    except KeyError:
        user = "?"
    return f"uid {peer.uid} ({user}) pid {peer.pid}"


# How an apply's answer is cut and how strictly its file is read (xdpflowctl sends both):
# not what it changes, which is what the audit line says.
_NOT_AUDITED = ("diff_limit", "no_duplicates")


def describe_request(cmd: commands.Command, args: Any) -> str:
    """The command and its arguments as typed, in one line ("rule add tenant=blue ...");
    an apply's state is summarized by what it holds."""
    if not isinstance(args, dict):
        return cmd.name
    parts = [cmd.name]
    for k, v in args.items():
        if k in _NOT_AUDITED:
            continue
        if k == "state" and isinstance(v, dict):
            held = ", ".join(f"{len(x)} {kind}" for kind, x in v.items()
                             if isinstance(x, list) and x)
            parts.append(f"state=({held or 'empty'})")
        elif v is True:
            parts.append(f"--{k.replace('_', '-')}")
        elif v not in (None, False):
            parts.append(f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}")
    return " ".join(parts)


def describe_result(cmd: commands.Command, reply: Dict[str, Any]) -> str:
    if not reply.get("ok"):
        err = reply.get("error") or {}
        return f"{err.get('code')}: {err.get('message')}"
    if cmd.name == "apply" and isinstance(reply.get("result"), dict):
        n = model.count_changes(reply["result"])
        return f"ok, {n} change{'' if n == 1 else 's'}"
    result = reply.get("result")
    if cmd.name == "port add" and isinstance(result, dict) and result.get("state") == "failed":
        return f"ok, but attaching failed: {result.get('note')}"
    return "ok"


class ApiError(Exception):
    """An error reply, or "unreachable" when the agent's socket cannot be reached."""

    def __init__(self, code: str, message: str, at: Optional[str] = None,
                 first_at: Optional[str] = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.at, self.first_at = at, first_at     # reply_error's place in an apply file


class ApiClient:
    """Sends one request per call to the agent's socket (what xdpflowctl uses)."""

    def __init__(self, path: str = DEFAULT_SOCKET, timeout: float = 30.0,
                 max_reply_bytes: int = 256 * 2**20):
        self.path = path
        self.timeout = timeout
        self.max_reply_bytes = max_reply_bytes

    def call(self, command: str, args: Optional[Dict[str, Any]] = None) -> Any:
        s = self._request(command, args)
        try:
            return self._result(self._line(s, bytearray()))
        finally:
            s.close()

    def stream(self, command: str, args: Optional[Dict[str, Any]] = None) -> "ApiStream":
        """Start a streaming command: its reply's result is `.head`, then `.next()` gives
        each line that follows."""
        s = self._request(command, args)
        buf = bytearray()
        try:
            head = self._result(self._line(s, buf))
        except BaseException:
            s.close()
            raise
        return ApiStream(self, s, head, buf)

    def _request(self, command: str, args: Optional[Dict[str, Any]]) -> socket.socket:
        args = args or {}
        body = encode_args(args)        # encoded once: it may be 10 MB
        # RawJSON may hold newlines, which end a plain request: always compressed.
        if len(body) > COMPRESS_ABOVE or any(type(v) is RawJSON for v in args.values()):
            request = (json.dumps({"command": command, "args_zlib": deflate_text(body)}) +
                       "\n").encode()
        else:
            request = (f'{{"command":{json.dumps(command)},"args":{body}}}\n').encode()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                s.connect(self.path)
                break
            except BlockingIOError:
                # EAGAIN on a unix socket with a timeout: the agent's listen queue is full
                # (a crowd of clients), so it is busy, not gone. Wait for room as a blocking
                # connect would; 200 clients at once were told "is the agent running?"
                # (found by the hostile-client tests, issue 14).
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                s.close()
                raise ApiError("unreachable", f"the agent at {self.path} is busy: its "
                                              f"connection queue stayed full for "
                                              f"{self.timeout:g}s") from None
            except OSError as e:
                s.close()
                raise ApiError("unreachable", f"cannot reach the agent at {self.path}: "
                                              f"{e.strerror or e}") from None
        try:
            s.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the agent may answer (busy, too large) before reading it all
        except OSError as e:
            s.close()
            raise ApiError("unreachable", f"connection to the agent at {self.path} "
                                          f"failed: {e.strerror or e}") from None
        return s

    def _line(self, s: socket.socket, buf: bytearray) -> bytes:
        """One line from the socket (without its newline); what follows stays in buf."""
        try:
            while b"\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > self.max_reply_bytes:
                    raise ApiError(INTERNAL, "reply too large")
        except socket.timeout:
            raise ApiError("unreachable", f"the agent at {self.path} did not answer "
                                          f"within {s.gettimeout():g}s") from None
        except OSError as e:
            raise ApiError("unreachable", f"connection to the agent at {self.path} "
                                          f"failed: {e.strerror or e}") from None
        line, _, rest = bytes(buf).partition(b"\n")
        buf[:] = rest
        return line

    def _result(self, line: bytes) -> Any:
        try:
            reply = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ApiError(INTERNAL, f"the agent at {self.path} sent no valid reply") from None
        if not isinstance(reply, dict) or "ok" not in reply:
            raise ApiError(INTERNAL, f"the agent at {self.path} sent a malformed reply")
        if reply["ok"]:
            return reply.get("result")
        err = reply.get("error") or {}
        place = {k: str(err[k]) for k in ("at", "first_at") if err.get(k) is not None}
        raise ApiError(str(err.get("code", INTERNAL)), str(err.get("message", "")), **place)


class ApiStream:
    """The lines of a streaming command after its reply (see ApiClient.stream)."""

    def __init__(self, client: ApiClient, sock: socket.socket, head: Any, buf: bytearray):
        self.client = client
        self.sock = sock
        self.head = head
        self._buf = buf

    def next(self, timeout: Optional[float] = None) -> Optional[Dict[str, Any]]:
        """The next line as a dict; None when `timeout` seconds pass without one. Raises
        ApiError("unreachable") when the agent ends the stream."""
        if b"\n" not in self._buf:
            self.sock.settimeout(timeout)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return None
            except OSError as e:
                raise ApiError("unreachable", f"stream from the agent failed: "
                                              f"{e.strerror or e}") from None
            if not chunk:
                raise ApiError("unreachable", "the agent ended the stream")
            self._buf += chunk
            if b"\n" not in self._buf:
                return None
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf[:] = rest
        try:
            return json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ApiError(INTERNAL, "the agent sent a line that is not JSON") from None

    def close(self) -> None:
        self.sock.close()
