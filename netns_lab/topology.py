"""A lab built from a lab file (netns_lab/labfile.py): every VM once per path, behind
- `offload`: a node namespace whose VM-facing veths are the agent's ports; the agent runs
  as a process there and is configured with `xdpflowctl apply` from the lab file's state;
- `iptables` / `nftables`: a router namespace per tenant rendered by netns_lab/render.py.

Every name starts with the lab's prefix (namespaces PREFIX-TAG-..., pins
/sys/fs/bpf/PREFIX-lab, files under /run/xdpflow-lab/PREFIX), so `down(prefix)` removes
everything a lab made, also after an `up` that was killed half-way. Interfaces live only
inside the lab's namespaces and go with them."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import external, render
from .lab import Lab, toml_tables
from .labfile import VM, VM_IFNAME, LabSpec
from .netns import run

RUN_ROOT = Path("/run/xdpflow-lab")


class LabError(RuntimeError):
    """The lab cannot be built or found; the message says what to do."""


def rundir(prefix: str) -> Path:
    return RUN_ROOT / prefix


def pin_dir(prefix: str) -> str:
    return f"/sys/fs/bpf/{prefix}-lab"


def namespaces_of(prefix: str) -> List[str]:
    out = run(["ip", "netns", "list"]).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix + "-")]


def down(prefix: str, say: Callable[[str], None] = lambda s: None) -> Dict[str, int]:
    """Remove everything lab `prefix` made: the processes it started inside its
    namespaces (found by id, through the namespaces), the namespaces (and with them every
    interface and attached program), the pins and the run directory."""
    names = namespaces_of(prefix)
    killed = 0
    for ns in names:
        pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, ValueError):
                pass
    for ns in names:
        run(["ip", "netns", "del", ns], check=False)
    pins = pin_dir(prefix)
    had_pins = os.path.exists(pins)
    shutil.rmtree(pins, ignore_errors=True)
    shutil.rmtree(rundir(prefix), ignore_errors=True)
    say(f"lab {prefix}: removed {len(names)} namespaces, {killed} processes"
        + (", the pin directory" if had_pins else ""))
    return {"namespaces": len(names), "processes": killed, "pins": int(had_pins)}


def _sysctl(ns: str, pairs: Sequence) -> None:
    if pairs:
        run(["sysctl", "-q", "-w", *[f"{k}={v}" for k, v in pairs]], ns=ns)


def _ip_batch(ns: str, lines: Sequence[str]) -> None:
    if lines:
        run(["ip", "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n")


def make_ns(s: render.NsSetup) -> None:
    """A kernel path's namespace, with its early sysctls."""
    run(["ip", "netns", "add", s.name])
    _ip_batch(s.name, ["link set lo up"])
    _sysctl(s.name, s.sysctls)


def agent_doc(lab: Lab) -> Dict:
    """What lab.json keeps of a running agent (see lab_handle)."""
    return dict(agent_pid=lab.proc.pid, socket=lab.socket, metrics_port=lab.metrics_port,
                node=lab.node, config=str(lab.config))


def lab_handle(doc: Dict) -> Lab:
    """The handles of an agent `up` started (its socket, log): up owns its namespaces."""
    lab = Lab.__new__(Lab)
    lab.socket, lab.metrics_port, lab.node = doc["socket"], doc["metrics_port"], doc["node"]
    lab.proc = None
    lab.config = Path(doc["config"])
    lab.log_path = lab.config.parent / "agent.log"
    return lab


def apply_state(lab: Lab, state: Dict, state_file: Path) -> None:
    """`xdpflowctl apply --prune` of `state` (the lab's whole state for that agent)."""
    state_file.write_text(toml_tables("", state))
    r = lab.ctl("apply", str(state_file), "--prune")
    if r.code != 0:
        raise LabError(f"xdpflowctl apply {state_file} failed: {r.stderr.strip()}; agent "
                       f"log (end):\n{lab.log_text()[-4000:]}")


def topology_for(spec: LabSpec):
    """The class that builds this lab: two nodes (netns_lab/nodes.py) or one."""
    if spec.nodes:
        from .nodes import Nodes
        return Nodes
    return Topology


