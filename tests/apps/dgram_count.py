"""A datagram application for s6-dtlsclient: N numbered datagrams out, each echo counted.

Sends ``N`` (its argument) datagrams ``0``, ``1``... on fd 7, then reads on
fd 6 until every number came back.  Prints ``got N of N, D duplicates`` and
exits 0 when each came back exactly once, 1 otherwise (a duplicate, or its
input ended first).
"""

import os
import sys

count = int(sys.argv[1])
for i in range(count):
    os.write(7, b"%d" % i)
got: set[int] = set()
duplicates = 0
while len(got) < count:
    data = os.read(6, 1 << 16)
    if not data:
        break
    number = int(data)
    duplicates += number in got
    got.add(number)
print(f"got {len(got)} of {count}, {duplicates} duplicates", flush=True)
sys.exit(0 if len(got) == count and not duplicates else 1)
