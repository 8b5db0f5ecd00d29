"""Load: many concurrent connections through s6-tlsserver, then no leak.

20 connection slots for 10 s by default (and 200 slots for 60 s, marked
slow: S6TLS_SLOW=1), all driven by one asyncio loop with the standard library's
ssl, against ``s6-tlsserver ... cat``.  Half the slots hold one connection
for the whole run and stream random data both ways with backpressure; the
other half open short connections back to back (so the fork, hand-over and
reaping paths run hundreds of times).  Every connection checks the SHA-256 of
what came back against what it sent.

Afterwards the server must be back where it started: every child reaped (its
"end" log line, no zombie), the same open descriptors (/proc/PID/fd), and the
same resident memory within a small allowance.  The allowance: the server's
RSS counts pages of the Python heap, which grows in arena steps (256 KiB) and
keeps a freed arena's pages until the arena is empty, so a few arenas of noise
is normal; a leak of even 1 KiB per connection would be far above it after
hundreds of connections.
"""

import asyncio
import contextlib
import hashlib
import random
import ssl
import threading
import time
from pathlib import Path

import pytest
from server_helpers import END_LINE, fd_count, start_server, zombies

RSS_ALLOWANCE_KB = 1024


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class ServerLog:
    """Reads the server's stderr continuously; counts ended children and their statuses."""

    def __init__(self, stream) -> None:
        self.cond = threading.Condition()
        self.statuses: list[int] = []
        self.other: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for raw in stream:
            line = raw.decode(errors="replace")
            match = END_LINE.search(line)
            with self.cond:
                if match:
                    self.statuses.append(int(match.group(4)))
                    self.cond.notify_all()
                elif ": info: " not in line:
                    self.other.append(line)

    def wait_ended(self, count: int, timeout: float = 60) -> list[int]:
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.statuses) >= count, timeout):
                raise AssertionError(f"{len(self.statuses)} of {count} children ended")
            return list(self.statuses)


class Tally:
    def __init__(self) -> None:
        self.connections = 0
        self.bytes_each_way = 0
        self.failures: list[str] = []


async def one_connection(ctx, port: int, rng: random.Random, stop_at: float, budget: int, tally):
    """Stream random data until ``stop_at`` or ``budget`` bytes; check the echo's SHA-256."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
    )
    sent, got = hashlib.sha256(), hashlib.sha256()
    counts = {"sent": 0, "got": 0}
    sending_done = asyncio.Event()

    async def send() -> None:
        while counts["sent"] < budget and time.monotonic() < stop_at:
            chunk = rng.randbytes(min(rng.randint(1, 65536), budget - counts["sent"]))
            sent.update(chunk)
            counts["sent"] += len(chunk)
            writer.write(chunk)
            await writer.drain()
        sending_done.set()

    async def receive() -> None:
        while not (sending_done.is_set() and counts["got"] == counts["sent"]):
            data = await reader.read(65536)
            if not data:
                raise AssertionError(f"EOF after {counts['got']} of {counts['sent']} bytes")
            got.update(data)
            counts["got"] += len(data)

    try:
        await asyncio.wait_for(asyncio.gather(send(), receive()), stop_at - time.monotonic() + 60)
        if sent.hexdigest() != got.hexdigest():
            tally.failures.append(f"digest mismatch after {counts['sent']} bytes")
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    tally.connections += 1
    tally.bytes_each_way += counts["sent"]


async def slot(ctx, port: int, seed: int, long_lived: bool, stop_at: float, tally) -> None:
    rng = random.Random(seed)
    if long_lived:
        await one_connection(ctx, port, rng, stop_at, 1 << 40, tally)
        return
    while time.monotonic() < stop_at:
        await one_connection(ctx, port, rng, stop_at, rng.randint(0, 256 * 1024), tally)


async def load(port: int, cafile: str, slots: int, duration: float) -> Tally:
    ctx = ssl.create_default_context(cafile=cafile)
    tally = Tally()
    stop_at = time.monotonic() + duration
    results = await asyncio.gather(
        *(slot(ctx, port, n, n % 2 == 0, stop_at, tally) for n in range(slots)),
        return_exceptions=True,
    )
    tally.failures += [repr(r) for r in results if isinstance(r, BaseException)]
    return tally


def run_load(slots: int, duration: float, server_env, pki, reap) -> None:
    limit = str(slots * 2 + 10)  # closed connections linger until their child is reaped
    server, port = start_server(["-v", "-c", limit, "-C", limit], ["cat"], server_env)
    reap.append(server)
    log = ServerLog(server.stderr)
    # Steady state first: a connection has gone through, the spare is forked.
    warm = asyncio.run(load_one(port, pki["ca"]))
    assert warm.failures == []
    log.wait_ended(1)
    fds_before, rss_before = fd_count(server.pid), rss_kb(server.pid)

    t0 = time.monotonic()
    tally = asyncio.run(load(port, pki["ca"], slots, duration))
    elapsed = time.monotonic() - t0
    assert tally.failures == [], tally.failures[:5]
    statuses = log.wait_ended(1 + tally.connections)
    assert statuses == [0] * len(statuses), [s for s in statuses if s]
    assert log.other == [], log.other[:5]
    assert zombies(server.pid) == []
    assert fd_count(server.pid) == fds_before
    rss_after = rss_kb(server.pid)
    assert rss_after - rss_before <= RSS_ALLOWANCE_KB, (rss_before, rss_after)
    print(
        f"{slots} slots for {elapsed:.1f}s: {tally.connections} connections,"
        f" {tally.bytes_each_way / 1e6:.1f} MB each way; server fds {fds_before},"
        f" RSS {rss_before} -> {rss_after} kB"
    )
    server.terminate()
    server.wait(timeout=30)


def test_twenty_connections_for_ten_seconds_echo_intact_and_leave_no_leak(server_env, pki, reap):
    run_load(20, 10.0, server_env, pki, reap)


@pytest.mark.slow
def test_two_hundred_connections_for_a_minute_echo_intact_and_leave_no_leak(server_env, pki, reap):
    run_load(200, 60.0, server_env, pki, reap)


async def load_one(port: int, cafile: str) -> Tally:
    ctx = ssl.create_default_context(cafile=cafile)
    tally = Tally()
    await one_connection(ctx, port, random.Random(0), time.monotonic() + 10, 1000, tally)
    return tally
