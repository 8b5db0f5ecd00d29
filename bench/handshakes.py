"""Handshake rate and server CPU per handshake: ``openssl s_time`` against every server.

The servers are ``bench.servers``'s (s6tls's pool, the fork-server before
it, ``openssl s_server``, stunnel as a daemon and per connection, the real
s6-networking), each running ``cat`` per connection.  They stay up for the
whole measurement and take turns, run by run: in each round, for each
network, TLS version and client count, every server is measured once.

- Networks (``bench.netns``): ``quickack``, a namespace whose loopback
  routes acknowledge at once, the main figures; ``loopback``, a namespace
  with Linux's usual delayed ACKs, where a server that writes a handshake
  flight in two writes (the real s6-networking) waits ~40 ms each time.
  Servers and clients of a network both run inside it.
- TLS versions: TLS 1.3 (``s_time -tls1_3``) and TLS 1.2 (``-tls1_2``),
  since the real s6-networking (BearSSL) does TLS 1.2 only: its figures
  sit in the TLS 1.2 rows, like for like.

Each s_time client makes full handshakes (``-new``: no resumption, no
payload) for ``seconds`` seconds; the rate is the connections the clients
made over the wall time of the slowest one (s_time's own "real seconds" is
rounded to the second, too coarse).  The server's CPU per handshake is the
CPU time of its whole process tree over the run (``bench/reaper.py``: the
applications it spawned and every orphan included), divided by the
connections.  ``own_cpu_ms`` is the share of the server's processes
alive at the end (not what they reaped): for s6tls's pool, the supervisor
and workers without the applications; for the stunnel daemon, stunnel
without ``cat``; for servers with a process per connection, nearly nothing.

With ``reuse``, each client resumes its first session again and again
(``-reuse``): it asks for ``/`` (``-www``) and reads to the end, so that the
TLS 1.3 tickets, which follow the handshake, are in, and each server ends the
connection with close_notify (``-S`` for s6-tlsserver, whose application is
then ``true``), without which OpenSSL forgets the session.  The share of
connections s_time reports as resumed is kept; the real s6-networking is
left out (BearSSL's s6-tlsd keeps no session).
"""

import re
import subprocess
import time
from collections.abc import Callable, Sequence

from . import servers as srv
from .common import BenchError, Pki, Processes, compare, scratch, summary
from .netns import Network, inside

CLIENTS = (1, 4)
VERSIONS = ("TLSv1.3", "TLSv1.2")
FLAGS = {"TLSv1.3": "-tls1_3", "TLSv1.2": "-tls1_2"}
CONNECTIONS = re.compile(rb"^(\d+) connections in", re.MULTILINE)
LETTERS = re.compile(rb"starting\s*\n([*r]+)")  # one per connection: r resumed, * new


