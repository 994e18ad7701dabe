"""`xdpflow-lab demo`: the agent on a lab node with two tenants that use the same
addresses and MACs, programmed only through `xdpflowctl`; real ICMP, UDP and TCP between
VMs that the rules allow and deny; a restart of the agent under a running stream; then the
flow table, counters, a trace and the Prometheus metrics. Exits 1 if anything observed
differs from what the rules say."""
from __future__ import annotations

import signal
import sys
import time

from .lab import Lab
from .traffic import Server, Stream, exchange, ping


def say(text: str = ""):
    print(text, flush=True)


def section(title: str):
    say()
    say(f"== {title} " + "=" * max(0, 70 - len(title)))


def ctl(lab: Lab, *args: str):
    say(f"$ xdpflowctl {' '.join(args)}")
    r = lab.ctl(*args, json=False)
    for line in (r.stdout + r.stderr).rstrip().splitlines():
        say(f"  {line}")
    if r.code != 0:
        raise RuntimeError(f"xdpflowctl {' '.join(args)} failed ({r.code})")


def probe(proto: str, src, dst, port: int) -> bool:
    """One TCP or UDP request from `src` to a server on `dst`: did the answer come back?"""
    with Server(dst, proto, port):
        return exchange(src, proto, dst.ip, port, "hello")["ok"]


def main(args=None) -> int:
    checks = []

    def expect(what: str, got: bool, want: bool):
        checks.append((what, got, want))
        mark = "ok  " if got == want else "FAIL"
        say(f"  [{mark}] {what}: {'passes' if got else 'blocked'} "
            f"(rules say {'pass' if want else 'block'})")

    with Lab(prefix="xfd") as lab:
        section("lab: one node, two tenants with the same addresses and MACs")
        blue1 = lab.add_vm("blue", 1, "10.0.0.1", "02:00:00:00:00:01")
        blue2 = lab.add_vm("blue", 2, "10.0.0.2", "02:00:00:00:00:02")
        red1 = lab.add_vm("red", 1, "10.0.0.1", "02:00:00:00:00:01")
        red2 = lab.add_vm("red", 2, "10.0.0.2", "02:00:00:00:00:02")
        for vm in (blue1, blue2, red1, red2):
            say(f"  {vm.tenant:5} VM {vm.ip} ({vm.mac}) behind port {vm.port}")
        lab.write_config(aging={"interval": 1.0})
        lab.start_agent()
        say(f"  agent running in namespace {lab.node}; socket {lab.socket}")

        section("programming the node with xdpflowctl")
        ctl(lab, "tenant", "add", "blue", "--id", "10")
        ctl(lab, "tenant", "add", "red", "--id", "20", "--default", "drop")
        for vm in (blue1, blue2, red1, red2):
            ctl(lab, "port", "add", vm.port, "--tenant", vm.tenant)
            ctl(lab, "endpoint", "add", "--tenant", vm.tenant, vm.ip, "--port", vm.port,
                "--mac", vm.mac)
        ctl(lab, "rule", "add", "--tenant", "blue", "--priority", "100", "--src", "10.0.0.1/32",
            "--proto", "icmp", "--action", "allow", "--comment", "ping from vm1")
        ctl(lab, "rule", "add", "--tenant", "blue", "--priority", "100", "--src", "10.0.0.0/24",
            "--proto", "tcp", "--dport", "5201", "--action", "allow", "--comment", "iperf port")
        ctl(lab, "rule", "add", "--tenant", "blue", "--priority", "100", "--proto", "udp",
            "--dport", "5300-5399", "--action", "allow")
        ctl(lab, "rule", "add", "--tenant", "red", "--priority", "200", "--proto", "udp",
            "--dport", "5300", "--action", "allow")
        ctl(lab, "rule", "add", "--tenant", "red", "--priority", "300", "--proto", "tcp",
            "--action", "deny", "--comment", "no tcp in red")
        ctl(lab, "rule", "list")

        section("traffic through the XDP datapath (replies need no rule: stateful)")
        expect("blue vm1 -> vm2 ping", ping(blue1, blue2.ip, count=2), True)
        expect("blue vm2 -> vm1 ping (no rule)", ping(blue2, blue1.ip, count=2), False)
        expect("blue vm1 -> vm2 tcp/5201", probe("tcp", blue1, blue2, 5201), True)
        expect("blue vm1 -> vm2 tcp/22 (no rule)", probe("tcp", blue1, blue2, 22), False)
        expect("blue vm2 -> vm1 udp/5350", probe("udp", blue2, blue1, 5350), True)
        expect("red vm1 -> vm2 udp/5300", probe("udp", red1, red2, 5300), True)
        expect("red vm1 -> vm2 udp/5350 (no rule)", probe("udp", red1, red2, 5350), False)
        expect("red vm1 -> vm2 tcp/5201 (denied)", probe("tcp", red1, red2, 5201), False)
        expect("red vm1 -> vm2 ping (no rule)", ping(red1, red2.ip, count=2), False)

        section("agent killed (SIGKILL) and restarted under a 1,000 packets/s UDP stream")
        with Stream(blue1, blue2, 5399, 40399, rate=1000) as stream:
            time.sleep(1.0)
            lab.stop_agent(signal.SIGKILL)
            say("  agent killed; traffic keeps flowing through the attached program")
            time.sleep(0.5)
            lab.start_agent()
            say("  new agent adopted the pinned maps and replaced the program atomically")
            time.sleep(1.0)
            res = stream.stop()
        lost = res["sent"] - res["received"]
        say(f"  sent {res['sent']} in {res['seconds']}s, received {res['received']}, "
            f"lost {lost}")
        checks.append(("no packet lost across the restart",
                       lost == 0 and res["missing_count"] == 0, True))

        section("what the node did")
        ctl(lab, "flow", "dump")
        ctl(lab, "stats")
        ctl(lab, "trace", "--port", blue1.port, "--scapy",
            f'Ether(src="{blue1.mac}", dst="{blue1.port_mac}")/IP(src="10.0.0.1", dst="10.0.0.2")'
            f'/TCP(sport=40000, dport=5201, flags="S")')
        ctl(lab, "trace", "--port", red1.port, "--scapy",
            f'Ether(src="{red1.mac}", dst="{red1.port_mac}")/IP(src="10.0.0.1", dst="10.0.0.2")'
            f'/TCP(sport=40000, dport=5201, flags="S")')

        section(f"Prometheus metrics (http://127.0.0.1:{lab.metrics_port}/metrics, excerpt)")
        text = lab.metrics()
        for line in text.splitlines():
            if line.startswith(("xdpflow_packets_total", "xdpflow_flows", "xdpflow_port_attached",
                                "xdpflow_flow_evictions_total", "xdpflow_up")):
                say(f"  {line}")

    section("summary")
    bad = [c for c in checks if c[1] != c[2]]
    say(f"  {len(checks) - len(bad)} of {len(checks)} observations as the rules say"
        + ("" if not bad else ": " + "; ".join(c[0] for c in bad)))
    say("  (the lab's namespaces, programs and pins are removed)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
