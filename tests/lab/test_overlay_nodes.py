"""Two nodes joined by an underlay link, an agent on each (its own socket, state and
pins), VMs of two tenants with the same addresses on both nodes and different VNIs:
traffic between nodes goes over VXLAN in the datapath (encap on one node, decap on the
other), tenants stay apart, rules apply on both ends, and a remote endpoint can move.

The same two nodes on the kernel path (a router namespace per tenant and node, a Linux
vxlan device in it with FDB entries for the remote endpoints, iptables at the
destination) get the same probes; what each VM gets must be the same on both paths."""
from __future__ import annotations

import time

import pytest

from netns_lab.lab import VM, VM_MAC, Lab
from netns_lab.netns import Namespaces, ip, run, unique
from netns_lab.traffic import exchange, ping, tcp_transfer, Server

pytestmark = pytest.mark.lab

VTEP = {"a": "192.0.2.1", "b": "192.0.2.2"}
UL = {"a": "ula", "b": "ulb"}            # each node's uplink
VNI = {"blue": 5010, "red": 5020}
TID = {"blue": 10, "red": 20}
# The MTU clouds give VMs on a VXLAN overlay (1500 - 50), so full frames fit the uplink.
VM_MTU = 1450
# vm1 of each tenant on node a, vm2 on node b.
HOME = {1: "a", 2: "b"}


class Nodes:
    def __init__(self):
        self.a, self.b = Lab(prefix="xfoa"), Lab(prefix="xfob")
        self.node = {"a": self.a, "b": self.b}

    def build(self):
        # The underlay: one veth between the nodes.
        self.a.ns.veth(UL["a"], self.a.node, UL["b"], self.b.node, a_mac="02:ee:00:00:00:01",
                       b_mac="02:ee:00:00:00:02")
        for n, lab in self.node.items():
            ip("addr", "add", f"{VTEP[n]}/24", "dev", UL[n], ns=lab.node)
        for tenant in ("blue", "red"):
            for i, n in HOME.items():
                vm = self.node[n].add_vm(tenant, i)
                ip("link", "set", "eth0", "mtu", str(VM_MTU), ns=vm.name)

    def state(self, n: str, rules=None, remote=None):
        """Node n's state: its VMs local, the other node's remote. `remote`: (tenant, ip)
        -> VTEP override (an endpoint that moved)."""
        remote = remote or {}
        lab = self.node[n]
        st = {"tenants": [{"name": t, "id": TID[t], "vni": VNI[t]} for t in ("blue", "red")],
              "ports": [{"name": vm.port, "tenant": vm.tenant} for vm in lab.vms.values()] +
              [{"name": UL[n], "uplink": True, "local_ip": VTEP[n]}],
              "endpoints": [], "rules": rules if rules is not None else [
                  {"id": 1, "tenant": "blue", "priority": 10, "action": "allow"},
                  {"id": 2, "tenant": "red", "priority": 10, "action": "allow"}]}
        for tenant in ("blue", "red"):
            for i, home in HOME.items():
                where = remote.get((tenant, i), home)
                addr = f"10.0.0.{i}"
                ep = {"tenant": tenant, "ip": addr, "mac": VM_MAC[i]}
                if where == n:
                    ep["port"], = [v.port for v in lab.vms.values()
                                   if (v.tenant, v.ip) == (tenant, addr)]
                else:
                    ep["vtep"] = VTEP[where]
                st["endpoints"].append(ep)
        return st

    def apply(self, n: str, **kw):
        from netns_lab.lab import toml_tables
        lab = self.node[n]
        f = lab.dir / "state.toml"
        f.write_text(toml_tables("", self.state(n, **kw)))
        lab.ok("apply", str(f), "--prune")

    def start(self):
        for n, lab in self.node.items():
            lab.write_config()
            lab.start_agent()
            self.apply(n)

    def counters(self, n: str):
        out = {}
        for r in self.node[n].ok("stats")["counters"]:
            key = (r["port"], r["verdict"], r["reason"])
            out[key] = out.get(key, 0) + r["packets"]
        return out

    def close(self):
        try:
            self.a.close(show_log=True)
        finally:
            self.b.close(show_log=True)


