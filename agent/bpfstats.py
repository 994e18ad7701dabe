"""The kernel's BPF run-time statistics for the datapath program (run time and run count,
as `bpftool prog` shows them), opt-in with `[metrics] bpf_stats = true`.

The kernel only counts while statistics are enabled, which costs every BPF program on the
node two clock reads per run. Two ways to enable them, in the order tried:
  - the BPF_ENABLE_STATS command (Linux 5.8+): the kernel counts while the returned fd is
    open, so the agent holds it and counting stops when the agent exits, even on kill -9;
  - the sysctl kernel.bpf_stats_enabled = 1: global and left on after the agent exits
    (older kernels only; said so in `status`).
"""
from __future__ import annotations

import ctypes as ct
import logging
import os
from typing import Any, Dict

from . import bpfsys

log = logging.getLogger("xdpflow.bpfstats")

SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"
BPF_STATS_RUN_TIME = 0


def _sysctl_on() -> bool:
    try:
        with open(SYSCTL) as f:
            return f.read().strip() == "1"
    except OSError:
        return False


class BpfStats:
    """Whether run-time statistics are on, how, and the fd that keeps them on."""

    def __init__(self, wanted: bool):
        self.wanted = wanted
        self.fd = -1
        self.how = "off"
        self.error = ""
        if wanted:
            self._enable()

    def _enable(self) -> None:
        fn = getattr(bpfsys._lib, "bpf_enable_stats", None)
        if fn is not None:
            fn.argtypes = [ct.c_int]
            fn.restype = ct.c_int
            fd = fn(BPF_STATS_RUN_TIME)
            if fd >= 0:
                self.fd, self.how = fd, "BPF_ENABLE_STATS (fd held by the agent)"
                log.info("BPF run-time statistics on: %s", self.how)
                return
            err = ct.get_errno() if fd == -1 else -fd
            self.error = f"BPF_ENABLE_STATS: {os.strerror(err)}"
        else:
            self.error = "BPF_ENABLE_STATS: this libbpf has no bpf_enable_stats"
        # Older kernels: the global switch.
        try:
            if not _sysctl_on():
                with open(SYSCTL, "w") as f:
                    f.write("1\n")
            self.how = "sysctl kernel.bpf_stats_enabled=1 (global, stays on after the agent)"
            log.warning("BPF run-time statistics on via %s (%s)", self.how, self.error)
        except OSError as e:
            self.error += f"; {SYSCTL}: {e.strerror}"
            log.error("BPF run-time statistics could not be enabled: %s", self.error)

    @property
    def enabled(self) -> bool:
        return self.fd >= 0 or (self.how.startswith("sysctl") and _sysctl_on())

    def describe(self) -> Dict[str, Any]:
        """The `status` entry."""
        out: Dict[str, Any] = {"enabled": self.enabled, "how": self.how}
        if not self.wanted:
            out["how"] = "off ([metrics] bpf_stats = false)"
        if self.error:
            out["error"] = self.error
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def run_stats(prog_fd: int) -> Dict[str, int]:
    """Run time (ns) and run count the kernel has counted for a program; zeros while
    statistics are off."""
    info = bpfsys.prog_info(prog_fd)
    return {"run_time_ns": int(info.run_time_ns), "run_count": int(info.run_cnt)}
