"""A node in namespaces: one node namespace running the agent on VM-facing veths, one
namespace per VM, and the agent as a real process driven through `xdpflowctl`. Used by
the demo and the lab tests. Everything it makes has a unique name and goes away in close().
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .netns import Namespaces, ip, run, unique

VENV_BIN = Path(sys.executable).parent


@dataclass
class VM:
    name: str          # the VM's namespace
    tenant: str
    ip: str
    mac: str
    port: str          # the node-side interface (the xdpflow port)
    port_mac: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    def __init__(self, prefix: str = "xfl", workdir: Optional[str] = None,
                 flow_table_size: int = 65536, extra_config: str = ""):
        self.prefix = prefix
        self.ns = Namespaces()
        self.dir = Path(workdir or tempfile.mkdtemp(prefix=f"{prefix}-"))
        self.dir.chmod(0o755)
        self.pin_dir = f"/sys/fs/bpf/xdpflow-{unique(prefix, 30)}"
        self.socket = str(self.dir / "run" / "agent.sock")
        self.metrics_port = free_port()
        self.config = self.dir / "agent.toml"
        self.vms: Dict[str, VM] = {}
        self.node = self.ns.add(f"{prefix}n")
        self.agent: Optional[subprocess.Popen] = None
        self.log_path = self.dir / "agent.log"
        self.config.write_text(
            f'[agent]\nsocket = "{self.socket}"\nstate_dir = "{self.dir}/state"\n'
            f'bpffs = "{self.pin_dir}"\n\n[metrics]\nlisten = "127.0.0.1:{self.metrics_port}"\n\n'
            f'[datapath]\nflow_table_size = {flow_table_size}\n\n[aging]\ninterval = 1.0\n'
            + extra_config)

    # -- topology ------------------------------------------------------------------------------
    def add_vm(self, tenant: str, index: int, vm_ip: str, mac: str, prefixlen: int = 24) -> VM:
        """A VM namespace with eth0 (vm_ip, mac) whose peer is a port in the node namespace.
        Port MACs differ per port; VM MACs may repeat across tenants."""
        name = self.ns.add(f"{self.prefix}v")
        port = f"{tenant[:6]}{index}"
        n = len(self.vms) + 1
        port_mac = f"02:fe:00:00:{n >> 8:02x}:{n & 0xff:02x}"
        ip("link", "add", port, "address", port_mac, "type", "veth", "peer", "name", "eth0",
           "address", mac, "netns", name, ns=self.node)
        ip("link", "set", port, "up", ns=self.node)
        ip("link", "set", "eth0", "up", ns=name)
        ip("addr", "add", f"{vm_ip}/{prefixlen}", "dev", "eth0", ns=name)
        vm = VM(name, tenant, vm_ip, mac, port, port_mac)
        self.vms[f"{tenant}/{index}"] = vm
        return vm

    # -- the agent ---------------------------------------------------------------------------
    def start_agent(self, env: Optional[Dict[str, str]] = None, wait: float = 30) -> None:
        full_env = dict(os.environ)
        full_env.update(env or {})
        log = open(self.log_path, "ab")
        self.agent = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.node}", "--",
             str(VENV_BIN / "xdpflow-agent"), "--config", str(self.config)],
            stdout=log, stderr=subprocess.STDOUT, env=full_env)
        log.close()
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.agent.poll() is not None:
                raise RuntimeError(f"agent exited with {self.agent.returncode}:\n{self.log()}")
            if self.ctl("status", check=False)[0] == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"agent did not answer within {wait}s:\n{self.log()}")

    def stop_agent(self, sig: int = signal.SIGTERM, timeout: float = 20) -> Optional[int]:
        if self.agent is None:
            return None
        if self.agent.poll() is None:
            self.agent.send_signal(sig)
            try:
                self.agent.wait(timeout)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait()
        rc, self.agent = self.agent.returncode, None
        return rc

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def ctl(self, *args: str, check: bool = True, as_json: bool = True):
        """Run the real CLI. Returns (exit code, parsed JSON or text)."""
        cmd = [str(VENV_BIN / "xdpflowctl"), "--socket", self.socket]
        if as_json:
            cmd.append("--json")
        p = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=60)
        out = p.stdout
        if as_json:
            try:
                out = json.loads(p.stdout) if p.stdout.strip() else None
            except ValueError:
                pass
        if check and p.returncode != 0:
            raise RuntimeError(f"xdpflowctl {' '.join(args)} -> {p.returncode}: "
                               f"{p.stderr.strip()} {p.stdout.strip()}")
        return p.returncode, out if as_json else (p.stdout + p.stderr)

    def metrics(self) -> str:
        """A scrape, from inside the node namespace (the agent listens on its loopback)."""
        import urllib.request

        from .netns import in_netns

        def fetch():
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                        timeout=10) as r:
                return r.read().decode()
        return in_netns(self.node, fetch)

    # -- VMs ---------------------------------------------------------------------------------
    def vm_run(self, vm: VM, cmd: Sequence[str], check: bool = False, timeout: float = 30):
        return run(cmd, ns=vm.name, check=check, timeout=timeout)

    def vm_python(self, vm: VM, code: str, timeout: float = 30, background: bool = False):
        cmd = ["nsenter", f"--net=/run/netns/{vm.name}", "--", sys.executable, "-c", code]
        if background:
            return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)

    # -- teardown --------------------------------------------------------------------------------
    def close(self):
        try:
            self.stop_agent()
        finally:
            try:
                # In the node namespace, where the ports are.
                subprocess.run(["nsenter", f"--net=/run/netns/{self.node}", "--",
                                str(VENV_BIN / "xdpflow-agent"), "--config", str(self.config),
                                "--teardown"], capture_output=True, timeout=60)
            finally:
                self.ns.close()
                shutil.rmtree(self.pin_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
