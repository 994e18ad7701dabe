"""`flow dump` pages with a cursor over the real flow table: the pages, end to end, are
the whole sorted dump (the contract of a small table's reply is unchanged), each page
holds at most its limit, the last says so (next_cursor None), and a cursor that is not
one is refused naming it."""
import pytest

from agent import model

from .test_sweeper import ctl, put_flow  # noqa: F401  (ctl is a fixture)

pytestmark = pytest.mark.bpf


def test_pages_add_up_to_the_whole_sorted_dump(ctl):  # noqa: F811
    for i in range(23):
        put_flow(ctl, 17 if i % 3 else 6, 1000 + i, 53, idle_s=1, tenant=10 if i % 2 else 20,
                 src=1 + i % 4)
    whole = ctl.flow_dump(limit=1000)
    assert len(whole) == 23 and isinstance(whole, list)        # no cursor: as before
    pages, cursor = [], "start"
    while cursor is not None:
        page = ctl.flow_dump(limit=10, cursor=cursor)
        assert set(page) == {"flows", "next_cursor"}
        assert len(page["flows"]) <= 10
        pages.append(page["flows"])
        cursor = page["next_cursor"]
    assert [len(p) for p in pages] == [10, 10, 3]
    assert [f for p in pages for f in p] == whole
    # Filters page too.
    blue = ctl.flow_dump(tenant="blue", limit=5, cursor="start")
    assert all(f["tenant"] == "blue" for f in blue["flows"]) and blue["next_cursor"]
    # A page that ends exactly at the end says so.
    assert ctl.flow_dump(limit=23, cursor="start")["next_cursor"] is None


def test_a_bad_cursor_is_refused_naming_it(ctl):  # noqa: F811
    for bad in ("", "blue|udp", "blue|udp|10.0.0.1|x|10.0.0.2|53", "blue|udp|nope|1|10.0.0.2|53"):
        with pytest.raises(model.Invalid, match="flow dump: cursor"):
            ctl.flow_dump(limit=10, cursor=bad)
