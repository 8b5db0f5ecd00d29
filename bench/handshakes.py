"""Handshake rate: ``openssl s_time`` against three servers, 1 and 4 clients.

- s6-tlsserver, the fork-server, running ``cat`` for each connection;
- stunnel started per connection by ``tcpserver`` (inetd mode), running ``cat``
  too: the C way of serving TLS per process, as s6-networking does;
- ``openssl s_server -www``, one process serving every connection: an upper
  bound, with no process per connection at all.

All three stay up for the whole measurement and take turns, round after
round.  Each s_time client makes full handshakes (``-new``: no resumption, no
payload) for ``seconds`` seconds; the rate is the connections the clients made
over the wall time of the slowest one.

With ``reuse``, each client resumes its first session again and again
(``-reuse``): it asks for ``/`` (``-www``) and reads to the end, so that the
TLS 1.3 tickets, which follow the handshake, are in, and each server ends the
connection with close_notify (``-S`` for s6-tlsserver, whose application is
then ``true``), without which OpenSSL forgets the session.  s6-tlsserver's
children resume each other's sessions with their shared ticket key; stunnel,
a new process per connection, cannot resume (it makes full handshakes); s_server
is one process.  The share of connections s_time reports as resumed is kept.

s_time's own "real seconds" is rounded to the second, too coarse here.  The
server's CPU time per handshake comes from ``/proc/PID/stat`` (its own time
and that of the children it reaped) read before and after.
"""

import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from .common import (
    BenchError,
    Pki,
    Processes,
    compare,
    free_port,
    program,
    scratch,
    summary,
    wait_listening,
)
from .tunnels import stunnel_config

CLIENTS = (1, 4)
SERVERS = ("s6tls", "stunnel-per-connection", "openssl-s_server")
CONNECTIONS = re.compile(rb"^(\d+) connections in", re.MULTILINE)
LETTERS = re.compile(rb"starting\s*\n([*r]+)")  # one per connection: r resumed, * new


def tcpserver(port: int, argv: list[str]) -> list[str]:
    """ucspi-tcp's tcpserver on 127.0.0.1:``port``, no DNS or ident look-ups."""
    return ["tcpserver", "-H", "-R", "-l", "0", "-c", "100", "127.0.0.1", str(port), *argv]


def stunnel_inetd_server(tmp: Path, pki: Pki, app: str = "cat") -> list[str]:
    """The command line of stunnel serving its stdin/stdout as TLS, running ``app``."""
    conf = stunnel_config(
        tmp / f"stunnel-inetd-{app}.conf",
        {"cert": pki.cert, "key": pki.key, "exec": f"/bin/{app}", "execArgs": app},
        None,
    )
    return ["stunnel", str(conf)]


def _start_servers(
    procs: Processes, tmp: Path, pki: Pki, reuse: bool = False
) -> dict[str, tuple[int, int]]:
    """Start the three servers, messages to a file in ``tmp``; return their ports and pids.

    s6-tlsserver reports every connection that s_time resets after its
    handshake (``connection broken``): one line each, thousands per run.
    With ``reuse``, the applications answer at once (see the module docstring).
    """
    ports = {name: free_port() for name in SERVERS}
    app, close = ("true", ["-S"]) if reuse else ("cat", [])
    ours = [*program("s6-tlsserver"), "-H", *close, "-c", "100", "127.0.0.1"]
    commands = {
        "s6tls": (
            [*ours, str(ports["s6tls"]), app],
            {"CERTFILE": pki.cert, "KEYFILE": pki.key},
        ),
        "stunnel-per-connection": (
            tcpserver(ports["stunnel-per-connection"], stunnel_inetd_server(tmp, pki, app)),
            {},
        ),
        "openssl-s_server": (
            [
                *("openssl", "s_server", "-www", "-quiet", "-cert", pki.cert, "-key", pki.key),
                *("-accept", f"127.0.0.1:{ports['openssl-s_server']}"),
            ],
            {},
        ),
    }
    servers = {}
    with (tmp / "stderr").open("ab") as err:
        for name, (argv, env) in commands.items():
            std = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": err}
            proc = procs.start(argv, env, **std)
            wait_listening(ports[name], proc)
            servers[name] = (ports[name], proc.pid)
    return servers


def server_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and of the children it has reaped (utime to cstime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(ticks) for ticks in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def rate(
    procs: Processes, port: int, clients: int, seconds: int, reuse: bool = False
) -> tuple[float, int, float]:
    """Handshakes per second that ``clients`` s_time processes get from ``port``, how many,
    and the share of them that resumed a session.

    Raises ``BenchError`` if a client fails or makes no connection at all.
    """
    mode = ["-reuse", "-www", "/"] if reuse else ["-new"]
    argv = ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", *mode, "-time", str(seconds)]
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


def measure(
    pki: Pki, seconds: int, rounds: int, log: Callable[[str], None], reuse: bool = False
) -> dict[str, object]:
    """``rounds`` rounds of every client count against every server, in turn.

    Returns the rates and the server CPU milliseconds per handshake, per
    client count and server, their summaries, the failures, and the ratios
    of s6-tlsserver's rate to each of the others'; with ``reuse``, session
    resumption (see the module docstring) and the share of resumed
    connections per server.
    """
    results: dict[str, object] = {"seconds": seconds, "rounds": rounds, "reuse": reuse}
    resumed: dict[str, list[float]] = {s: [] for s in SERVERS}
    runs: dict[int, dict[str, list[float | None]]] = {n: {s: [] for s in SERVERS} for n in CLIENTS}
    cpu: dict[int, dict[str, list[float | None]]] = {n: {s: [] for s in SERVERS} for n in CLIENTS}
    failures: list[str] = []
    with scratch() as tmp, Processes() as procs:
        servers = _start_servers(procs, tmp, pki, reuse)
        for round_no in range(rounds):
            for n in CLIENTS:
                for name, (port, pid) in servers.items():
                    before = server_cpu(pid)
                    try:
                        per_second, count, share = rate(procs, port, n, seconds, reuse)
                    except BenchError as exc:
                        what = "resumptions" if reuse else "handshakes"
                        failure = f"{what} {name} {n} client(s) round {round_no + 1}: {exc}"
                        failures.append(failure)
                        log(f"  FAILED {failure}")
                        runs[n][name].append(None)
                        cpu[n][name].append(None)
                        continue
                    runs[n][name].append(per_second)
                    cpu[n][name].append((server_cpu(pid) - before) * 1000 / count)
                    resumed[name].append(share)
                    log(
                        f"  {n} client(s) round {round_no + 1} {name}: {per_second:.0f}/s,"
                        f" {cpu[n][name][-1]:.2f} ms CPU each, {share:.0%} resumed"
                    )
    for n in CLIENTS:
        ours = runs[n]["s6tls"]
        results[f"{n}_clients"] = {
            **{name: summary(values) for name, values in runs[n].items()},
            "cpu_ms": {name: summary(values) for name, values in cpu[n].items()},
            "ratios": {name: compare(ours, runs[n][name]) for name in SERVERS if name != "s6tls"},
        }
    results["resumed"] = {name: min(shares, default=None) for name, shares in resumed.items()}
    results["failures"] = failures
    return results