@pytest.fixture(scope="module")
def nodes():
    import os
    if os.geteuid() != 0:
        pytest.skip("the lab tier needs root")
    n = Nodes()
    try:
        n.build()
        n.start()
        yield n
    finally:
        n.close()


def vm(nodes, tenant, i):
    return nodes.node[HOME[i]].vm(tenant, i)


class KernelNodes:
    """The kernel path of the same two nodes: per node a namespace with the underlay
    end, per tenant and node a router namespace holding the VM's port and the tenant's
    vxlan device (made in the node's namespace, so its UDP socket is the node's, then
    moved in), routes and permanent neighbours for every endpoint (a remote one's: the
    other router's vxlan MAC), an FDB entry per remote router. Routed at both ends, as the datapath does (TTL down by one per node)."""

    def __init__(self):
        self.ns = Namespaces()
        self.vms = {}
        self.routers = {}

    def _ns(self, stem):
        return self.ns.add(unique("xfok" + stem, 14), exact=True)

    def build(self):
        node = {n: self._ns(n) for n in HOME.values()}
        self.ns.veth(UL["a"], node["a"], UL["b"], node["b"])
        for n in node:
            ip("addr", "add", f"{VTEP[n]}/24", "dev", UL[n], ns=node[n])
        for tenant in ("blue", "red"):
            for i, n in HOME.items():
                r = self.routers[(tenant, n)] = self._ns("r")
                v = self._ns("v")
                port, port_mac = f"p{i}", f"02:aa:00:00:{TID[tenant]:02x}:{i:02x}"
                self.ns.veth(port, r, "eth0", v, a_mac=port_mac, b_mac=VM_MAC[i])
                self.vms[(tenant, i)] = VM(tenant, i, v, port, f"10.0.0.{i}", VM_MAC[i],
                                           port_mac)
                j = 3 - i                         # the other VM, on the other node
                run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"], ns=r)
                for cmd in (f"addr add 10.0.0.{i}/24 dev eth0", f"link set eth0 mtu {VM_MTU}",
                            f"neigh replace 10.0.0.{j} lladdr {port_mac} dev eth0 "
                            "nud permanent"):
                    ip(*cmd.split(), ns=v)
                vx, other = f"vx{tenant}", "b" if n == "a" else "a"
                # Routed, so the inner frame goes to the other router's vxlan MAC.
                vx_mac = {m: f"02:cc:00:00:{TID[tenant]:02x}:0{ord(m) - 96}" for m in "ab"}
                ip("link", "add", vx, "address", vx_mac[n], "type", "vxlan", "id",
                   str(VNI[tenant]), "local", VTEP[n], "dstport", "4789", "nolearning",
                   ns=node[n])
                ip("link", "set", vx, "netns", r, ns=node[n])
                for cmd in (f"link set {vx} mtu {VM_MTU} up",
                            f"route add 10.0.0.{i}/32 dev {port}",
                            f"neigh replace 10.0.0.{i} lladdr {VM_MAC[i]} dev {port} "
                            "nud permanent",
                            f"route add 10.0.0.{j}/32 dev {vx}",
                            f"neigh replace 10.0.0.{j} lladdr {vx_mac[other]} dev {vx} "
                            "nud permanent"):
                    ip(*cmd.split(), ns=r)
                run(["bridge", "fdb", "append", vx_mac[other], "dev", vx, "dst", VTEP[other],
                     "self", "permanent"], ns=r)

    def destination_rule(self, on: bool):
        """As the offload test's rules of node b: blue TCP 5001 from 10.0.0.1 only."""
        r = self.routers[("blue", "b")]
        run(["iptables", "-F", "FORWARD"], ns=r)
        run(["iptables", "-P", "FORWARD", "DROP" if on else "ACCEPT"], ns=r)
        if on:
            run(["iptables", "-A", "FORWARD", "-m", "conntrack", "--ctstate",
                 "ESTABLISHED,RELATED", "-j", "ACCEPT"], ns=r)
            run(["iptables", "-A", "FORWARD", "-o", "p2", "-s", "10.0.0.1", "-p", "tcp",
                 "--dport", "5001", "-j", "ACCEPT"], ns=r)
            run(["iptables", "-A", "FORWARD", "-o", "vxblue", "-j", "ACCEPT"], ns=r)

    def close(self):
        self.ns.close()


