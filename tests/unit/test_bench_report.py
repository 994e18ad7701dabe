"""`xdpflow-lab bench datapath`, the part that needs no root: packet bytes, the weighting
of calls, medians, ratios against their goals, the report and its table, the PNG writer
and chart, and the CLI's parsing (bench options, demo hand-off)."""
import json
import socket
import struct
import sys
import types
import zlib

import pytest

from netns_lab import bench, cli

pytestmark = pytest.mark.unit


def fake_rounds(scale=1.0):
    base = {"bare_pass": 5, "bare_lookup": 24, "hit_redirect": 50, "miss_classify_1mask": 150,
            "miss_classify_16masks": 600, "hit_redirect_rules_10": 50,
            "hit_redirect_rules_100000": 55, "miss_classify_rules_10": 150,
            "miss_classify_rules_100000": 200, "hit_redirect_no_hook": 48,
            "hit_redirect_monitor_on": 55, "miss_classify_1mask_no_hook": 145,
            "miss_classify_1mask_monitor_on": 160, "miss_classify_4masks": 250,
            "miss_classify_32masks": 1100, "miss_classify_1mask_best_first": 150,
            "miss_classify_4masks_best_first": 160, "miss_classify_16masks_best_first": 170,
            "miss_classify_32masks_best_first": 175, "bare_pass_1call": 250,
            "hit_redirect_1call": 400, "encap_hit": 420, "decap_hit": 480}
    return {k: [v * scale, v * scale * 1.1, v * scale * 0.9] for k, v in base.items()}


# -- packets and arithmetic ---------------------------------------------------------------

def test_udp_packet_is_a_valid_60_byte_frame_with_ttl_255():
    p = bench.udp_packet("02:00:00:00:00:01", "02:aa:00:00:01:01", "10.0.0.1", "10.0.0.2",
                         1234, 5005)
    assert len(p) == bench.PACKET_BYTES == 60
    assert p[:6] == bytes.fromhex("02aa00000101") and p[6:12] == bytes.fromhex("020000000001")
    assert p[12:14] == b"\x08\x00"
    ip = p[14:34]
    assert bench.ipv4_checksum(ip) == 0                    # checksum verifies
    ver_ihl, _, total, _, _, ttl, proto, _, src, dst = struct.unpack("!BBHHHBBH4s4s", ip)
    assert (ver_ihl, total, ttl, proto) == (0x45, 46, 255, 17)
    assert (socket.inet_ntoa(src), socket.inet_ntoa(dst)) == ("10.0.0.1", "10.0.0.2")
    sport, dport, ulen, _ = struct.unpack("!HHHH", p[34:42])
    assert (sport, dport, ulen) == (1234, 5005, 26)
    with pytest.raises(ValueError):
        bench.udp_packet("02:00:00:00:00:01", "02:00:00:00:00:02", "1.1.1.1", "2.2.2.2",
                         1, 2, size=41)


def test_ttl_outlasts_a_call():
    # A redirect decrements the TTL on every iteration of one call (same buffer): the call
    # must end before the TTL reaches 1, where the datapath hands the packet to the kernel.
    assert bench.PACKET_TTL - bench.CALL_SIZE >= 2


def test_split_calls():
    assert bench.split_calls(1000) == [250] * 4
    assert bench.split_calls(1001) == [250] * 4 + [1]
    assert bench.split_calls(100) == [100]
    assert sum(bench.split_calls(1_000_000)) == 1_000_000
    with pytest.raises(ValueError):
        bench.split_calls(0)


def test_weighted_mean_weights_by_repeat():
    assert bench.weighted_mean([(250, 10), (50, 40)]) == pytest.approx(15.0)
    assert bench.weighted_mean([(250, 7)] * 4) == 7
    with pytest.raises(ValueError):
        bench.weighted_mean([])


def test_median():
    assert bench.median([3, 1, 2]) == 2
    assert bench.median([1, 2, 3, 4]) == 2.5
    assert bench.median([7]) == 7
    with pytest.raises(ValueError):
        bench.median([])


