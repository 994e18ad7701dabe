"""A two-node lab (a lab file with [[nodes]], netns_lab/labfile.py): the overlay between
nodes, built on every path the way netns_lab/topology.py builds one node.

- `offload`: a namespace per node (PREFIX-o-nA), the nodes' uplinks one veth (the
  underlay), an agent in each node with its own socket, state and pins, configured with
  `xdpflowctl apply` of that node's derived state (LabSpec.node_state): VXLAN is the
  datapath's (encap on one node, decap on the other).
- `iptables` / `nftables`: per node an underlay namespace (PREFIX-i-uA) holding the same
  uplink, and per node and tenant a router namespace (PREFIX-i-rTENANT-A) rendered by
  render.router_setup from the node's local state, plus a Linux vxlan device with the
  tenant's VNI (made in the underlay namespace, so its UDP socket is there, then moved
  into the router), a /32 route and a permanent neighbour per remote endpoint (the other
  router's vxlan MAC) and an FDB entry per remote router. Routed at both ends, as the
  datapath does (TTL down by one per node), the tenant's rules at both ends. The
  underlay namespace accepts VXLAN only from a VTEP that has endpoints of the VNI's
  tenant (the datapath's VTEP/VNI check; Linux's vxlan would take any source).

The two nodes' underlay ends are scenario senders too ("A.uplink", see compare.py): a
crafted VXLAN frame goes out of node A's uplink on every path. A VM can move to the
other node (`change`, a scenario's Move): its port (the node side of its veth) moves to
the other node's namespace, both nodes' state follows, the VM keeps its namespace."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Tuple

from agent.model import State

from . import render
from .labfile import LabSpec, VM, uplink_mac
from .lab import Lab
from .netns import run
from .scenarios import Move
from .topology import (LabError, Topology, _ip_batch, _sysctl, agent_doc, apply_state,
                       lab_handle, make_ns, pin_dir, rundir)

VXLAN_PORT = 4789
ENCAP_OVERHEAD = 50           # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
UNDERLAY_MTU = 1500


@dataclass(frozen=True)
class NodeView:
    """What a scenario expression sees of a node (node("b")): its VTEP address, its
    uplink's MAC, and per tenant the MAC a decapsulated frame is addressed to on the
    kernel path (its router's vxlan device; the datapath takes any)."""
    name: str
    ip: str
    mac: str
    router: Dict[str, str]


def vx_name(tenant: str) -> str:
    return f"vx{tenant}"[:15]


def vx_mac(spec: LabSpec, tenant: str, node: str) -> str:
    tid = spec.tenant_id(tenant)
    return f"02:cc:00:{tid >> 8:02x}:{tid & 0xff:02x}:" \
           f"{[n.name for n in spec.nodes].index(node) + 1:02x}"


def node_view(spec: LabSpec, node: str) -> NodeView:
    n = spec.node(node)
    return NodeView(node, n.local_ip, uplink_mac(spec, node),
                    {t.name: vx_mac(spec, t.name, node) for t in spec.state.tenants})


def sender_name(node: str) -> str:
    """A node's underlay end as a scenario sender."""
    return f"{node}.uplink"


def other(spec: LabSpec, node: str) -> str:
    return next(n.name for n in spec.nodes if n.name != node)


def local_spec(spec: LabSpec, node: str) -> LabSpec:
    """Node `node` as a one-node lab: its VMs, their ports and endpoints (what the
    single-node router rendering takes); remote endpoints are the overlay's."""
    d = spec.node_state(node)
    d["ports"] = [p for p in d["ports"] if not p.get("uplink")]
    d["endpoints"] = [e for e in d["endpoints"] if e.get("port")]
    state = State.from_dict(d)
    return LabSpec(spec.prefix, state, [v for v in spec.vms if v.node == node], spec.source)


def remote_endpoints(spec: LabSpec, node: str, tenant: str) -> List[Dict]:
    return [e for e in spec.node_state(node)["endpoints"]
            if e["tenant"] == tenant and e.get("vtep")]


def known_vteps(spec: LabSpec, node: str) -> Dict[int, List[str]]:
    """VNI -> the VTEPs node `node` accepts it from (those of the tenant's endpoints)."""
    out = {}
    for t in spec.state.tenants:
        if t.vni is not None:
            out[t.vni] = sorted({e["vtep"] for e in remote_endpoints(spec, node, t.name)})
    return out


def underlay_firewall(spec: LabSpec, node: str, variant: str) -> Tuple[List[str], str]:
    """The kernel path's VTEP/VNI check in a node's underlay namespace: VXLAN with a VNI
    of a tenant, from a VTEP of that tenant's endpoints; nothing else (argv, stdin)."""
    vteps = known_vteps(spec, node)
    if variant == "iptables":
        out = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
        for vni, srcs in vteps.items():
            out += [f"-A INPUT -p udp --dport {VXLAN_PORT} -s {s}/32 -m u32 --u32 "
                    f"\"0>>22&0x3C@12>>8={vni}\" -j ACCEPT" for s in srcs]
        out += [f"-A INPUT -p udp --dport {VXLAN_PORT} -m comment --comment "
                f"\"unknown VTEP or VNI\" -j DROP", "COMMIT"]
        return ["iptables-restore"], "\n".join(out) + "\n"
    lines = ["flush ruleset", "table inet xdpflow_underlay {", "  chain input {",
             "    type filter hook input priority filter; policy accept;"]
    for vni, srcs in vteps.items():
        if srcs:
            lines.append(f"    udp dport {VXLAN_PORT} @th,96,24 {vni} "
                         f"ip saddr {{ {', '.join(srcs)} }} accept")
    lines += [f"    udp dport {VXLAN_PORT} counter drop comment \"unknown VTEP or VNI\"",
              "  }", "}"]
    return ["nft", "-f", "-"], "\n".join(lines) + "\n"


def overlay_routes(spec: LabSpec, node: str, tenant: str) -> List[str]:
    """`ip -batch` lines of a router for its tenant's remote endpoints."""
    vx = vx_name(tenant)
    out = []
    for e in remote_endpoints(spec, node, tenant):
        where = next(n.name for n in spec.nodes if n.local_ip == e["vtep"])
        out += [f"route replace {e['ip']}/32 dev {vx}",
                f"neigh replace {e['ip']} lladdr {vx_mac(spec, tenant, where)} dev {vx} "
                f"nud permanent"]
    return out


def router_firewall(spec: LabSpec, node: str, tenant: str, variant: str
                    ) -> List[Tuple[List[str], str]]:
    s = render.router_setup(local_spec(spec, node), tenant, variant)
    # Replacing a loaded ruleset: iptables-restore replaces the tables it names, nft
    # needs to be told.
    return [(argv, "flush ruleset\n" + text if argv[0] == "nft" else text)
            for argv, text in s.firewall]


class Nodes(Topology):
    """Topology of a two-node lab (see the module doc)."""

    def __init__(self, spec: LabSpec, *a, **kw):
        super().__init__(spec, *a, **kw)
        self.labs: Dict[str, Lab] = {}
        # Where each VM runs on each path (a Move changes one path at a time).
        self.placed: Dict[str, LabSpec] = {p: spec for p in self.paths}

    # -- names --------------------------------------------------------------------------------
    def node_ns(self, path: str, node: str) -> str:
        return render.ns_name(self.prefix, path, ("n" if path == "offload" else "u") + node)

    def router_ns(self, path: str, tenant: str, node: str) -> str:
        return render.ns_name(self.prefix, path, f"r{tenant}-{node}")

    def side_ns(self, path: str, vm: VM) -> str:
        node = self.placed[path].vm(vm.name).node
        return (self.node_ns(path, node) if path == "offload"
                else self.router_ns(path, vm.tenant, node))

    def senders(self, path: str) -> Dict[str, Tuple[str, str]]:
        return {sender_name(n.name): (self.node_ns(path, n.name), n.uplink)
                for n in self.spec.nodes}

    def _tenants(self, spec: LabSpec, node: str) -> List[str]:
        return [t.name for t in spec.state.tenants
                if any(v.tenant == t.name and v.node == node for v in spec.vms)
                or remote_endpoints(spec, node, t.name)]

    # -- up -----------------------------------------------------------------------------------
    def _underlay(self, path: str) -> None:
        a, b = self.spec.nodes
        na, nb = self.node_ns(path, a.name), self.node_ns(path, b.name)
        _ip_batch(na, [f"link add {a.uplink} address {uplink_mac(self.spec, a.name)} "
                       f"mtu {UNDERLAY_MTU} type veth peer name {b.uplink} address "
                       f"{uplink_mac(self.spec, b.name)} mtu {UNDERLAY_MTU} netns {nb}",
                       f"link set {a.uplink} up", f"addr add {a.local_ip}/24 dev {a.uplink}"])
        _ip_batch(nb, [f"link set {b.uplink} up", f"addr add {b.local_ip}/24 dev {b.uplink}"])

    def _sides(self, path: str) -> List[render.NsSetup]:
        spec = self.spec
        if path == "offload":
            for n in spec.nodes:
                ns = self.node_ns(path, n.name)
                self.labs[n.name] = self._offload_node(
                    ns, self.dir / f"agent-{n.name}", f"{pin_dir(self.prefix)}/{n.name}")
            self.lab = self.labs[spec.nodes[0].name]   # compare's monitor events: node A's
            self._underlay(path)
            return []
        sides = []
        for n in spec.nodes:
            make_ns(render.NsSetup(self.node_ns(path, n.name), list(render.QUIET_SYSCTLS)))
        self._underlay(path)
        for n in spec.nodes:
            under = self.node_ns(path, n.name)
            argv, text = underlay_firewall(spec, n.name, path)
            run(argv, ns=under, input=text)
            for tenant in self._tenants(spec, n.name):
                s = render.router_setup(local_spec(spec, n.name), tenant, path)
                s.name = self.router_ns(path, tenant, n.name)
                make_ns(s)
                vx, mtu = vx_name(tenant), UNDERLAY_MTU - ENCAP_OVERHEAD
                _ip_batch(under, [
                    f"link add {vx} address {vx_mac(spec, tenant, n.name)} mtu {mtu} type "
                    f"vxlan id {spec.state.tenant(tenant).vni} local {n.local_ip} dstport "
                    f"{VXLAN_PORT} nolearning", f"link set {vx} netns {s.name}"])
                peer = other(spec, n.name)
                run(["bridge", "fdb", "append", vx_mac(spec, tenant, peer), "dev", vx, "dst",
                     spec.node(peer).local_ip, "self", "permanent"], ns=s.name)
                s.ip_batch = [f"link set {vx} up"] + s.ip_batch + \
                    overlay_routes(spec, n.name, tenant)
                sides.append(s)
        return sides

    def _start_agent(self, detach: bool) -> None:
        for n, lab in self.labs.items():
            self.start_agent(lab, self.spec.node_state(n), self.dir / f"state-{n}.toml",
                             detach, what=f"offload node {n}")

    def _write_state(self) -> None:
        doc = {"prefix": self.prefix, "lab_file": os.path.abspath(self.spec.source),
               "paths": self.paths,
               "agents": {n: agent_doc(lab) for n, lab in self.labs.items()}}
        (self.dir / "lab.json").write_text(json.dumps(doc, indent=2) + "\n")

    @classmethod
    def attach(cls, spec: LabSpec, say=lambda s: None) -> "Nodes":
        try:
            doc = json.loads((rundir(spec.prefix) / "lab.json").read_text())
        except (OSError, ValueError):
            raise LabError(f"lab {spec.prefix} is not up") from None
        topo = cls(spec, doc["paths"], say)
        topo.labs = {n: lab_handle(d) for n, d in doc.get("agents", {}).items()}
        topo.lab = topo.labs.get(spec.nodes[0].name)
        return topo

    # -- a VM moves ---------------------------------------------------------------------------
    def change(self, path: str, step: Move) -> None:
        """VM `step.vm` runs on node `step.to` from now on, on this path: its port moves to
        that node and both nodes' state (agents, or routers and underlay filters) follows."""
        before = self.placed[path]
        vm = before.vm(step.vm)
        if vm.node == step.to:
            return
        after = before.with_vm_on(step.vm, step.to)
        old, new = vm.node, step.to
        if path == "offload":
            # The old node lets go of the port first, the new one takes it once it is there.
            apply_state(self.labs[old], after.node_state(old), self.dir / f"state-{old}.toml")
            run(["ip", "-n", self.node_ns(path, old), "link", "set", vm.port, "netns",
                 self.node_ns(path, new)])
            _ip_batch(self.node_ns(path, new), [f"link set {vm.port} up"])
            apply_state(self.labs[new], after.node_state(new), self.dir / f"state-{new}.toml")
            self._wait_attached(self.labs[new], vm.port)
        else:
            r_old, r_new = (self.router_ns(path, vm.tenant, n) for n in (old, new))
            run(["ip", "-n", r_old, "link", "set", vm.port, "netns", r_new])
            _sysctl(r_new, [(f"net.ipv4.conf.{vm.port}.proxy_arp", "1"),
                            (f"net.ipv4.neigh.{vm.port}.proxy_delay", "0")])
            lines = [f"link set {vm.port} up"]
            for a in vm.addrs:
                lines += [f"neigh flush {a} dev {vx_name(vm.tenant)}",
                          f"route replace {a}/32 dev {vm.port}",
                          f"neigh replace {a} lladdr {vm.mac} dev {vm.port} nud permanent"]
            _ip_batch(r_new, lines)
            _ip_batch(r_old, overlay_routes(after, old, vm.tenant))
            for n, r in ((old, r_old), (new, r_new)):
                for argv, text in router_firewall(after, n, vm.tenant, path):
                    run(argv, ns=r, input=text)
                argv, text = underlay_firewall(after, n, path)
                run(argv, ns=self.node_ns(path, n), input=text)
        self.placed[path] = after

    @staticmethod
    def _wait_attached(lab: Lab, port: str, timeout: float = 30) -> None:
        import time
        deadline = time.monotonic() + timeout
        while True:
            ports = {p["name"]: p for p in lab.ok("status")["ports"]}
            if ports.get(port, {}).get("attached"):
                return
            if time.monotonic() > deadline:
                raise LabError(f"the agent did not attach to moved port {port}")
            time.sleep(0.1)

    # -- the end ------------------------------------------------------------------------------
    def close(self) -> None:
        for lab in self.labs.values():
            self.lab = lab
            self._stop_agent()
        self.lab = None
        super().close()
