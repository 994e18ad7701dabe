"""The kernel's run-time statistics of the real datapath program: counted exactly while
enabled (the fd BPF_ENABLE_STATS returns keeps them on), not at all once it is closed."""
from __future__ import annotations

import pytest

from agent.bpfstats import BpfStats, _sysctl_on, run_stats

from . import cases

# Global statistics: no lab agent of this run may hold them on meanwhile (tests/conftest.py).
pytestmark = [pytest.mark.bpf, pytest.mark.usefixtures("bpf_stats_to_ourselves")]


def test_run_stats_count_while_enabled_only(bench):
    pkt = bytes(cases.udp4(port="p6"))     # p6 is never a port: XDP_PASS, nothing installed
    port = bench.lab.ifindex["p6"]
    stats = BpfStats(True)
    try:
        assert stats.enabled, stats.describe()
        assert stats.describe()["how"].startswith("BPF_ENABLE_STATS"), stats.describe()
        before = run_stats(bench.dp.prog_fd)
        rc, _, _ = bench.dp.run(pkt, port, repeat=1000)
        assert rc == 2
        after = run_stats(bench.dp.prog_fd)
    finally:
        stats.close()
    assert after["run_count"] - before["run_count"] == 1000
    # Each run costs more than nothing and less than a millisecond, even here.
    ns = (after["run_time_ns"] - before["run_time_ns"]) / 1000
    assert 0 < ns < 1e6, ns
    assert not stats.enabled
    if not _sysctl_on():    # (the global switch would keep counting: not ours to change)
        bench.dp.run(pkt, port, repeat=1000)
        assert run_stats(bench.dp.prog_fd) == after, "counted after the fd was closed"


def test_stats_off_unless_asked():
    stats = BpfStats(False)
    assert stats.fd == -1 and not stats.enabled
    assert stats.describe()["how"] == "off ([metrics] bpf_stats = false)"
