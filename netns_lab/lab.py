"""A node in namespaces, for the demo and the lab tests: one node namespace whose VM-facing
veths are the agent's ports, one namespace per VM, the agent started as a process the way
an operator would (inside the node's network namespace with `nsenter --net`, never
`ip netns exec`, which would hide bpffs pins), and the real `xdpflowctl` over the socket.

Everything a lab makes (namespaces, pin directory, temp dir, groups, processes) has a
unique name and is removed in close(), whatever happened in between."""
from __future__ import annotations

import grp
import json as jsonlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .netns import Namespaces, in_netns, ip, run, unique

BIN = Path(sys.executable).parent
AGENT = str(BIN / "xdpflow-agent")
CTL = str(BIN / "xdpflowctl")

# What every Lab of this process made, for an end-of-session check.
CREATED_NAMESPACES: List[str] = []
CREATED_PINS: List[str] = []

# Two tenants with the same addresses and the same VM MACs: only the tenant id keeps them
# apart. Node-side port names are short (<= 15 chars) and fixed inside the node namespace.
VM_MAC = {1: "02:00:00:00:00:01", 2: "02:00:00:00:00:02"}
VM_IP = {1: "10.0.0.1", 2: "10.0.0.2"}
TENANTS = {"blue": 10, "red": 20}

# How long a starting agent may take to answer: a bound, polled, never waited out. A cold
# start compiles the datapath with BCC: about 9 s on a quiet machine, past 60 s on a
# shared 2-core one with other test tiers running beside it (`bash setup.sh test`).
AGENT_START_TIMEOUT = 300.0
# How long one xdpflowctl call may take, by default: commands wait while a reload
# compiles (the same BCC build).
CTL_TIMEOUT = 180.0

SMALL_DATAPATH = {"flow_table_size": 65536, "max_rule_entries": 4096, "max_endpoints": 1024,
                  "max_routes": 1024, "max_ports": 64}


@dataclass
class VM:
    tenant: str
    index: int
    name: str        # the VM's namespace
    port: str        # the node-side interface (an xdpflow port)
    ip: str
    mac: str
    port_mac: str


class CtlResult:
    """(exit code, parsed JSON) when unpacked; the raw output is kept for messages."""

    def __init__(self, code: int, data: Any, stdout: str, stderr: str):
        self.code, self.data, self.stdout, self.stderr = code, data, stdout, stderr

    def __iter__(self):
        return iter((self.code, self.data))

    def __repr__(self):
        return (f"CtlResult(code={self.code}, data={self.data!r}, "
                f"stderr={self.stderr.strip()!r})")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return jsonlib.dumps(str(v))


