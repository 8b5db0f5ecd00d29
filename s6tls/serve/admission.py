"""The -c/-C limits of a server whose connections several workers serve, kept exactly.

One ``Table`` lives in memory shared by the supervisor and its workers (an
anonymous shared mapping made before they are forked).  Every connection a
worker takes holds a *slot* from its admission (``admit``) to its end
(``release``); the table counts them, in all and per client address, so
that -c and -C hold across workers.  A POSIX record lock (``lockf`` on a
file of its own) makes each operation atomic; the kernel drops the lock of
a worker that dies, and the supervisor then frees that worker's slots
(``release_worker``) and rebuilds what is derived from the slots
(``rebuild``), so that a worker killed in the middle of an update leaves
nothing wrong behind.

Admission that silent peers cannot exhaust: a connection is *early* from
its admission until its handshake is done (``established``): before TLS
(banner, PROXY header, rules) and in the handshake.  When -C is full for an
address, a new connection takes the slot of that address's oldest early
connection; when -c is full, that of the oldest early connection of its own
address if it has one, else of the oldest early connection of all.  So an
address that floods the server only ever pushes out its own connections,
and a newcomer from elsewhere always finds a place.
The connection that lost its slot is *evicted*: its slot goes to the new
one at once (its ticket's generation is then stale: ``evicted``), and its
worker (told through ``on_evict``) drops it.  Established connections
are never evicted.  A connection refused or an eviction is counted per
reason (``take_counts``), for one summary line per interval.

Layout: arrays of C ints over the mapping, one per field, so that each
access is one index, not a parse.  Derived from the slots, and rebuilt from
them: the per-address entries (an open-addressing table, keyed by a hash
with a secret, so that no client can choose collisions), the lists of
early slots (in all and per address, oldest first), the free list and the
count.
"""

import fcntl
import hashlib
import mmap
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

NONE = -1


class State(IntEnum):
    """What a slot holds."""

    FREE = 0
    EARLY = 1  # before TLS, or in the handshake: may be evicted
    RUNNING = 2  # handshake done: counts until released


class Reason(IntEnum):
    """Why a connection was refused, or a slot taken from an early connection."""

    REFUSED_ALL = 0  # -c full, nothing early to take
    REFUSED_ADDRESS = 1  # -C full for the address, nothing early of it to take
    EVICTED_ALL = 2  # -c full: the oldest early connection made room
    EVICTED_ADDRESS = 3  # -C full: the address's oldest early connection made room
    DUPLICATE = 4  # (datagrams) the peer's association already holds a slot


@dataclass(frozen=True)
class Ticket:
    """A slot given to a connection: present it to ``established`` and ``release``.

    ``number``: the connections from the same address already counted
    (``TCPCONNNUM``); ``count``: all the connections counted, this one included.
    """

    slot: int
    generation: int
    number: int
    count: int


_V4_MAPPED = bytes(10) + b"\xff\xff"


def address_key(ip: str) -> bytes:
    """16 bytes for an IPv4 or IPv6 address (IPv4 as mapped IPv6; an IPv6 zone left out).

    Raises ``OSError`` for a string that is neither.
    """
    if ":" in ip:
        return socket.inet_pton(socket.AF_INET6, ip.partition("%")[0])
    return _V4_MAPPED + socket.inet_pton(socket.AF_INET, ip)