@pytest.fixture(scope="module")
def kernel_nodes():
    import os
    if os.geteuid() != 0:
        pytest.skip("the lab tier needs root")
    k = KernelNodes()
    try:
        k.build()
        yield k
    finally:
        k.close()


def probes(vm_of, set_rule):
    """What each VM gets for the same probes: pings across nodes in both tenants, a UDP
    exchange per tenant to the same address (who answers), a 10 MB TCP transfer, and a
    ping refused at the destination by its rules."""
    out = {}
    for tenant in ("blue", "red"):
        out[f"ping {tenant} 1->2"] = ping(vm_of(tenant, 1), "10.0.0.2", count=2)
        out[f"ping {tenant} 2->1"] = ping(vm_of(tenant, 2), "10.0.0.1", count=2)
    with Server(vm_of("blue", 2), "udp", 7000) as b, Server(vm_of("red", 2), "udp", 7000) as r:
        for tenant in ("blue", "red"):
            got = exchange(vm_of(tenant, 1), "udp", "10.0.0.2", 7000, f"to-{tenant}")
            out[f"udp {tenant} answered by"] = got.get("reply", "").split(":")[0] \
                if got["ok"] else None
    set_rule(True)
    try:
        r = tcp_transfer(vm_of("blue", 1).name, vm_of("blue", 2).name, "10.0.0.2", 5001,
                         10_000_000)
        out["tcp 10 MB"] = (r["received"]["bytes"], r["received"]["sha256"] ==
                            r["sent"]["sha256"])
        out["seconds"] = r["sent"]["seconds"]
        out["ping blue 1->2 under the rule"] = ping(vm_of("blue", 1), "10.0.0.2", count=1)
    finally:
        set_rule(False)
    return out


def test_both_paths_agree(nodes, kernel_nodes):
    rules_b = [{"id": 1, "tenant": "blue", "priority": 10, "action": "allow",
                "src": "10.0.0.1/32", "proto": "tcp", "dport": "5001"},
               {"id": 2, "tenant": "red", "priority": 10, "action": "allow"}]
    offload = probes(lambda t, i: vm(nodes, t, i),
                     lambda on: nodes.apply("b", **({"rules": rules_b} if on else {})))
    kernel = probes(lambda t, i: kernel_nodes.vms[(t, i)], kernel_nodes.destination_rule)
    print(f"10 MB TCP across the overlay: offload {offload.pop('seconds')} s, "
          f"kernel {kernel.pop('seconds')} s")
    assert offload == kernel
    assert offload["tcp 10 MB"] == (10_000_000, True)
    assert offload["udp blue answered by"] != offload["udp red answered by"]
    assert not offload["ping blue 1->2 under the rule"]


def test_cross_node_ping_in_each_tenant(nodes):
    for tenant in ("blue", "red"):
        assert ping(vm(nodes, tenant, 1), "10.0.0.2", count=3), tenant
        assert ping(vm(nodes, tenant, 2), "10.0.0.1", count=3), tenant
    a, b = nodes.counters("a"), nodes.counters("b")
    # Encapsulated on the sender's node (redirect to the uplink), decapsulated and
    # delivered on the other (counted on the uplink port).
    for n, c in (("a", a), ("b", b)):
        assert c.get((UL[n], "redirect", "rule_allow"), 0) + \
            c.get((UL[n], "redirect", "flow"), 0) > 0, c


