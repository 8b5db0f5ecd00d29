"""Tests marked ``guest`` run inside the User-Mode-Linux guest (``uml.py``), once per run.

On the host, each test marked ``guest`` is replaced by a ``GuestItem`` of the
same node id.  As the run starts, one guest boots in the background and runs
pytest on all of them (the host's selection: -k, -m and the node ids given
apply); inside, each report (setup, call, teardown) becomes one JSON line in
the run folder.  Each ``GuestItem`` then reports what its twin did in the
guest: passed, failed (with the guest's traceback) or skipped.  Only when
the guest cannot start at all are they skipped, with the reason in the
summary; a guest that starts and then goes wrong fails them.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field

import pytest
from uml import GUEST_TMP, GuestUnavailable, guest_run

IN_GUEST = os.environ.get("S6TLS_GUEST") == "1"
SLOW = os.environ.get("S6TLS_SLOW") == "1"
TIMEOUT = 3600.0 if SLOW else 540.0  # seconds for the whole guest run, boot included
HANG = 120  # seconds after which a test in the guest dumps its stack


@dataclass
class Outcome:
    """What one test did inside the guest."""

    outcome: str = "passed"  # passed, failed or skipped
    text: str = ""  # the failure's traceback, or the skip's reason
    phases: list[str] = field(default_factory=list)


def read_reports(lines: list[str]) -> dict[str, Outcome]:
    """Fold the guest's JSON report lines (one per setup/call/teardown) per node id.

    A failure in any phase fails the test; a skip in setup skips it.
    """
    out: dict[str, Outcome] = {}
    for line in lines:
        rep = json.loads(line)
        got = out.setdefault(rep["nodeid"], Outcome())
        got.phases.append(rep["when"])
        if rep["outcome"] == "failed":
            if got.outcome != "failed":
                got.text = ""
            got.outcome = "failed"
            got.text += f"[{rep['when']}] {rep['longrepr']}\n"
        elif rep["outcome"] == "skipped" and got.outcome == "passed":
            got.outcome = "skipped"
            got.text = rep["longrepr"]
    return out


class GuestRun:
    """One boot of the guest running the given tests, waited for in a thread."""

    def __init__(self, nodeids: list[str]) -> None:
        self.nodeids = nodeids
        self.results: dict[str, Outcome] = {}
        self.unavailable = ""  # why the guest could not start at all
        self.broken = ""  # the guest started but its run went wrong
        self._proc: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._run, name="guest", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        self._thread.join()

    def stop(self) -> None:
        """Kill the guest if it is still running (pytest is ending early)."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        self._thread.join(timeout=60)

    def _started(self, proc: subprocess.Popen) -> None:
        self._proc = proc

    def _run(self) -> None:
        env = {
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
            "S6TLS_GUEST": "1",
            "S6TLS_SLOW": os.environ.get("S6TLS_SLOW", ""),
        }
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]
        command += [f"--basetemp={GUEST_TMP}/pytest", "-o", f"faulthandler_timeout={HANG}"]
        try:
            with guest_run(command + self.nodeids, env, TIMEOUT, self._started) as result:
                report = result.folder / "report.jsonl"
                lines = report.read_text().splitlines() if report.exists() else []
                self.results = read_reports(lines)
                if result.timed_out:
                    self.broken = f"the guest run passed its {TIMEOUT:.0f} s limit"
                elif result.status not in (0, 1):  # 1: a test failed, reported on its own
                    self.broken = f"pytest in the guest exited {result.status}"
                if self.broken:
                    self.broken += ":\n" + (result.tail() or result.tail("console.log"))
        except GuestUnavailable as exc:
            self.unavailable = str(exc)
        except Exception as exc:  # reported on every guest test, never lost
            self.broken = f"guest harness error: {type(exc).__name__}: {exc}"


class GuestFailure(Exception):
    """A test failed inside the guest; the text is its report there."""


class GuestItem(pytest.Item):
    """A test marked ``guest``, as seen from the host: its outcome in the guest."""

    def __init__(self, *, plugin: "GuestPlugin", **kwargs) -> None:
        super().__init__(**kwargs)
        self.plugin = plugin

    def runtest(self) -> None:
        run = self.plugin.run
        assert run is not None
        run.wait()
        if run.unavailable:
            pytest.skip(f"kernel TLS guest cannot start: {run.unavailable}")
        got = run.results.get(self.nodeid)
        if got is None:
            raise GuestFailure(run.broken or "this test did not run in the guest")
        if got.outcome == "failed" or (run.broken and "teardown" not in got.phases):
            raise GuestFailure(got.text or run.broken)
        if got.outcome == "skipped":
            pytest.skip(f"in the guest: {got.text}")

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, GuestFailure):
            return f"inside the UML guest:\n{excinfo.value}"
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"{self.name} [guest]"


class GuestPlugin:
    """Swaps tests marked ``guest`` for ``GuestItem`` on the host; reports them in the guest."""

    def __init__(self) -> None:
        self.run: GuestRun | None = None
        folder = os.environ.get("S6TLS_GUEST_DIR") if IN_GUEST else None
        self.report = os.path.join(folder, "report.jsonl") if folder else None

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        if IN_GUEST:
            return
        for i, item in enumerate(items):
            if item.get_closest_marker("guest") is None or item.get_closest_marker("skip"):
                continue
            twin = GuestItem.from_parent(item.parent, name=item.name, plugin=self)
            twin.own_markers.extend(item.own_markers)
            items[i] = twin

    def pytest_runtestloop(self, session: pytest.Session) -> None:
        """Boot the guest as the run starts: it works while the host's tests run."""
        nodeids = [i.nodeid for i in session.items if isinstance(i, GuestItem)]
        if nodeids and not session.config.option.collectonly:
            self.run = GuestRun(nodeids)

    def pytest_sessionfinish(self) -> None:
        if self.run is not None:
            self.run.stop()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if not self.report:
            return
        longrepr = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            longrepr = report.longrepr[2]
        elif report.longrepr is not None:
            longrepr = str(report.longrepr)
        line = {
            "nodeid": report.nodeid,
            "when": report.when,
            "outcome": report.outcome,
            "longrepr": longrepr,
        }
        with open(self.report, "a") as f:
            f.write(json.dumps(line) + "\n")


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker and the plugin; called from conftest's ``pytest_configure``."""
    config.addinivalue_line("markers", "guest: runs inside the User-Mode-Linux guest (kernel TLS)")
    config.pluginmanager.register(GuestPlugin(), "s6tls-guest")
