"""`bash setup.sh` on a machine that has never seen the project, for the parts that matter:
a clean clone (no .venv), no kernel headers under /lib/modules, no bpffs. The machine is
made to look fresh inside a private mount namespace (an empty tmpfs over /lib/modules,
/sys/fs/bpf unmounted), so nothing global changes for anyone else running tests and the
machine is back as it was when the namespace's last process ends, also if the test dies.

Run 1 must wire the headers, mount bpffs and make the venv; BCC then builds and loads the
real datapath from that venv. Run 2 must change nothing and say so. Then `bash setup.sh
demo`, the README's first command, runs the demo to its end."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.setup

CHECKOUT = Path(__file__).resolve().parents[2]
KVER = os.uname().release
MODULES = Path("/lib/modules")

# Runs as root inside `unshare -m --propagation private`: MODE is "fresh" (run setup twice,
# then load the datapath) or "no-header-tree" (the distribution's header package is
# installed but its tree is gone: setup must fail, naming what failed).
DRIVER = textwrap.dedent(r"""
    set -euo pipefail
    clone=$1 out=$2 mode=$3
    mount -t tmpfs -o size=4m,mode=0755 xdpflow-fresh /lib/modules
    while mountpoint -q /sys/fs/bpf; do umount /sys/fs/bpf; done
    if [ "$mode" = no-header-tree ]; then
      mount -t tmpfs -o size=4m,mode=0755 xdpflow-fresh /usr/src
    fi
    snapshot() {
      # What setup makes: the header links, the bpffs mount (its id changes on a remount),
      # every file of the venv with size and mtime.
      find /lib/modules -printf '%p %y %l\n' | sort
      awk '$5 == "/sys/fs/bpf" {print "mount", $1, $5, $9}' /proc/self/mountinfo
      [ ! -d "$clone/.venv" ] || find "$clone/.venv" -printf '%P %y %s %T@\n' | sort | sha256sum
    }
    snapshot > "$out/state0"
    for run in 1 2; do
      rc=0
      bash "$clone/setup.sh" </dev/null >"$out/run$run.out" 2>"$out/run$run.err" || rc=$?
      echo "$rc" > "$out/run$run.rc"
      snapshot > "$out/state$run"
      [ "$rc" = 0 ] && [ "$mode" = fresh ] || exit 0
    done
    rc=0
    "$clone/.venv/bin/python" "$out/load.py" >"$out/load.out" 2>"$out/load.err" || rc=$?
    echo "$rc" > "$out/load.rc"
    # The README's first command, as the issue's new user typed it.
    rc=0
    bash "$clone/setup.sh" demo </dev/null >"$out/demo.out" 2>&1 || rc=$?
    echo "$rc" > "$out/demo.rc"
""")

# Runs in the clone's new venv: build and load the real datapath (small sizes: it is the
# build that matters), run one packet through it, report where everything came from.
LOAD = textwrap.dedent(r"""
    import json, os, sys
    import bcc
    import agent
    from agent.datapath import Datapath
    pins = "/sys/fs/bpf/xdpflow-fresh-%d" % os.getpid()
    dp = Datapath(pins, {"XF_FLOW_TABLE_SIZE": 4096, "XF_MAX_RULE_ENTRIES": 1024,
                         "XF_MAX_ENDPOINTS": 256, "XF_MAX_ROUTES": 256, "XF_MAX_PORTS": 16})
    try:
        report = dp.load()
        # An IPv4/UDP frame from an interface that is no port of ours: XDP_PASS (2).
        frame = bytes(12) + b"\x08\x00" + bytes.fromhex(
            "4500001c00000000401100000a0000010a000002") + bytes.fromhex("0035003500080000")
        rc, _, _ = dp.run(frame, ifindex=1)
        print(json.dumps({"prefix": sys.prefix, "agent": agent.__file__, "bcc": bcc.__file__,
                          "prog_fd": dp.prog_fd, "verdict": rc,
                          "maps": sorted(s.name for s in report if s.action == "create")}))
    finally:
        dp.close()
        dp.unpin()
