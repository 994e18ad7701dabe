"""Ports as netlink sees them (pyroute2): look interfaces up, attach the datapath with an
atomic replace (never detach, then attach), detach, make a veth's peer able to take
redirected frames, and watch interfaces come and go."""
from __future__ import annotations

import errno
import logging
import os
import select
import subprocess
import threading
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Optional, Set, Tuple

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import bpfsys
from .netns import in_netns_path

log = logging.getLogger("xdpflow.links")

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_REPLACE = 1 << 4
MODE_FLAGS = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}
OUR_PROGRAMS = ("xdpflow_port", "xf_pass")   # program names (BCC names them after the function)
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_NEIGH = 0x4
# Neighbour states whose link-layer address is usable (linux/neighbour.h NUD_*).
NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80   # REACHABLE STALE DELAY PROBE NOARP PERMANENT
DISCARD_PORT = 9      # a datagram to it makes the kernel resolve the address (RFC 863)


class LinkError(Exception):
    pass


@dataclass
class Link:
    name: str
    ifindex: int
    mac: str
    kind: str                    # veth, tun, ...
    xdp_prog_id: int             # 0: nothing attached
    xdp_mode: str                # native | generic | ""
    peer_ifindex: int            # veth: the peer's ifindex in its namespace
    peer_netnsid: Optional[int]  # veth: the peer's namespace id as seen from here
    addrs: Tuple[str, ...] = ()
    mtu: int = 1500


def _xdp_state(msg) -> Tuple[int, str]:
    x = msg.get_attr("IFLA_XDP")
    if not x:
        return 0, ""
    attached = x.get_attr("IFLA_XDP_ATTACHED")
    pid = x.get_attr("IFLA_XDP_PROG_ID") or 0
    mode = {"xdp": "native", "xdpgeneric": "generic", "xdpoffload": "offload"}.get(
        attached, "") if attached else ""
    return pid, mode


def _link_from_msg(msg, addrs=()) -> Link:
    info = msg.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info else ""
    pid, mode = _xdp_state(msg)
    return Link(name=msg.get_attr("IFLA_IFNAME"), ifindex=msg["index"],
                mac=(msg.get_attr("IFLA_ADDRESS") or "00:00:00:00:00:00").lower(),
                kind=kind or "", xdp_prog_id=pid, xdp_mode=mode,
                peer_ifindex=msg.get_attr("IFLA_LINK") or 0,
                peer_netnsid=msg.get_attr("IFLA_LINK_NETNSID"), addrs=tuple(addrs),
                mtu=msg.get_attr("IFLA_MTU") or 1500)


