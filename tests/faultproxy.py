"""A TCP proxy that misbehaves on purpose, for the fault tests.

``FaultProxy(target_port)`` listens on a free loopback port and relays every
connection it accepts to ``127.0.0.1:target_port``, one asyncio task per
direction, in an event loop of its own running in a daemon thread.  Each
direction (``"c2s"``: client to server, ``"s2c"``: server to client) can be
given a ``Fault``:

* ``delay``: wait this long before passing on each piece it read;
* ``split``: pass on every byte as a write of its own (TCP_NODELAY is set, so
  on loopback each byte is a segment of its own);
* ``cut_after``: after passing on exactly that many bytes in this direction,
  end the whole connection, both sides at once, with ``cut`` = ``"fin"``
  (an orderly TCP close, no TLS close_notify) or ``"rst"`` (SO_LINGER 0, so
  the kernel sends a reset);
* ``half_close_after``: after that many bytes, send FIN to this direction's
  destination only, and drop what its source still sends; the other
  direction flows on;
* ``stalled``: read nothing from this direction's source until
  ``release(direction)`` is called; the other direction flows on;
  ``stall_after``: the same, from the moment that many bytes went through.

``rcvbuf`` fixes the proxy's socket receive buffers (no autotuning), so that
a stalled direction fills up and blocks its sender after a known amount.

The test can also act on the live connection at any moment: ``cut(mode)``,
``half_close(direction)``, ``stall(direction)``, ``release(direction)``.
Each of these acts on every connection currently relayed (the tests use one
connection at a time).  ``forwarded[direction]`` counts the bytes passed on,
``writes[direction]`` the writes that took, ``log`` lists every piece read
and passed on as (direction, size), in order,
``wire[direction]`` holds every byte passed on when the proxy was made with
``record=True`` (a capture of the wire), ``cut_done`` is set once a cut
happened, and ``closed`` once every relayed connection ended.  Nothing here
sleeps to synchronise: waits are on events.
"""

import asyncio
import contextlib
import socket
import struct
import threading
from dataclasses import dataclass

DIRECTIONS = ("c2s", "s2c")


@dataclass
class Fault:
    """How one direction misbehaves; the defaults relay faithfully."""

    delay: float = 0.0
    split: bool = False
    cut_after: int | None = None
    cut: str = "fin"  # or "rst"
    half_close_after: int | None = None
    stalled: bool = False
    stall_after: int | None = None


def set_rst_on_close(sock: socket.socket) -> None:
    """Make ``close()`` send a TCP reset instead of a FIN (SO_LINGER on, timeout 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Relay:
    """One proxied connection: two sockets and two pump tasks."""

    def __init__(self, proxy: "FaultProxy", client: socket.socket, server: socket.socket):
        self.proxy = proxy
        self.socks = {"c2s": (client, server), "s2c": (server, client)}
        self.client = client
        self.server = server
        self.ended = False
        self.resume = {d: asyncio.Event() for d in DIRECTIONS}
        self.half_closed = {d: False for d in DIRECTIONS}
        self.stall_done = {d: False for d in DIRECTIONS}
        self.tasks: list[asyncio.Task] = []
        for d in DIRECTIONS:
            if not proxy.faults[d].stalled:
                self.resume[d].set()

    async def pump(self, direction: str) -> None:
        loop = asyncio.get_running_loop()
        src, dst = self.socks[direction]
        fault = self.proxy.faults[direction]
        sent = 0
        try:
            while not self.ended:
                await self.resume[direction].wait()
                limit = 65536
                for boundary in (fault.cut_after, fault.half_close_after):
                    if boundary is not None and not self.half_closed[direction]:
                        limit = min(limit, boundary - sent)
                if fault.stall_after is not None and not self.stall_done[direction]:
                    if sent >= fault.stall_after:
                        self.stall_done[direction] = True
                        self.resume[direction].clear()
                        self.proxy.stalled.set()
                        continue
                    limit = min(limit, fault.stall_after - sent)
                if limit <= 0:
                    if fault.cut_after is not None and sent >= fault.cut_after:
                        self.end(fault.cut)
                        return
                    self.half_close(direction)
                    continue
                data = await loop.sock_recv(src, limit)
                if not self.resume[direction].is_set():
                    # Stalled while we waited: hold this piece until released.
                    await self.resume[direction].wait()
                if not data:
                    if not self.half_closed[direction]:
                        with contextlib.suppress(OSError):
                            dst.shutdown(socket.SHUT_WR)  # pass the FIN on
                    return
                if self.half_closed[direction]:
                    continue  # dropped: the destination was told nothing more comes
                if fault.delay:
                    await asyncio.sleep(fault.delay)  # the fault itself, not a synchronisation
                if fault.split:
                    for i in range(len(data)):
                        await loop.sock_sendall(dst, data[i : i + 1])
                    self.proxy.writes[direction] += len(data)
                else:
                    await loop.sock_sendall(dst, data)
                    self.proxy.writes[direction] += 1
                sent += len(data)
                if self.proxy.wire is not None:
                    self.proxy.wire[direction] += data
                self.proxy.forwarded[direction] += len(data)
                self.proxy.log.append((direction, len(data)))
        except OSError:
            self.end("rst")  # one side reset or vanished: so does the other

    def half_close(self, direction: str) -> None:
        """FIN towards this direction's destination; what its source still sends is dropped."""
        _src, dst = self.socks[direction]
        self.half_closed[direction] = True
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def end(self, mode: str) -> None:
        """End both sides now: an orderly FIN, or a reset with ``mode == "rst"``.

        After a FIN, whatever the two sides still send is read and dropped,
        so that closing never turns the FIN into a reset.
        """
        if self.ended:
            return
        self.ended = True
        for event in self.resume.values():
            event.set()
        # Cancelling schedules the removal of the pumps' pending reads; what
        # follows is scheduled after it, so no fd is closed or read twice.
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        loop = asyncio.get_running_loop()
        for sock in (self.client, self.server):
            if mode == "rst":
                with contextlib.suppress(OSError):
                    set_rst_on_close(sock)
                loop.call_soon(sock.close)
            else:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
                self.proxy.lingering.add(loop.create_task(_discard(sock, close=True)))
        self.proxy.cut_done.set()


