"""``python -m bench.dtls``: DTLS handshakes and datagrams per second, beside s_server -dtls.

Two servers stay up for the whole run and take turns, round after round:

- ``s6-dtlsserver -q``, one child per association, each running ``cat >&2``
  (the datagrams it receives go to the server's stderr, which this process
  reads);
- ``openssl s_server -dtls -quiet``, one process serving one association at
  a time, which prints what it receives on its stdout: the C reference,
  with no process per association at all.

The client is the same for both: one pyOpenSSL DTLS client in this process
(``tests/dtls_peer.DtlsClient``), so that the client's cost is the same.

- handshakes: full handshakes one after the other (a close_notify after
  each) for ``--seconds``; the rate, and the server's CPU milliseconds per
  handshake (the time of its whole process tree, workers and the children
  they reaped included, from ``/proc/PID/stat``: ``common.tree_cpu``);
- datagrams: one association carries ``--count`` datagrams of ``--size``
  bytes, at most ``WINDOW`` of them not yet delivered to the application;
  the rate is the count over the time until the application has them all.
  A datagram that never arrives fails the run (nothing is lost on loopback
  with a window).

Prints one line per run and a summary with medians and the ratio
s6-dtlsserver / s_server; exits 1 if a run of s6-dtlsserver failed.
"""

import argparse
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from .common import (
    ROOT,
    BenchError,
    Pki,
    Processes,
    become_subreaper,
    compare,
    program,
    scratch,
    summary,
    tree_cpu,
    wait_listening,
)

sys.path.insert(0, str(ROOT / "tests"))
from dtls_peer import DtlsClient, free_udp_port

WINDOW = 64  # datagrams sent and not yet delivered, at most
SERVERS = ("s6-dtlsserver", "openssl-s_server")


class Delivered:
    """Counts the bytes a server's application writes out, read from ``fd`` by a thread."""

    def __init__(self, fd: int) -> None:
        self.bytes = 0
        self.changed = threading.Condition()
        threading.Thread(target=self._read, args=(fd,), daemon=True).start()

    def _read(self, fd: int) -> None:
        while data := os.read(fd, 1 << 16):
            with self.changed:
                self.bytes += len(data)
                self.changed.notify_all()

    def wait_for(self, target: int, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.bytes >= target, timeout)


def start_servers(procs: Processes, pki: Pki) -> dict[str, tuple[int, int, Delivered]]:
    """Both servers: name -> (port, pid, what its application delivered)."""
    env = {"CERTFILE": pki.cert, "KEYFILE": pki.key}
    ours = procs.start(
        [*program("s6-dtlsserver"), "-q", "-1", "-c", "1000", "-C", "1000",
         "127.0.0.1", "0", "sh", "-c", "exec cat >&2"],
        env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert ours.stdout is not None and ours.stderr is not None
    port = int(ours.stdout.readline())
    servers = {"s6-dtlsserver": (port, ours.pid, Delivered(ours.stderr.fileno()))}
    port = free_udp_port()
    theirs = procs.start(
        ["openssl", "s_server", "-dtls", "-quiet", "-accept", f"127.0.0.1:{port}",
         "-cert", pki.cert, "-key", pki.key],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert theirs.stdout is not None
    wait_listening(port, theirs, udp=True)
    servers["openssl-s_server"] = (port, theirs.pid, Delivered(theirs.stdout.fileno()))
    return servers


def handshakes(port: int, cafile: str, seconds: float) -> tuple[float, int]:
    """Full handshakes one after the other for ``seconds``: (per second, how many)."""
    count = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        client = DtlsClient(port, cafile)
        client.handshake(timeout=10)
        client.close_notify()
        client.close()
        count += 1
    return count / (time.monotonic() - start), count


def datagrams(port: int, cafile: str, delivered: Delivered, count: int, size: int) -> float:
    """``count`` datagrams of ``size`` bytes through one association: datagrams per second."""
    client = DtlsClient(port, cafile)
    client.handshake(timeout=10)
    payload = b"d" * (size - 1) + b"\n"
    base = delivered.bytes
    start = time.monotonic()
    for sent in range(count):
        if not delivered.wait_for(base + (sent - WINDOW) * size, 10):
            raise BenchError(f"datagram {sent - WINDOW} never arrived")
        client.send(payload)
    if not delivered.wait_for(base + count * size, 10):
        raise BenchError(f"{(delivered.bytes - base) // size} of {count} datagrams arrived")
    rate = count / (time.monotonic() - start)
    client.close_notify()
    client.close()
    return rate


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.dtls", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="per handshake run")
    parser.add_argument("--count", type=int, default=20000, help="datagrams per run")
    parser.add_argument("--size", type=int, default=100, help="bytes per datagram")
    args = parser.parse_args(argv)
    become_subreaper()
    rates: dict[str, list[float | None]] = {s: [] for s in SERVERS}
    cpu: dict[str, list[float | None]] = {s: [] for s in SERVERS}
    flow: dict[str, list[float | None]] = {s: [] for s in SERVERS}
    failed = []
    with scratch() as tmp, Processes() as procs:
        pki = Pki.make(tmp)
        servers = start_servers(procs, pki)
        for round_no in range(1, args.rounds + 1):
            for name, (port, pid, delivered) in servers.items():
                try:
                    before = tree_cpu(pid)
                    per_second, made = handshakes(port, pki.ca, args.seconds)
                    ms = (tree_cpu(pid) - before) * 1000 / made
                    dps = datagrams(port, pki.ca, delivered, args.count, args.size)
                except (BenchError, TimeoutError, OSError) as exc:
                    failed.append(f"{name} round {round_no}: {exc}")
                    print(f"round {round_no} {name}: FAILED {exc}", flush=True)
                    for values in (rates, cpu, flow):
                        values[name].append(None)
                    continue
                rates[name].append(per_second)
                cpu[name].append(ms)
                flow[name].append(dps)
                print(
                    f"round {round_no} {name}: {per_second:.0f} handshakes/s,"
                    f" {ms:.2f} ms server CPU each; {dps:.0f} datagrams/s of {args.size} bytes",
                    flush=True,
                )
    print(f"\nmedians over {args.rounds} rounds (one client, loopback):")
    for name in SERVERS:
        h, c, d = summary(rates[name]), summary(cpu[name]), summary(flow[name])
        print(
            f"  {name}: {h['median'] or 0:.0f} handshakes/s ({c['median'] or 0:.2f} ms server CPU"
            f" each), {d['median'] or 0:.0f} datagrams/s"
        )
    ours, theirs = SERVERS
    for what, values in (("handshakes/s", rates), ("datagrams/s", flow)):
        ratio = compare(values[ours], values[theirs])["ratio"]
        print(f"  {what}: s6-dtlsserver / s_server = {ratio or 0:.2f}")
    for line in failed:
        print(f"FAILED {line}")
    return 1 if any(line.startswith(ours) for line in failed) else 0


if __name__ == "__main__":
    sys.exit(main())