class Links:
    """One netlink socket in the agent's namespace."""

    def __init__(self):
        self.ipr = IPRoute()
        self._lock = threading.Lock()
        # The underlay next hops (ifindex, address) `neighbours` last looked up: the only
        # neighbours whose changes matter to the datapath (wants_neighbour).
        self.next_hops: FrozenSet[Tuple[int, str]] = frozenset()

    def close(self):
        self.ipr.close()

    def get(self, name: str) -> Optional[Link]:
        with self._lock:
            try:
                msgs = self.ipr.link("get", ifname=name)
            except NetlinkError as e:
                if e.code in (19, 2):    # ENODEV, ENOENT
                    return None
                raise
            if not msgs:
                return None
            msg = msgs[0]
            addrs = [a.get_attr("IFA_ADDRESS") for a in self.ipr.get_addr(index=msg["index"])]
        return _link_from_msg(msg, addrs)

    def neighbours(self, addrs) -> Dict[str, str]:
        """Underlay address (a VTEP) -> the MAC of its next hop, as the kernel resolved it.
        One not resolved is asked for (a datagram to its discard port makes the kernel
        resolve it; the event that follows reconciles) and left out meanwhile: the
        datapath hands its packets to the kernel until it is known."""
        out, hops = {}, set()
        for addr in sorted(addrs):
            mac = self._next_hop_mac(addr, hops)
            if mac:
                out[addr] = mac
            else:
                self._solicit(addr)
        self.next_hops = frozenset(hops)
        return out

    def wants_neighbour(self, ifindex: int, addr: Optional[str]) -> bool:
        """Is a neighbour event about an underlay next hop (of the last `neighbours`)?
        Any other (a VM's ARP, the node's own peers) changes nothing in the datapath."""
        return (ifindex, (addr or "").lower()) in self.next_hops

    def _next_hop_mac(self, addr: str, hops: Set[Tuple[int, str]]) -> Optional[str]:
        with self._lock:
            try:
                routes = self.ipr.route("get", dst=addr)
            except NetlinkError:
                return None        # no route: nothing to resolve
            if not routes:
                return None
            oif = routes[0].get_attr("RTA_OIF")
            hop = routes[0].get_attr("RTA_GATEWAY") or addr
            hops.add((oif, hop.lower()))
            # Wanted at once: the answer to the solicitation below may come before
            # `neighbours` is done.
            self.next_hops = self.next_hops | {(oif, hop.lower())}
            for n in self.ipr.get_neighbours(ifindex=oif, dst=hop):
                lladdr = n.get_attr("NDA_LLADDR")
                if lladdr and n["state"] & NUD_USABLE:
                    return lladdr.lower()
        return None

    @staticmethod
    def _solicit(addr: str) -> None:
        import socket
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"", (addr, DISCARD_PORT))
        except OSError as e:
            log.debug("resolving %s: %s", addr, e)

    def all(self) -> Dict[str, Link]:
        with self._lock:
            return {m.get_attr("IFLA_IFNAME"): _link_from_msg(m) for m in self.ipr.get_links()}

    # -- XDP --------------------------------------------------------------------------------
    def attach(self, link: Link, prog_fd: int, mode: str = "native") -> str:
        """Put prog_fd on the interface. If a program is already there (ours from an
        earlier agent, or an older build) it is replaced in one step, refused by the
        kernel if someone swapped it in between. Returns what was done."""
        flags = MODE_FLAGS[mode]
        attrs = [("IFLA_XDP_FD", prog_fd)]
        old_fd = -1
        if link.xdp_prog_id:
            owner = bpfsys.prog_name_by_id(link.xdp_prog_id)
            if owner not in OUR_PROGRAMS:
                raise LinkError(f"{link.name}: another XDP program ({owner!r}, id "
                                f"{link.xdp_prog_id}) is attached; xdpflow does not replace "
                                f"programs it did not attach")
            if link.xdp_mode and link.xdp_mode != mode:
                raise LinkError(f"{link.name}: a {link.xdp_mode} XDP program is attached; "
                                f"this agent attaches in {mode} mode. Detach it first "
                                f"(xdpflow-agent --teardown) or set datapath.xdp_mode")
            old_fd = bpfsys.prog_fd_by_id(link.xdp_prog_id)
            attrs += [("IFLA_XDP_FLAGS", flags | XDP_FLAGS_REPLACE),
                      ("IFLA_XDP_EXPECTED_FD", old_fd)]
        else:
            attrs += [("IFLA_XDP_FLAGS", flags | XDP_FLAGS_UPDATE_IF_NOEXIST)]
        try:
            with self._lock:
                self.ipr.link("set", index=link.ifindex, xdp={"attrs": attrs})
        except NetlinkError as e:
            raise LinkError(f"{link.name}: attaching XDP ({mode}) failed: "
                            f"{os.strerror(e.code)} (errno {e.code})") from None
        finally:
            if old_fd >= 0:
                os.close(old_fd)
        return "replaced" if link.xdp_prog_id else "attached"

    def detach(self, link: Link, only_ours: bool = True) -> bool:
        if not link.xdp_prog_id:
            return False
        if only_ours and bpfsys.prog_name_by_id(link.xdp_prog_id) not in OUR_PROGRAMS:
            return False
        flags = MODE_FLAGS.get(link.xdp_mode, XDP_FLAGS_DRV_MODE)
        with self._lock:
            self.ipr.link("set", index=link.ifindex,
                          xdp={"attrs": [("IFLA_XDP_FD", -1), ("IFLA_XDP_FLAGS", flags)]})
        return True

    # -- veth peers ---------------------------------------------------------------------------
    def peer_namespace(self, link: Link) -> Optional[str]:
        """The path of the named namespace holding a veth's peer, if it can be found."""
        if link.kind != "veth":
            return None
        if link.peer_netnsid is None:
            return "self"
        try:
            names = os.listdir("/run/netns")
        except FileNotFoundError:
            return None
        for name in names:
            path = f"/run/netns/{name}"
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                with self._lock:
                    r = self.ipr.get_netnsid(fd=fd)
                if r and r.get("nsid") == link.peer_netnsid:
                    return path
            except NetlinkError:
                pass
            finally:
                os.close(fd)
        return None

    def on_peer(self, link: Link, fn: Callable) -> Optional[object]:
        """Call fn(IPRoute in the peer's namespace, peer ifindex) for a veth port."""
        where = self.peer_namespace(link)
        if where is None:
            return None

        def work():
            ipr = IPRoute()
            try:
                return fn(ipr, link.peer_ifindex)
            finally:
                ipr.close()

        return work() if where == "self" else in_netns_path(where, work)

    def unprepare_peer(self, link: Link) -> bool:
        """Take our pass-through program off a veth's peer (teardown)."""
        def work(ipr, ifindex):
            msg = ipr.link("get", index=ifindex)[0]
            pid, mode = _xdp_state(msg)
            if not pid or bpfsys.prog_name_by_id(pid) != "xf_pass":
                return False
            ipr.link("set", index=ifindex, xdp={"attrs": [
                ("IFLA_XDP_FD", -1), ("IFLA_XDP_FLAGS", MODE_FLAGS.get(mode, XDP_FLAGS_DRV_MODE))]})
            return True
        return bool(self.on_peer(link, work))

    def prepare_peer(self, link: Link, pass_fd: int) -> str:
        """Make a veth's peer (the VM side) able to take redirected frames:
        - a redirect into a veth only delivers when the peer runs an XDP program, so give it
          a pass-through one unless it has a program already;
        - frames the VM sends with checksum offload carry an unfinished L4 checksum that an
          XDP redirect cannot finish, so the peer computes checksums itself (tx off)."""
        def work(ipr, ifindex):
            msg = ipr.link("get", index=ifindex)[0]
            notes = []
            pid, _ = _xdp_state(msg)
            if not pid:
                ipr.link("set", index=ifindex, xdp={"attrs": [
                    ("IFLA_XDP_FD", pass_fd),
                    ("IFLA_XDP_FLAGS", XDP_FLAGS_DRV_MODE | XDP_FLAGS_UPDATE_IF_NOEXIST)]})
                notes.append("pass-through XDP program attached")
            name = msg.get_attr("IFLA_IFNAME")
            p = subprocess.run(["ethtool", "-K", name, "tx", "off"], capture_output=True,
                               text=True)
            notes.append("tx checksum offload off" if p.returncode == 0 else
                         f"could not turn tx checksum offload off: {p.stderr.strip()}")
            return "peer " + name + ": " + ", ".join(notes)
        if link.kind != "veth":
            return "not a veth"
        return self.on_peer(link, work) or "peer namespace not found (not under /run/netns)"


