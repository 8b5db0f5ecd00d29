"""Memory: what an open connection costs s6-tlsserver, and what a stalled reader costs.

Idle connections: ``count`` TLS connections to ``s6-tlsserver ... cat``, each
having echoed one byte (so its application runs and its engine has moved
data both ways), held open.  Each child of the server is read from
``/proc/PID/smaps_rollup``: USS (Private_Clean + Private_Dirty, what the
process alone costs) and PSS (its share of the pages it shares).  Their sum
over the server's children, the spare child included, divided by ``count``
is the cost per connection; the applications (``cat``) are not counted.
The spare's own USS, before any connection, is what copy-on-write alone
costs a child.

Stalled reader: the application sends 64 MiB to a client that has stopped
reading.  Backpressure must keep the engine's memory flat: the child's
VmRSS is read once the connection runs, then its VmHWM (peak) once the
application is blocked and again once the client has read everything; the
growth is that peak minus the starting VmRSS.
"""

import contextlib
import os
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from .common import (
    SERVER_NAME,
    BenchError,
    Pki,
    Processes,
    free_port,
    program,
    scratch,
    wait_listening,
)
from .tunnels import endpoint

STALL_SIZE = 64 << 20


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


def _fields(path: str, names: tuple[str, ...]) -> dict[str, int]:
    """The ``name: N kB`` lines of a /proc file, in kB."""
    values = {}
    with open(path) as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in names:
                values[key] = int(rest.split()[0])
    return values


def private_memory(pid: int) -> dict[str, int]:
    """USS and PSS of ``pid`` in kB, from its smaps_rollup."""
    rollup = _fields(f"/proc/{pid}/smaps_rollup", ("Pss", "Private_Clean", "Private_Dirty", "Rss"))
    return {
        "uss_kb": rollup["Private_Clean"] + rollup["Private_Dirty"],
        "pss_kb": rollup["Pss"],
        "rss_kb": rollup["Rss"],
    }


def resident(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in kB, with its USS."""
    status = _fields(f"/proc/{pid}/status", ("VmRSS", "VmHWM"))
    return {
        "rss_kb": status["VmRSS"],
        "hwm_kb": status["VmHWM"],
        "uss_kb": private_memory(pid)["uss_kb"],
    }


def _server(
    procs: Processes, pki: Pki, app: list[str], maxconn: int, err: Path
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    argv = [*program("s6-tlsserver"), "-H", "-c", str(maxconn), "-C", str(maxconn)]
    with err.open("ab") as stderr:
        server = procs.start(
            [*argv, "127.0.0.1", str(port), *app],
            {"CERTFILE": pki.cert, "KEYFILE": pki.key},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    wait_listening(port, server)
    return server, port


def idle_connections(pki: Pki, count: int) -> dict[str, object]:
    """USS and PSS per connection of s6-tlsserver holding ``count`` idle connections."""
    context = ssl.create_default_context(cafile=pki.ca)
    with scratch() as tmp, Processes() as procs, contextlib.ExitStack() as conns:
        server, port = _server(procs, pki, ["cat"], count + 10, tmp / "stderr")
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            tls = conns.enter_context(context.wrap_socket(sock, server_hostname=SERVER_NAME))
            tls.sendall(b"x")
            if tls.recv(1) != b"x":
                raise BenchError("an idle connection did not echo its byte")
        engines = {pid: children(pid) for pid in children(server.pid)}
        apps = [app for kids in engines.values() for app in kids]
        if len(apps) != count:
            raise BenchError(f"{len(apps)} applications running for {count} connections")
        engine = [private_memory(pid) for pid in engines]
        application = [private_memory(pid) for pid in apps]
        spares = [private_memory(pid)["uss_kb"] for pid, kids in engines.items() if not kids]
        return {
            "connections": count,
            "children": len(engines),
            "server": private_memory(server.pid),
            "spare_uss_kb": spares,
            "uss_kb_per_connection": sum(m["uss_kb"] for m in engine) / count,
            "pss_kb_per_connection": sum(m["pss_kb"] for m in engine) / count,
            "app_uss_kb_per_connection": sum(m["uss_kb"] for m in application) / count,
        }


def _wait_for(what: str, check: Callable[[], int | None], timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while (found := check()) is None:
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        time.sleep(0.01)
    return found


def _written(pid: int) -> int:
    return _fields(f"/proc/{pid}/io", ("wchar",))["wchar"]


def _wait_stalled(pid: int, quiet: float = 0.5) -> int:
    """Wait until ``pid`` has written nothing for ``quiet`` seconds; return bytes written."""
    last, since = -1, time.monotonic()
    deadline = since + 60
    while time.monotonic() - since < quiet:
        if time.monotonic() > deadline:
            raise BenchError("the application never stalled")
        time.sleep(0.05)
        now = _written(pid)
        if now != last:
            last, since = now, time.monotonic()
    return last


def _read_exactly(tls: ssl.SSLSocket, size: int) -> None:
    buf = bytearray(1 << 16)
    left = size
    while left:
        n = tls.recv_into(buf, min(left, len(buf)))
        if not n:
            raise BenchError(f"data lost: connection ended {left} bytes short")
        left -= n


def stalled_reader(pki: Pki) -> dict[str, object]:
    """The memory growth of an s6-tlsserver child while its client stops reading 64 MiB."""
    context = ssl.create_default_context(cafile=pki.ca)
    with scratch() as tmp, Processes() as procs:
        args = ["--go", "--hold", "--send", str(STALL_SIZE), "--report", str(tmp / "app.json")]
        server, port = _server(procs, pki, endpoint(0, 1, args), 10, tmp / "stderr")
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        with context.wrap_socket(sock, server_hostname=SERVER_NAME) as tls:
            child = _wait_for(
                "the connection's child",
                lambda: next((pid for pid in children(server.pid) if children(pid)), None),
            )
            app = children(child)[0]
            before = resident(child)
            tls.sendall(b"g")
            sent_while_stalled = _wait_stalled(app)
            stalled = resident(child)
            _read_exactly(tls, STALL_SIZE)
            after = resident(child)
            with socket.socket(fileno=os.dup(tls.fileno())) as raw:
                raw.shutdown(socket.SHUT_WR)  # a TCP EOF: the application may end
            if tls.recv(1):
                raise BenchError("more data than was sent")
        peak = max(stalled["hwm_kb"], after["hwm_kb"])
        return {
            "size": STALL_SIZE,
            "written_before_stall": sent_while_stalled,
            "before": before,
            "stalled": stalled,
            "after": after,
            "hwm_growth_kb": peak - before["rss_kb"],
            "uss_growth_kb": max(stalled["uss_kb"], after["uss_kb"]) - before["uss_kb"],
        }


def measure(pki: Pki, count: int, log: Callable[[str], None]) -> dict[str, object]:
    """Both memory measurements; a failure of either is recorded, not raised."""
    results: dict[str, object] = {}
    failures: list[str] = []
    for name, run in (
        ("idle", lambda: idle_connections(pki, count)),
        ("stall", lambda: stalled_reader(pki)),
    ):
        try:
            results[name] = run()
        except (BenchError, OSError, ssl.SSLError) as exc:
            failures.append(f"memory {name}: {exc}")
            log(f"  FAILED {failures[-1]}")
    results["failures"] = failures
    return results
