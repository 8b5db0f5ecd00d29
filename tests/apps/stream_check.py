"""A UCSPI application that streams N bytes each way and checks them by SHA-256.

Usage: stream_check.py N RFD WFD [OUT].  Writes N pseudo-random bytes on WFD
while it reads N bytes from RFD (or up to its end, if it comes first), then
closes WFD: a peer that cannot half-close (OpenSSL's s_server, which ends
the connection at the first close_notify or EOF) still gets and sends it
all.  Both sides' data is the same deterministic stream, so the peer's copy
can be checked without holding it.  Writes ``sent SHA received
SHA COUNT`` to OUT (default: stderr) and exits 0 if what it received is
exactly the stream's first N bytes, 1 otherwise.
"""

import hashlib
import os
import sys
import threading

BLOCK = hashlib.sha256(b"s6tls stream").digest() * 2048  # 64 KiB, the same each run


def stream(n: int):
    """The first ``n`` bytes of the stream, in pieces of at most 64 KiB."""
    while n > 0:
        piece = BLOCK[: min(n, len(BLOCK))]
        n -= len(piece)
        yield piece


def stream_sha256(n: int) -> str:
    h = hashlib.sha256()
    for piece in stream(n):
        h.update(piece)
    return h.hexdigest()


def main() -> int:
    n, rfd, wfd = (int(a) for a in sys.argv[1:4])
    sent = hashlib.sha256()

    def send() -> None:
        for piece in stream(n):
            view = memoryview(piece)
            while view:
                view = view[os.write(wfd, view) :]
            sent.update(piece)

    sender = threading.Thread(target=send)
    sender.start()
    got = hashlib.sha256()
    total = 0
    while total < n and (chunk := os.read(rfd, min(65536, n - total))):
        got.update(chunk)
        total += len(chunk)
    sender.join()
    os.close(wfd)
    line = f"sent {sent.hexdigest()} received {got.hexdigest()} {total}\n"
    if len(sys.argv) > 4:
        with open(sys.argv[4], "w") as f:
            f.write(line)
    else:
        sys.stderr.write(line)
    return 0 if total == n and got.hexdigest() == stream_sha256(n) else 1


if __name__ == "__main__":
    sys.exit(main())
