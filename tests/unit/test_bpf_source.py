"""The datapath's C read as text: small stages (no function of 100 lines or more, the
size at which the next feature becomes a branch instead of a stage) and kernel names for
kernel things (no hand-swapped ethertypes, no protocol numbers or header bytes spelled
by hand where a kernel header names them)."""
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

BPF = Path(__file__).resolve().parents[2] / "bpf"
SOURCES = sorted(p for p in BPF.iterdir() if p.suffix in (".c", ".h"))
MAX_LINES = 100


def functions(text: str):
    """(name, lines) of every function defined at the top level (K&R brace at column 0)."""
    lines = text.split("\n")
    out, head = [], None
    for i, line in enumerate(lines):
        m = re.match(r"^[A-Za-z_].*?\b(\w+)\s*\(", line)
        if m and not line.rstrip().endswith(";") and not line.startswith(("#", "struct xf_")):
            head = (m.group(1), i)
        elif line.startswith("{") and head:
            start = head
        elif line.startswith("}") and head:
            out.append((start[0], i - start[1] + 1))
            head = None
    return out


def test_the_parser_of_this_test_sees_the_entry_point():
    names = dict(functions((BPF / "xdpflow.c").read_text()))
    assert "xdpflow_port" in names and "xf_classify" in names


@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_no_function_reaches_100_lines(path):
    long = [(n, k) for n, k in functions(path.read_text()) if k >= MAX_LINES]
    assert not long, f"{path.name}: {long}"


HAND_SPELLED = [
    (r"#define\s+ETH_P_\w+", "an ethertype defined here (linux/if_ether.h has it)"),
    (r"\b0x(0008|DD86|dd86|0608|0081|A888|a888)\b", "a hand-swapped ethertype"),
    (r"#define\s+\w*IPPROTO_\w+", "a protocol number defined here (linux/in.h, in6.h)"),
    (r"\[\s*13\s*\]", "the TCP flag byte by index (tcp_flag_byte())"),
    (r"\b(ih|icmp|eh|l4)\[\s*\d+\s*\]", "a header read by byte index"),
    (r"(icmp_type|type)\s*[=!<>]=?\s*\d+\b", "an ICMP type by number"),
    (r"bpf_htons\(\s*0x0?800\s*\)|bpf_htons\(\s*[12]\s*\)", "an ARP field by number"),
]


@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_kernel_names_for_kernel_things(path):
    bad = []
    for no, line in enumerate(path.read_text().split("\n"), 1):
        code = line.split("/*")[0].split("//")[0]
        for pattern, what in HAND_SPELLED:
            if re.search(pattern, code):
                bad.append(f"{path.name}:{no}: {what}: {line.strip()}")
    assert not bad, "\n".join(bad)
