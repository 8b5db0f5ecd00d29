"""s6-tlsserver's pool of workers (issue 21): what the supervisor and its workers promise.

Real processes and real TLS: s6-tlsserver as a command, or its own code in
a forked child of the test where a test patches it (the object count, the
injected fault).  The applications tell the test what they see on a FIFO
(``worker_helpers.fifo_lines``); the clients run in one poll loop
(``worker_helpers.Loop``).  Every wait is on a line, a descriptor or a
pidfd (or /proc: ``wait_listening``), with a deadline; each server runs in
a process group of its own, killed and reaped at the end of its test
whatever happened.
"""

import gc
import itertools
import os
import random
import re
import resource
import select
import signal
import socket
import ssl
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import write_leaf
from OpenSSL.SSL import TLS1_2_VERSION
from server_helpers import ALLOW_LINE, END_LINE, child_pids, fd_count, tls_connect, zombies
from test_properties import APPS, Outcome, Peer, Scenario, check, payload
from tls_peer import client_context
from worker_helpers import (
    SUMMARY,
    Echo,
    Holder,
    Lines,
    Loop,
    Reports,
    Server,
    client_socket,
    process_state,
    vars_of,
    wait_listening,
    wait_reaped,
)

from s6tls.lifetime import Op
from s6tls.operations import Operations
from s6tls.serve.worker import FDS_PER_CONNECTION, FDS_SPARE, Worker

# An application that says on the FIFO ($0) when it starts (its client's port,
# its pid, its parent: the worker) and when its input ends; it echoes meanwhile.
REPORTING_CAT = (
    'printf "start %s %s %s\\n" "$TCPREMOTEPORT" $$ $PPID >"$0"; cat;'
    ' printf "eof %s\\n" "$TCPREMOTEPORT" >"$0"'
)
STREAMED = 1 << 18  # what each streaming client moves before, and again after, a reload


@pytest.fixture
def client_ctx(pki):
    return client_context(pki["ca"])


@pytest.fixture
def reports(tmp_path):
    """A FIFO the applications write their lines to, read all along."""
    fifo = Reports(tmp_path / "reports")
    yield fifo
    fifo.close()


def round_trip(conn: ssl.SSLSocket, data: bytes = b"ping") -> None:
    """``data`` there and back: the connection runs, its application too."""
    conn.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = conn.recv(len(data) - len(got))
        assert chunk, f"EOF after {got!r}"
        got += chunk
    assert got == data


def der(leaf) -> bytes:
    """A trustme leaf's certificate, DER."""
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


def hung_up(conn: ssl.SSLSocket) -> bool:
    """True if the server's end of ``conn`` is gone (EOF or reset)."""
    try:
        return conn.recv(1) == b""
    except (ConnectionResetError, ssl.SSLError):
        return True


def test_a_worker_killed_while_serving_is_logged_and_replaced_and_its_applications_see_eof(
    server_env, pki, reports
):
    """kill -9 of a worker with connections: one warning line, its applications see
    EOF on their input and are reaped (no zombie), its clients see the end, a new
    worker takes its place (--workers of them again) and serves a new connection,
    and the other worker's connections go on.  The other worker is stopped
    (SIGSTOP) meanwhile, so that only a replacement can take that connection."""
    prog = ["sh", "-c", REPORTING_CAT, str(reports.path)]
    with Server.start(["-v", "-H", "--workers", "2"], prog, server_env) as server:
        clients = [tls_connect(server.port, pki["ca"]) for _ in range(10)]
        for conn in clients:
            round_trip(conn)
        assert len(server.workers()) == 2
        started = reports.wait(r"^start (\d+) (\d+) (\d+)$", 10)
        starts = {int(m[1]): (int(m[2]), int(m[3])) for m in started}
        victim = Counter(worker for _app, worker in starts.values()).most_common(1)[0][0]
        [other] = set(server.workers()) - {victim}
        orphans = {port: app for port, (app, worker) in starts.items() if worker == victim}

        os.kill(other, signal.SIGSTOP)
        try:
            os.kill(victim, signal.SIGKILL)
            server.log.wait(rf"^s6-tlsserver: warning: worker {victim} ended with status 137$")
            reports.wait(rf"^eof ({'|'.join(map(str, orphans))})$", len(orphans))
            wait_reaped(orphans.values())  # by the supervisor, their subreaper
            assert all(hung_up(c) for c in clients if c.getsockname()[1] in orphans)
            assert process_state(other) == "T"  # long since: only a new worker can accept
            late = tls_connect(server.port, pki["ca"])
            round_trip(late)
            [late_start] = reports.wait(rf"^start {late.getsockname()[1]} \d+ (\d+)$")
        finally:
            os.kill(other, signal.SIGCONT)
        replacement = int(late_start[1])
        assert replacement not in (victim, other)
        assert server.workers() == sorted((replacement, other))
        for conn in clients:
            if conn.getsockname()[1] not in orphans:
                round_trip(conn, b"still served")
        for conn in [*clients, late]:
            conn.close()
        server.log.wait(r"info: end ", 10 - len(orphans) + 1)
        assert server.stop() == 0