def rate(
    procs: Processes,
    port: int,
    clients: int,
    seconds: int,
    version: str,
    reuse: bool = False,
) -> tuple[float, int, float]:
    """Handshakes per second that ``clients`` s_time processes get from ``port``, how many,
    and the share of them that resumed a session.

    Raises ``BenchError`` if a client fails or makes no connection at all.
    """
    mode = ["-reuse", "-www", "/"] if reuse else ["-new"]
    argv = ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", FLAGS[version], *mode]
    argv += ["-time", str(seconds)]
    start = time.monotonic()
    runs = [
        procs.start(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(clients)
    ]
    total = resumed = 0
    for run in runs:
        assert run.stdout is not None
        output = run.stdout.read()
        code = procs.wait(run, seconds + 30)
        found = CONNECTIONS.search(output)
        if code or not found or not int(found.group(1)):
            last = output.strip().splitlines()[-1:] or [b"no output"]
            raise BenchError(f"s_time failed: {last[0].decode(errors='replace')}")
        total += int(found.group(1))
        letters = LETTERS.search(output)
        resumed += letters.group(1).count(b"r") if letters else 0
    return total / (time.monotonic() - start), total, resumed / total


def settle(server: srv.Running, count: int, timeout: float = 10) -> None:
    """Wait until ``server`` is down to ``count`` processes again (its connections' ends)."""
    deadline = time.monotonic() + timeout
    while len(server.processes()) > count and time.monotonic() < deadline:
        time.sleep(0.02)


def measure(
    pki: Pki,
    seconds: int,
    rounds: int,
    log: Callable[[str], None],
    networks: Sequence[Network],
    names: Sequence[str] = srv.ALL,
    reuse: bool = False,
) -> dict[str, object]:
    """``rounds`` rounds of every network, version, client count and server, in turn.

    Returns, per network, version, client count and server, the rates and the
    server CPU milliseconds per handshake, their summaries, the ratios of
    s6tls's rates to each other server's, and the failures; with ``reuse``
    (TLS 1.3 only), the lowest share of resumed connections per server.
    """
    names = [n for n in srv.available(names) if not (reuse and n in srv.TLS12_ONLY)]
    versions = VERSIONS[:1] if reuse else VERSIONS
    app, options = ("true", ["-S"]) if reuse else ("cat", [])
    runs: dict[str, dict[str, list[float | None]]] = {}  # "net version n" -> server -> rates
    cpu: dict[str, dict[str, list[float | None]]] = {}
    own: dict[str, dict[str, list[float | None]]] = {}  # the live processes' own CPU
    resumed: dict[str, list[float]] = {name: [] for name in names}
    failures: list[str] = []
    with scratch() as tmp, Processes() as procs:
        started: dict[str, dict[str, tuple[srv.Running, int]]] = {}
        for net in networks:
            (tmp / net.name).mkdir()
            with inside(net):
                started[net.name] = {}
                for name in names:
                    server = srv.start(procs, name, tmp / net.name, pki, app, options=options)
                    started[net.name][name] = (server, len(server.processes()))
        for round_no in range(rounds):
            for net in networks:
                for version in versions:
                    for n in CLIENTS:
                        key = f"{net.name} {version} {n}"
                        runs.setdefault(key, {name: [] for name in names})
                        cpu.setdefault(key, {name: [] for name in names})
                        own.setdefault(key, {name: [] for name in names})
                        for name in names:
                            if version != "TLSv1.2" and name in srv.TLS12_ONLY:
                                continue
                            server, count = started[net.name][name]
                            with inside(net):
                                before, own_before = server.cpu(), server.own_cpu()
                                try:
                                    per_second, total, share = rate(
                                        procs, server.port, n, seconds, version, reuse
                                    )
                                except BenchError as exc:
                                    what = "resumptions" if reuse else "handshakes"
                                    failure = f"{what} {name} {key} round {round_no + 1}: {exc}"
                                    failures.append(failure)
                                    log(f"  FAILED {failure}")
                                    runs[key][name].append(None)
                                    cpu[key][name].append(None)
                                    own[key][name].append(None)
                                    continue
                                settle(server, count)
                                ms = (server.cpu() - before) * 1000 / total
                                own_ms = (server.own_cpu() - own_before) * 1000 / total
                            runs[key][name].append(per_second)
                            cpu[key][name].append(ms)
                            own[key][name].append(own_ms)
                            resumed[name].append(share)
                            log(
                                f"  {key} round {round_no + 1} {name}: {per_second:.0f}/s,"
                                f" {ms:.2f} ms CPU each"
                                + (f", {share:.0%} resumed" if reuse else "")
                            )
    results: dict[str, object] = {
        "seconds": seconds,
        "rounds": rounds,
        "reuse": reuse,
        "servers": names,
        "networks": [net.name for net in networks],
        "versions": list(versions),
        "clients": list(CLIENTS),
    }
    results["runs"] = {
        key: {
            name: {
                "rate": summary(runs[key][name]),
                "cpu_ms": summary(cpu[key][name]),
                "own_cpu_ms": summary(own[key][name]),
            }
            for name in names
            if runs[key][name]
        }
        for key in runs
    }
    results["ratios"] = {
        key: {
            name: compare(runs[key]["s6tls"], runs[key][name])
            for name in names
            if name != "s6tls" and runs[key][name] and "s6tls" in runs[key]
        }
        for key in runs
    }
    results["resumed"] = {name: min(shares, default=None) for name, shares in resumed.items()}
    results["failures"] = failures
    return results
