"""Scenarios for `xdpflow-lab compare`: each module of this package is one scenario, a list
of sends (`SENDS`): which VM sends, and a Scapy expression for the frame(s) it sends.

The expression is evaluated with Scapy's names and:
    me        the sending VM: me.ip, me.ip6, me.mac, me.gw (its port's MAC: the gateway)
    vm(name)  another VM of the lab, the same attributes
    snma(a), snmac(a)  the solicited-node multicast address of IPv6 address a, its MAC
    N         the send's nonce (bytes; put it in the payload so what arrives is matched to
              what was sent); it is the same on every path, so the bytes compare
An expression may give one packet or a list (fragments, a burst): the whole list is sent
back to back, and what every VM receives during the send is its outcome.

A difference the two paths are meant to have is listed on the send as `expect=Expect(...)`
with the reason; it is reported as expected, never skipped, and a send that was expected
to differ but did not is a mismatch too (the scenario file is out of date).

Each scenario module (its file name is its name; the shipped ones are written for the demo
lab, netns_lab/labs/demo.toml) has DESCRIPTION, SENDS and optionally WAITING_ON: what must
land in the datapath before it can match (it is reported as waiting, and its mismatches
do not fail the demo).

A lab file's `[lab] scenarios = "NAME"` picks the package netns_lab/scenarios/NAME/ instead
(e.g. `overlay`, for netns_lab/labs/overlay.toml). There SENDS may also hold `Move(vm, to)`:
from that point the VM runs on the other node of a two-node lab, on every path (its port
and both nodes' state move; netns_lab/nodes.py), and `node(name)` gives a node's NodeView
(ip: its VTEP, mac: its uplink's, router[tenant]); "A.uplink" sends from node A's uplink."""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from types import ModuleType
from typing import List, Optional, Union


@dataclass(frozen=True)
class Expect:
    """A difference the paths are meant to have. With `same_delivery` the same VMs must
    receive something on both paths; only the bytes may differ."""
    reason: str
    same_delivery: bool = True


@dataclass(frozen=True)
class Send:
    src: str                        # the sending VM's name
    frames: str                     # a Scapy expression (see the module doc)
    what: str = ""                  # what it shows, for the report
    expect: Optional[Expect] = None


@dataclass(frozen=True)
class Move:
    """A VM moves to another node of a two-node lab (see the module doc)."""
    vm: str
    to: str


@dataclass
class Scenario:
    name: str
    description: str
    sends: List[Send] = field(default_factory=list)
    waiting_on: Optional[str] = None
    steps: List[Union[Send, Move]] = field(default_factory=list)   # sends and moves, in order

    def __post_init__(self):
        self.steps = self.steps or list(self.sends)


def _from_module(mod: ModuleType) -> Scenario:
    name = mod.__name__.rsplit(".", 1)[-1]
    steps = getattr(mod, "SENDS", None)
    if not steps or not all(isinstance(s, (Send, Move)) for s in steps) or \
            not any(isinstance(s, Send) for s in steps):
        raise ValueError(f"scenario {name}: SENDS must be a non-empty list of Send (and Move)")
    return Scenario(name, getattr(mod, "DESCRIPTION", "").strip(),
                    [s for s in steps if isinstance(s, Send)],
                    getattr(mod, "WAITING_ON", None), list(steps))


def _package(package: str) -> str:
    return f"{__name__}.{package}" if package else __name__


def names(package: str = "") -> List[str]:
    """The scenarios of a package ("": the top-level ones); sub-packages are other sets."""
    mod = importlib.import_module(_package(package))
    return sorted(m.name for m in pkgutil.iter_modules(mod.__path__)
                  if not m.name.startswith("_") and not m.ispkg)


def load(selected: Optional[List[str]] = None, exclude: Optional[List[str]] = None,
         package: str = "") -> List[Scenario]:
    """The shipped scenarios of a package (all, or `selected`), minus `exclude`; unknown
    names raise."""
    try:
        known = names(package)
    except ImportError:
        raise ValueError(f"unknown scenario set {package!r}") from None
    for n in list(selected or []) + list(exclude or []):
        if n not in known:
            raise ValueError(f"unknown scenario {n!r} (known: {', '.join(known)})")
    chosen = [n for n in (selected or known) if n not in set(exclude or [])]
    return [_from_module(importlib.import_module(f"{_package(package)}.{n}")) for n in chosen]