def test_tenants_stay_apart_across_nodes(nodes):
    """Same addresses in both tenants: what blue vm1 sends reaches blue vm2 only."""
    with Server(vm(nodes, "blue", 2), "udp", 7000) as blue_srv, \
            Server(vm(nodes, "red", 2), "udp", 7000) as red_srv:
        r = exchange(vm(nodes, "blue", 1), "udp", "10.0.0.2", 7000, "to-blue")
        assert r["ok"] and r["reply"].startswith("blue-vm2"), r
        r = exchange(vm(nodes, "red", 1), "udp", "10.0.0.2", 7000, "to-red")
        assert r["ok"] and r["reply"].startswith("red-vm2"), r


def test_stateful_replies_and_rules_at_the_destination(nodes):
    """Node b allows blue TCP to 5001 only from 10.0.0.1; replies come back across the
    overlay without a rule; anything else to vm2 is dropped at node b (where vm2 is),
    though node a allowed it out."""
    rules_b = [{"id": 1, "tenant": "blue", "priority": 10, "action": "allow",
                "src": "10.0.0.1/32", "proto": "tcp", "dport": "5001"},
               {"id": 2, "tenant": "red", "priority": 10, "action": "allow"}]
    nodes.apply("b", rules=rules_b)
    try:
        before = nodes.counters("b")
        r = tcp_transfer(vm(nodes, "blue", 1).name, vm(nodes, "blue", 2).name, "10.0.0.2",
                         5001, 10_000_000)
        assert r["received"]["bytes"] == 10_000_000
        assert r["received"]["sha256"] == r["sent"]["sha256"]
        print(f"10 MB over the VXLAN overlay (offload) in {r['sent']['seconds']} s")
        assert not ping(vm(nodes, "blue", 1), "10.0.0.2", count=1)
        after = nodes.counters("b")
        key = (UL["b"], "drop", "default")
        assert after.get(key, 0) > before.get(key, 0)
    finally:
        nodes.apply("b")


def test_unknown_vni_and_unknown_vtep_are_dropped_and_counted(nodes):
    from scapy.all import IP, UDP, Ether, raw
    from scapy.layers.vxlan import VXLAN
    inner = Ether(src=VM_MAC[1], dst="02:00:00:00:00:02") / IP(src="10.0.0.1", dst="10.0.0.2") / \
        UDP(sport=1, dport=2)
    before = nodes.counters("b")
    for vni, src in ((5999, VTEP["a"]), (VNI["blue"], "192.0.2.99")):
        # From node a's namespace onto the underlay, as a forged sender would.
        frame = Ether(dst="02:ee:00:00:00:02", src="02:ee:00:00:00:01") / \
            IP(src=src, dst=VTEP["b"]) / UDP(sport=50000, dport=4789) / VXLAN(vni=vni) / inner
        run(["python3", "-c", "import socket,sys; s=socket.socket(socket.AF_PACKET, "
             "socket.SOCK_RAW); s.bind((sys.argv[2], 0)); s.send(bytes.fromhex(sys.argv[1]))",
             raw(frame).hex(), UL["a"]], ns=nodes.a.node)
    time.sleep(0.5)
    after = nodes.counters("b")
    for reason in ("vni_unknown", "vtep_unknown"):
        key = (UL["b"], "drop", reason)
        assert after.get(key, 0) == before.get(key, 0) + 1


def test_a_remote_endpoint_moves_to_the_other_node(nodes):
    """blue 10.0.0.2 moves from node b to node a: a VM with its address and MAC appears on
    a; a now has it local and b has it remote behind a's VTEP."""
    moved = nodes.a.add_vm("blue", 3, ip_addr="10.0.0.2", mac=VM_MAC[2], port="bvm2m")
    ip("link", "set", "eth0", "mtu", str(VM_MTU), ns=moved.name)
    try:
        nodes.apply("a", remote={("blue", 2): "a"})
        # The state of a names the moved VM's port: its endpoint is local there.
        st = nodes.node["a"].ok("endpoint", "list", "--tenant", "blue")
        assert any(e["ip"] == "10.0.0.2" and e.get("port") == "bvm2m" for e in st), st
        nodes.apply("b", remote={("blue", 2): "a"})
        with Server(moved, "udp", 7001, ident="moved") as srv:
            r = exchange(vm(nodes, "blue", 1), "udp", "10.0.0.2", 7001, "hello")
            assert r["ok"] and r["reply"].startswith("moved"), r
    finally:
        nodes.apply("b")
        del nodes.a.vms[("blue", 3)]
        nodes.apply("a")


