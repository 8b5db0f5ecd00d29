"""A UDP proxy that misbehaves on purpose, for the DTLS fault tests.

``UdpFaultProxy(target_port, c2s=Fault(...), s2c=Fault(...))`` listens on a
free loopback port and relays each client's datagrams to
``127.0.0.1:target_port`` from a socket of its own per client (so the server
sees one peer per client), and the answers back, in an asyncio event loop
of its own running in a daemon thread.  Each direction (``"c2s"``, ``"s2c"``)
misbehaves as its ``Fault`` says:

* ``drop``: the indexes (from 0, counted in that direction) of the
  datagrams to drop; ``loss``: the chance that any other one is dropped;
* ``duplicate``: the chance that a datagram is sent twice;
* ``reorder``: the chance that a datagram is held back and sent after the
  next one (or after ``HOLD`` seconds if none comes);
* ``delay``: each datagram waits a time drawn between these two bounds.

The chances are drawn from a ``random.Random(seed)``, so a run can be
played again.  ``counts[direction]`` counts what happened to the datagrams
(seen, passed, dropped, duplicated, reordered, delayed, replayed),
``seen_at[direction]`` holds when each one arrived (``time.monotonic``),
``passed[direction]`` every datagram passed on, in order, and
``replay(direction, index)`` sends one of them again, as an attacker who
captured it would.  ``wait_seen(direction, n)`` waits until ``n`` arrived.
Nothing here sleeps to synchronise.
"""

import asyncio
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

DIRECTIONS = ("c2s", "s2c")
HOLD = 0.2  # seconds a reordered datagram waits for the next one at most


@dataclass
class Fault:
    """How one direction misbehaves; the defaults relay faithfully."""

    drop: frozenset[int] = field(default_factory=frozenset)
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    delay: tuple[float, float] = (0.0, 0.0)


class UdpFaultProxy:
    """See the module docstring.  Use it as a context manager; ``port`` is where it listens."""

    def __init__(
        self, target_port: int, c2s: Fault | None = None, s2c: Fault | None = None, seed: int = 0
    ) -> None:
        self.target = ("127.0.0.1", target_port)
        self.faults = {"c2s": c2s or Fault(), "s2c": s2c or Fault()}
        self.rng = random.Random(seed)
        self.counts: dict[str, Counter[str]] = {d: Counter() for d in DIRECTIONS}
        self.passed: dict[str, list[bytes]] = {d: [] for d in DIRECTIONS}
        self.seen_at: dict[str, list[float]] = {d: [] for d in DIRECTIONS}
        self._arrival = threading.Condition()
        self._held: dict[str, tuple[bytes, Callable[[bytes], None]] | None] = dict.fromkeys(
            DIRECTIONS
        )
        self._clients: dict[tuple, socket.socket] = {}  # client address -> upstream socket
        self._last_client: tuple | None = None
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "UdpFaultProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        for sock in [self.listener, *self._clients.values()]:
            sock.close()
        self.loop.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.add_reader(self.listener.fileno(), self._from_client)
        self.loop.run_forever()

    def _from_client(self) -> None:
        while True:
            try:
                data, addr = self.listener.recvfrom(1 << 16)
            except BlockingIOError:
                return
            upstream = self._clients.get(addr)
            if upstream is None:
                upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                upstream.connect(self.target)
                upstream.setblocking(False)
                self._clients[addr] = upstream
                self.loop.add_reader(upstream.fileno(), self._from_server, addr, upstream)
            self._last_client = addr
            self._relay("c2s", data, upstream.send)

    def _from_server(self, addr: tuple, upstream: socket.socket) -> None:
        while True:
            try:
                data = upstream.recv(1 << 16)
            except (BlockingIOError, ConnectionRefusedError):
                return
            self._relay("s2c", data, lambda d, a=addr: self._send_to_client(d, a))

    def _send_to_client(self, data: bytes, addr: tuple) -> None:
        self.listener.sendto(data, addr)

    def _relay(self, direction: str, data: bytes, send: Callable[[bytes], None]) -> None:
        fault, counts = self.faults[direction], self.counts[direction]
        index = counts["seen"]
        with self._arrival:
            counts["seen"] += 1
            self.seen_at[direction].append(time.monotonic())
            self._arrival.notify_all()
        if index in fault.drop or self.rng.random() < fault.loss:
            counts["dropped"] += 1
            return
        copies = 1
        if self.rng.random() < fault.duplicate:
            counts["duplicated"] += 1
            copies = 2
        held = self._held[direction]
        if held is None and self.rng.random() < fault.reorder:
            counts["reordered"] += 1
            self._held[direction] = (data, send)
            self.loop.call_later(HOLD, self._release, direction, data)
            return
        delay = self.rng.uniform(*fault.delay)
        if delay:
            counts["delayed"] += 1
        for _ in range(copies):
            self._later(delay, direction, data, send)
        if held is not None:
            self._held[direction] = None
            self._later(delay, direction, *held)

    def _release(self, direction: str, data: bytes) -> None:
        held = self._held[direction]
        if held is not None and held[0] is data:
            self._held[direction] = None
            self._pass(direction, *held)

    def _later(
        self, delay: float, direction: str, data: bytes, send: Callable[[bytes], None]
    ) -> None:
        if delay:
            self.loop.call_later(delay, self._pass, direction, data, send)
        else:
            self._pass(direction, data, send)

    def _pass(self, direction: str, data: bytes, send: Callable[[bytes], None]) -> None:
        self.counts[direction]["passed"] += 1
        self.passed[direction].append(data)
        try:
            send(data)
        except OSError:
            self.counts[direction]["unsent"] += 1

    def replay(self, direction: str, index: int) -> None:
        """Send again the ``index``-th datagram passed in ``direction`` (to the last client).

        Returns once it is sent.
        """
        done = threading.Event()

        def again() -> None:
            data = self.passed[direction][index]
            self.counts[direction]["replayed"] += 1
            if direction == "c2s":
                assert self._last_client is not None
                self._clients[self._last_client].send(data)
            elif self._last_client is not None:
                self.listener.sendto(data, self._last_client)
            done.set()

        self.loop.call_soon_threadsafe(again)
        assert done.wait(10)

    def wait_seen(self, direction: str, n: int, timeout: float = 30) -> None:
        """Return once ``n`` datagrams arrived in ``direction``, or raise ``TimeoutError``."""
        with self._arrival:
            if not self._arrival.wait_for(lambda: self.counts[direction]["seen"] >= n, timeout):
                raise TimeoutError(f"{n} datagrams {direction}: {self.report()}")

    def report(self) -> str:
        """One line per direction: what happened to its datagrams."""
        return "; ".join(
            f"{d}: " + ", ".join(f"{k} {v}" for k, v in sorted(self.counts[d].items()))
            for d in DIRECTIONS
        )
