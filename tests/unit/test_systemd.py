"""The systemd unit, its sysusers/tmpfiles entries, the example config and install.sh."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    tomllib = pytest.importorskip("tomli")

pytestmark = pytest.mark.unit

CHECKOUT = Path(__file__).resolve().parents[2]
SYSTEMD = CHECKOUT / "systemd"
UNIT = SYSTEMD / "xdpflow-agent.service"
INSTALL = SYSTEMD / "install.sh"
EXAMPLE = SYSTEMD / "agent.toml.example"
PLACEHOLDER = "/opt/xdpflow/.venv/bin/xdpflow-agent"
CHECKOUT_AGENT = CHECKOUT / ".venv" / "bin" / "xdpflow-agent"

CAPS = {"CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON", "CAP_SYS_ADMIN", "CAP_SYS_RESOURCE",
        "CAP_NET_RAW"}

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze not installed")


def unit_settings(text):
    """{section: {key: [values]}} from unit-file text (comments and blanks skipped)."""
    out, section = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = out.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return out


def verify(unit_path):
    """systemd-analyze verify; returns (exit code, everything it printed)."""
    result = subprocess.run(["systemd-analyze", "verify", str(unit_path)],
                            capture_output=True, text=True, timeout=60)
    return result.returncode, (result.stdout + result.stderr).strip()


def with_exec(text, binary):
    return text.replace(f"ExecStart={PLACEHOLDER} ", f"ExecStart={binary} ")


# --- the unit ---------------------------------------------------------------------------

@needs_analyze
def test_unit_verifies_with_a_stand_in_binary(tmp_path):
    unit = tmp_path / UNIT.name
    unit.write_text(with_exec(UNIT.read_text(), sys.executable))
    code, output = verify(unit)
    # verify only warns (exit 0) on unknown keys, so any output is a failure too.
    assert code == 0 and output == "", output


@needs_analyze
def test_unit_verifies_with_the_checkout_agent(tmp_path):
    binary = CHECKOUT_AGENT if os.access(CHECKOUT_AGENT, os.X_OK) else Path(sys.executable)
    unit = tmp_path / UNIT.name
    unit.write_text(with_exec(UNIT.read_text(), binary))
    code, output = verify(unit)
    assert code == 0 and output == "", output


@needs_analyze
def test_verify_would_catch_a_typo(tmp_path):
    """Guards the two tests above: a misspelt key must make output."""
    unit = tmp_path / UNIT.name
    unit.write_text(with_exec(UNIT.read_text(), sys.executable)
                    .replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"))
    _, output = verify(unit)
    assert "NoNewPrivilege" in output


def test_unit_settings():
    s = unit_settings(UNIT.read_text())
    svc = s["Service"]
    one = {k: v[0] for k, v in svc.items() if len(v) == 1}
    expected = {
        "Type": "notify", "NotifyAccess": "main",
        "ExecStart": f"{PLACEHOLDER} --config /etc/xdpflow/agent.toml",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "WatchdogSec": "30", "Restart": "on-failure", "RestartSec": "2",
        "RuntimeDirectory": "xdpflow", "RuntimeDirectoryMode": "0750",
        "RuntimeDirectoryPreserve": "yes",
        "StateDirectory": "xdpflow", "StateDirectoryMode": "0750",
        "KillMode": "mixed", "TimeoutStopSec": "20", "Group": "xdpflow",
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ReadWritePaths": "/sys/fs/bpf",
        "ProtectHome": "yes", "PrivateTmp": "yes", "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "RestrictNamespaces": "net", "LockPersonality": "yes", "RestrictRealtime": "yes",
        "SystemCallArchitectures": "native",
    }
    for key, value in expected.items():
        assert one.get(key) == value, key
    assert set(one["CapabilityBoundingSet"].split()) == CAPS
    assert set(one["AmbientCapabilities"].split()) == CAPS
    # Each would break the agent (see the comments in the unit): W+X for LLVM's JIT,
    # a read-only /sys for bpffs, a hidden /lib/modules for BCC's kernel headers.
    for key in ("MemoryDenyWriteExecute", "ProtectKernelTunables", "ProtectKernelModules",
                "User", "DynamicUser"):
        assert key not in svc, key
    # Module loading is still refused, by the filter instead of ProtectKernelModules=.
    assert "@module" in one["SystemCallFilter"] and one["SystemCallFilter"].startswith("~")
    assert s["Install"]["WantedBy"] == ["multi-user.target"]


# --- sysusers / tmpfiles -----------------------------------------------------------------

def entries(path):
    return [line.split() for line in path.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_sysusers_and_tmpfiles_entries():
    assert entries(SYSTEMD / "xdpflow.sysusers") == [["g", "xdpflow", "-"]]
    assert entries(SYSTEMD / "xdpflow.tmpfiles") == [
        ["d", "/run/xdpflow", "0750", "root", "xdpflow", "-"],
        ["d", "/var/lib/xdpflow", "0750", "root", "xdpflow", "-"],
        ["d", "/etc/xdpflow", "0755", "root", "root", "-"],
    ]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("systemd-sysusers")
                    or not shutil.which("systemd-tmpfiles"),
                    reason="needs root and systemd-sysusers/systemd-tmpfiles to chown")
def test_sysusers_and_tmpfiles_apply_in_a_staged_root(tmp_path):
    (tmp_path / "etc/sysusers.d").mkdir(parents=True)
    (tmp_path / "etc/tmpfiles.d").mkdir(parents=True)
    shutil.copy(SYSTEMD / "xdpflow.sysusers", tmp_path / "etc/sysusers.d/xdpflow.conf")
    shutil.copy(SYSTEMD / "xdpflow.tmpfiles", tmp_path / "etc/tmpfiles.d/xdpflow.conf")
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}"], check=True,
                   capture_output=True, timeout=60)
    groups = dict(line.split(":")[0:3:2] for line in
                  (tmp_path / "etc/group").read_text().splitlines())
    gid = int(groups["xdpflow"])
    subprocess.run(["systemd-tmpfiles", f"--root={tmp_path}", "--create"], check=True,
                   capture_output=True, timeout=60)
    for path, mode, group in (("run/xdpflow", 0o750, gid), ("var/lib/xdpflow", 0o750, gid),
                              ("etc/xdpflow", 0o755, 0)):
        st = (tmp_path / path).stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (mode, 0, group), path


# --- the example config ------------------------------------------------------------------

def uncommented_state(text):
    """The example with its commented-out [state] block switched on."""
    out, in_state = [], False
    for line in text.splitlines():
        if re.match(r"^# \[\[state\.", line):
            in_state = True
        if in_state and line.startswith("# "):
            line = line[2:]
        out.append(line)
    return "\n".join(out) + "\n"


def test_example_config_parses_with_every_section():
    from agent import config
    doc = tomllib.loads(EXAMPLE.read_text())
    # Every setting spelled out, at the agent's defaults; the state example stays commented.
    assert set(doc) == {"agent", "metrics", "datapath", "aging", "monitor", "flows"}
    assert config.parse(EXAMPLE.read_text()) == config.Config.default()
    for section in doc:
        assert re.search(rf"^# .*\n\[{section}\]$", EXAMPLE.read_text(), re.M), section


def test_example_state_block_parses_when_uncommented():
    doc = tomllib.loads(uncommented_state(EXAMPLE.read_text()))
    state = doc["state"]
    assert state["tenants"] == [{"name": "blue", "id": 10, "vni": 5010, "default": "drop"}]
    assert state["ports"] == [{"name": "veth-vm1", "tenant": "blue"}]
    assert state["endpoints"] == [{"tenant": "blue", "ip": "10.0.0.5", "port": "veth-vm1",
                                   "mac": "02:00:00:00:00:05"}]
    assert state["rules"] == [{"id": 1, "tenant": "blue", "priority": 100,
                               "src": "10.0.0.0/24", "proto": "tcp", "dport": "22",
                               "action": "allow", "comment": "ssh"}]


def test_example_config_passes_the_agents_checks():
    config = pytest.importorskip("agent.config")
    config.parse(EXAMPLE.read_text(), str(EXAMPLE))
    config.parse(uncommented_state(EXAMPLE.read_text()), str(EXAMPLE))


# --- install.sh --------------------------------------------------------------------------

def run_install(*args):
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True,
                          timeout=60)


def snapshot(root):
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mode, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


INSTALLED = {
    "etc/systemd/system/xdpflow-agent.service",
    "etc/sysusers.d/xdpflow.conf",
    "etc/tmpfiles.d/xdpflow.conf",
    "etc/xdpflow/agent.toml",
}


def test_install_into_a_staging_root(tmp_path):
    result = run_install("--root", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert set(snapshot(tmp_path)) == INSTALLED

    unit = (tmp_path / "etc/systemd/system/xdpflow-agent.service").read_text()
    exec_start = unit_settings(unit)["Service"]["ExecStart"]
    assert exec_start == [f"{CHECKOUT_AGENT} --config /etc/xdpflow/agent.toml"]
    assert unit == with_exec(UNIT.read_text(), CHECKOUT_AGENT)  # nothing else changed
    assert (tmp_path / "etc/sysusers.d/xdpflow.conf").read_bytes() == \
        (SYSTEMD / "xdpflow.sysusers").read_bytes()
    assert (tmp_path / "etc/tmpfiles.d/xdpflow.conf").read_bytes() == \
        (SYSTEMD / "xdpflow.tmpfiles").read_bytes()
    assert (tmp_path / "etc/xdpflow/agent.toml").read_bytes() == EXAMPLE.read_bytes()


@needs_analyze
@pytest.mark.skipif(not os.access(CHECKOUT_AGENT, os.X_OK),
                    reason="the checkout's venv has no xdpflow-agent (run setup.sh)")
def test_installed_unit_verifies(tmp_path):
    assert run_install("--root", str(tmp_path)).returncode == 0
    code, output = verify(tmp_path / "etc/systemd/system/xdpflow-agent.service")
    assert code == 0 and output == "", output


def test_install_twice_changes_nothing(tmp_path):
    assert run_install("--root", str(tmp_path)).returncode == 0
    first = snapshot(tmp_path)
    second_run = run_install("--root", str(tmp_path))
    assert second_run.returncode == 0, second_run.stderr
    assert snapshot(tmp_path) == first  # same bytes, modes and even mtimes
    assert "installed " not in second_run.stdout


def test_install_keeps_an_existing_config_and_repairs_the_rest(tmp_path):
    config = tmp_path / "etc/xdpflow/agent.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[metrics]\nlisten = "[::1]:9477"\n')
    unit = tmp_path / "etc/systemd/system/xdpflow-agent.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("stale\n")
    assert run_install("--root", str(tmp_path)).returncode == 0
    assert config.read_text() == '[metrics]\nlisten = "[::1]:9477"\n'
    assert unit.read_text() == with_exec(UNIT.read_text(), CHECKOUT_AGENT)


def test_uninstall_removes_what_install_put(tmp_path):
    assert run_install("--root", str(tmp_path)).returncode == 0
    result = run_install("--root", str(tmp_path), "--uninstall")
    assert result.returncode == 0, result.stderr
    assert snapshot(tmp_path) == {}
    assert not (tmp_path / "etc/xdpflow").exists()
    # Again: nothing left to remove is not an error.
    assert run_install("--root", str(tmp_path), "--uninstall").returncode == 0


def test_uninstall_keeps_an_edited_config(tmp_path):
    assert run_install("--root", str(tmp_path)).returncode == 0
    config = tmp_path / "etc/xdpflow/agent.toml"
    config.write_text(config.read_text().replace('"info"', '"debug"'))
    assert run_install("--root", str(tmp_path), "--uninstall").returncode == 0
    assert set(snapshot(tmp_path)) == {"etc/xdpflow/agent.toml"}


def test_install_refuses_unknown_arguments(tmp_path):
    result = run_install("--root", str(tmp_path), "--frobnicate")
    assert result.returncode == 2
    assert "--frobnicate" in result.stderr
    assert snapshot(tmp_path) == {}
