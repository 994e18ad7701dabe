"""The operator kit in monitoring/: the alert rules pass `promtool check rules` and their
own `promtool test rules` unit tests (each alert fires and stays quiet on fed series), and
the Grafana dashboard is valid JSON whose every query is valid PromQL. That the metrics
they name are the agent's is checked against a real scrape in
tests/lab/test_agent_operator_metrics.py."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

KIT = Path(__file__).resolve().parents[2] / "monitoring"
RULES = KIT / "xdpflow-alerts.yml"
RULE_TESTS = KIT / "xdpflow-alerts.test.yml"
DASHBOARD = KIT / "xdpflow-dashboard.json"

# What the issue asks the alerts to cover, by alert name.
ALERTS = {
    "XdpflowFlowTableNearlyFull",   # flow table above 90% full
    "XdpflowMapNearlyFull",         # every other sized map
    "XdpflowFlowInsertsFailing",
    "XdpflowFlowTableEvicting",     # issue 14: evictions of live flows (over the watermark)
    "XdpflowTenantAtFlowQuota",     # issue 14: a tenant's new flows refused by its quota
    "XdpflowDropsRising",           # drops by reason rising
    "XdpflowAgentDown",             # agent down ...
    "XdpflowAgentNotScraped",       # ... or not scraped
    "XdpflowDatapathUnreadable",
    "XdpflowPortDetached",          # a configured port whose program is detached
    "XdpflowReconcileErrors",       # reconcile errors
    "XdpflowAgentRestarting",       # watchdog restarts
}


@pytest.fixture
def promtool(tool):
    tool("promtool", "prometheus")

    def run(*args: str, cwd: Path = KIT) -> subprocess.CompletedProcess:
        return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True,
                              timeout=120)
    return run


def test_check_rules_is_clean(promtool):
    p = promtool("check", "rules", RULES.name)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in p.stdout, p.stdout


def test_rule_unit_tests_pass(promtool):
    p = promtool("test", "rules", RULE_TESTS.name)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SUCCESS" in p.stdout, p.stdout


def test_every_alert_is_asked_for_and_tested_both_ways():
    rules = yaml.safe_load(RULES.read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert names == ALERTS
    fires, quiet = set(), set()
    for t in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in t.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert fires == ALERTS, f"never expected to fire: {ALERTS - fires}"
    assert quiet == ALERTS, f"never expected to stay quiet: {ALERTS - quiet}"


def test_rule_tests_catch_a_wrong_threshold(promtool, tmp_path):
    """The unit tests can fail: the flow-table alert at 96% instead of 90% misses the
    fed 95% table."""
    text = RULES.read_text()
    assert "xdpflow_flow_table_fill_ratio > 0.9\n" in text
    (tmp_path / RULES.name).write_text(text.replace("xdpflow_flow_table_fill_ratio > 0.9\n",
                                                    "xdpflow_flow_table_fill_ratio > 0.96\n"))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    p = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert p.returncode != 0, p.stdout
    assert "XdpflowFlowTableNearlyFull" in p.stdout + p.stderr


def dashboard_queries():
    dash = json.loads(DASHBOARD.read_text())
    return dash, [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def test_dashboard_loads_and_covers_what_was_asked():
    dash, queries = dashboard_queries()
    assert dash["uid"] == "xdpflow" and dash["panels"]
    titles = " | ".join(p["title"] for p in dash["panels"]).lower()
    for words in ("packets/s by tenant and verdict", "bits/s by tenant and verdict",
                  "drops/s by reason", "flows by tenant", "fill ratio", "evictions/s by reason",
                  "reconcile and apply latency", "time per packet"):
        assert words in titles, f"no panel for {words!r}: {titles}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["targets"], f"panel {p['title']!r} has no query"
        assert p["datasource"]["uid"] == "${datasource}"


def test_dashboard_queries_are_valid_promql(promtool, tmp_path):
    """promtool parses each query (as a recording rule), with Grafana's variables given
    the values Grafana would substitute."""
    _, queries = dashboard_queries()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}",
         "expr": q.replace("$__rate_interval", "1m").replace("$instance", ".*")}
        for i, (_, q) in enumerate(queries)]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    p = promtool("check", "rules", str(path))
    assert p.returncode == 0, p.stdout + p.stderr