def test_sighup_under_load_drops_no_connection_and_a_new_one_gets_the_new_certificate(
    ca, pki, client_ctx, tmp_path
):
    """20 connections stream both ways through cat while the certificate files are
    replaced and SIGHUP is sent: each goes on streaming past the reload and ends
    with every byte back (length and SHA-256 both ways, status 0, no warning), and
    a connection made once ``reloaded the keypairs`` is logged gets the new
    certificate, from a new worker."""
    old, new = ca.issue_cert("localhost"), ca.issue_cert("localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    write_leaf(old, cert, key)
    env = {**os.environ, "CERTFILE": str(cert), "KEYFILE": str(key)}
    with Server.start(["-v", "-H", "--workers", "2"], ["cat"], env) as server:
        loop = Loop(Echo(client_ctx, client_socket(server.port), seed=n) for n in range(20))
        clients = loop.clients
        try:
            loop.start(timeout=120)
            loop.wait(lambda: all(c.received >= STREAMED for c in clients))
            old_workers = server.workers()
            write_leaf(new, cert, key)
            os.kill(server.pid, signal.SIGHUP)
            server.log.wait("info: reloaded the keypairs$")
            with tls_connect(server.port, pki["ca"]) as fresh:
                assert fresh.getpeercert(binary_form=True) == der(new)
                round_trip(fresh)
                fresh_port = fresh.getsockname()[1]
            marks = [c.received for c in clients]
            loop.wait(
                lambda: all(c.received >= m + STREAMED for c, m in zip(clients, marks, strict=True))
            )
            for client in clients:
                client.finish()
            loop.wake()
            loop.join(timeout=60)
        finally:
            loop.close()
        assert [vars_of(c) for c in clients if not c.intact] == []
        ends = server.log.wait(END_LINE.pattern, len(clients) + 1)
        assert {int(m[2]): int(m[4]) for m in ends} == dict.fromkeys(
            [*(c.port for c in clients), fresh_port], 0
        )
        [fresh_line] = server.log.matching(rf"peer 127.0.0.1:{fresh_port} pid (\d+): sni ")
        assert int(fresh_line[1]) not in old_workers
        assert server.log.matching(r": warning: ") == []
        assert server.stop() == 0


def test_sigterm_after_a_reload_counts_the_old_workers_connections_and_lets_them_finish(
    server_env, pki
):
    """SIGHUP, then SIGTERM while a connection of the old worker runs: the one stop
    line comes at once and counts it (the old worker reports again at SIGTERM,
    though it stopped taking connections at SIGHUP), and it still finishes."""
    with Server.start(["-v", "-H", "--workers", "1"], ["cat"], server_env) as server:
        with tls_connect(server.port, pki["ca"]) as conn:
            round_trip(conn)
            os.kill(server.pid, signal.SIGHUP)
            server.log.wait("info: reloaded the keypairs$")
            round_trip(conn, b"after SIGHUP")
            os.kill(server.pid, signal.SIGTERM)
            line = "stopped accepting, 1 connection running, 0 handshakes dropped"
            server.log.wait(f"info: {line}$", timeout=10)
            round_trip(conn, b"after SIGTERM")
        assert server.wait() == 0


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_a_session_ticket_one_worker_issued_is_resumed_by_another(server_env, pki, version):
    """--workers 2: a client resumes, on another worker, the session whose ticket
    the first worker issued (SSL_SESSION_RESUMED=1 in the application's
    environment, and the client sees it resumed).  The issuer is killed first, so
    that another worker must serve the resumptions: the other one, or the
    issuer's replacement, forked later with the same ticket key."""
    tell = ["sh", "-c", 'echo "$SSL_SESSION_RESUMED $PPID"']
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.maximum_version = ssl.TLSVersion[version]

    def served(session: ssl.SSLSession | None = None) -> tuple[list[bytes], ssl.SSLSession, bool]:
        """What the application said, the session and whether it was resumed."""
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        with ctx.wrap_socket(sock, server_hostname="localhost", session=session) as conn:
            said = b""
            while chunk := conn.recv(100):  # to the end: TLS 1.3's tickets come meanwhile
                said += chunk
            return said.split(), conn.session, conn.session_reused

    with Server.start(["-v", "-H", "-S", "--workers", "2"], tell, server_env) as server:
        (issued, issuer), ticket, _reused = served()
        assert issued == b"0" and ticket.has_ticket
        os.kill(int(issuer), signal.SIGKILL)
        server.log.wait(rf"warning: worker {int(issuer)} ended with status 137$")
        resumptions = [served(ticket) for _ in range(4)]
        assert [reused for _said, _session, reused in resumptions] == [True] * 4
        said = [said for said, _session, _reused in resumptions]
        assert {resumed for resumed, _worker in said} == {b"1"}, said
        assert {int(worker) for _resumed, worker in said} <= set(server.workers())
        assert server.stop() == 0


def test_c_and_C_hold_exactly_across_workers_under_five_hundred_concurrent_connects(
    server_env, client_ctx, reports
):
    """--workers 2 -c 50 -C 30, 500 connects at once from two addresses, each client
    holding on once its application runs: exactly 50 applications run, at most 30
    from one address (each says so on the FIFO, and each is alive), no count in the
    log's lines goes above 50, and the 450 others are refused or dropped early, as
    the summed-up warnings say (their dropped ones each end 98 with no application)."""
    tell = 'printf "start %s %s %s\\n" "$TCPREMOTEIP" "$TCPREMOTEPORT" $$ >"$0"; echo ok; exec cat'
    args = ["-v", "-H", "--workers", "2", "-c", "50", "-C", "30", "-b", "1024"]
    with Server.start(args, ["sh", "-c", tell, str(reports.path)], server_env) as server:
        sources = ("127.0.0.1", "127.0.0.2")
        holders = [
            Holder(client_ctx, client_socket(server.port, sources[n % 2], wait=False))
            for n in range(500)
        ]
        loop = Loop(holders)
        try:
            loop.run(timeout=60)
            running = {(h.ip, h.port) for h in holders if h.running}
            assert len(running) == 50, [vars_of(h) for h in holders if not h.running][:5]
            starts = reports.wait(r"^start (\S+) (\d+) (\d+)$", 50)
            assert {(m[1], int(m[2])) for m in starts} == running
            assert max(Counter(m[1] for m in starts).values()) <= 30
            assert [process_state(int(m[3])) in (None, "Z") for m in starts] == [False] * 50
            _refused, dropped = summed_up(server.log, 450)
            made_room = r": dropped in the handshake, to make room$"
            server.log.wait(made_room, dropped)
            assert len(server.log.matching(made_room)) == dropped
        finally:
            loop.close()
        ends = server.log.wait(END_LINE.pattern, dropped + 50)
        assert {(m[1], int(m[2])) for m in ends if m[3] != "-"} == running
        assert {int(m[4]) for m in ends if m[3] != "-"} == {0}
        assert {int(m[4]) for m in ends if m[3] == "-"} <= {98}
        counts = [int(m[3]) for m in server.log.matching(ALLOW_LINE.pattern)]
        counts += [int(m[5]) for m in ends]
        assert max(counts) == 50
        assert server.stop() == 0


def summed_up(log, total: int) -> tuple[int, int]:
    """(refused, dropped) from the supervisor's summed-up warnings, once they add up to
    ``total``; every reason they give is one of the limits."""
    lines: list = []
    refused = dropped = 0
    while refused + dropped < total:
        lines = log.wait(SUMMARY.pattern, len(lines) + 1, timeout=15)
        refused = sum(int(m[1] or 0) for m in lines)
        dropped = sum(int(m[3] or 0) for m in lines)
    for m in lines:
        reasons = ", ".join(r for r in (m[2], m[4]) if r).split(", ")
        assert all(re.fullmatch(r"\d+ (over|for) -(c 50|C 30)", r) for r in reasons), m[0]
    assert refused + dropped == total, [m[0] for m in lines]
    return refused, dropped


CONNECTIONS = 10_000
MARKS = (1_000, CONNECTIONS)  # after these connections, the worker reports its objects


def counting_objects(report: int) -> Callable[[], None]:
    """Patches for a forked server (``Server.fork``): its worker runs with the garbage
    collector disabled, and writes ``N OBJECTS RSS_KB`` on ``report`` after the
    connections of ``MARKS`` (``Worker._forget`` is called once per finished one)."""

    def prepare() -> None:
        serve, forget = Worker.serve, Worker._forget
        finished = itertools.count(1)

        def serve_without_gc(self: Worker) -> int:
            gc.disable()
            return serve(self)

        def forget_and_count(self: Worker, conn: object) -> None:
            forget(self, conn)
            n = next(finished)
            if n in MARKS:
                rss = Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]
                os.write(report, f"{n} {len(gc.get_objects())} {rss}\n".encode())

        Worker.serve = serve_without_gc  # type: ignore[method-assign]
        Worker._forget = forget_and_count  # type: ignore[method-assign]

    return prepare


