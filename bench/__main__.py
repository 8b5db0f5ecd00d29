"""``python -m bench [--full]``: every figure of the README, against C tools, in one run.

Quick sizes by default (a few minutes on 2 cores), ``--full`` for the sizes
the README's targets are about.  Writes ``bench/results/latest.json`` (every
raw figure) and ``bench/results/summary.png``, and prints the report.  A
run that failed (a tool failed, or data was lost) is never counted as a
speed and is printed as FAILED; the exit status is 1 if a run of s6tls
failed, 2 if a tool is missing, 0 otherwise (a C tool's failures are
reported, not fatal: stunnel 5.68 loses data in some duplex runs).
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

from . import handshakes, memory, startup, throughput
from .common import ROOT, Pki, become_subreaper, scratch
from .report import plot, render, targets

RESULTS = ROOT / "bench" / "results"
TOOLS = ("socat", "stunnel", "openssl", "tcpserver")


@dataclass(frozen=True)
class Settings:
    """How much of everything one run measures."""

    mode: str
    size: int  # bytes per throughput run, each way
    rounds: int  # throughput rounds, every tunnel each round
    handshake_seconds: int  # per s_time run
    handshake_rounds: int
    startup_connections: int  # per server
    idle_connections: int


QUICK = Settings("quick", 128 << 20, 7, 3, 3, 30, 100)
FULL = Settings("full", 1 << 30, 7, 10, 5, 200, 100)


def log(text: str) -> None:
    """A progress line on stderr."""
    print(text, file=sys.stderr, flush=True)


def _version(argv: Sequence[str], starts: str) -> str:
    """The first line of ``argv``'s output that starts with ``starts``."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    lines = (result.stdout + result.stderr).splitlines()
    return next((line.strip() for line in lines if line.startswith(starts)), "?")


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    from OpenSSL import SSL
    from OpenSSL import __version__ as pyopenssl

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout.strip()
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pyopenssl": pyopenssl,
        "openssl": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),
        "system_openssl": _version(["openssl", "version"], "OpenSSL"),
        "socat": _version(["socat", "-V"], "socat version"),
        "stunnel": _version(["stunnel", "-version"], "stunnel"),
        "commit": commit,
    }


def _terminate(signum: int, frame: object) -> NoReturn:
    """SIGTERM/SIGHUP unwind like ^C, so every process and directory is cleaned up."""
    raise KeyboardInterrupt


OURS = {"s6tls", "s6-tlsd", "s6-tlsserver"}  # the names s6tls runs go by


def failures(results: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Every failure recorded in ``results``: (s6tls's, the C tools').

    Each failure reads "<what> <name> ...", or "memory ..." (s6tls only).
    """
    found = []
    for mode in throughput.MODES:
        for name, section in results["throughput"][mode].items():
            if name != "ratios":
                found += section["failures"]
    for key in ("handshakes", "resumption", "startup", "memory"):
        found += results[key]["failures"]
    ours = [f for f in found if f.startswith("memory ") or f.split()[1].rstrip(":") in OURS]
    return ours, [f for f in found if f not in ours]


def main(argv: Sequence[str] | None = None) -> int:
    """Run every benchmark, write the results and the plot, print the report."""
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="full sizes (1 GiB per run)")
    args = parser.parse_args(argv)
    settings = FULL if args.full else QUICK
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        log(f"bench: missing {', '.join(missing)}: install socat stunnel4 openssl ucspi-tcp")
        return 2
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    become_subreaper()
    started = time.monotonic()
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "settings": asdict(settings),
    }
    with scratch() as tmp:
        pki = Pki.make(tmp)
        log(f"throughput, {settings.size >> 20} MiB x {settings.rounds} rounds")
        results["throughput"] = throughput.measure(pki, settings.size, settings.rounds, log)
        log("handshakes")
        results["handshakes"] = handshakes.measure(
            pki, settings.handshake_seconds, settings.handshake_rounds, log
        )
        log("session resumption")
        results["resumption"] = handshakes.measure(
            pki, settings.handshake_seconds, settings.handshake_rounds, log, reuse=True
        )
        log("start-up")
        results["startup"] = startup.measure(pki, settings.startup_connections, log)
        log("memory")
        results["memory"] = memory.measure(pki, settings.idle_connections, log)
    results["duration_s"] = time.monotonic() - started
    results["targets"] = targets(results)
    results["failures"], results["c_tool_failures"] = failures(results)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, RESULTS / "summary.png")
    print("\n".join(render(results)))
    if results["c_tool_failures"]:
        log(f"bench: {len(results['c_tool_failures'])} failed run(s) of a C tool, see above")
    if results["failures"]:
        log(f"bench: {len(results['failures'])} failed run(s) of s6tls, see above")
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("bench: interrupted; every process started was killed")
        sys.exit(130)
