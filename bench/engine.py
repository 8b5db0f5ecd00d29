"""``python -m bench.engine``: the engine alone, 256 MiB one way, socketpair and pipes.

Two ``s6tls.engine.run`` loops in forked children (the test suite's harness,
``tests/engine_harness.py``), a real TLS 1.3 handshake between them, the
ciphertext over one socketpair or over two pipes; this process writes the
same 1 MiB block 256 times into the client engine's cleartext pipe and counts
what comes out of the server engine's.  Prints MB/s, the two engines' CPU
(user+sys, from their rusage) per GB, and their memory growth (VmHWM after
the run minus VmRSS before it).  Exits 1 if a byte is missing.
"""

import os
import resource
import sys
import threading
import time

from .common import ROOT, Pki, scratch

sys.path.insert(0, str(ROOT / "tests"))
from engine_harness import contexts, start_engine, transport

SIZE = 256 << 20
BLOCK = os.urandom(1 << 20)
ROUNDS = 3


def one_way(pki: dict[str, str], kind: str) -> tuple[float, float, int]:
    """One transfer of SIZE bytes: (seconds, CPU seconds of both engines, server growth kB)."""
    sctx, cctx = contexts(pki)
    net_s, net_c = transport(kind)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server = start_engine("server", sctx, net_s)
    client = start_engine("client", cctx, net_c)
    os.close(server.to_engine)  # the server's application sends nothing

    def write() -> None:
        for _ in range(SIZE // len(BLOCK)):
            view = memoryview(BLOCK)
            while view:
                view = view[os.write(client.to_engine, view) :]
        os.close(client.to_engine)

    writer = threading.Thread(target=write)
    started = time.perf_counter()
    writer.start()
    count = 0
    while chunk := os.read(server.from_engine, 1 << 20):
        count += len(chunk)
    seconds = time.perf_counter() - started
    writer.join()
    while os.read(client.from_engine, 1 << 16):
        pass
    for fd in (server.from_engine, client.from_engine):
        os.close(fd)
    report = server.wait()
    client.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if count != SIZE or report.get("ret", 0) is not None:
        raise SystemExit(f"bench.engine: FAILED {kind}: {count} of {SIZE} bytes, {report}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu, report["hwm_after"] - report["rss_before"]


def main() -> None:
    with scratch() as tmp:
        made = Pki.make(tmp)
        pki = {"ca": made.ca, "server_cert": made.cert, "server_key": made.key}
        for kind in ("socketpair", "pipes"):
            for _ in range(ROUNDS):
                seconds, cpu, growth = one_way(pki, kind)
                print(
                    f"engine {kind}: 256 MiB one way in {seconds:.2f} s ="
                    f" {SIZE / seconds / 1e6:.0f} MB/s, engines' CPU {cpu / (SIZE / 1e9):.2f} s/GB,"
                    f" server memory growth {growth} kB"
                )


if __name__ == "__main__":
    main()
