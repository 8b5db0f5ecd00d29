"""Tunnel throughput: endpoint | client ==TLS over loopback== server | endpoint.

Each run starts a server tunnel whose application is an endpoint, waits
until it listens, then starts the client tunnel around another endpoint
(see ``bench/endpoint.py``).  One way, the client's endpoint sends and the
server's counts; each way at once, both send and both sha256 what they get.
A run whose byte counts or digests are wrong is a failure, never a speed.

MB/s is the payload moved (both directions added up in duplex) over the time
from the first payload byte reaching a receiver to the last receiver's EOF:
start-up and handshake are left out.

CPU s/GB is the marginal cost of the data: the user+sys time of every
process of the run minus the endpoints' own, for this run minus the same
tunnel moving nothing (set-up, handshake and teardown alone, measured in the
same round), divided by the payload in 10^9 bytes.  Without that subtraction
a 128 MiB run would mostly weigh Python's start-up.
"""

import functools
import json
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .common import BenchError, Pki, Processes, compare, free_port, scratch, summary, wait_listening
from .endpoint import expected_digest
from .tunnels import S6TLS, TUNNELS, Command, Tunnel, endpoint

MODES = ("oneway", "duplex")
_digest = functools.lru_cache(expected_digest)
METRICS = ("mbps", "cpu_per_gb", "sys_per_gb", "fixed_cpu")
UP, DOWN = "client-to-server", "server-to-client"


@dataclass(frozen=True)
class Transfer:
    """What one run measured: payload bytes, elapsed seconds, tunnel CPU seconds (and sys)."""

    payload: int
    seconds: float
    cpu: float
    sys: float


def _read_report(path: Path, deadline: float) -> dict[str, object]:
    while not path.exists():
        if time.monotonic() > deadline:
            raise BenchError(f"no report from the endpoint behind {path.stem}")
        time.sleep(0.005)
    report: dict[str, object] = json.loads(path.read_text())
    return report


def _check(report: dict[str, object], side: str, size: int, seed: str | None) -> None:
    """Raise ``BenchError`` unless ``report`` shows ``size`` bytes (with ``seed``'s digest)."""
    if report["received"] != size:
        raise BenchError(f"data lost: {side} endpoint received {report['received']} of {size}")
    if seed is not None and report["sha256"] != _digest(seed, size):
        raise BenchError(f"data corrupted: {side} endpoint's sha256 differs")


def _tail(path: Path) -> str:
    text = path.read_text(errors="replace").strip() if path.exists() else ""
    return text.splitlines()[-1] if text else "no message"


def _start_client(
    procs: Processes, command: Command, args: Sequence[str], err: BinaryIO
) -> list["subprocess.Popen[bytes]"]:
    """Start the client tunnel, and its endpoint on its stdin/stdout if it needs one.

    The tool and the endpoint share a socketpair, as stunnel's ``exec`` and
    socat's ``EXEC`` do.  Not pipes: stunnel 5.68 takes POLLHUP for the end
    of the data and drops what it has not read yet, which on a stdin pipe
    happens whenever the writer closes while data is still in the pipe
    (47 KiB lost in one run of eight here).  A socket reports POLLHUP only
    once both of its directions are shut, which duplex runs still hit.
    """
    if not command.app_on_stdio:
        std = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": err}
        return [procs.start(command.argv, command.env, **std)]
    tool_end, app_end = socket.socketpair()
    with tool_end, app_end:
        tool = procs.start(command.argv, command.env, stdin=tool_end, stdout=tool_end, stderr=err)
        app = procs.start(endpoint(0, 1, args), stdin=app_end, stdout=app_end, stderr=err)
    return [tool, app]


