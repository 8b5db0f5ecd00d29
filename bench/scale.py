"""Many connections: one s6-tlsserver holding 10,000 at once, and a worker after 100,000.

Held: one s6-tlsserver (default ``--workers``, ``-c``/``-C`` the count plus
a margin) and ``count`` idle TLS connections from this process, opened
one after the other (``PARALLEL``), each having echoed one byte (``cat`` runs for each:
``count`` processes).  RSS and USS
of the supervisor and of each worker are read every ``STEP`` connections
and at the end, with the number of applications running.  The descriptor
limit is raised as far as the hard limit allows (a worker needs three per
connection: its socket and two pipes to the application), and the servers'
processes and applications are all gone before the function returns (the
server's process group is killed, every process reaped, and a scan of
/proc checks that no ``cat`` of it is left).

Growth: one s6-tlsserver with ``--workers 1`` and application ``true``,
``openssl s_time -new`` (4 clients) in slices until ``total`` connections
were served; the worker's VmRSS and USS are read after the first 1,000
and at every ``checkpoints`` count.  Target (issue 21): after 100,000, the
RSS within 5 MB of that after 1,000.

Both run in the quickack namespace (``bench.netns``) when given one.
"""

import contextlib
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import servers as srv
from .common import BenchError, Pki, Processes, process_table, raise_nofile, scratch
from .handshakes import rate
from .memory import open_idle, private_memory, resident
from .netns import Network, inside

STEP = 1000  # connections between two readings of the held run
# Connections opened at once: one after the other, the harder case.  Each goes to the
# worker first in the listening socket's wait queue (EPOLLEXCLUSIVE) until that one is at
# its descriptor limit and stops taking them; then to the next.
PARALLEL = 1
WANTED_NOFILE = 65536


def _roles(server: srv.Running) -> tuple[int, list[int], int, list[int]]:
    """s6tls's supervisor, its workers, how many applications run, and how many each
    worker runs."""
    table = process_table()
    found = server.processes()
    supervisor = next(pid for pid in found if table[pid][0] == server.proc.pid)
    workers = [pid for pid in found if table[pid][0] == supervisor and found[pid] != "cat"]
    apps = [pid for pid, name in found.items() if name == "cat"]
    each = [sum(1 for app in apps if table[app][0] == worker) for worker in workers]
    return supervisor, workers, len(apps), each


def _reading(server: srv.Running, held: int, seconds: float) -> dict[str, Any]:
    supervisor, workers, apps, each = _roles(server)
    return {
        "connections": held,
        "seconds": seconds,
        "applications": apps,
        "supervisor": resident(supervisor),
        "workers": [
            {**resident(pid), "applications": n} for pid, n in zip(workers, each, strict=True)
        ],
        "rss_kb": resident(supervisor)["rss_kb"] + sum(resident(w)["rss_kb"] for w in workers),
        "uss_kb": private_memory(supervisor)["uss_kb"]
        + sum(private_memory(w)["uss_kb"] for w in workers),
    }


def held(
    pki: Pki,
    count: int,
    network: Network,
    log: Callable[[str], None],
    options: Sequence[str] = (),
) -> dict[str, Any]:
    """One s6-tlsserver (with ``options``) holding ``count`` idle connections; see the
    module docstring."""
    nofile = raise_nofile(WANTED_NOFILE)
    context = ssl.create_default_context(cafile=pki.ca)
    readings = []
    apps: set[int] = set()
    with scratch() as tmp, inside(network):
        with Processes() as procs:
            server = srv.start(
                procs, "s6tls", tmp, pki, "cat", maxconn=count + 100, options=options
            )
            start = time.monotonic()
            with contextlib.ExitStack() as conns:
                done = 0
                while done < count:
                    step = min(STEP, count - done)
                    try:
                        open_idle(context, server.port, step, conns, PARALLEL)
                    except (BenchError, OSError, ssl.SSLError) as exc:
                        lines = (tmp / "s6tls.err").read_text(errors="replace").splitlines()
                        said = [line for line in lines if "warning" in line or "fatal" in line]
                        last = said[-1] if said else "nothing"
                        raise BenchError(f"{exc}; the server's last warning: {last}") from exc
                    done += step
                    time.sleep(0.2)
                    readings.append(_reading(server, done, time.monotonic() - start))
                    last = readings[-1]
                    log(
                        f"  {done} connections held: RSS {last['rss_kb'] / 1024:.0f} MiB,"
                        f" USS {last['uss_kb'] / 1024:.0f} MiB, {last['applications']} applications"
                    )
                if readings[-1]["applications"] != count:
                    running = readings[-1]["applications"]
                    raise BenchError(f"{running} applications for {count} connections")
                apps = {pid for pid, name in server.processes().items() if name == "cat"}
        # Every connection closed, the server's group killed, everything reaped: any left?
        table = process_table()
        left = [pid for pid in apps if table.get(pid, (0, ""))[1] == "cat"]
    return {
        "count": count,
        "options": list(options),
        "nofile": nofile,
        "readings": readings,
        "cats_left": len(left),
    }


def growth(
    pki: Pki,
    checkpoints: Sequence[int],
    network: Network,
    log: Callable[[str], None],
    clients: int = 4,
) -> dict[str, Any]:
    """A worker's memory after 1,000 connections and at each of ``checkpoints``."""
    readings = []
    total = 0
    marks = sorted({1000, *checkpoints})
    with scratch() as tmp, inside(network), Processes() as procs:
        server = srv.start(procs, "s6tls", tmp, pki, "true", options=["--workers", "1"])
        start = time.monotonic()
        per_second = 300.0
        for mark in marks:
            while total < mark:
                seconds = max(1, min(20, round((mark - total) / per_second)))
                per_second, made, _ = rate(procs, server.port, clients, seconds, "TLSv1.3")
                total += made
            time.sleep(0.5)  # the last connections end
            _supervisor, workers, _apps, _each = _roles(server)
            if len(workers) != 1:
                raise BenchError(f"{len(workers)} workers under --workers 1")
            reading = {
                "connections": total,
                "seconds": time.monotonic() - start,
                **resident(workers[0]),
            }
            readings.append(reading)
            log(
                f"  after {total} connections: worker RSS {reading['rss_kb']} kB,"
                f" USS {reading['uss_kb']} kB"
            )
    first, last = readings[0], readings[-1]
    return {
        "readings": readings,
        "rss_growth_kb": last["rss_kb"] - first["rss_kb"],
        "uss_growth_kb": last["uss_kb"] - first["uss_kb"],
    }


def measure(
    pki: Pki,
    count: int,
    checkpoints: Sequence[int],
    network: Network,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Both; a failure of either is recorded (``scale ...``), not raised."""
    results: dict[str, Any] = {}
    failures = []
    for name, run in (
        ("held", lambda: held(pki, count, network, log)),
        ("growth", lambda: growth(pki, checkpoints, network, log)),
    ):
        try:
            results[name] = run()
        except (BenchError, OSError, ssl.SSLError) as exc:
            failures.append(f"scale {name}: {exc}")
            log(f"  FAILED {failures[-1]}")
    results["failures"] = failures
    return results
