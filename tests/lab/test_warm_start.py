"""A warm start answers before it has loaded its state (issue 12): the pinned program keeps
forwarding while the start-up loads the store and checks it against the maps behind the
controller's lock. Whenever `status` answers, it is either the start-up's short form
(done: false, no state-derived fields) or the whole status; a command sent as soon as
the agent answers waits for the start-up and sees the whole state, never the empty one
the start-up replaces; and the state survives. A change of more rows than the digest
hashes under the lock may leave the next start to compare; the start after that trusts
the pinned digest."""
from __future__ import annotations

import json
import signal
import time

import pytest

pytestmark = pytest.mark.lab

N = 12_000      # rules: a start-up long enough to be seen on a quiet machine


def started(lab):
    """Start the agent; poll status from the moment it answers until its start-up is
    done, with a `rule list` sent as soon as it answers. Returns (status answers, rule
    list, the final status)."""
    from agent.api import ApiClient, ApiError
    lab.stop_agent(signal.SIGTERM, timeout=120)
    proc = lab.start_agent(wait=False)
    client = ApiClient(lab.socket, timeout=120)
    answers, rules = [], None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, lab.log_text()[-3000:]
        try:
            st = client.call("status")
        except (ApiError, OSError):
            time.sleep(0.01)
            continue
        if st.get("pid") != proc.pid:
            continue
        answers.append(st)
        if rules is None:
            rules = client.call("rule list", {})
        elif st["startup"]["done"]:
            return answers, rules, st
        time.sleep(0.01)
    raise AssertionError("the start-up did not finish")


def test_a_warm_start_answers_first_and_commands_wait_for_its_state(lab):
    lab.add_vm("blue", 1)
    lab.write_config(datapath={"max_rule_entries": 2 * N + 4096})
    lab.start_agent()
    apply_many_rules(lab, N)
    # 12,000 rows are not hashed by the apply (the digest stays cleared), unless a link
    # event's reconcile recorded it since: the first start may compare; the next trusts.
    for expect in (("reconciled: no pinned digest", "skipped: the pinned digest matches"),
                   ("skipped: the pinned digest matches",)):
        answers, rules, final = started(lab)
        for st in answers:
            assert st["program"]["how"] == "adopted", st["program"]
            if st["startup"]["done"]:
                assert len(st["tenants"]) == 1 and st["rules"] == N, st
            else:
                assert "rules" not in st and "tenants" not in st, st
                assert st["startup"]["phase"] in ("loading state", "checking the maps"), st
        # Sent as soon as it answered: it waited for the stored state.
        assert len(rules) == N
        assert final["startup"]["reconcile"] in expect, final["startup"]
        assert final["ports"][0]["attached"], final["ports"]
    # How many answers came before the start-up was done (0 on a fast enough machine).
    print(f"answers during the start-up: {sum(not a['startup']['done'] for a in answers)}")


def apply_many_rules(lab, n: int) -> None:
    """The lab's base state and `n` deny rules of blue (one mask), applied from JSON."""
    state = lab.base_state()
    state["rules"] = [{"id": 100 + i, "tenant": "blue", "priority": 10, "action": "deny",
                       "src": f"198.18.{i // 250}.{i % 250}/32"} for i in range(n)]
    path = lab.dir / "big.json"
    path.write_text(json.dumps(state))
    lab.ok("apply", str(path), timeout=600)
