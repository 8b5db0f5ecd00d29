"""engine.run for real: two engine processes, real handshakes, sockets and pipes."""

import hashlib
import os
import shutil
import socket
import subprocess
import threading

import pytest
from engine_harness import Stream, contexts, start_engine, transport
from OpenSSL import SSL

MiB = 1 << 20


def pair(pki, kind="socketpair", max_version=None, server_app=None, **options):
    """A server engine and a client engine talking to each other over ``kind``."""
    sctx, cctx = contexts(pki, max_version)
    net_s, net_c = transport(kind)
    server = start_engine("server", sctx, net_s, app=server_app, **options)
    client = start_engine("client", cctx, net_c, **options)
    return server, client


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("kind", ["socketpair", "pipes"])
@pytest.mark.parametrize("close_notify", [False, True], ids=["s", "S"])
@pytest.mark.parametrize("strict", [False, True], ids=["j", "J"])
@pytest.mark.parametrize("first", ["server", "client"])
def test_32_mib_each_way_at_once_arrive_intact_or_fail_as_documented(
    pki, kind, close_notify, strict, first
):
    server, client = pair(pki, kind, close_notify=close_notify, strict_close_notify=strict)
    data = {"server": os.urandom(32 * MiB), "client": os.urandom(32 * MiB)}
    engines = {"server": server, "client": client}
    late = "client" if first == "server" else "server"
    late_may_close = threading.Event()
    streams = {
        first: Stream(engines[first], data[first]),
        late: Stream(engines[late], data[late], late_may_close),
    }
    # The late side ends its output only once the first side's end reached it.
    threading.Thread(
        target=lambda: (streams[late].received.wait(60), late_may_close.set()), daemon=True
    ).start()
    for stream in streams.values():
        stream.join()
    reports = {name: engine.wait() for name, engine in engines.items()}
    for report in reports.values():
        assert report.get("left_open") == [], report
    # TLS 1.3: under -s as under -S each end is a close_notify, so -J is satisfied.
    assert reports == {name: {**r, "ret": None} for name, r in reports.items()}, (
        reports
    )  # both returned None: a clean end
    assert streams[late].count == 32 * MiB
    assert streams[late].digest.hexdigest() == digest(data[first])
    assert streams[first].count == 32 * MiB
    assert streams[first].digest.hexdigest() == digest(data[late])


@pytest.mark.parametrize("close_notify", [False, True], ids=["s", "S"])
def test_one_direction_ends_while_the_other_streams_8_mib(pki, close_notify):
    server, client = pair(pki, close_notify=close_notify)
    payload = os.urandom(8 * MiB)
    done = threading.Event()
    quiet = Stream(client, b"", done)  # sends nothing... but only closes at the end
    quiet_first = Stream(server, payload)
    # the client closed nothing yet; now let it end first, while the server still sends
    done.set()
    quiet.join()
    quiet_first.join()
    assert quiet.count == 8 * MiB and quiet.digest.hexdigest() == digest(payload)
    for engine in (server, client):
        report = engine.wait()
        assert report["ret"] is None and report["left_open"] == [], report


def test_tls12_with_S_answers_a_close_notify_at_once_and_ends_both_ways(pki):
    server, client = pair(pki, max_version=SSL.TLS1_2_VERSION, close_notify=True)
    never = threading.Event()
    first = Stream(client, b"bye")  # ends at once: close_notify under -S
    late = Stream(server, os.urandom(8 * MiB), never)  # would go on sending
    first.join()
    never.set()
    late.join()
    reports = server.wait(), client.wait()
    assert all(r.get("ret") is None and r["left_open"] == [] for r in reports), reports
    assert late.count == 3  # what the client sent arrived
    assert first.count < 8 * MiB  # the documented cost of -S under TLS 1.2


def test_peer_eof_without_close_notify_is_an_eof_with_j_and_an_error_with_J(pki):
    """-s under TLS 1.2 ends with a bare half-close: -J takes it for a truncation."""
    for strict, expected in ((False, None), (True, "TlsRuntimeError")):
        server, client = pair(
            pki, max_version=SSL.TLS1_2_VERSION, close_notify=False, strict_close_notify=strict
        )
        s = Stream(server, b"hello")
        c = Stream(client, b"world")
        s.join()
        c.join()
        reports = [server.wait(), client.wait()]
        if expected is None:
            assert [r["ret"] for r in reports] == [None, None], reports
            assert s.digest.hexdigest() == digest(b"world")
        else:
            assert expected in {r.get("error") for r in reports}, reports


