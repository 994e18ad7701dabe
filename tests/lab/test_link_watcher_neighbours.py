"""Neighbour events and the agent: only the underlay next hops of its remote VTEPs matter
(their MACs are in the overlay's flow entries); the neighbours a node's VMs and peers
resolve all the time are no reason to reconcile every port. On a real netlink socket in
a namespace of its own."""
from __future__ import annotations

import os
import queue

import pytest

from agent.links import Links, LinkWatcher
from netns_lab.netns import Namespaces, entered, ip

pytestmark = pytest.mark.lab


@pytest.fixture
def node():
    """A namespace with an underlay veth (192.0.2.1/24), a route through a gateway, the
    neighbours of a VTEP and of the gateway known, and the agent's Links in it."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with Namespaces() as nss:
        ns = nss.add("xfn")
        ip("link", "add", "xfn-ul", "type", "veth", "peer", "name", "xfn-peer", ns=ns)
        for cmd in ("link set xfn-ul up", "link set xfn-peer up",
                    "addr add 192.0.2.1/24 dev xfn-ul",
                    "route add 198.51.100.0/24 via 192.0.2.254",
                    "neigh replace 192.0.2.2 lladdr 02:ee:00:00:00:02 dev xfn-ul nud permanent",
                    "neigh replace 192.0.2.254 lladdr 02:ee:00:00:00:fe dev xfn-ul "
                    "nud permanent"):
            ip(*cmd.split(), ns=ns)
        with entered(ns):            # netlink and the solicitations: the namespace's
            links = Links()
        try:
            yield ns, links
        finally:
            links.close()


def test_the_next_hops_are_the_vteps_or_their_gateways(node):
    ns, links = node
    with entered(ns):
        got = links.neighbours({"192.0.2.2", "198.51.100.7"})
    assert got == {"192.0.2.2": "02:ee:00:00:00:02", "198.51.100.7": "02:ee:00:00:00:fe"}
    ul = links.get("xfn-ul").ifindex
    assert links.next_hops == {(ul, "192.0.2.2"), (ul, "192.0.2.254")}
    assert links.wants_neighbour(ul, "192.0.2.2") and links.wants_neighbour(ul, "192.0.2.254")
    assert not links.wants_neighbour(ul, "192.0.2.9")
    assert not links.wants_neighbour(links.get("xfn-peer").ifindex, "192.0.2.2")
    # A VTEP no longer in the state is no longer watched.
    with entered(ns):
        links.neighbours({"192.0.2.2"})
    assert not links.wants_neighbour(ul, "192.0.2.254")


def test_only_next_hop_neighbour_events_reach_the_agent(node):
    ns, links = node
    with entered(ns):
        links.neighbours({"192.0.2.2"})
        events = queue.Queue()
        w = LinkWatcher(events.put, neighbour_wanted=links.wants_neighbour)
        w.start()
    try:
        # Another neighbour on the uplink, and the VTEP's address on another port.
        ip("neigh", "replace", "192.0.2.9", "lladdr", "02:ee:00:00:00:09", "dev", "xfn-ul",
           "nud", "permanent", ns=ns)
        ip("neigh", "replace", "192.0.2.2", "lladdr", "02:ee:00:00:00:22", "dev", "xfn-peer",
           "nud", "permanent", ns=ns)
        with pytest.raises(queue.Empty):
            events.get(timeout=1.0)
        assert w.neighbours_ignored >= 2
        # The VTEP's next hop changes its MAC: the agent hears of it.
        ip("neigh", "replace", "192.0.2.2", "lladdr", "02:ee:00:00:00:99", "dev", "xfn-ul",
           "nud", "permanent", ns=ns)
        assert events.get(timeout=5) == "link"
        # Links still count, neighbours or not.
        ip("link", "set", "xfn-peer", "down", ns=ns)
        assert events.get(timeout=5) == "link"
    finally:
        w.stop()