def transfer(tunnel: Tunnel, pki: Pki, mode: str, size: int, timeout: float) -> Transfer:
    """Move ``size`` bytes (each way in duplex) through ``tunnel``; verify and measure.

    Raises ``BenchError`` when a tool fails, time runs out, or data is lost.
    Every process started is reaped and the scratch directory removed.
    """
    duplex = mode == "duplex"
    with scratch() as tmp, Processes() as procs:
        deadline = time.monotonic() + timeout
        hashed = ["--hash"] if duplex else []
        server_args = ["--report", str(tmp / "server.json"), *hashed]
        server_args += ["--send", str(size), "--seed", DOWN] if duplex else ["--hold"]
        client_args = ["--report", str(tmp / "client.json"), "--send", str(size), "--seed", UP]
        client_args += hashed
        port = free_port()
        errors = tmp / "stderr"
        with errors.open("wb") as err:
            server = tunnel.server(tmp, pki, port, server_args)
            srv = procs.start(server.argv, server.env, stdin=subprocess.DEVNULL, stderr=err)
            wait_listening(port, srv)
            client = tunnel.client(tmp, pki, port, client_args)
            clients = _start_client(procs, client, client_args, err)
            for proc in clients:
                if procs.wait(proc, deadline - time.monotonic()):
                    raise BenchError(f"{tunnel.name} client failed: {_tail(errors)}")
            reports = {
                side: _read_report(tmp / f"{side}.json", deadline) for side in ("client", "server")
            }
            procs.stop(srv, deadline - time.monotonic())
            procs.reap_orphans(deadline - time.monotonic())
        _check(reports["server"], "server", size, UP if duplex else None)
        _check(reports["client"], "client", size if duplex else 0, DOWN if duplex else None)
        receivers = [r for r in reports.values() if r["received"]]
        start = min((float(r["first_byte"]) for r in receivers), default=0.0)
        end = max((float(r["eof"]) for r in receivers), default=0.0)
        own = sum(float(r["cpu"]) for r in reports.values())
        own_sys = sum(float(r["sys"]) for r in reports.values())
        payload = size * (2 if duplex else 1)
        return Transfer(payload, end - start, procs.cpu - own, procs.sys - own_sys)


def measure(pki: Pki, size: int, rounds: int, log: Callable[[str], None]) -> dict[str, object]:
    """Every mode, ``rounds`` rounds, the tunnels alternating run by run.

    In each round each tunnel makes an empty run (its fixed cost) and a
    ``size`` run.  Returns, per mode and tunnel, the raw figures, their
    summaries, the failures, and the ratios of s6tls to each C tool.
    """
    timeout = 60 + size / 5e6
    results: dict[str, object] = {
        "size": size,
        "rounds": rounds,
        "tunnels": [t.name for t in TUNNELS],
    }
    for mode in MODES:
        runs: dict[str, dict[str, list[Any]]] = {
            t.name: {"failures": [], **{metric: [] for metric in METRICS}} for t in TUNNELS
        }
        for round_no in range(rounds):
            for tunnel in TUNNELS:
                figures = runs[tunnel.name]
                try:
                    empty = transfer(tunnel, pki, mode, 0, timeout)
                    full = transfer(tunnel, pki, mode, size, timeout)
                except BenchError as exc:
                    failure = f"{mode} {tunnel.name} round {round_no + 1}: {exc}"
                    figures["failures"].append(failure)
                    log(f"  FAILED {failure}")
                    for metric in METRICS:
                        figures[metric].append(None)
                    continue
                figures["mbps"].append(full.payload / full.seconds / 1e6)
                gb = full.payload / 1e9
                figures["cpu_per_gb"].append((full.cpu - empty.cpu) / gb)
                figures["sys_per_gb"].append((full.sys - empty.sys) / gb)
                figures["fixed_cpu"].append(empty.cpu)
                log(
                    f"  {mode} round {round_no + 1} {tunnel.name}: {figures['mbps'][-1]:.0f} MB/s,"
                    f" {figures['cpu_per_gb'][-1]:.2f} CPU s/GB"
                )
        results[mode] = _summarise(runs)
    return results


def _summarise(runs: dict[str, dict[str, list[Any]]]) -> dict[str, object]:
    """Summaries per tunnel and metric, and the ratios of s6tls to each C tool."""
    out: dict[str, object] = {
        name: {
            **{metric: summary(figures[metric]) for metric in METRICS},
            "failures": figures["failures"],
        }
        for name, figures in runs.items()
    }
    ours = runs[S6TLS.name]
    out["ratios"] = {
        name: {metric: compare(ours[metric], runs[name][metric]) for metric in METRICS[:2]}
        for name in runs
        if name != S6TLS.name
    }
    return out
