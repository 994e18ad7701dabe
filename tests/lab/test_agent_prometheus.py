"""A real Prometheus server scrapes the agent: the target is up and the datapath's
counters can be queried with PromQL (promtool lint is in the unit tier)."""
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from netns_lab import traffic
from netns_lab.lab import Lab, free_port
from netns_lab.netns import in_netns

pytestmark = pytest.mark.lab


def api(lab: Lab, port: int, path: str):
    def get():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return json.loads(r.read())
    return in_netns(lab.node, get)


def test_prometheus_scrapes_the_agent(lab, tmp_path):
    prom = shutil.which("prometheus")
    assert prom, "setup.sh installs Debian's prometheus package"
    vm1, vm2 = lab.add_vm("blue", 1), lab.add_vm("blue", 2)
    lab.write_config(state={**lab.base_state(), "rules": [
        {"id": 1, "tenant": "blue", "priority": 1, "proto": "icmp", "action": "allow"}]})
    lab.start_agent()
    assert traffic.ping(vm1, vm2.ip, count=3)

    web = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: xdpflow\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{lab.metrics_port}']\n")
    proc = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{lab.node}", prom,
         f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{web}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
    try:
        query = "/api/v1/query?query=" + urllib.parse.quote(
            'sum(xdpflow_packets_total{tenant="blue",reason="rule_allow"})')
        deadline, result, targets = time.monotonic() + 40, None, None
        while time.monotonic() < deadline:
            try:
                targets = api(lab, web, "/api/v1/targets")["data"]["activeTargets"]
                result = api(lab, web, query)["data"]["result"]
                if targets and targets[0]["health"] == "up" and result:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert targets and targets[0]["health"] == "up", \
            (targets, (tmp_path / "prometheus.log").read_text()[-2000:])
        assert result and float(result[0]["value"][1]) >= 1
        up = api(lab, web, "/api/v1/query?query=xdpflow_up")["data"]["result"]
        assert up and up[0]["value"][1] == "1"
    finally:
        proc.terminate()
        proc.wait(10)