async def _discard(sock: socket.socket, close: bool = False) -> None:
    """Read and drop everything from ``sock`` until EOF or an error."""
    loop = asyncio.get_running_loop()
    try:
        while await loop.sock_recv(sock, 65536):
            pass
    except OSError:
        pass
    finally:
        if close:
            sock.close()


class FaultProxy:
    """The proxy; use as a context manager, or call ``close()``."""

    def __init__(
        self,
        target_port: int,
        *,
        c2s: Fault | None = None,
        s2c: Fault | None = None,
        target_host: str = "127.0.0.1",
        rcvbuf: int | None = None,
        record: bool = False,
    ) -> None:
        self.target = (target_host, target_port)
        self.wire = {d: bytearray() for d in DIRECTIONS} if record else None
        self.faults = {"c2s": c2s or Fault(), "s2c": s2c or Fault()}
        self.forwarded = {"c2s": 0, "s2c": 0}
        self.writes = {"c2s": 0, "s2c": 0}
        self.log: list[tuple[str, int]] = []
        self.rcvbuf = rcvbuf
        self.cut_done = threading.Event()
        self.stalled = threading.Event()
        self.closed = threading.Event()
        self.accepted = threading.Event()
        self.relays: list[_Relay] = []
        self.lingering: set[asyncio.Task] = set()
        self.listener = socket.socket()
        if rcvbuf:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        self._active = 0
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._accepter = asyncio.run_coroutine_threadsafe(self._accept_loop(), self.loop)

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            client, _addr = await loop.sock_accept(self.listener)
            server = socket.socket()
            server.setblocking(False)
            if self.rcvbuf:
                server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            try:
                await loop.sock_connect(server, self.target)
            except OSError:
                set_rst_on_close(client)
                client.close()
                server.close()
                continue
            for sock in (client, server):
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            relay = _Relay(self, client, server)
            self.relays.append(relay)
            self._active += 1
            self.closed.clear()
            relay.tasks = [loop.create_task(relay.pump(d)) for d in DIRECTIONS]
            self.lingering.add(loop.create_task(self._finish(relay)))
            self.accepted.set()

    async def _finish(self, relay: _Relay) -> None:
        while pending := [t for t in relay.tasks if not t.done()]:
            await asyncio.gather(*pending, return_exceptions=True)
        if not relay.ended:
            relay.ended = True
            for sock in (relay.client, relay.server):
                sock.close()
        self._active -= 1
        if not self._active:
            self.closed.set()

    def _call(self, fn, *args) -> None:
        """Run ``fn(*args)`` in the proxy's loop and wait until it ran."""
        done = threading.Event()

        def call() -> None:
            try:
                fn(*args)
            finally:
                done.set()

        self.loop.call_soon_threadsafe(call)
        done.wait(10)

    # -- acting on live connections ------------------------------------

    def cut(self, mode: str = "fin") -> None:
        """End every relayed connection now, with a FIN or (``"rst"``) a reset."""
        self._call(lambda: [r.end(mode) for r in self.relays])

    def half_close(self, direction: str) -> None:
        """Send FIN to ``direction``'s destination; the other direction flows on."""
        self._call(lambda: [r.half_close(direction) for r in self.relays if not r.ended])

    def stall(self, direction: str) -> None:
        """Stop passing on ``direction`` until ``release``."""
        self._call(lambda: [r.resume[direction].clear() for r in self.relays])

    def release(self, direction: str) -> None:
        """Let ``direction`` flow again."""
        self.faults[direction].stalled = False
        self._call(lambda: [r.resume[direction].set() for r in self.relays])

    def close(self) -> None:
        """Stop accepting, reset what is still relayed, stop the loop."""

        async def shutdown() -> None:
            for relay in self.relays:
                relay.end("rst")
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.listener.close()

        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        self.loop.close()
