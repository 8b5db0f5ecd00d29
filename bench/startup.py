"""Start-up: what a process per connection costs s6-tlsd, and where its time goes.

``tcpserver`` starts ``s6-tlsd -- cat`` for each connection; a Python ``ssl``
client in this process times connect() to handshake done, one connection
after another, turn by turn with the same through ``tcpserver`` starting
stunnel (the C way), and with s6-tlsserver (forked, not started).  The
difference between s6-tlsd and stunnel is the price of Python's start-up
per connection.

Then one s6-tlsd, started the same way under ``python -X importtime``,
serves one connection, and its import log is summed up: the total, and the
ten imports with the largest cumulative time.
"""

import re
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from .common import (
    PYTHON,
    ROOT,
    SERVER_NAME,
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
from .servers import stunnel_inetd_server, tcpserver

SERVERS = ("s6-tlsd", "stunnel", "s6-tlsserver")
IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$")


def handshake_ms(context: ssl.SSLContext, port: int) -> float:
    """Milliseconds from connect() to a finished, verified handshake on ``port``."""
    start = time.perf_counter()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as sock,
        context.wrap_socket(sock, server_hostname=SERVER_NAME),
    ):
        return (time.perf_counter() - start) * 1000


def _start(procs: Processes, argv: list[str], env: dict[str, str], port: int, err: Path) -> None:
    with err.open("ab") as stderr:
        proc = procs.start(
            argv, env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
        )
    wait_listening(port, proc)


def import_profile(pki: Pki, tmp: Path) -> dict[str, object]:
    """Serve one connection with ``s6-tlsd`` under ``-X importtime``; sum up its imports."""
    port = free_port()
    log = tmp / "importtime"
    keys = {"CERTFILE": pki.cert, "KEYFILE": pki.key}
    argv = tcpserver(port, [PYTHON, "-X", "importtime", str(ROOT / "bin" / "s6-tlsd"), "--", "cat"])
    context = ssl.create_default_context(cafile=pki.ca)
    with Processes() as procs:
        _start(procs, argv, keys, port, log)
        handshake_ms(context, port)
    imports = []
    for line in log.read_text().splitlines():
        if found := IMPORT_LINE.match(line):
            own, cumulative, indent, name = found.groups()
            imports.append(
                {
                    "module": name,
                    "self_ms": int(own) / 1000,
                    "cumulative_ms": int(cumulative) / 1000,
                    "depth": len(indent) // 2,
                }
            )
    if not imports:
        raise BenchError("s6-tlsd under -X importtime logged no import")
    top = sorted(imports, key=lambda i: i["cumulative_ms"], reverse=True)[:10]
    return {
        "modules": len(imports),
        "total_ms": sum(i["self_ms"] for i in imports),
        "top": top,
    }


def measure(pki: Pki, connections: int, log: Callable[[str], None]) -> dict[str, object]:
    """``connections`` sequential handshakes per server, taking turns; and the import profile."""
    context = ssl.create_default_context(cafile=pki.ca)
    times: dict[str, list[float | None]] = {name: [] for name in SERVERS}
    failures: list[str] = []
    with scratch() as tmp:
        ports = {name: free_port() for name in SERVERS}
        keys = {"CERTFILE": pki.cert, "KEYFILE": pki.key}
        commands = {
            "s6-tlsd": (tcpserver(ports["s6-tlsd"], [*program("s6-tlsd"), "--", "cat"]), keys),
            "stunnel": (tcpserver(ports["stunnel"], stunnel_inetd_server(tmp, pki)), {}),
            "s6-tlsserver": (
                [*program("s6-tlsserver"), "-H", "127.0.0.1", str(ports["s6-tlsserver"]), "cat"],
                keys,
            ),
        }
        with Processes() as procs:
            for name, (argv, env) in commands.items():
                _start(procs, argv, env, ports[name], tmp / "stderr")
            for i in range(connections):
                for name in SERVERS:
                    try:
                        times[name].append(handshake_ms(context, ports[name]))
                    except (OSError, ssl.SSLError) as exc:
                        failure = f"start-up {name} connection {i + 1}: {exc}"
                        failures.append(failure)
                        log(f"  FAILED {failure}")
                        times[name].append(None)
        profile = import_profile(pki, tmp)
    diffs = [a - b for a, b in zip(times["s6-tlsd"], times["stunnel"], strict=True) if a and b]
    return {
        "connections": connections,
        **{name: summary(values) for name, values in times.items()},
        "python_overhead_ms": summary(diffs),
        "ratios": {"stunnel": compare(times["s6-tlsd"], times["stunnel"])},
        "importtime": profile,
        "failures": failures,
    }