class LinkWatcher:
    """Link and address events, parsed by pyroute2 (IPRoute.bind/get), handed to
    `on_change(why)` from the watcher's own thread, a burst coalesced into one call. `why`
    is "link", or "lost" when the kernel dropped events because the socket's receive
    buffer overflowed (ENOBUFS): the caller cannot know what changed and must reconcile
    every port. Neighbour events count only where `neighbour_wanted(ifindex, address)`
    says so (the agent: Links.wants_neighbour, its underlay next hops): a node's VMs and
    peers resolve neighbours all the time, and none of those is a reason to reconcile."""

    # Neighbours too: a VTEP's underlay MAC is part of the overlay's flow entries.
    GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_NEIGH
    NEIGH_EVENTS = ("RTM_NEWNEIGH", "RTM_DELNEIGH")

    def __init__(self, on_change: Callable[[str], None], rcvbuf: int = 1 << 20,
                 neighbour_wanted: Callable[[int, Optional[str]], bool] = lambda i, a: True):
        self.on_change = on_change
        self.neighbour_wanted = neighbour_wanted
        self.neighbours_ignored = 0        # neighbour events that were not about a next hop
        self.rcvbuf = rcvbuf
        self.lost = 0                      # overflows seen (each followed by "lost")
        self.ipr: Optional[IPRoute] = None
        self._lost_pending = False
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="link-watch", daemon=True)

    def _open(self) -> IPRoute:
        ipr = IPRoute(rcvbuf=self.rcvbuf)
        try:
            ipr.bind(groups=self.GROUPS)
        except BaseException:
            ipr.close()
            raise
        return ipr

    def start(self):
        """Subscribe (in the caller's network namespace) and start watching; raises what
        subscribing raised."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def stop(self):
        os.write(self._stop_w, b"x")
        self._thread.join(timeout=5)
        os.close(self._stop_r)
        os.close(self._stop_w)

    def _overflowed(self) -> None:
        """The kernel dropped events (ENOBUFS); pyroute2's socket stays in that error, so
        it is replaced, and the next call says "lost"."""
        self.lost += 1
        self._lost_pending = True
        log.warning("netlink: link events were lost (receive buffer overflowed); "
                    "reconciling every port")
        self._close()
        self.ipr = self._open()

    def _fd(self) -> int:
        try:
            return self.ipr.fileno()
        except OSError as e:      # pyroute2 raises a socket's pending error here
            if e.errno != errno.ENOBUFS:
                raise
        self._overflowed()
        return self.ipr.fileno()

    def _read(self) -> bool:
        """Read what is there; True when any of it is a change to report."""
        relevant = False
        try:
            for msg in self.ipr.get():
                if msg.get("event") in self.NEIGH_EVENTS and not self.neighbour_wanted(
                        msg.get("ifindex"), msg.get_attr("NDA_DST")):
                    self.neighbours_ignored += 1
                    continue
                relevant = True
                log.debug("netlink: %s %s", msg.get("event"),
                          msg.get_attr("IFLA_IFNAME") or msg.get("index"))
        except OSError as e:
            if e.errno != errno.ENOBUFS:
                raise
            self._overflowed()
        return relevant

    def _run(self):
        # pyroute2's synchronous socket belongs to the thread that made it (its event
        # loop is per thread): open, read and close it here.
        try:
            self.ipr = self._open()
        except BaseException as e:
            self._error = e
            return
        finally:
            self._ready.set()
        try:
            self._watch()
        finally:
            self._close()

    def _close(self) -> None:
        try:
            self.ipr.close()
        except OSError:           # a socket in error raises it again on close
            pass

    def _watch(self):
        while True:
            fd = self._fd()
            r, _, _ = select.select([fd, self._stop_r], [], [],
                                    0 if self._lost_pending else None)
            if self._stop_r in r:
                return
            relevant = False
            try:
                if fd in r:
                    relevant = self._read()
                # Coalesce a burst of events into one reconcile.
                while select.select([self._fd()], [], [], 0.05)[0]:
                    relevant = self._read() or relevant
            except OSError:
                log.exception("reading link events")
                continue
            if not relevant and not self._lost_pending:
                continue
            why = "lost" if self._lost_pending else "link"
            self._lost_pending = False
            try:
                self.on_change(why)
            except Exception:
                log.exception("handling a link event")