def test_a_worker_holds_no_more_objects_after_ten_thousand_connections_than_after_one_thousand(
    server_env, pki
):
    """With the garbage collector disabled in the worker, the count of objects it
    tracks after 10,000 connections is the count after 1,000, give or take a few
    connections in flight: a reference cycle per finished connection would only be
    freed by a collection, and would show here (and its RSS grows no more than
    5 MB).  The clients resume TLS 1.2 sessions, and the application is true."""
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    reports = Lines(report_r)
    try:
        with Server.fork(
            ["--workers", "1", "-H"], ["true"], server_env, counting_objects(report_w)
        ) as server:
            os.close(report_w)
            report_w = -1
            connect = ["-connect", f"127.0.0.1:{server.port}", "-CAfile", pki["ca"]]
            client = subprocess.Popen(
                ["openssl", "s_time", *connect, "-tls1_2", "-reuse", "-time", "120"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                marks = reports.wait(r"^(\d+) (\d+) (\d+)$", len(MARKS), timeout=120)
            finally:
                client.kill()
                client.wait(timeout=10)
    finally:
        if report_w >= 0:
            os.close(report_w)
        reports.close()
    (first, first_rss), (last, last_rss) = [(int(m[2]), int(m[3])) for m in marks]
    print(f"objects {first} -> {last}, RSS {first_rss} -> {last_rss} kB")
    assert last - first < 1_000, (first, last)
    assert last_rss - first_rss < 5_000, (first_rss, last_rss)


MARKER = b"a fault is injected where this is written to the application"


def injecting_a_fault() -> None:
    """Patches for a forked server: writing data with ``MARKER`` to an application
    raises RuntimeError, as a bug of ours in the middle of a connection would."""
    write_app = Operations.PERFORM[Op.WRITE_APP]

    def write_app_or_fail(self: Operations) -> None:
        if MARKER in bytes(self.m.inbound.data()):
            raise RuntimeError("injected")
        write_app(self)

    Operations.PERFORM[Op.WRITE_APP] = write_app_or_fail


def test_a_worker_at_its_descriptor_limit_leaves_new_connections_to_the_others(
    server_env, pki, reports
):
    """Connections opened one after the other mostly go to one worker (EPOLLEXCLUSIVE
    wakes the same idle one): at its ulimit -n it stops taking them, one warning says
    so, and the other worker takes them; both full, the next one waits in the
    listening queue until a connection ends, and is served then.  None fails (before,
    the full worker accepted and ended them with 111: too many open files)."""
    per_worker = 8
    prog = ["sh", "-c", REPORTING_CAT, str(reports.path)]
    with Server.start(["-v", "-H", "--workers", "2"], prog, server_env) as server:
        workers = server.workers()
        wait_listening(workers)  # set up: what they have open now, they had at their start
        limits = {}
        for pid in workers:  # room for per_worker connections, counted as the worker counts
            hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]
            limits[pid] = len(os.listdir(f"/proc/{pid}/fd")) + FDS_SPARE
            limits[pid] += FDS_PER_CONNECTION * per_worker
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (limits[pid], hard))
        held = []
        for _ in range(2 * per_worker):
            held.append(tls_connect(server.port, pki["ca"]))
            round_trip(held[-1])
        started = reports.wait(r"^start \d+ \d+ (\d+)$", 2 * per_worker)
        assert Counter(int(m[1]) for m in started) == dict.fromkeys(workers, per_worker)
        for pid in workers:
            server.log.wait(
                rf"^s6-tlsserver: warning: {per_worker} connections reach the descriptor"
                rf" limit of {limits[pid]}: not taking more until one ends$"
            )
        waiting = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        ended = held.pop(0)
        ended_port = ended.getsockname()[1]
        ended.close()
        ctx = ssl.create_default_context(cafile=pki["ca"])
        with ctx.wrap_socket(waiting, server_hostname="localhost") as late:
            round_trip(late, b"waited in the queue")
            late_port = late.getsockname()[1]
        server.log.wait(rf"allow 127\.0\.0\.1 port {late_port} count")
        lines = server.log.lines
        end_at = next(i for i, line in enumerate(lines) if f"port {ended_port} pid" in line)
        allow_at = next(i for i, line in enumerate(lines) if f"port {late_port} count" in line)
        assert allow_at > end_at  # taken only once a connection had ended
        for conn in held:
            round_trip(conn, b"all still served")
            conn.close()
        assert server.stop() == 0
    assert not server.log.matching("Too many open files| status 111 ")


