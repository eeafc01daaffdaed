"""Makes the shared test references importable as `reference`, and fails the run on any skipped test.

No test may skip silently: a skip not named in `ALLOWED_SKIPS` (node id -> why) turns the exit status into a
failure and is listed at the end, so a missing reference library or tool cannot hide a part of the suite.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ALLOWED_SKIPS: dict[str, str] = {}  # none today

_unexpected_skips: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    """Records every skip (setup or call) that `ALLOWED_SKIPS` does not name."""
    if report.skipped and report.nodeid not in ALLOWED_SKIPS:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _unexpected_skips.append((report.nodeid, reason))


def pytest_terminal_summary(terminalreporter):
    """Lists the unexpected skips."""
    if _unexpected_skips:
        terminalreporter.section("skipped tests not in tests/conftest.py ALLOWED_SKIPS (the run fails)")
        for nodeid, reason in _unexpected_skips:
            terminalreporter.write_line(f"{nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    """Fails an otherwise passing run that skipped tests outside `ALLOWED_SKIPS`."""
    if _unexpected_skips and exitstatus == 0:
        session.exitstatus = 1
