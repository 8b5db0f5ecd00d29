"""TLS 1.3 half-close by the book, against the servers and clients people run.

The README's client example, ``CAFILE=ca.pem s6-tlsclient localhost PORT sh -c
'echo hello >&7; exec 7>&-; cat <&6'``, runs ``RUNS`` times against each of
stunnel4 (``exec = /bin/cat``), Debian's ``openssl s_server`` (3.0, ``-rev``)
and a Python ``ssl`` server that answers once the request has ended with a
close_notify, and takes an EOF without one for the truncation it is.  On the
server side, ``curl`` and ``openssl s_client`` talk ``RUNS`` times each to an
application that answers, closes its output and keeps reading (curl forgives
a bare EOF there: its trace must show our close_notify).

These peers are OpenSSL 3: an EOF without close_notify is an error to them,
often before they answer.  Under TLS 1.3 our end is a close_notify, then the
half-close (RFC 8446 6.1), under -s as under -S.  Every run must deliver
every byte and end with the application's status.
"""

import contextlib
import os
import socket
import socketserver
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import STARTED, program
from openssl_peer import s_client
from server_helpers import END_LINE, free_port, serving
from test_faults import s_server, wait_listening

RUNS = 50
CLIENT_APP = ["sh", "-c", "echo hello >&7; exec 7>&-; cat <&6"]
# Answers the first line, closes its output, reads the rest to the end, exits 0.
SERVER_APP = [
    "sh",
    "-c",
    'read -r l; printf "HTTP/1.0 200 OK\\r\\n\\r\\nhello\\n"; exec >&-; cat >/dev/null',
]


def readme_client(port: int, cafile: str) -> subprocess.CompletedProcess:
    """The README's client example, once."""
    return subprocess.run(
        [*program("s6-tlsclient"), "localhost", str(port), *CLIENT_APP],
        env={**os.environ, "CAFILE": cafile},
        capture_output=True,
        timeout=30,
    )


def runs(once: Callable[[], subprocess.CompletedProcess]) -> list[subprocess.CompletedProcess]:
    """``RUNS`` runs of ``once``, two at a time (the start of a Python program is most of one)."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda _: once(), range(RUNS)))


def failures(results: list[subprocess.CompletedProcess], answer: bytes) -> list[tuple]:
    return [
        (r.returncode, r.stdout, r.stderr)
        for r in results
        if (r.returncode, r.stdout, r.stderr) != (0, answer, b"")
    ]


@contextlib.contextmanager
def stunnel(pki: dict[str, str], tmp_path) -> Iterator[int]:
    port = free_port()
    conf = tmp_path / "stunnel.conf"
    conf.write_text(
        "foreground = yes\npid =\n[echo]\n"
        f"accept = 127.0.0.1:{port}\ncert = {pki['server_cert']}\nkey = {pki['server_key']}\n"
        "exec = /bin/cat\nexecArgs = cat\n"
    )
    proc = subprocess.Popen(["stunnel4", str(conf)], stderr=subprocess.PIPE)
    STARTED.append(proc)
    wait_listening(port, proc)
    yield port
    proc.terminate()
    proc.communicate(timeout=30)


class _Strict(socketserver.BaseRequestHandler):
    """Reads the request to its close_notify (an EOF without one raises), then answers it."""

    context: ssl.SSLContext

    def handle(self) -> None:
        self.request.setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
        )  # no delayed close_notify
        with self.context.wrap_socket(
            self.request, server_side=True, suppress_ragged_eofs=False
        ) as tls:
            request = b""
            while chunk := tls.recv(65536):
                request += chunk
            tls.sendall(request)
            tls.unwrap()  # our close_notify


@contextlib.contextmanager
def python_ssl_server(pki: dict[str, str]) -> Iterator[int]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki["server_cert"], pki["server_key"])
    handler = type("Handler", (_Strict,), {"context": context})
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield server.server_address[1]
        server.shutdown()
        thread.join(30)


def test_the_readme_client_example_against_stunnel4(pki, tmp_path):
    with stunnel(pki, tmp_path) as port:
        results = runs(lambda: readme_client(port, pki["ca"]))
    assert failures(results, b"hello\n") == []


def test_the_readme_client_example_against_openssl_s_server(pki):
    server, port = s_server(pki, "-rev", "-naccept", str(RUNS))
    STARTED.append(server)
    results = runs(lambda: readme_client(port, pki["ca"]))
    server.communicate(timeout=30)
    assert failures(results, b"olleh\n") == []


def test_the_readme_client_example_against_a_python_ssl_server(pki):
    with python_ssl_server(pki) as port:
        results = runs(lambda: readme_client(port, pki["ca"]))
    assert failures(results, b"hello\n") == []


@pytest.fixture
def half_closing_server(server_env) -> Iterator[tuple[subprocess.Popen, int]]:
    with serving(["-v"], SERVER_APP, server_env) as (server, port):
        yield server, port


def statuses(server: subprocess.Popen) -> list[str]:
    """The status of each connection the server ended (``-v``), once it is stopped."""
    server.terminate()
    _out, err = server.communicate(timeout=30)
    return [end[3] for end in END_LINE.findall(err.decode())]


def test_curl_to_an_application_that_closes_its_output_and_keeps_reading(half_closing_server, pki):
    """curl forgives a bare EOF at the end of a response: its trace shows our close_notify."""
    server, port = half_closing_server
    curl = ["curl", "-v", "-sS", "--cacert", pki["ca"], f"https://localhost:{port}/"]
    results = runs(lambda: subprocess.run(curl, capture_output=True, timeout=30))
    assert [(r.returncode, r.stdout) for r in results] == [(0, b"hello\n")] * RUNS
    closed = b"(IN), TLS alert, close notify"
    assert [r.stderr for r in results if closed not in r.stderr] == []
    assert statuses(server) == ["0"] * RUNS


def test_openssl_s_client_to_an_application_that_closes_its_output_and_keeps_reading(
    half_closing_server, pki
):
    server, port = half_closing_server
    argv = ("-CAfile", pki["ca"], "-verify_return_error", "-servername", "localhost")
    peers = [s_client(port, *argv, input=b"hello\n") for _ in range(RUNS)]
    bad = [p for p in peers if (p.code, p.out) != (0, b"HTTP/1.0 200 OK\r\n\r\nhello\n")]
    assert bad == [] and not any("unexpected eof" in p.err for p in peers), bad[:3]
    assert statuses(server) == ["0"] * RUNS