def toml_tables(prefix: str, state: Dict[str, List[Dict[str, Any]]]) -> str:
    """[[PREFIXkind]] tables from {kind: [objects]} (prefix "state." for a config file,
    "" for an apply file)."""
    out = []
    for kind, objs in state.items():
        for obj in objs:
            out.append(f"[[{prefix}{kind}]]")
            out += [f"{k} = {_toml_value(v)}" for k, v in obj.items() if v is not None]
            out.append("")
    return "\n".join(out) + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """One node namespace, VM namespaces behind veths, a temp dir, a pin dir, a config
    file, and at most one running agent."""

    def __init__(self, prefix: str = "xfl", node: Optional[str] = None,
                 workdir: Optional[Path] = None, pin_dir: Optional[str] = None):
        """By default every name is `prefix` + a unique tail; a lab built from a file
        (netns_lab/topology.py) passes its own node namespace, work dir and pin dir."""
        self.prefix = prefix
        self.ns = Namespaces()
        if workdir is not None:
            self.dir = Path(workdir)
            self.dir.mkdir(parents=True, exist_ok=True)
        else:
            self.dir = Path(tempfile.mkdtemp(prefix=prefix + "-"))
        self.pin_dir = pin_dir or f"/sys/fs/bpf/xdpflow-lab-{unique(prefix, 30)}"
        self.socket = str(self.dir / "run" / "agent.sock")
        self.state_dir = str(self.dir / "state")
        self.config = self.dir / "agent.toml"
        self.log_path = self.dir / "agent.log"
        self.metrics_port = free_port()
        CREATED_PINS.append(self.pin_dir)
        self.vms: Dict[tuple, VM] = {}
        self.proc: Optional[subprocess.Popen] = None
        self.groups: List[str] = []
        self.agent_starts = 0
        self.node = self._ns("n") if node is None else self._ns(node, exact=True)

    # -- topology -------------------------------------------------------------------------
    def _ns(self, kind: str, exact: bool = False) -> str:
        name = self.ns.add(kind if exact else self.prefix + kind, exact=exact)
        CREATED_NAMESPACES.append(name)
        return name

    def add_vm(self, tenant: str, index: int, ip_addr: Optional[str] = None,
               mac: Optional[str] = None, port: Optional[str] = None) -> VM:
        """A VM namespace with eth0 (ip_addr/24, mac; by default VM_IP/VM_MAC[index]) whose
        peer is the port `port` (by default e.g. "bvm1", "rvm2") in the node namespace.
        Port MACs differ per tenant and index; VM MACs may repeat across tenants."""
        name = self._ns("v")
        port = port or f"{tenant[0]}vm{index}"
        t = list(TENANTS).index(tenant) + 1 if tenant in TENANTS else 9
        port_mac = f"02:aa:00:00:{t:02x}:{index:02x}"
        vm = VM(tenant, index, name, port, ip_addr or VM_IP[index], mac or VM_MAC[index],
                port_mac)
        self.ns.veth(port, self.node, "eth0", name, a_mac=port_mac, b_mac=vm.mac)
        ip("addr", "add", f"{vm.ip}/24", "dev", "eth0", ns=name)
        self.vms[(tenant, index)] = vm
        return vm

    def vm(self, tenant: str, index: int) -> VM:
        return self.vms[(tenant, index)]

    def two_tenants(self) -> None:
        for tenant in TENANTS:
            for i in (1, 2):
                self.add_vm(tenant, i)

    def base_state(self) -> Dict[str, List[Dict[str, Any]]]:
        """Tenants, ports and endpoints for every VM in the lab (no rules)."""
        tenants = sorted({vm.tenant for vm in self.vms.values()})
        return {
            "tenants": [{"name": t, "id": TENANTS[t]} for t in tenants],
            "ports": [{"name": vm.port, "tenant": vm.tenant} for vm in self.vms.values()],
            "endpoints": [{"tenant": vm.tenant, "ip": vm.ip, "port": vm.port, "mac": vm.mac}
                          for vm in self.vms.values()],
        }

    def vm_run(self, vm: VM, cmd: Sequence[str], check: bool = False,
               timeout: float = 30) -> subprocess.CompletedProcess:
        """A command in a VM's network namespace."""
        return run(cmd, ns=vm.name, check=check, timeout=timeout)

    # -- config ------------------------------------------------------------------------------
    def write_config(self, agent: Optional[Dict[str, Any]] = None,
                     state: Optional[Dict[str, List[Dict[str, Any]]]] = None,
                     aging: Optional[Dict[str, Any]] = None,
                     datapath: Optional[Dict[str, Any]] = None) -> Path:
        a = {"socket": self.socket, "state_dir": self.state_dir, "bpffs": self.pin_dir}
        a.update(agent or {})
        lines = ["[agent]"] + [f"{k} = {_toml_value(v)}" for k, v in a.items()]
        lines += ["", "[metrics]", f'listen = "127.0.0.1:{self.metrics_port}"', "",
                  "[datapath]"] + [f"{k} = {v}" for k, v in
                                   {**SMALL_DATAPATH, **(datapath or {})}.items()]
        if aging:
            lines += ["", "[aging]"] + [f"{k} = {_toml_value(v)}" for k, v in aging.items()]
        text = "\n".join(lines) + "\n\n" + (toml_tables("state.", state) if state else "")
        self.config.write_text(text)
        return self.config

    # -- the agent ----------------------------------------------------------------------------
    def start_agent(self, env: Optional[Dict[str, str]] = None, wait: bool = True,
                    timeout: float = AGENT_START_TIMEOUT,
                    detach: bool = False) -> subprocess.Popen:
        """Start the agent in the node namespace; `detach` puts it in its own session, so
        it outlives this process (`xdpflow-lab up`) and a Ctrl-C here does not reach it."""
        assert self.proc is None or self.proc.poll() is not None, "an agent is running"
        if not self.config.exists():
            self.write_config()
        full_env = dict(os.environ)
        for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "XDPFLOW_CFLAGS"):
            full_env.pop(k, None)
        full_env.update(env or {})
        self.agent_starts += 1
        with open(self.log_path, "a") as log:
            log.write(f"\n===== agent start #{self.agent_starts} "
                      f"(env {env or {}}) =====\n")
            log.flush()
            # nsenter --net (no --fork) execs the agent: the Popen pid is the agent's pid.
            self.proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.node}", AGENT, "--config",
                 str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env,
                start_new_session=detach)
        if wait:
            self.wait_ready(timeout)
        return self.proc

    def wait_ready(self, timeout: float = AGENT_START_TIMEOUT) -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"the agent exited with {self.proc.returncode} before "
                                     f"answering; log:\n{self.log_text()}")
            if os.path.exists(self.socket):
                last = self.ctl("status", timeout=5)
                # A warm start answers before its state is loaded: tests want it whole.
                if last.code == 0 and last.data.get("pid") == self.proc.pid and \
                        (last.data.get("startup") or {}).get("done", True):
                    return last.data
            time.sleep(0.1)
        raise AssertionError(f"the agent did not answer `status` within {timeout}s "
                             f"(last: {last!r}); log:\n{self.log_text()}")

    def stop_agent(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> Optional[int]:
        """Send `sig`; wait; SIGKILL if it does not go. Returns the exit status."""
        p = self.proc
        if p is None or p.poll() is not None:
            return p.returncode if p else None
        p.send_signal(sig)
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
            raise AssertionError(f"the agent ignored signal {sig} for {timeout}s")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"

    # -- xdpflowctl and metrics -------------------------------------------------------------
    def ctl(self, *args: str, json: bool = True, as_user: Optional[Sequence[str]] = None,
            timeout: float = CTL_TIMEOUT, input: Optional[str] = None) -> CtlResult:
        cmd = [CTL, "--socket", self.socket] + (["--json"] if json else []) + list(args)
        if as_user is not None:
            cmd = list(as_user) + cmd
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
        data: Any = None
        if json and p.stdout.strip():
            try:
                data = jsonlib.loads(p.stdout)
            except ValueError:
                raise AssertionError(f"xdpflowctl {' '.join(args)} printed no JSON document:"
                                     f"\n{p.stdout}\n{p.stderr}") from None
        return CtlResult(p.returncode, data, p.stdout, p.stderr)

    def ok(self, *args: str, **kw) -> Any:
        """ctl that must succeed; returns the JSON."""
        r = self.ctl(*args, **kw)
        assert r.code == 0, f"xdpflowctl {' '.join(args)} -> {r!r}"
        return r.data

    def metrics(self) -> str:
        """A scrape, from inside the node namespace (the agent listens on its loopback)."""
        def scrape():
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                        timeout=10) as r:
                return r.read().decode()
        return in_netns(self.node, scrape)

    # -- the node ------------------------------------------------------------------------------
    def xdp_prog(self, port: str) -> Dict[str, Any]:
        """The XDP program attached to a node port, from `ip -d -j link show`."""
        out = ip("-d", "-j", "link", "show", "dev", port, ns=self.node)
        link = jsonlib.loads(out)[0]
        xdp = link.get("xdp") or {}
        prog = xdp.get("prog") or {}
        if not prog and xdp.get("attached"):
            prog = (xdp["attached"][0].get("prog") or {}) if xdp["attached"] else {}
        return prog

    def add_group(self, stem: str) -> str:
        name = unique(self.prefix + stem, maxlen=30)
        subprocess.run(["groupadd", name], check=True, capture_output=True)
        self.groups.append(name)
        return name

    def gid(self, name: str) -> int:
        return grp.getgrnam(name).gr_gid

    # -- the end ---------------------------------------------------------------------------------
    def close(self, show_log: bool = False) -> None:
        """Stop the agent, tear its programs and pins down, remove everything; with
        show_log, print the agent's log first (a test's captured output)."""
        errors = []
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        except Exception as e:  # keep cleaning up
            errors.append(e)
        try:
            if self.config.exists() and self.node in self.ns.names:
                # In the node namespace, where the ports are; --force: a test may have
                # removed a port's interface, and everything goes anyway.
                p = run(["nsenter", f"--net=/run/netns/{self.node}", AGENT, "--config",
                         str(self.config), "--teardown", "--force"], check=False, timeout=60)
                if p.returncode != 0:
                    print(f"teardown exited {p.returncode}: {p.stdout}{p.stderr}")
        except Exception as e:
            errors.append(e)
        self.ns.close()
        shutil.rmtree(self.pin_dir, ignore_errors=True)
        for g in self.groups:
            subprocess.run(["groupdel", g], capture_output=True)
        self.groups = []
        if show_log:
            print(f"----- agent log ({self.log_path}) -----\n{self.log_text()}")
        shutil.rmtree(self.dir, ignore_errors=True)
        if errors:
            raise errors[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