class Topology:
    """The lab's namespaces on the chosen paths, and for `offload` the running agent."""

    def __init__(self, spec: LabSpec, paths: Sequence[str] = render.PATHS,
                 say: Callable[[str], None] = lambda s: None,
                 datapath: Optional[Dict[str, int]] = None, firewall: bool = True):
        """datapath: the agent's [datapath] sizes over the lab's small ones (a benchmark's
        100,000 flows); firewall=False leaves the kernel paths' routers without netfilter
        rules (plain kernel forwarding, the benchmark's baseline)."""
        unknown = set(paths) - set(render.PATHS)
        if unknown:
            raise LabError(f"unknown path(s) {', '.join(sorted(unknown))} "
                           f"(known: {', '.join(render.PATHS)})")
        self.spec = spec
        self.prefix = spec.prefix
        self.paths = [p for p in render.PATHS if p in paths]
        self.say = say
        self.dir = rundir(self.prefix)
        self.lab: Optional[Lab] = None
        self.datapath = datapath
        self.firewall = firewall

    # -- names ------------------------------------------------------------------------------
    def vm_ns(self, path: str, vm: VM) -> str:
        return render.ns_name(self.prefix, path, vm.name)

    def side_ns(self, path: str, vm: VM) -> str:
        """Where the VM's port lives on this path: the node, or its tenant's router (an
        external host's uplink: the node, or the kernel path's gateway)."""
        if path == "offload":
            return render.ns_name(self.prefix, path, "node")
        if vm.tenant is None:
            return external.gw_ns(self.prefix, path)
        return render.router_ns(self.prefix, path, vm.tenant)

    # -- up ----------------------------------------------------------------------------------
    def up(self, detach: bool = False) -> "Topology":
        """Build every path; on any failure remove what was made and raise."""
        if namespaces_of(self.prefix):
            raise LabError(f"lab {self.prefix} is already up (or a killed run left it "
                           f"behind): run `xdpflow-lab down --prefix {self.prefix}` first")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            for path in self.paths:
                t0 = time.monotonic()
                self._build_path(path)
                self.say(f"  {path}: {len(self.spec.vms)} VMs built "
                         f"({time.monotonic() - t0:.1f}s)")
            if "offload" in self.paths:
                self._start_agent(detach)
            time.sleep(0.3)        # the kernels' start-up chatter (MLD reports) is over
            self._write_state()
        except BaseException:
            self.close()
            raise
        return self

    def _offload_node(self, node: str, workdir: Path, pins: str) -> Lab:
        """A node namespace with its (not yet started) agent."""
        lab = Lab(prefix=self.prefix, node=node, workdir=workdir, pin_dir=pins)
        # The node forwards nothing itself: what the datapath passes to it ends there.
        _sysctl(node, list(render.QUIET_SYSCTLS) + [("net.ipv4.ip_forward", "0"),
                                                    ("net.ipv6.conf.all.forwarding", "0")])
        return lab

    def _sides(self, path: str) -> List[render.NsSetup]:
        """The namespaces the VMs' ports live in on this path, made (the kernel paths'
        netfilter and routes come after the ports, from the setups returned)."""
        if path == "offload":
            node = render.ns_name(self.prefix, path, "node")
            self.lab = self._offload_node(node, self.dir / "agent", pin_dir(self.prefix))
            return [render.NsSetup(node)]
        sides = render.kernel_setups(self.spec, path)
        for s in sides:
            make_ns(s)
        return sides

    def _build_path(self, path: str) -> None:
        spec = self.spec
        sides = self._sides(path)
        # VMs behind their ports; external hosts (netns_lab/external.py) behind uplinks.
        wired = [(vm, render.vm_setup(spec, vm, path)) for vm in spec.vms] + [
            (host, external.host_setup(spec, host, path)) for host in spec.external]
        for vm, vs in wired:
            side = self.side_ns(path, vm)
            run(["ip", "netns", "add", vs.name])
            _sysctl(vs.name, vs.sysctls)
            _ip_batch(vs.name, [
                "link set lo up",
                f"link add {VM_IFNAME} address {vm.mac} type veth peer name {vm.port} "
                f"address {vm.port_mac} netns {side}",
                f"link set {VM_IFNAME} up"] + vs.ip_batch)
            _ip_batch(side, [f"link set {vm.port} up"])
            # Finished checksums in what the VM sends, on every path: bytes compare.
            run(["ethtool", "-K", VM_IFNAME, "tx", "off"], ns=vs.name)
        if path == "offload":
            ns = external.node_setup(spec)
            _sysctl(ns.name, ns.late_sysctls)
            _ip_batch(ns.name, ns.ip_batch)
            for argv, text in ns.firewall:
                run(argv, ns=ns.name, input=text)
        for s in sides:
            _sysctl(s.name, s.late_sysctls)
            _ip_batch(s.name, s.ip_batch)
            for argv, text in (s.firewall if self.firewall else ()):
                run(argv, ns=s.name, input=text)

    def _start_agent(self, detach: bool) -> None:
        self.start_agent(self.lab, self.spec.apply_dict(), self.dir / "state.toml", detach)

    def start_agent(self, lab: Lab, state: Dict, state_file: Path, detach: bool,
                    what: str = "offload") -> None:
        """Start `lab`'s agent, configure it with `state` and wait until it is attached."""
        lab.write_config(datapath=self.datapath)
        t0 = time.monotonic()
        self.say(f"  {what}: starting the agent (builds the datapath with BCC) ...")
        lab.start_agent(detach=detach)
        apply_state(lab, state, state_file)
        deadline = time.monotonic() + 30
        while True:
            ports = lab.ok("status")["ports"]
            missing = [p["name"] for p in ports if not p.get("attached")]
            if not missing:
                break
            if time.monotonic() > deadline:
                raise LabError(f"the agent did not attach to {', '.join(missing)}; "
                               f"log:\n{lab.log_text()}")
            time.sleep(0.1)
        self.say(f"  {what}: agent pid {lab.proc.pid} attached to {len(ports)} ports, "
                 f"configured with `xdpflowctl apply` ({time.monotonic() - t0:.1f}s)")

    def _write_state(self) -> None:
        lab = self.lab
        doc = {"prefix": self.prefix, "lab_file": os.path.abspath(self.spec.source),
               "paths": self.paths}
        if lab is not None:
            doc.update(agent_doc(lab))
        (self.dir / "lab.json").write_text(json.dumps(doc, indent=2) + "\n")

    # -- an up lab ------------------------------------------------------------------------------
    @classmethod
    def attach(cls, spec: LabSpec, say: Callable[[str], None] = lambda s: None) -> "Topology":
        """The lab `up` built and left running (for `compare` and `demo --keep`)."""
        try:
            doc = json.loads((rundir(spec.prefix) / "lab.json").read_text())
        except (OSError, ValueError):
            raise LabError(f"lab {spec.prefix} is not up") from None
        topo = cls(spec, doc["paths"], say)
        if "socket" in doc:
            topo.lab = lab_handle(doc)
        return topo

    def senders(self, path: str) -> Dict[str, Tuple[str, str]]:
        """Scenario senders besides the VMs: name -> (namespace, interface); none here."""
        return {}

    def change(self, path: str, step) -> None:
        raise LabError(f"lab {self.prefix} has one node: a VM cannot move ({step})")

    @staticmethod
    def is_up(prefix: str) -> bool:
        return (rundir(prefix) / "lab.json").exists() and bool(namespaces_of(prefix))

    def agent_pid(self) -> Optional[int]:
        if self.lab is None:
            return None
        if self.lab.proc is not None:
            return self.lab.proc.pid
        try:
            return json.loads((self.dir / "lab.json").read_text()).get("agent_pid")
        except (OSError, ValueError):
            return None

    # -- the end -----------------------------------------------------------------------------------
    def close(self) -> None:
        self._stop_agent()
        down(self.prefix)

    def _stop_agent(self) -> None:
        if self.lab is not None and getattr(self.lab, "proc", None) is not None:
            p = self.lab.proc
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
