"""Memory: what an idle connection costs each server, and what a stalled reader costs.

Idle connections: each server of ``MEMORY_SERVERS`` (see ``bench.servers``;
``openssl s_server`` runs no application and is left out) holds, in turn,
``counts`` TLS connections (100 and 1,000 by default), each having echoed
one byte (so its application, ``cat``, runs and waits, and the TLS engine
has moved data both ways).  Each process of the server is read from
``/proc/PID/smaps_rollup``: USS (Private_Clean + Private_Dirty, what the
process alone costs), PSS, RSS.  The cost per connection is the slope of
the server's USS (every process but the applications: s6tls's supervisor
and workers, the fork-server and its children, s6-tcpserverd and each
s6-tlsd-io, stunnel) between the smallest and the largest count; the
applications' slope is given apart.  The servers run in the quickack
namespace (``bench.netns``), where the real s6-networking is not slowed by
delayed ACKs.

Stalled reader: the application sends 64 MiB to a client that has stopped
reading.  Backpressure must keep the engine's memory flat: the serving
process's (s6tls's worker's) VmRSS is read once the connection runs, then
its VmHWM (peak) once the application is blocked and again once the client
has read everything; the growth is that peak minus the starting VmRSS.
"""

import contextlib
import os
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import servers as srv
from .common import (
    SERVER_NAME,
    BenchError,
    Pki,
    Processes,
    descendants,
    free_port,
    process_table,
    program,
    raise_nofile,
    scratch,
    wait_listening,
)
from .netns import Network, inside
from .tunnels import endpoint

STALL_SIZE = 64 << 20
WARM_UP = 20  # connections made and closed before the first reading
NOFILE = 65536  # descriptors for this process (the clients) and the servers it starts


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


def open_idle(
    context: ssl.SSLContext,
    port: int,
    count: int,
    conns: contextlib.ExitStack,
    parallel: int = 1,
) -> None:
    """``count`` more TLS connections to ``port``, each having echoed one byte, held in
    ``conns``: handshake done, the application running and waiting.  With ``parallel``,
    that many are opened at once (threads), as clients arrive in a server's life."""

    def one(_: int) -> ssl.SSLSocket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        tls = context.wrap_socket(sock, server_hostname=SERVER_NAME)
        try:
            tls.sendall(b"x")
            if tls.recv(1) != b"x":
                raise BenchError("an idle connection did not echo its byte")
        except BaseException:
            tls.close()
            raise
        return tls

    if parallel <= 1:
        for i in range(count):
            conns.enter_context(one(i))
        return
    with ThreadPoolExecutor(parallel) as pool:
        futures = [pool.submit(one, i) for i in range(count)]
        for future in futures:
            with contextlib.suppress(BaseException):
                conns.enter_context(future.result())
        for future in futures:
            future.result()  # the first failure, if any


def usage(server: srv.Running, app: str) -> dict[str, Any]:
    """The memory of ``server``'s processes, in kB, from their smaps_rollup and status.

    ``top`` is the process the server started as (the supervisor, the
    fork-server, s6-tcpserverd, tcpserver, the stunnel daemon); ``below``
    every other process of the server (workers, forked children,
    s6-tlsd-io, stunnel per connection); ``app`` the applications (named
    ``app``).  USS is Private_Clean + Private_Dirty.
    """
    table = process_table()
    found = descendants(server.proc.pid, table)
    parts: dict[str, dict[str, int]] = {
        part: {"processes": 0, "uss_kb": 0, "pss_kb": 0, "rss_kb": 0}
        for part in ("top", "below", "app")
    }
    for pid, name in found.items():
        part = "app" if name == app else "top" if table[pid][0] == server.proc.pid else "below"
        with contextlib.suppress(OSError, KeyError):  # it just ended
            memory = private_memory(pid)
            parts[part]["processes"] += 1
            for key, value in memory.items():
                parts[part][key] += value
    server_side = {
        key: parts["top"][key] + parts["below"][key] for key in ("uss_kb", "pss_kb", "rss_kb")
    }
    return {**parts, "server": server_side}