def test_a_fault_while_serving_one_connection_ends_it_alone_and_fifty_others_finish_intact(
    server_env, client_ctx
):
    """--workers 1 serves 51 connections at once through cat; writing one of them
    to its application raises an exception (patched in): that connection alone
    ends, status 111, with one warning naming its client, while the 50 others move
    256 KiB each way intact (length and SHA-256), status 0, in the same worker."""
    args = ["-v", "-H", "--workers", "1", "-c", "60", "-C", "60"]
    with Server.fork(args, ["cat"], server_env, injecting_a_fault) as server:
        clients = [
            Echo(client_ctx, client_socket(server.port), size=1 << 18, seed=n) for n in range(50)
        ]
        faulty = Echo(client_ctx, client_socket(server.port), data=MARKER)
        loop = Loop([*clients, faulty])
        try:
            loop.run(timeout=60)
        finally:
            loop.close()
        assert [vars_of(c) for c in clients if not c.intact] == []
        assert faulty.received == 0 and faulty.ending in ("eof", "reset"), vars_of(faulty)
        ends = server.log.wait(END_LINE.pattern, 51)
        statuses = {int(m[2]): int(m[4]) for m in ends}
        assert statuses == {**dict.fromkeys((c.port for c in clients), 0), faulty.port: 111}
        [worker] = server.workers()
        warning = (
            f"peer 127.0.0.1:{faulty.port} pid {worker}: internal error: RuntimeError: injected"
        )
        assert [m[0] for m in server.log.matching(": warning: .*")] == [f": warning: {warning}"]
        assert {int(m[1]) for m in server.log.matching(r": peer \S+ pid (\d+): ")} == {worker}
        assert server.stop() == 0


