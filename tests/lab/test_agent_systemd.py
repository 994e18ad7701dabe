"""The agent as systemd runs it: sd_notify messages (READY, WATCHDOG, RELOADING, STOPPING)
read from a socket the test binds as systemd would, the unit file as installed, and
`--check` on a config that is wrong."""
from __future__ import annotations

import importlib.util
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from netns_lab.lab import AGENT

pytestmark = pytest.mark.lab

CHECKOUT = Path(__file__).resolve().parents[2]


def unit_tests_module():
    """tests/unit/test_systemd.py, for its helpers (verify, with_exec, UNIT)."""
    path = CHECKOUT / "tests" / "unit" / "test_systemd.py"
    spec = importlib.util.spec_from_file_location("xfl_unit_systemd_helpers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class NotifySocket:
    """The datagram socket systemd would listen on for sd_notify."""

    def __init__(self, path: Path, lab):
        self.lab = lab              # to notice an agent that died instead of answering
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages = []          # (monotonic time, {key: value})

    def wait_for(self, key: str, value: str = None, timeout: float = 30.0):
        """Read until a message with `key` (= `value`) arrives; returns it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, min(0.5, deadline - time.monotonic())))
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                proc = self.lab.proc
                if key != "STOPPING" and proc is not None and proc.poll() is not None:
                    raise AssertionError(f"the agent exited ({proc.returncode}) while waiting "
                                         f"for {key}; got {[m for _, m in self.messages]}")
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))
            if key in fields and (value is None or fields[key] == value):
                return fields
        raise AssertionError(f"no {key}={value or '*'} within {timeout}s; got "
                             f"{[m for _, m in self.messages]}")

    def close(self):
        self.sock.close()


def test_sd_notify_ready_watchdog_reload_stop(lab):
    ns = NotifySocket(lab.dir / "notify.sock", lab)
    try:
        lab.write_config()
        lab.start_agent(env={"NOTIFY_SOCKET": ns.path, "WATCHDOG_USEC": "2000000"},
                        wait=False)
        ready = ns.wait_for("READY", "1", timeout=90)
        assert "STATUS" in ready, ready            # "serving N ports", for systemctl status
        # Serving by the time it said so.
        assert lab.ctl("status").code == 0
        # WATCHDOG_USEC=2 s: pings every second or so, from the main loop.
        t0 = time.monotonic()
        ns.wait_for("WATCHDOG", "1", timeout=3)
        ns.wait_for("WATCHDOG", "1", timeout=3)
        ns.wait_for("WATCHDOG", "1", timeout=3)
        assert time.monotonic() - t0 < 4.5
        # SIGHUP: RELOADING=1, then READY=1 again, and the watchdog keeps going.
        n = len(ns.messages)
        lab.proc.send_signal(signal.SIGHUP)
        reloading = ns.wait_for("RELOADING", "1", timeout=30)
        assert reloading.get("MONOTONIC_USEC", "").isdigit(), reloading
        ns.wait_for("READY", "1", timeout=30)
        kinds = [k for _, m in ns.messages[n:] for k in ("RELOADING", "READY") if k in m]
        assert kinds == ["RELOADING", "READY"], ns.messages[n:]
        ns.wait_for("WATCHDOG", "1", timeout=3)
        assert lab.ctl("status").code == 0
        # SIGTERM: STOPPING=1, then a clean exit.
        lab.proc.send_signal(signal.SIGTERM)
        ns.wait_for("STOPPING", "1", timeout=20)
        assert lab.proc.wait(20) == 0
    finally:
        ns.close()


def test_no_watchdog_pings_for_another_pid(lab):
    """WATCHDOG_PID names another process: the agent must not ping on its behalf."""
    ns = NotifySocket(lab.dir / "notify.sock", lab)
    try:
        lab.write_config()
        lab.start_agent(env={"NOTIFY_SOCKET": ns.path, "WATCHDOG_USEC": "1000000",
                             "WATCHDOG_PID": "1"}, wait=False)
        ns.wait_for("READY", "1", timeout=90)
        time.sleep(1.5)
        with pytest.raises(AssertionError, match="no WATCHDOG"):
            ns.wait_for("WATCHDOG", timeout=0.5)
        assert lab.proc.poll() is None
    finally:
        ns.close()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed")
def test_unit_verifies_with_this_venvs_agent(tmp_path):
    helpers = unit_tests_module()
    unit = tmp_path / helpers.UNIT.name
    text = helpers.with_exec(helpers.UNIT.read_text(), AGENT)
    assert f"ExecStart={AGENT} --config" in text
    unit.write_text(text)
    code, output = helpers.verify(unit)
    assert code == 0 and output == "", output


@pytest.mark.parametrize("text, key", [
    ('[aging]\nudp = -5\n', "aging.udp"),
    ('[agent]\nsocket_grup = "xdpflow"\n', "socket_grup"),
    ('[datapath]\nxdp_mode = "turbo"\n', "datapath.xdp_mode"),
    ('[[state.rules]]\nid = 1\ntenant = "blue"\npriority = 1\naction = "allow"\n'
     'src = "10.0.0.1/33"\n', "src"),
])
def test_check_names_the_bad_key(tmp_path, text, key):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(text)
    p = subprocess.run([AGENT, "--config", str(cfg), "--check"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert key in p.stderr, p.stderr
    assert str(cfg) in p.stderr, p.stderr


def test_check_accepts_a_good_config(lab):
    lab.write_config()
    p = subprocess.run([AGENT, "--config", lab.config, "--check"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
