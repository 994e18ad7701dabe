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
do not fail the demo)."""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from types import ModuleType
from typing import List, Optional


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


@dataclass
class Scenario:
    name: str
    description: str
    sends: List[Send] = field(default_factory=list)
    waiting_on: Optional[str] = None


def _from_module(mod: ModuleType) -> Scenario:
    name = mod.__name__.rsplit(".", 1)[-1]
    sends = getattr(mod, "SENDS", None)
    if not sends or not all(isinstance(s, Send) for s in sends):
        raise ValueError(f"scenario {name}: SENDS must be a non-empty list of Send")
    return Scenario(name, getattr(mod, "DESCRIPTION", "").strip(), list(sends),
                    getattr(mod, "WAITING_ON", None))


def names() -> List[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def load(selected: Optional[List[str]] = None, exclude: Optional[List[str]] = None
         ) -> List[Scenario]:
    """The shipped scenarios (all, or `selected`), minus `exclude`; unknown names raise."""
    known = names()
    for n in list(selected or []) + list(exclude or []):
        if n not in known:
            raise ValueError(f"unknown scenario {n!r} (known: {', '.join(known)})")
    chosen = [n for n in (selected or known) if n not in set(exclude or [])]
    return [_from_module(importlib.import_module(f"{__name__}.{n}")) for n in chosen]
