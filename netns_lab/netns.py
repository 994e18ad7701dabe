"""Network namespaces and veths for tests and the lab: unique names, always removed, and a
way to run this process (or one thread of it) inside a namespace without `ip netns exec`
(which would give a fresh /sys and hide bpffs pins)."""
from __future__ import annotations

import os
import secrets
import subprocess
from typing import List, Optional, Sequence

from agent.netns import entered, in_netns, in_netns_path, setns  # noqa: F401 (re-exported)


def unique(prefix: str, maxlen: int = 15) -> str:
    """A name no other run uses: prefix + pid + random, cut to an interface's 15 chars."""
    tail = f"{os.getpid() % 1000:03d}{secrets.token_hex(2)}"
    return (prefix + tail)[:maxlen] if len(prefix) + len(tail) > maxlen else prefix + tail


def run(cmd: Sequence[str], ns: Optional[str] = None, check: bool = True,
        capture: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """Run a command, inside a namespace's network stack only (nsenter --net), so it
    still sees this mount namespace (bpffs pins, /sys)."""
    full = list(cmd)
    if ns:
        full = ["nsenter", f"--net=/run/netns/{ns}", "--"] + full
    p = subprocess.run(full, capture_output=capture, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(full)} failed ({p.returncode}): "
                           f"{(p.stderr or '').strip()}")
    return p


def ip(*args: str, ns: Optional[str] = None, check: bool = True) -> str:
    return run(["ip", *args], ns=ns, check=check).stdout


class Namespaces:
    """Namespaces and root-namespace links created by one test or lab run, removed on
    close() whatever happened in between."""

    def __init__(self):
        self.names: List[str] = []

    def add(self, prefix: str = "xf", exact: bool = False) -> str:
        """A new namespace named prefix + a unique tail, or exactly `prefix` (a lab built
        from a file, whose names `down` finds again by the lab's prefix)."""
        name = prefix if exact else unique(prefix, maxlen=30)
        ip("netns", "add", name)
        self.names.append(name)
        ip("link", "set", "lo", "up", ns=name)
        return name

    def veth(self, a: str, a_ns: Optional[str], b: str, b_ns: Optional[str],
             a_mac: Optional[str] = None, b_mac: Optional[str] = None) -> None:
        """A veth pair a<->b, each end moved into its namespace and brought up."""
        args = ["link", "add", a]
        if a_mac:
            args += ["address", a_mac]
        args += ["type", "veth", "peer", "name", b]
        if b_mac:
            args += ["address", b_mac]
        ip(*args, ns=a_ns)
        if b_ns != a_ns:
            ip("link", "set", b, "netns", b_ns, ns=a_ns)
        ip("link", "set", a, "up", ns=a_ns)
        ip("link", "set", b, "up", ns=b_ns)

    def delete(self, name: str) -> None:
        """Remove one namespace now (its veths go with it, and their peers)."""
        self.names.remove(name)
        ip("netns", "del", name)

    def close(self):
        for name in reversed(self.names):
            # Deleting the namespace deletes its veths, and their peers with them.
            run(["ip", "netns", "del", name], check=False)
        self.names = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