class Table:
    """The shared admission table; see the module docstring.

    ``maxconn`` is -c, ``localmaxconn`` -C; ``workers`` the most worker
    indexes used at once (a worker's index names it in the slots).  Make it
    before forking the workers.  Raises ``OSError`` if the memory or the
    lock cannot be had.
    """

    def __init__(self, maxconn: int, localmaxconn: int, workers: int) -> None:
        self.maxconn = maxconn
        self.localmaxconn = localmaxconn
        self.nslots = maxconn
        nbuckets = 1
        while nbuckets < 2 * maxconn:
            nbuckets *= 2
        self.nbuckets = nbuckets
        self.workers = workers
        self._secret = secrets.token_bytes(16)
        ints = {
            # the slots: the truth
            "state": self.nslots,
            "worker": self.nslots,
            "generation": self.nslots,
            "port": self.nslots,
            # derived from the slots
            "next": self.nslots,  # free list, or the next early slot (in all)
            "prev": self.nslots,  # the previous early slot (in all)
            "anext": self.nslots,  # the next early slot of the same address
            "aprev": self.nslots,
            "count": nbuckets,  # connections counted per address entry (0: empty entry)
            "ahead": nbuckets,  # the address's oldest early slot
            "atail": nbuckets,
            "pids": workers,  # each worker index's pid (0: none)
            "header": 4,  # used, free head, early head, early tail
            "tallies": len(Reason),
        }
        longs = {"seq": self.nslots, "clock": 1}  # admission order
        size = sum(ints.values()) * 4 + sum(longs.values()) * 8
        size += (self.nslots + nbuckets) * 16  # slot addresses (ips), entry keys
        self._mem = mmap.mmap(-1, size)  # shared with the workers forked later
        view = memoryview(self._mem)
        self._views = [view]
        offset = 0
        for kind, fields, width in (("i", ints, 4), ("q", longs, 8), ("B", _BYTES, 16)):
            for name, count in fields.items():
                count = count if kind != "B" else (self.nslots if name == "ips" else nbuckets)
                part = view[offset : offset + count * width]
                self._views.append(part)
                if kind != "B":
                    part = part.cast(kind)
                    self._views.append(part)
                setattr(self, "_" + name, part)
                offset += count * width
        self._lock_fd = os.memfd_create("s6tls-admission", os.MFD_CLOEXEC)
        os.write(self._lock_fd, b"\0")
        with self._locked():
            self._rebuild()

    # -- the lock --------------------------------------------------------------

    def _locked(self) -> "_Lock":
        return _Lock(self._lock_fd)

    # -- what the workers call ---------------------------------------------------

    def admit(
        self,
        ip: str,
        port: int,
        worker: int,
        on_evict: Callable[[int, int, int], None],
        *,
        unique: bool = False,
    ) -> Ticket | Reason:
        """A slot for a connection from ``ip``:``port`` taken by ``worker``, or why not.

        When a limit is full, the oldest early connection (of the address
        for -C, of all for -c) is evicted to make room, and ``on_evict(pid,
        slot, generation)`` is called for it, under the lock: it must only
        take note.  ``unique`` (datagrams): refuse (``Reason.DUPLICATE``)
        when an early connection of the same ``ip``:``port`` holds a slot.
        """
        key = address_key(ip)
        with self._locked():
            entry = self._find(key)
            if unique and entry is not None and self._early_port(entry, port):
                return Reason.DUPLICATE
            own = self._ahead[entry] if entry is not None else NONE  # its oldest early one
            if entry is not None and self._count[entry] >= self.localmaxconn:
                if own == NONE:
                    self._tally(Reason.REFUSED_ADDRESS)
                    return Reason.REFUSED_ADDRESS
                self._evict(own, Reason.EVICTED_ADDRESS, on_evict)
            elif self._header[_USED] >= self.maxconn:
                victim = own if own != NONE else self._header[_EARLY_HEAD]
                if victim == NONE:
                    self._tally(Reason.REFUSED_ALL)
                    return Reason.REFUSED_ALL
                self._evict(victim, Reason.EVICTED_ALL, on_evict)
            slot = self._header[_FREE]
            self._header[_FREE] = self._next[slot]
            self._state[slot] = State.EARLY
            self._worker[slot] = worker
            self._generation[slot] += 1
            self._port[slot] = port
            self._ips[slot * 16 : slot * 16 + 16] = key
            self._clock[0] += 1
            self._seq[slot] = self._clock[0]
            entry = self._count_in(slot, key)
            number = self._count[entry] - 1
            return Ticket(slot, self._generation[slot], number, self._header[_USED])

    def established(self, ticket: Ticket) -> bool:
        """The handshake of ``ticket``'s connection is done: it can no longer be evicted.

        False if it was evicted meanwhile: the caller drops it, as if told.
        """
        with self._locked():
            slot = ticket.slot
            if self._generation[slot] != ticket.generation:
                return False
            if self._state[slot] == State.EARLY:
                self._unlink_early(slot)
                self._state[slot] = State.RUNNING
            return True

    def evicted(self, ticket: Ticket) -> bool:
        """True if ``ticket``'s connection (not released) lost its slot: drop it."""
        return self._generation[ticket.slot] != ticket.generation

    def release(self, ticket: Ticket) -> int:
        """The connection of ``ticket`` is over: its slot is freed; the count now."""
        with self._locked():
            slot = ticket.slot
            if self._generation[slot] == ticket.generation:
                self._free(slot)
            return self._header[_USED]

    def register(self, worker: int, pid: int) -> None:
        """``worker``'s index is now ``pid``'s (0: no longer anyone's)."""
        self._pids[worker] = pid

    def release_worker(self, worker: int) -> None:
        """Free every slot of ``worker``, which died; then rebuild what is derived."""
        with self._locked():
            for slot in range(self.nslots):
                if self._worker[slot] == worker and self._state[slot] != State.FREE:
                    self._state[slot] = State.FREE
                    self._generation[slot] += 1
            self._pids[worker] = 0
            self._rebuild()

    def take_counts(self) -> dict[Reason, int]:
        """The refusals and evictions since the last call, per reason (zeros left out)."""
        with self._locked():
            counts = {reason: self._tallies[reason] for reason in Reason if self._tallies[reason]}
            for reason in Reason:
                self._tallies[reason] = 0
        return counts

    @property
    def count(self) -> int:
        """The connections counted now."""
        return self._header[_USED]

    def close(self) -> None:
        """Let go of the shared memory and the lock (in a process that is done with them)."""
        for view in reversed(self._views):
            view.release()
        self._mem.close()
        os.close(self._lock_fd)

    # -- the slots -------------------------------------------------------------------

    def _free(self, slot: int) -> None:
        if self._state[slot] == State.EARLY:
            self._unlink_early(slot)
        self._count_out(slot)
        self._state[slot] = State.FREE
        self._generation[slot] += 1
        self._next[slot] = self._header[_FREE]
        self._header[_FREE] = slot

    def _evict(self, slot: int, why: Reason, on_evict: Callable[[int, int, int], None]) -> None:
        pid, generation = self._pids[self._worker[slot]], self._generation[slot]
        self._free(slot)
        self._tally(why)
        on_evict(pid, slot, generation)

    def _tally(self, why: Reason) -> None:
        self._tallies[why] += 1

    def _early_port(self, entry: int, port: int) -> bool:
        slot = self._ahead[entry]
        while slot != NONE:
            if self._port[slot] == port:
                return True
            slot = self._anext[slot]
        return False

    # -- counts and early lists ----------------------------------------------------

    def _count_in(self, slot: int, key: bytes) -> int:
        """``slot`` (early, its address ``key``) counts, last of the early ones; its entry."""
        entry = self._find(key, create=True)
        assert entry is not None
        self._count[entry] += 1
        self._header[_USED] += 1
        # the list of all early slots, then the address's
        tail = self._header[_EARLY_TAIL]
        self._prev[slot], self._next[slot] = tail, NONE
        if tail == NONE:
            self._header[_EARLY_HEAD] = slot
        else:
            self._next[tail] = slot
        self._header[_EARLY_TAIL] = slot
        tail = self._atail[entry]
        self._aprev[slot], self._anext[slot] = tail, NONE
        if tail == NONE:
            self._ahead[entry] = slot
        else:
            self._anext[tail] = slot
        self._atail[entry] = slot
        return entry

    def _unlink_early(self, slot: int) -> None:
        prev, nxt = self._prev[slot], self._next[slot]
        if prev == NONE:
            self._header[_EARLY_HEAD] = nxt
        else:
            self._next[prev] = nxt
        if nxt == NONE:
            self._header[_EARLY_TAIL] = prev
        else:
            self._prev[nxt] = prev
        entry = self._find(bytes(self._ips[slot * 16 : slot * 16 + 16]))
        assert entry is not None
        prev, nxt = self._aprev[slot], self._anext[slot]
        if prev == NONE:
            self._ahead[entry] = nxt
        else:
            self._anext[prev] = nxt
        if nxt == NONE:
            self._atail[entry] = prev
        else:
            self._aprev[nxt] = prev

    def _count_out(self, slot: int) -> None:
        """``slot`` (no longer early) stops counting."""
        entry = self._find(bytes(self._ips[slot * 16 : slot * 16 + 16]))
        assert entry is not None
        self._header[_USED] -= 1
        self._count[entry] -= 1
        if not self._count[entry]:
            self._remove_entry(entry)

    # -- the address entries: open addressing, linear probing ------------------------

    def _home(self, key: bytes) -> int:
        digest = hashlib.blake2b(key, digest_size=8, key=self._secret).digest()
        return int.from_bytes(digest, "little") & (self.nbuckets - 1)

    def _find(self, key: bytes, *, create: bool = False) -> int | None:
        """The entry of ``key``; a new one if ``create``; else None when it has none."""
        mask = self.nbuckets - 1
        entry = self._home(key)
        while self._count[entry]:
            if self._keys[entry * 16 : entry * 16 + 16] == key:
                return entry
            entry = (entry + 1) & mask
        if not create:
            return None
        self._keys[entry * 16 : entry * 16 + 16] = key
        self._ahead[entry] = self._atail[entry] = NONE
        return entry

    def _remove_entry(self, entry: int) -> None:
        """Empty ``entry`` and shift back the entries after it (no tombstones)."""
        mask = self.nbuckets - 1
        hole = entry
        other = (hole + 1) & mask
        while self._count[other]:
            home = self._home(bytes(self._keys[other * 16 : other * 16 + 16]))
            # ``other`` may move to the hole if its home is not between the hole and it
            if (other - home) & mask >= (other - hole) & mask:
                self._keys[hole * 16 : hole * 16 + 16] = self._keys[other * 16 : other * 16 + 16]
                self._count[hole] = self._count[other]
                self._ahead[hole], self._atail[hole] = self._ahead[other], self._atail[other]
                self._count[other] = 0
                hole = other
            other = (other + 1) & mask
        self._count[hole] = 0

    def _rebuild(self) -> None:
        """Everything derived, from the slots alone: entries, early lists, free list, count."""
        for entry in range(self.nbuckets):
            self._count[entry] = 0
        self._header[_USED] = 0
        self._header[_FREE] = self._header[_EARLY_HEAD] = self._header[_EARLY_TAIL] = NONE
        counted = []
        for slot in reversed(range(self.nslots)):
            state = self._state[slot]
            if state == State.FREE:
                self._next[slot] = self._header[_FREE]
                self._header[_FREE] = slot
            else:
                counted.append(slot)
        for slot in sorted(counted, key=lambda s: self._seq[s]):
            key = bytes(self._ips[slot * 16 : slot * 16 + 16])
            if self._state[slot] == State.EARLY:
                self._count_in(slot, key)
            else:
                entry = self._find(key, create=True)
                assert entry is not None
                self._count[entry] += 1
                self._header[_USED] += 1


_USED, _FREE, _EARLY_HEAD, _EARLY_TAIL = range(4)
_BYTES = {"ips": 0, "keys": 0}  # 16 bytes each: per slot, per entry (counts set in Table)


class _Lock:
    """The table's lock: a POSIX record lock, dropped by the kernel if its holder dies."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)
