"""The guest harness's bookkeeping: the guest's reports, folded per test."""

import json

from guest import read_reports


def line(nodeid, when, outcome, longrepr=""):
    return json.dumps({"nodeid": nodeid, "when": when, "outcome": outcome, "longrepr": longrepr})


def test_reports_are_folded_per_test():
    got = read_reports(
        [
            line("t::ok", "setup", "passed"),
            line("t::ok", "call", "passed"),
            line("t::ok", "teardown", "passed"),
            line("t::bad", "setup", "passed"),
            line("t::bad", "call", "failed", "assert 1 == 2"),
            line("t::bad", "teardown", "failed", "leak"),
            line("t::skip", "setup", "skipped", "no reason"),
            line("t::skip", "teardown", "passed"),
            line("t::late", "setup", "passed"),
            line("t::late", "call", "passed"),
            line("t::late", "teardown", "failed", "fd left open"),
        ]
    )
    assert {k: v.outcome for k, v in got.items()} == {
        "t::ok": "passed",
        "t::bad": "failed",
        "t::skip": "skipped",
        "t::late": "failed",
    }
    assert got["t::bad"].text == "[call] assert 1 == 2\n[teardown] leak\n"
    assert got["t::skip"].text == "no reason"
    assert got["t::late"].text == "[teardown] fd left open\n"
    assert got["t::ok"].phases == ["setup", "call", "teardown"]