def test_ratios_against_goals():
    r = bench.compute_ratios({"hit_redirect": 50, "bare_lookup": 24,
                              "hit_redirect_rules_10": 50, "hit_redirect_rules_100000": 70,
                              "miss_classify_rules_10": 100,
                              "miss_classify_rules_100000": 125})
    assert set(r) == {"hit_redirect/bare_lookup",
                      "hit_redirect_rules_100000/hit_redirect_rules_10",
                      "miss_classify_rules_100000/miss_classify_rules_10"}
    assert r["hit_redirect/bare_lookup"]["value"] == pytest.approx(50 / 24, abs=1e-3)
    assert r["hit_redirect/bare_lookup"]["met"] is True
    assert r["hit_redirect_rules_100000/hit_redirect_rules_10"]["met"] is False   # 1.4
    assert r["miss_classify_rules_100000/miss_classify_rules_10"]["met"] is True  # 1.25, at goal
    assert r["hit_redirect/bare_lookup"]["goal_max"] == 2.5
    mon = bench.compute_ratios({"hit_redirect": 50, "hit_redirect_no_hook": 48,
                                "hit_redirect_monitor_on": 66})
    assert mon["hit_redirect/hit_redirect_no_hook"]["met"] is True            # 1.04 <= 1.1
    assert mon["hit_redirect_monitor_on/hit_redirect_no_hook"]["met"] is False  # 1.375
    # missing cases: no ratio rather than a crash
    assert bench.compute_ratios({"bare_lookup": 24}) == {}


# -- the report ---------------------------------------------------------------------------

def test_report_shape_order_and_medians():
    rounds = fake_rounds()
    shuffled = dict(reversed(list(rounds.items())))
    extra = {"hit_redirect": {"verdict": "XDP_REDIRECT", "verdict_ok": True}}
    rep = bench.make_report(shuffled, {"kernel": "x", "repeat": 1000, "rounds": 3}, extra)
    assert [c["name"] for c in rep["cases"]] == list(bench.REQUIRED_CASES)
    by = {c["name"]: c for c in rep["cases"]}
    assert by["bare_lookup"]["ns_per_packet"] == 24
    assert by["bare_lookup"]["rounds"] == [24, 26.4, 21.6]
    assert by["hit_redirect"]["x_bare_lookup"] == pytest.approx(50 / 24, abs=1e-3)
    assert by["hit_redirect"]["verdict"] == "XDP_REDIRECT"
    assert all(c["description"] for c in rep["cases"])
    assert rep["machine"]["kernel"] == "x"
    assert rep["ratios"]["hit_redirect/bare_lookup"]["met"] is True
    json.dumps(rep)                                   # serialisable as is


def test_table_lists_cases_and_ratio_verdicts():
    rep = bench.make_report(fake_rounds(), {"repeat": 1000, "rounds": 3, "call_size": 250})
    text = bench.format_table(rep)
    for name in bench.REQUIRED_CASES:
        assert name in text
    assert "x bare_lookup" in text
    assert "hit_redirect/bare_lookup" in text and "met" in text
    rounds = fake_rounds()
    rounds["hit_redirect"] = [100, 100, 100]
    assert "MISSED" in bench.format_table(bench.make_report(rounds, {}))


def test_write_json_creates_directories(tmp_path):
    rep = bench.make_report(fake_rounds(), {"repeat": 1})
    path = tmp_path / "results" / "deep" / "bench-datapath.json"
    bench.write_json(rep, str(path))
    back = json.loads(path.read_text())
    assert back["cases"][0]["name"] == "bare_pass"
    assert set(back) == {"cases", "machine", "ratios"}
    assert not list(path.parent.glob("*.tmp"))


# -- PNG ----------------------------------------------------------------------------------

