"""``python -m bench [--full] [--only PART,...]``: every figure of the README, in one run.

Quick sizes by default, ``--full`` for the sizes the README's targets are
about; ``--only`` runs some parts (``PARTS``).  ``S6TLS_BEFORE`` names
another checkout of s6tls (with its .venv) to measure beside this one, and
``S6TLS_REFERENCE`` the ``bin/`` of the real s6-networking (README.md,
section Performance).  The per-connection parts run in network namespaces
(``bench.netns``, as root): ``quickack`` for every figure, and ``loopback``
(Linux's delayed ACKs) for the handshakes too.  Writes
``bench/results/latest.json`` (every raw figure) and
``bench/results/summary.png``, and prints the report.  A run that failed (a
tool failed, or data was lost) is never counted as a speed and is printed
as FAILED; the exit status is 1 if a run of s6tls failed, 2 if a tool is
missing, 0 otherwise (another tool's failures are reported, not fatal:
stunnel 5.68 loses data in some duplex runs).
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

from . import handshakes, memory, netns, scale, startup, throughput
from .common import BEFORE, REFERENCE, ROOT, Pki, become_subreaper, scratch
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
    idle_counts: tuple[int, ...]  # idle connections each server holds, in turn
    held: int  # idle connections one s6-tlsserver holds at once
    growth: tuple[int, ...]  # connections after which a worker's RSS is read


QUICK = Settings("quick", 128 << 20, 7, 3, 3, 30, (10, 100), 2_000, (10_000,))
FULL = Settings("full", 1 << 30, 7, 10, 3, 200, (100, 1_000), 10_000, (10_000, 50_000, 100_000))
PARTS = ("throughput", "handshakes", "resumption", "startup", "memory", "scale")


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
    commit = _commit(ROOT)
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
        "before": _commit(BEFORE) if BEFORE is not None else None,
        "reference": str(REFERENCE) if REFERENCE is not None else None,
    }


def _commit(root: Path) -> str:
    """The commit checked out in ``root``."""
    return subprocess.run(
        ["git", "-C", str(root), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout.strip()


def _terminate(signum: int, frame: object) -> NoReturn:
    """SIGTERM/SIGHUP unwind like ^C, so every process and directory is cleaned up."""
    raise KeyboardInterrupt


# The names s6tls runs go by in failures ("<what> <name> ..."); s6tls-before's are not ours.
OURS = {"s6tls", "s6-tlsd", "s6-tlsserver", "stall", "held", "growth"}


def failures(results: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Every failure recorded in ``results``: (s6tls's, the other tools')."""
    found = []
    if "throughput" in results:
        for mode in throughput.MODES:
            for name, section in results["throughput"][mode].items():
                if name != "ratios":
                    found += section["failures"]
    for key in ("handshakes", "resumption", "startup", "memory", "scale"):
        found += results.get(key, {}).get("failures", [])
    ours = [f for f in found if f.split()[1].rstrip(":") in OURS]
    return ours, [f for f in found if f not in ours]


def _carry(results: dict[str, Any], parts: list[str]) -> None:
    """Into a run of some parts, the other parts of the previous ``latest.json`` (whole
    sections, each with the date and commit of its own run in ``carried``)."""
    path = RESULTS / "latest.json"
    if not path.exists():
        return
    previous = json.loads(path.read_text())
    carried = previous.get("carried", {})
    results["carried"] = {}
    for part in PARTS:
        if part not in parts and part in previous:
            results[part] = previous[part]
            results["carried"][part] = carried.get(
                part, {"date": previous["date"], "commit": previous["machine"]["commit"]}
            )


def networks() -> list[netns.Network]:
    """quickack and loopback namespaces, or the host's network when they cannot be made."""
    problem = netns.available()
    if problem is not None:
        log(f"bench: no network namespace ({problem}): measuring on the host's loopback")
        return [netns.HOST]
    return [netns.make("quickack", quickack=True), netns.make("loopback")]


def main(argv: Sequence[str] | None = None) -> int:
    """Run every benchmark, write the results and the plot, print the report."""
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="full sizes (1 GiB per run)")
    parser.add_argument("--only", default=",".join(PARTS), help=f"some of {','.join(PARTS)}")
    args = parser.parse_args(argv)
    settings = FULL if args.full else QUICK
    parts = args.only.split(",")
    if not set(parts) <= set(PARTS):
        parser.error(f"--only takes some of {','.join(PARTS)}")
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
        "parts": parts,
        "load_before": os.getloadavg(),
    }
    nets = networks()
    seconds, rounds = settings.handshake_seconds, settings.handshake_rounds
    with scratch() as tmp:
        pki = Pki.make(tmp)
        if "throughput" in parts:
            log(f"throughput, {settings.size >> 20} MiB x {settings.rounds} rounds")
            results["throughput"] = throughput.measure(pki, settings.size, settings.rounds, log)
        if "handshakes" in parts:
            log(f"handshakes, networks {', '.join(net.name for net in nets)}")
            results["handshakes"] = handshakes.measure(pki, seconds, rounds, log, nets)
        if "resumption" in parts:
            log("session resumption")
            results["resumption"] = handshakes.measure(
                pki, seconds, rounds, log, nets[:1], reuse=True
            )
        if "startup" in parts:
            log("start-up")
            results["startup"] = startup.measure(pki, settings.startup_connections, log)
        if "memory" in parts:
            log(f"memory, {' and '.join(map(str, settings.idle_counts))} idle connections")
            results["memory"] = memory.measure(pki, settings.idle_counts, nets[0], log)
        if "scale" in parts:
            log(f"{settings.held} connections held, a worker after {max(settings.growth)}")
            results["scale"] = scale.measure(pki, settings.held, settings.growth, nets[0], log)
    results["duration_s"] = time.monotonic() - started
    results["load_after"] = os.getloadavg()
    if set(parts) != set(PARTS):
        _carry(results, parts)
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