@pytest.mark.parametrize("kind", ["socketpair", "pipes"])
def test_an_application_that_exits_with_data_in_flight_still_gets_it_delivered(pki, kind):
    app = ["sh", "-c", "head -c 1000000 /dev/zero; exit 7"]  # never reads its input
    server, client = pair(pki, kind, server_app=app, close_notify=True)
    c = Stream(client, os.urandom(8 * MiB))
    c.join()
    server_report, client_report = server.wait(), client.wait()
    assert server_report["app_reaped"] is True, server_report  # run waited for it
    status = server_report["ret"]
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7
    assert server_report["left_open"] == []
    assert c.count == 1000000 and c.digest.hexdigest() == digest(bytes(1000000))
    assert client_report["left_open"] == []


def test_a_stalled_reader_keeps_engine_memory_bounded(pki):
    server, client = pair(pki, "socketpair")
    resume = threading.Event()
    sink = Stream(server, b"", read_after=resume)  # the server's application stops reading
    source = Stream(client, os.urandom(64 * MiB))
    threading.Event().wait(2)  # the scenario: the reader is stalled for 2 s
    resume.set()
    sink.join()
    source.join()
    for engine in (server, client):
        report = engine.wait()
        assert report["ret"] is None, report
        growth = report["hwm_after"] - report["rss_before"]
        assert growth < 1024, f"engine memory grew by {growth} kB"
    assert sink.count == 64 * MiB


def test_an_idle_connection_is_closed_after_the_idle_timeout(pki):
    server, client = pair(pki, idle_timeout=0.5)
    hold = threading.Event()
    streams = [Stream(server, b"", hold), Stream(client, b"", hold)]
    for s in streams:
        assert s.received.wait(30), "the idle timeout did not close the connection"
    hold.set()
    for s in streams:
        s.join()
    for engine in (server, client):
        report = engine.wait()
        assert report["ret"] is None and report["left_open"] == [], report


def test_an_active_connection_is_not_cut_by_the_idle_timeout(pki):
    server, client = pair(pki, idle_timeout=1.0)
    payload = os.urandom(8 * 1000)
    slow = Stream(client, payload, pause=0.3, chunk=1000)  # 2.1 s of activity, > 1 s idle
    echo = Stream(server, b"")
    slow.join()
    echo.join()
    assert echo.count == len(payload) and echo.digest.hexdigest() == digest(payload)
    for engine in (server, client):
        assert engine.wait()["ret"] is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openssl_s_client_talks_to_the_engine(pki):
    assert shutil.which("openssl")
    sctx, _cctx = contexts(pki)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    s_client = subprocess.Popen(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-quiet", "-no_ign_eof"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    conn, _addr = listener.accept()
    listener.close()
    fd = conn.detach()
    server = start_engine("server", sctx, (fd, fd), close_notify=True)
    reply = b"hello from the engine\n"
    done = threading.Event()
    app = Stream(server, reply, done)
    assert s_client.stdout.read(len(reply)) == reply
    payload = os.urandom(300000).hex().encode() + b"\n"
    s_client.stdin.write(payload)
    s_client.stdin.close()  # s_client sends close_notify and leaves
    app.received.wait(30)
    done.set()
    app.join()
    assert s_client.wait(timeout=30) == 0
    assert app.digest.hexdigest() == digest(payload)
    report = server.wait()
    assert report["ret"] is None and report["left_open"] == [], report


def test_the_engine_talks_to_openssl_s_server(pki):
    port = free_port()
    s_server = subprocess.Popen(
        [
            "openssl",
            "s_server",
            "-accept",
            str(port),
            "-naccept",
            "1",
            "-rev",
            "-cert",
            pki["server_cert"],
            "-key",
            pki["server_key"],
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        while b"ACCEPT" not in s_server.stdout.readline():
            pass
        _sctx, cctx = contexts(pki)
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.settimeout(None)
        fd = sock.detach()
        client = start_engine("client", cctx, (fd, fd), close_notify=True)
        got_all = threading.Event()
        app = Stream(client, b"hello\nworld\n", got_all)
        expected = b"olleh\ndlrow\n"
        while app.count < len(expected) and not app.received.is_set():
            app.received.wait(0.05)
        got_all.set()
        app.join()
        assert app.digest.hexdigest() == digest(expected)
        report = client.wait()
        assert report.get("ret") is None and report["left_open"] == [], report
    finally:
        s_server.kill()
        s_server.wait(timeout=10)
