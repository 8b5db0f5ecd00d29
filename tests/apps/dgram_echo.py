"""A datagram application for s6-dtlsserver: echo each datagram, and log it.

Reads datagrams on fd 0 (one end of a SOCK_SEQPACKET socketpair), writes
each back on fd 1 (the same socket), and appends it, with its length, to
the file named by its argument (if any), as ``length data\\n``.  Exits 0 at
the end of its input.
"""

import os
import sys

log = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT) if len(sys.argv) > 1 else -1
while data := os.read(0, 1 << 16):
    if log >= 0:
        os.write(log, b"%d %s\n" % (len(data), data))
    os.write(1, data)