""")


def _git(*args: str, cwd: Path = CHECKOUT) -> str:
    # (a CI checkout owned by another user than root is still ours to clone)
    return subprocess.run(["git", "-c", "safe.directory=*", *args], cwd=cwd, check=True, capture_output=True,
                          text=True, timeout=120).stdout.strip()


def _global_view() -> str:
    """What the rest of the machine sees: must be the same before and after."""
    links = sorted((str(p), os.readlink(p)) for p in MODULES.glob("*/*") if p.is_symlink())
    bpffs = [line.split()[1:3] for line in Path("/proc/self/mounts").read_text().splitlines()
             if line.split()[1] == "/sys/fs/bpf"]
    return json.dumps({"links": links, "bpffs": bpffs})


@pytest.fixture
def fresh_clone(tmp_path):
    """A clean clone of this checkout's HEAD (committed files only, no .venv) and a
    directory for the driver's outputs."""
    if os.geteuid() != 0:
        pytest.skip("the setup tier needs root")
    for tool in ("git", "unshare"):
        assert shutil.which(tool), f"{tool} is missing (setup.sh installs it)"
    assert (CHECKOUT / ".git").exists(), f"{CHECKOUT} is not a git checkout: nothing to clone"
    assert MODULES.is_dir(), "/lib/modules is missing: run bash setup.sh first"
    clone = tmp_path / "xdpflow"
    _git("clone", "--quiet", "--no-hardlinks", str(CHECKOUT), str(clone))
    _git("checkout", "--quiet", "--detach", _git("rev-parse", "HEAD"), cwd=clone)
    out = tmp_path / "out"
    out.mkdir()
    (out / "load.py").write_text(LOAD)
    (out / "driver.sh").write_text(DRIVER)
    yield clone, out
    # The venv and clone are big; keep nothing of them.
    shutil.rmtree(clone, ignore_errors=True)


def _in_fresh_namespace(clone: Path, out: Path, mode: str, timeout: float = 420) -> None:
    before = _global_view()
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "bash", str(out / "driver.sh"),
         str(clone), str(out), mode],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # The whole group (pip, apt, compilers): the namespace dies with its last process.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"setup in a fresh namespace took over {timeout}s")
    assert proc.returncode == 0, f"driver failed ({proc.returncode}):\n{log}"
    assert _global_view() == before, "the fresh-machine test changed the machine's own view"


def _read(out: Path, name: str) -> str:
    path = out / name
    return path.read_text() if path.exists() else f"({name} missing)"


def test_setup_on_a_fresh_machine(fresh_clone):
    clone, out = fresh_clone
    _in_fresh_namespace(clone, out, "fresh")
    run1 = _read(out, "run1.out") + _read(out, "run1.err")
    assert _read(out, "run1.rc").strip() == "0", f"first run failed:\n{run1}"
    print(f"----- first run -----\n{run1}")

    # Before: nothing under /lib/modules, no bpffs, no venv. After: all three.
    assert _read(out, "state0").splitlines() == ["/lib/modules d "], _read(out, "state0")
    state1 = _read(out, "state1")
    build = re.search(rf"^/lib/modules/{re.escape(KVER)}/build l (\S+)$", state1, re.M)
    source = re.search(rf"^/lib/modules/{re.escape(KVER)}/source l (\S+)$", state1, re.M)
    assert build and source, state1
    assert Path(build.group(1), "include/generated/autoconf.h").exists(), build.group(1)
    assert Path(source.group(1), "include/linux/kconfig.h").exists(), source.group(1)
    assert re.search(r"^mount \d+ /sys/fs/bpf bpf$", state1, re.M), state1
    assert "linked /lib/modules" in run1 and "mounted bpffs" in run1, run1
    assert f"made virtual environment {clone}/.venv" in run1, run1

    # The second run: same files, same mount, and it says it changed nothing.
    run2 = _read(out, "run2.out") + _read(out, "run2.err")
    print(f"----- second run -----\n{run2}")
    assert _read(out, "run2.rc").strip() == "0", f"second run failed:\n{run2}"
    assert _read(out, "state2") == state1, "the second run changed the machine"
    assert "setup: nothing changed" in run2, run2
    assert "installing" not in run2 and "setup: changed:" not in run2, run2

    # BCC builds and loads the real datapath from the new venv, against the wired headers.
    load = _read(out, "load.out") + _read(out, "load.err")
    assert _read(out, "load.rc").strip() == "0", f"the datapath did not build:\n{load}"
    got = json.loads(_read(out, "load.out"))
    print(f"----- datapath from the new venv -----\n{got}")
    assert got["prefix"] == str(clone / ".venv")
    assert got["agent"].startswith(str(clone)), got["agent"]
    assert got["prog_fd"] >= 0 and got["verdict"] == 2, got
    assert "xf_flows" in got["maps"], got

    demo = _read(out, "demo.out")
    print(f"----- bash setup.sh demo (last lines) -----\n{demo[-600:]}")
    assert _read(out, "demo.rc").strip() == "0", f"the demo failed:\n{demo[-4000:]}"
    assert "setup: nothing changed" in demo, demo[:2000]


def test_setup_names_what_failed(fresh_clone):
    """The failure the issue found (the distribution's header package is installed but no
    header tree matches the globs) ends with the step and the reason, not in silence."""
    clone, out = fresh_clone
    _in_fresh_namespace(clone, out, "no-header-tree")
    rc = _read(out, "run1.rc").strip()
    err = _read(out, "run1.err")
    assert rc not in ("0", ""), f"setup succeeded without headers:\n{_read(out, 'run1.out')}"
    assert 'setup: error: step "kernel headers"' in err, err
    assert "no header tree" in err, err
    assert not (out / "run2.rc").exists()
