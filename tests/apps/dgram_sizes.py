"""A datagram application for s6-dtlsclient: every size from 1 to a limit, echoed back.

Sends on fd 7 one datagram of each size from 1 to ``SSL_DTLS_MAX_DATAGRAM``
(or the limit given as argument), each a pattern of its own, and checks
that the next datagram on fd 6 is the same, whole.  Then one datagram a
byte over the limit, then ``end``: the next one back must be ``end`` (the
big one was refused, not split).  Prints ``sizes 1..N echoed, the larger
one refused`` and exits 0, or prints what went wrong and exits 1.
"""

import os
import sys

limit = int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ["SSL_DTLS_MAX_DATAGRAM"])
for size in range(1, limit + 1):
    data = bytes((size + i) % 256 for i in range(size))
    os.write(7, data)
    back = os.read(6, 1 << 16)
    if back != data:
        print(f"size {size}: got {len(back)} bytes back, not the same", flush=True)
        sys.exit(1)
os.write(7, b"x" * (limit + 1))
os.write(7, b"end")
back = os.read(6, 1 << 16)
if back != b"end":
    print(f"after the oversize datagram: got {len(back)} bytes", flush=True)
    sys.exit(1)
print(f"sizes 1..{limit} echoed, the larger one refused", flush=True)