def read_png(data: bytes):
    """(width, height, rows of RGB bytes), checking signature, chunk CRCs and IHDR."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (n,) = struct.unpack("!I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack("!I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks.append((kind, body))
        pos += 12 + n
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    w, h, depth, ctype, comp, filt, interlace = struct.unpack("!IIBBBBB", chunks[0][1])
    assert (depth, ctype, comp, filt, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    assert len(raw) == h * (1 + 3 * w)
    rows = [raw[y * (1 + 3 * w) + 1:(y + 1) * (1 + 3 * w)] for y in range(h)]
    assert all(raw[y * (1 + 3 * w)] == 0 for y in range(h))      # filter "none"
    return w, h, rows


def test_png_writer_roundtrip():
    w, h = 7, 3
    px = bytearray(b"\xff\xff\xff" * (w * h))
    px[(1 * w + 2) * 3:(1 * w + 2) * 3 + 3] = b"\x10\x20\x30"
    data = bench.png_bytes(w, h, bytes(px))
    # IHDR right after the signature: length 13, then width and height
    assert struct.unpack("!I4sII", data[8:24]) == (13, b"IHDR", 7, 3)
    rw, rh, rows = read_png(data)
    assert (rw, rh) == (7, 3)
    assert rows[1][6:9] == b"\x10\x20\x30"
    assert rows[0][:3] == b"\xff\xff\xff"
    with pytest.raises(ValueError):
        bench.png_bytes(2, 2, b"\0" * 11)


def test_bar_chart_has_a_bar_per_case(tmp_path):
    rep = bench.make_report(fake_rounds(), {})
    path = tmp_path / "chart.png"
    bench.write_png(rep, str(path))
    w, h, rows = read_png(path.read_bytes())
    assert w > 300 and h > 20 * len(rep["cases"])
    colors = {bytes(c) for c in bench.BAR_COLORS.values()}
    seen = set()
    for row in rows:
        for x in range(0, len(row), 3):
            if row[x:x + 3] in colors:
                seen.add(row[x:x + 3])
    assert seen == colors                 # bare, hit and miss bars all drawn


def test_font_covers_case_names():
    for name in list(bench.REQUIRED_CASES) + ["0123456789."]:
        assert all(ch in bench._FONT for ch in name.upper()), name
    assert all(len(g) == 5 and all(d in "01234567" for d in g) for g in bench._FONT.values())


# -- CLI ----------------------------------------------------------------------------------

def test_cli_bench_datapath_defaults_and_options():
    p = cli.build_parser()
    a = p.parse_args(["bench", "datapath"])
    assert (a.command, a.target) == ("bench", "datapath")
    assert (a.json, a.png, a.repeat, a.rounds) == ("results/bench-datapath.json", None,
                                                   1_000_000, 3)
    a = p.parse_args(["bench", "datapath", "--json", "x.json", "--png", "x.png",
                      "--repeat", "2000", "--rounds", "1"])
    assert (a.json, a.png, a.repeat, a.rounds) == ("x.json", "x.png", 2000, 1)


@pytest.mark.parametrize("argv", [["bench"], ["bench", "nope"], ["bench", "datapath", "--repeat", "0"],
                                  ["bench", "datapath", "--bogus"], []])
def test_cli_bad_usage_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2


def test_cli_bench_needs_root(monkeypatch, capsys):
    monkeypatch.setattr(cli.os, "geteuid", lambda: 1000)
    assert cli.main(["bench", "datapath", "--repeat", "10"]) == 2
    assert "needs root" in capsys.readouterr().err


def test_cli_demo_not_available(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "netns_lab.demo", None)     # import fails
    assert cli.main(["demo"]) == 2
    assert "demo is not available yet" in capsys.readouterr().err


def test_cli_demo_gets_its_own_options(monkeypatch):
    seen = {}
    mod = types.ModuleType("netns_lab.demo")
    mod.add_arguments = lambda p: p.add_argument("--fast", action="store_true")
    mod.main = lambda args: seen.setdefault("args", args) and 0
    monkeypatch.setitem(sys.modules, "netns_lab.demo", mod)
    monkeypatch.setattr(cli, "_terminate_cleanly", lambda: None)
    assert cli.main(["demo", "--fast"]) == 0
    assert seen["args"].fast is True and seen["args"].command == "demo"


# -- the traffic suites' report (netns_lab/benchlib.py, netns_lab/bench_traffic.py) ------------

from netns_lab import bench_suites, bench_traffic, benchlib  # noqa: E402


def test_cost_subtracts_the_generators_own_cost():
    # generator alone 1 Mpps: 1,000 ns of its own per packet; a path at 0.5 Mpps: 2,000 ns
    # per packet in all, 1,000 of them the node's.
    assert benchlib.cost_ns(500_000, 1_000_000) == pytest.approx(1000.0)
    assert benchlib.cost_ns(250_000, 1_000_000) == pytest.approx(3000.0)
    assert benchlib.cost_ns(1_000_000, 1_000_000) == pytest.approx(0.0)
    assert benchlib.cost_ns(0, 1_000_000) is None          # nothing arrived: no cost


def test_summarize_pairs_rounds_and_takes_medians():
    gen = [1_000_000, 800_000, 1_250_000]
    path = [500_000, 400_000, 100_000]
    s = benchlib.summarize(path, gen)
    # per round: 2000-1000, 2500-1250, 10000-800 -> 1000, 1250, 9200; median 1250
    assert s["samples_ns"] == [1000.0, 1250.0, 9200.0]
    assert s["ns_per_packet"] == 1250.0
    assert s["pps"] == 400_000 and s["generator_pps"] == 1_000_000
    assert s["samples_pps"] == path and s["generator_samples_pps"] == gen
    with pytest.raises(ValueError, match="paired"):
        benchlib.summarize(path, gen[:2])


def test_summarize_with_a_round_where_nothing_arrived():
    s = benchlib.summarize([0, 500_000, 500_000], [1e6, 1e6, 1e6])
    assert s["samples_ns"] == [None, 1000.0, 1000.0] and s["ns_per_packet"] == 1000.0
    assert benchlib.summarize([0, 0], [1e6, 1e6])["ns_per_packet"] is None


def test_goal_entries_report_met_and_by_how_much_missed():
    g = benchlib.goal_entry("x", 5.0, ">=", 10)
    assert g["met"] is False and g["missed_by"] == "2.00x" and g["goal"] == ">= 10"
    assert benchlib.goal_entry("x", 12.0, ">=", 10)["met"] is True
    g = benchlib.goal_entry("bytes", 160.0, "<=", 128)
    assert g["met"] is False and g["missed_by"] == "1.25x"
    assert benchlib.goal_entry("x", None, ">=", 1)["met"] is None
    with pytest.raises(ValueError):
        benchlib.goal_entry("x", 1.0, "==", 1)


def _case(path, flows, rules, ns):
    return {"path": path, "flows": flows, "rules": rules, "ns_per_packet": ns,
            "pps": 1e5, "generator_pps": 2e5}


def test_forward_goals_are_ratios_of_one_cell():
    cases = [_case("offload", 1, 100, 100.0), _case("iptables", 1, 100, 1500.0),
             _case("nftables", 1, 100, 150.0), _case("offload", 1, 10000, 100.0),
             _case("iptables", 1, 10000, 5000.0), _case("offload", 1, 0, 200.0),
             _case("plain", 1, 0, 150.0), _case("nftables", 1, 0, 300.0)]
    goals = {g["name"]: g for g in bench_traffic.forward_goals(cases)}
    assert goals["iptables/offload cost, 100 rules, 1 flows"]["value"] == 15.0
    assert goals["iptables/offload cost, 100 rules, 1 flows"]["met"] is True
    assert goals["iptables/offload cost, 10,000 rules, 1 flows"]["value"] == 50.0
    assert goals["iptables/offload cost, 10,000 rules, 1 flows"]["missed_by"] == "2.00x"
    assert goals["nftables/offload cost, 100 rules, 1 flows"]["met"] is False
    assert goals["nftables/offload cost, 0 rules, 1 flows"]["value"] == 1.5
    plain = goals["plain/offload cost (offload at most plain), 0 rules, 1 flows"]
    assert plain["value"] == 0.75 and plain["met"] is False
    # no nftables case at 10,000 rules: no goal invented for it
    assert "nftables/offload cost, 10,000 rules, 1 flows" not in goals


def test_forward_table_and_plot(tmp_path):
    cases = []
    for nf in (1, 1000):
        for nr in (0, 100):
            for p, ns in (("offload", 150), ("iptables", 1500), ("nftables", 900)):
                c = {"path": p, "flows": nf, "rules": nr}
                c.update(benchlib.summarize([1e9 / (ns + 3000)] * 2, [1e9 / 3000] * 2))
                cases.append(c)
        c = {"path": "plain", "flows": nf, "rules": 0}
        c.update(benchlib.summarize([1e9 / 3140] * 2, [1e9 / 3000] * 2))
        cases.append(c)
    doc = {"cases": cases, "goals": bench_traffic.forward_goals(cases),
           "plan": {"rounds": 2, "seconds": 0.4}, "seconds": 1.0}
    assert [c["ns_per_packet"] for c in cases[:3]] == [150.0, 1500.0, 900.0]
    text = bench_traffic.forward_table(doc)
    assert "iptables/offload cost, 100 rules, 1 flows" in text and "met" in text
    png = bench_traffic.forward_plots(doc, str(tmp_path))[0]
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_rules_model_and_trafgen_frame():
    spec = bench_traffic.spec_for("xbtest", 3)
    rules = spec.state.rules
    allow = [r for r in rules if r.id == 1]
    assert len(rules) == 4 and all(allow[0].priority < r.priority for r in rules if r.id != 1)
    assert {str(r.src) for r in rules if r.id != 1} == {"10.64.0.1/32", "10.64.0.2/32",
                                                        "10.64.0.3/32"}
    # two batches are two different rule sets, the allow of the load in both
    a, b = bench_traffic.rules(2, 0), bench_traffic.rules(2, 2)
    assert a[0] == b[0] and not {r["id"] for r in a[1:]} & {r["id"] for r in b[1:]}
    assert not {r["src"] for r in a[1:]} & {r["src"] for r in b[1:]}
    conf = bench_traffic.trafgen_conf(bench_traffic.SRC_MAC, "02:aa:00:4d:00:01", 100000)
    assert "sp=drnd(1024, 4148)" in conf and "dp=drnd(7000, 7031)" in conf
    assert 3125 * 32 == 100000
    assert "sp=1024, dp=7000" in bench_traffic.trafgen_conf(bench_traffic.SRC_MAC, "x", 1)
    assert "drnd(0, 65535), dp=drnd(0, 65535)" in bench_traffic.trafgen_conf(
        bench_traffic.SRC_MAC, "x", bench_traffic.NEW_FLOWS)
    with pytest.raises(ValueError):
        bench_traffic.trafgen_conf(bench_traffic.SRC_MAC, "x", 7)


@pytest.mark.parametrize("suite", ["forward", "setup", "churn", "restart", "memory", "all"])
def test_cli_bench_suites_parse_and_need_root(suite, monkeypatch, capsys):
    args = cli.build_parser().parse_args(["bench", suite, "--quick", "--plot", "d"])
    assert args.quick and args.plot == "d" and args.json == f"results/bench-{suite}.json"
    monkeypatch.setattr(cli.os, "geteuid", lambda: 1000)
    assert cli.main(["bench", suite, "--quick"]) == 2
    assert "needs root" in capsys.readouterr().err


def test_all_records_a_failing_suite_and_runs_the_others(monkeypatch):
    ran = []

    def ok(quick, say):
        ran.append("ok")
        return {"suite": "ok"}

    def boom(quick, say):
        raise RuntimeError("broken rig")
    monkeypatch.setattr(bench_suites, "SUITES", {
        "a": bench_suites.Suite("", boom, str, lambda d, o: []),
        "b": bench_suites.Suite("", ok, lambda d: "B TABLE", lambda d, o: [])})
    doc = bench_suites.run_all(True, lambda s: None)
    assert ran == ["ok"] and doc["errors"] == {"a": "RuntimeError: broken rig"}
    assert doc["suites"]["b"]["quick"] is True
    text = bench_suites.all_table(doc)
    assert "B TABLE" in text and "a == FAILED" in text


def test_markdown_lists_every_goal_and_plot():
    doc = {"machine": {"kernel": "6.18", "cpus": 2, "cpu_model": "x", "arch": "x86_64",
                       "commit": "abc", "loadavg_at_start": [1.0, 1.0, 1.0]},
           "seconds": 12.0, "quick": True, "errors": {"churn": "RuntimeError: no"},
           "suites": {"datapath": {"cases": [], "ratios": {"hit/bare": {
               "value": 2.7, "goal": "<= 2.5", "met": False}}, "machine": {}},
               "memory": {"goals": [benchlib.goal_entry("bytes per flow", 187.0, "<=", 128)],
                          "method": "fdinfo"}}}
    tables = {"datapath": lambda d: "DP TABLE", "memory": lambda d: "MEM TABLE"}
    suites = {n: bench_suites.SUITES[n]._replace(table=t) for n, t in tables.items()}
    import unittest.mock as mock
    with mock.patch.object(bench_suites, "SUITES", suites):
        md = bench_suites.markdown(doc, "benchmarks")
    assert "| datapath | hit/bare | 2.70 | <= 2.5 | **missed** |" in md
    assert "| memory | bytes per flow | 187.00 | <= 128 | **missed** by 1.46x |" in md
    assert "![memory](benchmarks/memory.png)" in md and "MEM TABLE" in md
    assert "*Method:* fdinfo" in md and "FAILED in this run: RuntimeError: no" in md


def test_bench_control_states_goals_and_table():
    """`bench control`'s pure part: 4 rule shapes are 4 masks of distinct entries, the
    goals are reported against the largest size (not measured when it failed), and the
    table shows every figure."""
    from agent import compiler, model
    from netns_lab import bench_control as bc
    st = model.State.from_dict(bc.state(bc.shaped_rules(400)))
    cls = compiler.compile_rules(bc.TENANT, st.rules, {}, 32)
    assert len(cls.masks) == 4 and cls.size == 400
    doc = {"apply": [{"rules": 1000, "ok": True, "seconds": 0.5, "rules_per_s": 2000.0,
                      "dry_run_seconds": 0.3, "json_seconds": 0.25, "json_rules_per_s": 4000.0,
                      "json_dry_run_seconds": 0.2},
                     {"rules": 100000, "ok": False, "error": "request larger than 4194304"}],
           "single": [{"beside": 1000, "add_e2e_ms": 200.0, "add_agent_ms": 3.0,
                       "del_e2e_ms": 190.0, "del_agent_ms": 1.0}],
           "restart": {"rules": 1000, "warm_ready_s": 0.8, "cold_ready_s": 7.0},
           "restart_small": {"rules": 0, "warm_ready_s": 0.5, "cold_ready_s": 3.0,
                             "warm_started_s": 0.6, "cold_started_s": 3.1},
           "agent_rss_mib": {"started_empty": 240.0},
           "masks": [{"masks": n, "best_in_top_mask_ns": 100.0 + n, "no_match_ns": 50.0 * n}
                     for n in bc.MASK_COUNTS]}
    doc["goals"] = bc.goals(doc)
    by = {g["name"]: g for g in doc["goals"]}
    assert by["apply of 100,000 rules, rules/s end to end"]["met"] is None
    assert by["apply of 100,000 rules from JSON, rules/s end to end"]["met"] is None
    assert by["warm restart to ready (s)"]["met"] is True
    assert by["miss, best match in the top mask: 16 masks / 1 mask"]["value"] == round(116 / 101, 3)
    text = bc.control_table(doc)
    assert "100,000 rules: FAILED request larger" in text and "warm 0.8 s" in text
    assert "with 0 rules: warm 0.5 s, cold 3.0 s (start-up done: warm 0.6 s, cold 3.1 s)" in text
    assert "  1,000 rules from JSON" in text and "4,000" in text
    assert bc.metric_value("# x\nxdpflow_apply_duration_seconds 0.0125\n",
                           "xdpflow_apply_duration_seconds") == 0.0125
