"""Tell systemd how the agent is doing (sd_notify), without linking libsystemd.

The protocol is one datagram of newline-separated KEY=VALUE lines sent to the AF_UNIX
socket named by $NOTIFY_SOCKET: a filesystem path, or an abstract-namespace name written
with a leading '@'. Outside systemd the variable is unset and every call is a no-op that
returns False, so the daemon calls these unconditionally.

The unit is Type=notify with WatchdogSec=: the daemon calls `ready()` once the datapath is
loaded and the desired state applied, `watchdog()` every `watchdog_interval() / 2` seconds
from its main loop (so a wedged loop, not just a dead process, gets restarted),
`reloading()` then `ready()` around a SIGHUP reload, and `stopping()` on the way out.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Optional

log = logging.getLogger(__name__)

__all__ = [
    "notify",
    "ready",
    "stopping",
    "reloading",
    "status",
    "watchdog",
    "watchdog_interval",
]


def _address(value: str) -> Optional[str]:
    if value.startswith("@"):
        # Abstract namespace: the kernel wants a leading NUL, systemd writes '@'.
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # systemd >= 253 may also hand out "vsock:CID:PORT"; a host agent never runs in a VM
    # manager's guest, so that transport is not worth the code.
    return None


def notify(state: str) -> bool:
    """Send `state` (KEY=VALUE lines) to $NOTIFY_SOCKET; True if the datagram was sent.

    False when not run under systemd, or when sending failed: a lost notification must never
    take the datapath down with it, so errors are logged, not raised.
    """
    value = os.environ.get("NOTIFY_SOCKET", "")
    if not value:
        return False
    address = _address(value)
    if address is None:
        log.debug("NOTIFY_SOCKET=%r: unsupported address, not notifying", value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode("utf-8"), address)
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", value, exc)
        return False
    return True


def ready(status_text: Optional[str] = None) -> bool:
    """The agent is serving: systemd ends `start` (and `reload`) here."""
    state = "READY=1"
    if status_text is not None:
        state += "\n" + _status_line(status_text)
    return notify(state)


def stopping() -> bool:
    """The agent is shutting down of its own accord (SIGTERM)."""
    return notify("STOPPING=1")


def reloading() -> bool:
    """A reload started; call `ready()` when it is done.

    MONOTONIC_USEC lets systemd (>= 253) tell this reload from an earlier one; older
    versions ignore it.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def _status_line(text: str) -> str:
    # A newline would start a new KEY=VALUE assignment in the datagram.
    return "STATUS=" + " ".join(text.splitlines())


def status(text: str) -> bool:
    """A one-line human status, shown by `systemctl status`."""
    return notify(_status_line(text))


def watchdog() -> bool:
    """Keep-alive for WatchdogSec=; send every `watchdog_interval() / 2` seconds."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> Optional[float]:
    """The watchdog timeout in seconds that systemd expects of this process, or None.

    $WATCHDOG_PID, when set, names the process the watchdog is meant for: a child that
    inherited the environment must not ping on its parent's behalf.
    """
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 1_000_000