class Driven:
    """A ``test_properties.Peer`` (one scenario's client), driven by ``Loop``."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.fd = peer.sock.fileno()
        self.port = peer.sock.getsockname()[1]

    def fileno(self) -> int:
        return self.fd

    def events(self) -> int:
        peer = self.peer
        reading = select.POLLIN if peer.ending is None else 0
        return reading | (select.POLLOUT if peer.out and not peer.send_failed else 0)

    @property
    def done(self) -> bool:
        return self.peer._finished()

    def step(self) -> None:
        """As ``Peer.run`` does between two waits: step until there is something to
        wait for (a step may write out the last bytes, and the next one sends the FIN)."""
        for _ in range(100):
            if self.done:
                return
            self.peer._step()
            if self.events() and not (self.peer.fin_pending and not self.peer.out):
                return  # (a FIN still to send once the last bytes went: step again)
        raise AssertionError(f"a peer that waits for nothing: {vars_of(self)}")

    def on_event(self, revents: int) -> None:
        if revents & (select.POLLIN | select.POLLHUP | select.POLLERR) and self.peer.ending is None:
            self.peer._read()
        if revents & select.POLLOUT and not self.done:
            self.peer._write()
        self.step()

    def close(self) -> None:
        if not self.peer.sock_closed:
            self.peer.sock.close()


def small_scenarios(rng: random.Random, count: int) -> list[Scenario]:
    """``count`` scenarios as test_properties draws them, smaller: at most 20 kB each way,
    and 1 to 16-byte records or writes only for at most 2 kB (one process drives them all)."""

    def size() -> int:
        return rng.choice((rng.randint(0, 64), rng.randint(0, 20_000)))

    def chunks(small: bool, big: tuple[int, int]) -> tuple[int, ...]:
        tiny = small and rng.random() < 0.3
        return tuple(
            rng.randint(1, 16) if tiny else rng.randint(*big) for _ in range(rng.randint(1, 4))
        )

    found_by_test_properties = Scenario(False, 7, 0, (1,), (1,), "app", "fin", "exit")
    out = [found_by_test_properties]
    while len(out) < count:
        up, down = size(), size()
        out.append(
            Scenario(
                tls12=rng.random() < 0.5,
                up=up,
                down=down,
                records=chunks(up <= 2_000, (512, 20_000)),
                wire=chunks(up <= 2_000, (1_000, 70_000)),
                first=rng.choice(sorted(APPS)),
                peer_end=rng.choice(("close_notify", "fin", "rst")),
                app_end=rng.choice(("exit", "killed")),
            )
        )
    return out


def as_tlsd_said(lines: list[str]) -> str:
    """The server's warnings about one connection, as s6-tlsd serving it alone would
    have ended: ``s6-tlsd: fatal: ...`` (what test_properties' ``check`` reads)."""
    return "".join(f"s6-tlsd: fatal: {line}\n" for line in lines)


RANDOM_ENDINGS = int(os.environ.get("N", 1000))


@pytest.mark.parametrize("strict", [False, True], ids=["j", "J"])
@pytest.mark.parametrize("close_notify", [False, True], ids=["s", "S"])
def test_a_thousand_concurrent_connections_with_random_endings_each_end_as_documented(
    close_notify, strict, tmp_path, pki
):
    """The lifetime property test through one s6-tlsserver's loops: 1,000 peers at
    once (test_properties' Peer, in one poll loop), each connection with its own
    random scenario (TLS 1.2 or 1.3, sizes, records and writes, who closes first,
    the peer's end, the application's), its application picking it by
    TCPREMOTEPORT.  Each one ends as test_properties' ``check`` requires of
    s6-tlsd alone (prefixes, everything on a clean end, the status of its end line,
    its warnings), nothing hangs, and the server is as it was: the same workers,
    no zombie, no descriptor left."""
    seed = int(os.environ.get("S6TLS_SEED", random.randrange(1 << 32)))
    scenarios = small_scenarios(random.Random(seed), RANDOM_ENDINGS)
    opts = ["-S" if close_notify else "-s", "-J" if strict else "-j"]
    args = ["-v", "-H", "--workers", "2", "-c", "1100", "-C", "1100", "-K", "60000", *opts]
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "CERTFILE": pki["server_cert"],
        "KEYFILE": pki["server_key"],
    }
    contexts = {
        tls12: client_context(pki["ca"], TLS1_2_VERSION if tls12 else None)
        for tls12 in (False, True)
    }
    chosen = ["sh", "-c", 'exec sh "$0/$TCPREMOTEPORT"', str(tmp_path)]
    with Server.start(args, chosen, env) as server:
        warm = client_socket(server.port)
        (tmp_path / str(warm.getsockname()[1])).write_text("exec cat\n")
        with ssl.create_default_context(cafile=pki["ca"]).wrap_socket(
            warm, server_hostname="localhost"
        ) as conn:
            round_trip(conn)
        server.log.wait(END_LINE.pattern)
        workers = server.workers()
        assert len(workers) == 2
        fds = {pid: fd_count(pid) for pid in (server.pid, *workers)}

        peers, payloads = [], []
        for n, sc in enumerate(scenarios):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            up, down = payload(sc.up, 2 * n), payload(sc.down, 2 * n + 1)
            (tmp_path / f"{port}.send").write_bytes(down)
            body = APPS[sc.first].replace(
                "$END", "exit 0" if sc.app_end == "exit" else "kill -9 $$"
            )
            (tmp_path / str(port)).write_text(
                f"SEND={tmp_path}/{port}.send RECV={tmp_path}/{port}.recv\n{body}\n"
            )
            sock.settimeout(10)
            sock.connect(("127.0.0.1", server.port))
            peers.append(Driven(Peer(contexts[sc.tls12], sock, sc, up)))
            payloads.append((up, down))
        loop = Loop(peers)
        try:
            loop.run(timeout=120)
        finally:
            loop.close()
        ends = server.log.wait(END_LINE.pattern, 1 + len(peers), timeout=60)
        codes = {int(m[2]): int(m[4]) for m in ends}
        said: dict[int, list[str]] = {}
        for m in server.log.matching(r": warning: peer 127\.0\.0\.1:(\d+) pid \d+: (.*)$"):
            said.setdefault(int(m[1]), []).append(m[2])
        classes: Counter[str] = Counter()
        for driven, sc, (up, down) in zip(peers, scenarios, payloads, strict=True):
            recv = tmp_path / f"{driven.port}.recv"
            out = Outcome(
                codes[driven.port],
                as_tlsd_said(said.get(driven.port, [])),
                bytes(driven.peer.got),
                driven.peer.ending or "",
                recv.read_bytes() if recv.exists() else None,
            )
            try:
                classes[check(sc, close_notify, strict, out, up, down)] += 1
            except AssertionError as exc:
                raise AssertionError(f"seed {seed}: {sc}: {out}") from exc
        print(f"{' '.join(opts)} seed {seed}: {dict(classes)}")

        assert server.workers() == workers
        assert server.log.matching(r"warning: worker ") == []
        assert [zombies(pid) for pid in workers] == [[], []]
        wait_reaped(set(child_pids(server.pid)) - set(workers))  # what killed shells left
        assert {pid: fd_count(pid) for pid in fds} == fds
        assert server.stop() == 0
