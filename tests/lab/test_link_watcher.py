"""The link watcher on a real netlink socket in a namespace of its own: parsed events
reach the callback, and an overflow of its receive buffer (ENOBUFS, events lost) is
reported as "lost" (the agent then reconciles every port) and the watcher keeps
watching."""
from __future__ import annotations

import os
import queue

import pytest

from agent.links import LinkWatcher
from netns_lab.netns import Namespaces, entered, ip, run

pytestmark = pytest.mark.lab


@pytest.fixture
def ns():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with Namespaces() as nss:
        yield nss.add("xfw")


def watcher_in(ns, events, rcvbuf=1 << 20):
    w = LinkWatcher(events.put, rcvbuf=rcvbuf)
    with entered(ns):            # the netlink socket belongs to the namespace it is made in
        w.start()
    return w


def test_events_reach_the_callback(ns):
    events = queue.Queue()
    w = watcher_in(ns, events)
    try:
        ip("link", "add", "xfw-a", "type", "veth", "peer", "name", "xfw-b", ns=ns)
        assert events.get(timeout=5) == "link"
    finally:
        w.stop()


def test_lost_events_are_reported_and_watching_goes_on(ns):
    events = queue.Queue()
    # A receive buffer far too small for a burst: the kernel drops events (ENOBUFS).
    w = watcher_in(ns, events, rcvbuf=1024)
    script = "".join(f"link add xfa{i} type veth peer name xfb{i}\n" for i in range(64))
    run(["ip", "-batch", "-"], ns=ns, input=script)
    try:
        assert events.get(timeout=5) == "lost"
        assert w.lost >= 1
        while not events.empty():
            events.get()
        ip("link", "set", "xfa0", "up", ns=ns)
        assert events.get(timeout=5) in ("link", "lost")
    finally:
        w.stop()