def test_trace_through_decap(nodes):
    """`trace --port UPLINK`: a VXLAN packet is followed through decap to the VM port,
    and the route named is the inner destination's."""
    from scapy.all import IP, UDP, Ether, raw
    from scapy.layers.vxlan import VXLAN
    frame = Ether(dst="02:ee:00:00:00:02", src="02:ee:00:00:00:01") / \
        IP(src=VTEP["a"], dst=VTEP["b"]) / UDP(sport=50000, dport=4789) / \
        VXLAN(vni=VNI["blue"]) / Ether(src=VM_MAC[1], dst="02:aa:00:00:00:02") / \
        IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1000, dport=2000)
    t = nodes.b.ok("trace", "--port", UL["b"], "--hex", raw(frame).hex(), timeout=180)
    assert (t["verdict"], t["tenant"], t["decapsulated"], t["out_port"]) == \
        ("redirect", "blue", True, vm(nodes, "blue", 2).port), t
    assert t["route"] == f"endpoint 10.0.0.2 on port {vm(nodes, 'blue', 2).port}"
    out = Ether(bytes.fromhex(t["packet_out"]))
    assert out.dst == VM_MAC[2] and out[IP].ttl == 63 and UDP in out
    # From a VTEP of no blue endpoint: dropped before decap, nothing decapsulated.
    frame[IP].src = "192.0.2.99"
    t = nodes.b.ok("trace", "--port", UL["b"], "--hex", raw(frame).hex())
    assert (t["verdict"], t["reason"], t["decapsulated"]) == ("drop", "vtep_unknown", False)


def test_the_underlay_neighbour_is_kept_current(nodes):
    """The agent follows the VTEP's underlay MAC through neighbour events: a changed entry
    changes the outer destination of the next encapsulated packet (the tenant's flows go
    stale with the endpoint entry, so no flow keeps the old MAC)."""
    from scapy.all import IP, UDP, Ether, raw
    from scapy.layers.vxlan import VXLAN
    a = nodes.a
    pkt = Ether(src=VM_MAC[1], dst=vm(nodes, "blue", 1).port_mac) / \
        IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1000, dport=2000)

    def outer_dst():
        # The first trace builds the trace program: seconds, more on a loaded machine.
        t = a.ok("trace", "--port", vm(nodes, "blue", 1).port, "--hex", raw(pkt).hex(),
                 timeout=180)
        assert t["verdict"] == "redirect" and t["out_port"] == UL["a"], t
        out = Ether(bytes.fromhex(t["packet_out"]))
        assert VXLAN in out and out[IP].dst == VTEP["b"]
        return out.dst

    assert outer_dst() == "02:ee:00:00:00:02"
    ip("neigh", "replace", VTEP["b"], "lladdr", "02:ee:00:00:00:99", "dev", UL["a"],
       "nud", "permanent", ns=a.node)
    try:
        deadline = time.monotonic() + 20
        while outer_dst() != "02:ee:00:00:00:99" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert outer_dst() == "02:ee:00:00:00:99"
    finally:
        ip("neigh", "replace", VTEP["b"], "lladdr", "02:ee:00:00:00:02", "dev", UL["a"],
           "nud", "reachable", ns=a.node)
    deadline = time.monotonic() + 20
    while outer_dst() != "02:ee:00:00:00:02" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ping(vm(nodes, "blue", 1), "10.0.0.2", count=2)
