"""`xdpflow-lab bench datapath` end to end with a tiny repeat: every required case is
measured on the intended path (verdict of every call, the datapath's own counters), the
JSON and PNG are written, and nothing is left behind (namespaces, pins)."""
import glob
import json
import os
import subprocess

import pytest

from netns_lab import bench, cli

pytestmark = pytest.mark.bpf

if os.geteuid() != 0:
    pytest.skip("needs root", allow_module_level=True)


def _mine():
    """Namespaces and pin directories this process's bench made (netns.unique() puts the
    pid's last 3 digits right after the prefix; others may run benches in parallel)."""
    pid = f"{os.getpid() % 1000:03d}"
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    ns = {w for w in names.split() if w.startswith((f"xfbn{pid}", f"xfbv{pid}"))}
    return ns | set(glob.glob(f"/sys/fs/bpf/xfbench-{pid}*"))


def test_bench_datapath_small_run(tmp_path, capsys):
    before = _mine()
    out_json, out_png = tmp_path / "r" / "bench.json", tmp_path / "bench.png"
    rc = cli.main(["bench", "datapath", "--repeat", "2000", "--rounds", "1",
                   "--json", str(out_json), "--png", str(out_png), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads(out_json.read_text())
    by = {c["name"]: c for c in rep["cases"]}
    assert set(bench.REQUIRED_CASES) <= set(by)
    for name in bench.REQUIRED_CASES:
        c = by[name]
        assert c["ns_per_packet"] > 0 and len(c["rounds"]) == 1, name
        assert c["verdict_ok"] is True, name
        # warm-up + the round, every packet counted on the intended path (one-packet
        # cases send a share of the repeat, a call each)
        sent = 2000 // bench.ONE_PACKET_SHARE if name.endswith(("_1call", "cap_hit")) \
            else 2000
        assert c["packets"] == 2 * sent, name
        want = {"bare": "XDP_PASS", "hit_": "XDP_REDIRECT", "miss": "XDP_DROP",
                "enca": "XDP_REDIRECT", "deca": "XDP_REDIRECT"}[name[:4]]
        assert c["verdict"] == want, name
        if not name.startswith("bare"):
            assert c["counter_ok"] is True, name
            assert c["counter"] == ("drop/rule_deny" if name.endswith("_best_first") else
                                    "drop/default" if name.startswith("miss")
                                    else "redirect/flow"), name
    assert set(rep["ratios"]) == {r[0] for r in bench.RATIO_GOALS}
    assert rep["machine"]["repeat"] == 2000 and rep["machine"]["call_size"] == 250
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "hit_redirect_rules_100000" in table
    # torn down
    assert _mine() == before