MEMORY_SERVERS = (
    "s6tls",
    "s6tls-before",
    "stunnel-daemon",
    "stunnel-per-connection",
    "s6-networking",
)


def idle_connections(
    pki: Pki, counts: Sequence[int], network: Network, log: Callable[[str], None]
) -> dict[str, Any]:
    """Each server holding ``counts`` idle connections in turn (``cat`` waiting in each).

    Per server: its memory (``usage``) after a warm-up of ``WARM_UP``
    connections (closed again), then at each count; the cost per connection
    between the smallest and the largest count (the slope: what one more
    connection costs the server, its fixed part left out), and the server's
    whole USS at the largest count divided by it.  Servers one at a time.
    """
    context = ssl.create_default_context(cafile=pki.ca)
    results: dict[str, Any] = {"counts": list(counts), "network": network.name}
    failures = []
    for name in srv.available(MEMORY_SERVERS):
        try:
            results[name] = _idle(pki, context, name, counts, network)
        except (BenchError, OSError, ssl.SSLError) as exc:
            failures.append(f"memory {name}: {exc}")
            log(f"  FAILED {failures[-1]}")
            continue
        figures = results[name]
        log(
            f"  {name}: {figures['server_uss_kb_per_connection']:.0f} kB USS per connection"
            f" (the application: {figures['app_uss_kb_per_connection']:.0f} kB)"
        )
    results["failures"] = failures
    return results


def _idle(
    pki: Pki, context: ssl.SSLContext, name: str, counts: Sequence[int], network: Network
) -> dict[str, Any]:
    with (
        scratch() as tmp,
        Processes() as procs,
        inside(network),
    ):
        server = srv.start(procs, name, tmp, pki, "cat", maxconn=max(counts) + 10)
        with contextlib.ExitStack() as warm:
            open_idle(context, server.port, WARM_UP, warm)
        _wait_for("the warm-up's ends", lambda: _quiet(server, "cat"))
        snapshots = {0: usage(server, "cat")}
        with contextlib.ExitStack() as conns:
            held = 0
            for count in counts:
                open_idle(context, server.port, count - held, conns)
                held = count
                time.sleep(0.5)  # the last ones' applications are up and waiting
                snapshots[count] = usage(server, "cat")
                if snapshots[count]["app"]["processes"] != count:
                    running = snapshots[count]["app"]["processes"]
                    raise BenchError(f"{running} applications running for {count} connections")
    low, high = min(counts), max(counts)
    slope = {
        part: (snapshots[high][part]["uss_kb"] - snapshots[low][part]["uss_kb"]) / (high - low)
        for part in ("server", "app")
    }
    return {
        "snapshots": {str(count): snap for count, snap in snapshots.items()},
        "server_uss_kb_per_connection": slope["server"],
        "app_uss_kb_per_connection": slope["app"],
        "server_uss_kb_whole_per_connection": snapshots[high]["server"]["uss_kb"] / high,
    }


def _quiet(server: srv.Running, app: str) -> int | None:
    """1 once none of ``server``'s applications runs, else None."""
    return None if app in server.processes().values() else 1


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


def measure(
    pki: Pki, counts: Sequence[int], network: Network, log: Callable[[str], None]
) -> dict[str, object]:
    """Both memory measurements; a failure of either is recorded, not raised."""
    raise_nofile(NOFILE)
    results: dict[str, object] = {}
    failures: list[str] = []
    results["idle"] = idle_connections(pki, counts, network, log)
    failures += results["idle"].pop("failures")  # type: ignore[attr-defined]
    try:
        results["stall"] = stalled_reader(pki)
    except (BenchError, OSError, ssl.SSLError) as exc:
        failures.append(f"memory stall: {exc}")
        log(f"  FAILED {failures[-1]}")
    results["failures"] = failures
    return results
