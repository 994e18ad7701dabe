"""The overlay in the datapath: uplink ports (and, built on them, VXLAN encap/decap).
Cases of the same shape as cases.py, run through the program and the trace build."""
from __future__ import annotations

from typing import List

import pytest

from . import cases
from .cases import XDP_PASS, Case, tcp4, udp4
from .test_datapath import run_case, trace_case

pytestmark = pytest.mark.bpf

UPLINK = "p5"
LOCAL_VTEP = "192.0.2.1"


def overlay(**kw) -> dict:
    """Tenant blue (VNI 5010) on p1/p2, and p5 the node's uplink."""
    st = cases.blue([cases.rule(1, priority=10)], **kw)
    st["tenants"][0]["vni"] = 5010
    st["ports"].append({"name": UPLINK, "uplink": True, "local_ip": LOCAL_VTEP})
    return st


def build() -> List[Case]:
    C = [
        Case("uplink: the node's own traffic goes to the kernel", overlay(),
             tcp4(40000, 22, port=UPLINK, src="192.0.2.9", dst=LOCAL_VTEP), XDP_PASS,
             {(UPLINK, "pass", "uplink_other"): 1}, port=UPLINK),
        Case("uplink: a tenant's addresses on an uplink are not the tenant's", overlay(),
             udp4(port=UPLINK), XDP_PASS, {(UPLINK, "pass", "uplink_other"): 1},
             port=UPLINK),
    ]
    return C


CASES = build()
IDS = [c.desc for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_case(bench, case):
    run_case(bench, case)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_trace(bench, case):
    trace_case(bench, case)
