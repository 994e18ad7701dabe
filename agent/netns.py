"""Entering network namespaces without `ip netns exec` (which would also give a fresh /sys
and hide bpffs pins): the calling thread, or a short-lived thread, joins the namespace."""
from __future__ import annotations

import contextlib
import ctypes as ct
import os
import threading
from typing import Callable, Iterator

CLONE_NEWNET = 0x40000000
_libc = ct.CDLL(None, use_errno=True)


def setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ct.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


@contextlib.contextmanager
def entered(ns: str) -> Iterator[None]:
    """Run the calling thread inside network namespace `ns`, then return to where it was."""
    here = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    try:
        setns(f"/run/netns/{ns}")
        yield
    finally:
        try:
            if _libc.setns(here, CLONE_NEWNET) != 0:
                raise OSError(ct.get_errno(), "setns back to the original namespace")
        finally:
            os.close(here)


def in_netns(ns: str, fn: Callable, *args, **kw):
    """Call fn in a short-lived thread that lives in namespace `ns` (sockets it opens stay
    bound to that namespace; file descriptors are shared with the whole process)."""
    return in_netns_path(f"/run/netns/{ns}", fn, *args, **kw)


def in_netns_path(path: str, fn: Callable, *args, **kw):
    result, error = [], []

    def body():
        try:
            setns(path)
            result.append(fn(*args, **kw))
        except BaseException as e:  # handed back to the caller
            error.append(e)

    t = threading.Thread(target=body, name=f"netns-{os.path.basename(path)}")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]
