"""The metrics endpoint across a warm restart: it listens as soon as the control API does,
while the start-up still loads the stored state and checks it against the maps (seconds
with a large state, the controller's lock held all along). A Prometheus scraping then must
not see the target down, nor numbers from a half-started agent: every answer is a 200 the
Prometheus parser and `promtool check metrics` accept, says `xdpflow_agent_state_loaded 0`
and leaves out the series read from the state; once loaded, the full set is back.
A cold start compiles in a child process (the agent reads the stored state meanwhile): an
agent stopped during that compile takes the child along."""
from __future__ import annotations

import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.netns import in_netns
from test_warm_start import apply_many_rules

pytestmark = pytest.mark.lab

N = 40_000      # rules: a load of a second or more, long enough to be scraped during

# Read from the stored state: absent while it loads (family names, as the parser gives them).
FROM_STATE = ("xdpflow_packets", "xdpflow_flows", "xdpflow_flow_table_capacity",
              "xdpflow_flow_evictions", "xdpflow_tenant_generation", "xdpflow_rules",
              "xdpflow_endpoints", "xdpflow_port_attached", "xdpflow_port_packets",
              "xdpflow_port_tx_packets", "xdpflow_map_entries", "xdpflow_map_capacity",
              "xdpflow_overlay_packets")


def parsed(body: str):
    """{family name: [samples]} by the Prometheus text parser (families without samples
    left out)."""
    return {f.name: f.samples for f in text_string_to_metric_families(body) if f.samples}


def one(families, name: str) -> float:
    (sample,) = families[name]
    return sample.value


def promtool_clean(body: str) -> None:
    r = subprocess.run([shutil.which("promtool"), "check", "metrics"], input=body, text=True,
                       capture_output=True, timeout=30)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


def scrapes_across_the_start(lab, deadline_s: float = 300.0):
    """From the agent's start until a scrape says its state is loaded: every answer (in
    order) and how many connections were refused. An HTTP error fails at once."""
    url = f"http://127.0.0.1:{lab.metrics_port}/metrics"

    def poll():
        answers, refused = [], 0
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            assert lab.proc.poll() is None, lab.log_text()[-3000:]
            try:
                with urllib.request.urlopen(url, timeout=60) as r:
                    assert r.status == 200
                    body = r.read().decode()
            except urllib.error.HTTPError:
                raise
            except urllib.error.URLError as e:
                if not isinstance(e.reason, ConnectionRefusedError):
                    raise
                refused += 1
                time.sleep(0.005)
                continue
            answers.append(body)
            fams = parsed(body)
            if "xdpflow_agent_state_loaded" not in fams or \
                    one(fams, "xdpflow_agent_state_loaded") == 1:
                return answers, refused
            time.sleep(0.02)
        raise AssertionError("the start-up did not finish")
    return in_netns(lab.node, poll)


def test_metrics_answer_during_a_warm_restarts_state_load(lab):
    assert shutil.which("promtool"), "setup.sh installs Debian's prometheus package"
    lab.add_vm("blue", 1)
    lab.add_vm("blue", 2)
    lab.write_config(datapath={"max_rule_entries": 2 * N + 4096})
    lab.start_agent(timeout=300)
    apply_many_rules(lab, N)
    before = parsed(lab.metrics())
    (info,) = before["xdpflow_agent_info"]
    started = time.time()

    lab.stop_agent(signal.SIGTERM, timeout=120)
    lab.start_agent(wait=False)
    answers, refused = scrapes_across_the_start(lab)
    *loading, last = answers
    assert loading, (f"no scrape answered while the warm start loaded its state ({refused} "
                     "connections refused): a Prometheus would see the target down")
    for body in loading:
        fams = parsed(body)
        assert one(fams, "xdpflow_agent_state_loaded") == 0
        assert one(fams, "xdpflow_up") == 1
        assert one(fams, "xdpflow_scrape_errors") == 0
        assert one(fams, "xdpflow_agent_start_time_seconds") >= started - 1
        # The adopted program: the one that forwarded before the restart.
        (now,) = fams["xdpflow_agent_info"]
        assert now.labels["program_id"] == info.labels["program_id"], (now, info)
        assert "process_resident_memory_bytes" in fams
        present = sorted(set(FROM_STATE) & set(fams))
        assert not present, f"read from a state not loaded yet: {present}"
    promtool_clean(loading[0])

    # Loaded: every series is back, with the stored state's numbers.
    fams = parsed(last)
    assert one(fams, "xdpflow_agent_state_loaded") == 1
    assert set(fams) - {"xdpflow_api_requests", "xdpflow_api_request_seconds"} == \
        set(before) - {"xdpflow_api_requests", "xdpflow_api_request_seconds"}
    assert [s.value for s in fams["xdpflow_rules"]] == [N]
    assert {s.labels["port"]: s.value for s in fams["xdpflow_port_attached"]} == \
        {"bvm1": 1, "bvm2": 1}
    promtool_clean(last)
    st = lab.ok("status")
    assert st["program"]["how"] == "adopted" and st["startup"]["done"], st
    print(f"scrapes: {refused} refused, {len(loading)} answered during the load")


def children(pid: int) -> list:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except FileNotFoundError:
        return []


def test_a_stop_during_a_cold_starts_compile_leaves_no_compile_behind(lab):
    """A start that compiles does it in a child process; the agent stopped meanwhile
    takes it along (no compile finishing behind a stopped agent, racing the next one for
    the pins), and the next start compiles and serves as usual."""
    lab.add_vm("blue", 1)
    lab.write_config(state=lab.base_state())
    proc = lab.start_agent(wait=False)
    deadline = time.monotonic() + 60
    while not children(proc.pid):
        assert proc.poll() is None and time.monotonic() < deadline, lab.log_text()[-3000:]
        time.sleep(0.01)
    (compiler,) = children(proc.pid)
    lab.stop_agent(signal.SIGTERM, timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{compiler}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    break       # a zombie: ended, its parent gone before reaping it
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the compiling process {compiler} outlived the agent")
    lab.start_agent(timeout=300)
    st = lab.ok("status")
    assert st["program"]["how"] == "compiled" and st["ports"][0]["attached"], st
    assert lab.xdp_prog("bvm1").get("id") == st["program_id"]
