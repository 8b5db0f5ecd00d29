"""A UCSPI client application: send N random bytes on fd 7, expect them back on fd 6.

Usage: echo_check.py N.  Writes and reads at the same time (full duplex).
Exits 0 if exactly the bytes sent came back, 1 otherwise, and prints the
SHA-256 of both sides on stderr.
"""

import hashlib
import os
import sys
import threading

n = int(sys.argv[1])
data = os.urandom(n)


def send() -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(7, view[:65536]) :]
    os.close(7)


sender = threading.Thread(target=send)
sender.start()
got = hashlib.sha256()
total = 0
while chunk := os.read(6, 65536):
    got.update(chunk)
    total += len(chunk)
sender.join()
sent = hashlib.sha256(data).hexdigest()
sys.stderr.write(f"sent {n} {sent} got {total} {got.hexdigest()}\n")
sys.exit(0 if total == n and got.hexdigest() == sent else 1)
