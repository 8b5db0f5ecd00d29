"""One end of a measured data stream: sends a known pattern, counts (and hashes) what it gets.

Run as a separate process (``python -I -S bench/endpoint.py ...``), so that its CPU
time can be told apart from the tunnel's: on exit it writes a JSON report with its
own ``RUSAGE_SELF`` user and sys seconds, which the benchmark subtracts from the
rusage of the whole process tree it started.

The stream sent is a fixed 1 MiB pseudo-random block (seeded by ``--seed``)
repeated and cut at ``--send`` bytes, so the receiver's byte count and sha256
can be checked against :func:`expected_digest`.  With ``--hold`` the output
is closed only once the input has ended, as a server that answers nothing
would do: closing it at once would make socat start its ``-t`` timer.  With
``--go`` nothing is sent before one byte (not counted) has been read.

Timestamps are ``time.monotonic()``, one clock for every process of the host.
This file imports only the standard library, so that it also runs under
``python -I -S``.
"""

import argparse
import hashlib
import json
import os
import random
import resource
import signal
import socket
import stat
import threading
import time

BLOCK = 1 << 20
READ_SIZE = 1 << 18


def pattern(seed: str) -> bytes:
    """The 1 MiB block that a stream seeded ``seed`` repeats."""
    return random.Random(seed).randbytes(BLOCK)


def expected_digest(seed: str, size: int) -> str:
    """The sha256 (hex) of the first ``size`` bytes of the stream seeded ``seed``."""
    block = memoryview(pattern(seed))
    digest = hashlib.sha256()
    for _ in range(size // BLOCK):
        digest.update(block)
    digest.update(block[: size % BLOCK])
    return digest.hexdigest()


def send(fd: int, seed: str, size: int) -> None:
    """Write the first ``size`` bytes of the stream seeded ``seed`` to ``fd``."""
    block = memoryview(pattern(seed))
    left = size
    while left:
        chunk = block[: min(left, BLOCK)]
        while chunk:
            chunk = chunk[os.write(fd, chunk) :]
        left -= min(left, BLOCK)


def close_output(fd: int) -> None:
    """Close ``fd``, our write side; on a socket, shut its write side down first.

    The tool may have given us one socket as both stdin and stdout (socat's
    and stunnel's socketpair): closing one of two descriptors sends no EOF.
    """
    if stat.S_ISSOCK(os.fstat(fd).st_mode):
        sock = socket.socket(fileno=fd)
        sock.shutdown(socket.SHUT_WR)
        sock.detach()
    os.close(fd)


def receive(fd: int, hashed: bool, report: dict[str, object]) -> None:
    """Read ``fd`` to EOF; put the byte count, timings and digest into ``report``."""
    buf = bytearray(READ_SIZE)
    view = memoryview(buf)
    digest = hashlib.sha256() if hashed else None
    total = 0
    first = None
    while n := os.readv(fd, [buf]):
        if first is None:
            first = time.monotonic()
        total += n
        if digest is not None:
            digest.update(view[:n])
    report.update(
        received=total,
        first_byte=first,
        eof=time.monotonic(),
        sha256=digest.hexdigest() if digest is not None else None,
    )


def main() -> None:
    """Parse the arguments, stream both ways at once, write the report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rfd", type=int, default=0, help="descriptor to read from")
    parser.add_argument("--wfd", type=int, default=1, help="descriptor to write to")
    parser.add_argument("--send", type=int, default=0, help="bytes to send")
    parser.add_argument("--seed", default="", help="seed of the stream sent")
    parser.add_argument("--hash", action="store_true", help="sha256 what is received")
    parser.add_argument("--hold", action="store_true", help="close the output after input EOF")
    parser.add_argument("--go", action="store_true", help="wait for one byte before sending")
    parser.add_argument("--report", required=True, help="where to write the JSON report")
    args = parser.parse_args()
    # socat sends SIGTERM to its EXEC child as it exits, which can be while
    # the child is still writing its report: let the report be finished.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.go and not os.read(args.rfd, 1):
        raise SystemExit("endpoint: input ended before the go byte")
    report: dict[str, object] = {"sent": 0}
    reader = threading.Thread(target=receive, args=(args.rfd, args.hash, report))
    reader.start()
    send(args.wfd, args.seed, args.send)
    if not args.hold:
        close_output(args.wfd)
    reader.join()
    if args.hold:
        close_output(args.wfd)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report.update(sent=args.send, cpu=usage.ru_utime + usage.ru_stime, sys=usage.ru_stime)
    tmp = f"{args.report}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f)
    os.rename(tmp, args.report)


if __name__ == "__main__":
    main()
