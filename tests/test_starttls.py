"""STARTTLS end to end: s6-ucspitlsd and s6-ucspitlsc with real peers.

The application is tests/apps/smtp_starttls.py, an SMTP-like line server
(and client) that speaks UCSPI-TLS.  The server runs under Debian's
tcpserver, as users run it; its clients are ``openssl s_client -starttls
smtp``, ``gnutls-cli --starttls`` and s6-ucspitlsc under tcpclient; the
client side also talks to ``openssl s_server``.  A recording proxy captures
the wire to prove that after the STARTTLS exchange only TLS records pass.
"""

import os
import signal
import subprocess
import sys

import pytest
from conftest import STARTED, program
from faultproxy import FaultProxy
from server_helpers import APPS
from ucspi_helpers import LineReader, TcpServer, connection_fatal, fatal

UCSPITLSD = program("s6-ucspitlsd")
UCSPITLSC = program("s6-ucspitlsc")
APP = [sys.executable, str(APPS / "smtp_starttls.py")]
SECRET = b"ECHO secret-after-starttls"


def smtp_server(command: str, args=(), env=None, *, server_env) -> TcpServer:
    """tcpserver running s6-ucspitlsd ARGS -- the SMTP-like server sending COMMAND."""
    return TcpServer(["-v", "2", *args], [*APP, "server", command], env or server_env, UCSPITLSD)


class Peer:
    """A client process driven line by line through its stdin and stdout, with deadlines."""

    def __init__(self, argv, env=None, merge_stderr=False) -> None:
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        )
        STARTED.append(self.proc)
        self.out = LineReader(self.proc.stdout)
        self.seen: list[str] = []

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\r\n")
        self.proc.stdin.flush()

    def expect(self, prefix: str) -> str:
        """Read lines until one starts with ``prefix``; return it."""
        while True:
            line = self.out.readline().rstrip("\r")
            self.seen.append(line)
            assert line or not self.out.eof, f"EOF before {prefix!r}; saw {self.seen}"
            if line.startswith(prefix):
                return line

    def finish(self) -> tuple[int, str]:
        """Close stdin, wait for the end; the exit code and stderr."""
        _out, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, (err or b"").decode(errors="replace")


def raw_client(port: int) -> Peer:
    """A cleartext TCP client (socat) that sends exactly what it is given."""
    return Peer(["socat", "-t", "30", "-", f"TCP:127.0.0.1:{port}"])


def s_client(port: int, pki, extra=()) -> Peer:
    return Peer(
        [
            "openssl", "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{port}",
            "-CAfile", pki["ca"], "-verify_hostname", "localhost", "-servername", "localhost",
            "-verify_return_error", "-quiet", "-no_ign_eof", "-nocommands", *extra,
        ]
    )  # fmt: skip


def tls_records(data: bytes) -> list[int]:
    """The content types of the TLS records that make up ``data`` exactly; fails otherwise."""
    types, pos = [], 0
    while pos < len(data):
        assert len(data) - pos >= 5, f"a partial record header at {pos}"
        kind, major, length = data[pos], data[pos + 1], int.from_bytes(data[pos + 3 : pos + 5])
        assert kind in (20, 21, 22, 23) and major == 3, (
            f"not a TLS record at {pos}: {data[pos : pos + 8]!r}"
        )
        assert length <= 16384 + 256
        pos += 5 + length
        types.append(kind)
    assert pos == len(data), "the last record is cut"
    return types


def test_openssl_s_client_starttls_smtp_with_the_notification_block(server_env, pki):
    with smtp_server("Y", ["-S"], server_env=server_env) as server:
        client = s_client(server.port, pki)
        client.send("ECHO inside TLS")
        assert client.expect("250 ") == "250 inside TLS"
        client.send("FACTS")
        facts = []
        while (line := client.expect("250")) != "250 end":
            facts.append(line.removeprefix("250-"))
        client.send("QUIT")
        client.expect("221")
        code, err = client.finish()
        status, lines = server.wait_end()
    assert code == 0, err
    assert "unexpected eof" not in err
    assert facts[:3] == ["SSL_PROTOCOL=TLSv1.3", "SSL_CIPHER=TLS_AES_256_GCM_SHA384",
                         "SSL_TLS_SNI_SERVERNAME=localhost"]  # fmt: skip
    # unset: no client certificate, no ALPN
    assert facts[3:] == ["SSL_PEER_CERT_HASH", "SSL_PEER_CERT_SUBJECT", "SSL_ALPN_PROTOCOL"]
    assert status == 0
    assert lines[0].startswith("s6-ucspitlsd: info: peer 127.0.0.1:")
    assert lines[0].endswith(": accepted opportunistic TLS")
    assert lines[-1] == "engine exit 0"


def test_gnutls_cli_starttls_by_hand(server_env, pki):
    """gnutls-cli --starttls: the client sends STARTTLS itself, then SIGALRM starts TLS."""
    with smtp_server("y", server_env=server_env) as server:
        client = Peer(
            ["gnutls-cli", "--starttls", "--crlf", "--x509cafile", pki["ca"],
             "-p", str(server.port), "localhost"],
            merge_stderr=True,
        )  # fmt: skip
        client.expect("220 s6tls.test")
        client.send("EHLO gnutls.test")
        client.expect("250 ")
        client.send("STARTTLS")
        client.expect("220 2.0.0")
        client.proc.send_signal(signal.SIGALRM)
        # gnutls-cli reads no more input until the handshake is over; input
        # sent before it saw the signal would go out in cleartext (and the
        # engine would refuse it as "wrong version number").
        client.expect("*** Starting TLS handshake")
        client.send("ECHO via gnutls")
        assert client.expect("250 ") == "250 via gnutls"
        client.send("QUIT")
        client.expect("221")
        client.finish()
        status, lines = server.wait_end()
    assert status == 0
    assert lines[-1] == "engine exit 0"


def test_no_cleartext_byte_after_the_command_reaches_the_wire(server_env, pki):
    with (
        smtp_server("Y", ["-S"], server_env=server_env) as server,
        FaultProxy(server.port, record=True) as proxy,
    ):
        client = s_client(proxy.port, pki)
        client.send(SECRET.decode())
        client.expect("250 secret-after-starttls")
        client.send("QUIT")
        client.expect("221")
        assert client.finish()[0] == 0
        server.wait_end()
    assert proxy.wire is not None
    c2s, s2c = bytes(proxy.wire["c2s"]), bytes(proxy.wire["s2c"])
    before, cmd, after = c2s.partition(b"STARTTLS\r\n")
    assert cmd and b"EHLO" in before
    assert tls_records(after)[0] == 22  # a handshake record first
    before, reply, after = s2c.partition(b"220 2.0.0 ready to start TLS\r\n")
    assert reply and b"250-STARTTLS" in before
    assert 23 in tls_records(after)  # application data, encrypted
    for wire in (c2s, s2c):
        assert b"secret-after-starttls" not in wire
    # The capture is real: the same check fails on what came before STARTTLS.
    with pytest.raises(AssertionError):
        tls_records(before)


def test_cleartext_sent_after_starttls_is_never_a_command(server_env, pki, tmp_path):
    """A client (or a man in the middle) that sends a command right behind STARTTLS."""
    with smtp_server("Y", server_env=server_env) as server:
        client = raw_client(server.port)
        client.expect("220 ")
        assert client.proc.stdin is not None
        client.proc.stdin.write(b"STARTTLS\r\n" + SECRET + b"\r\nQUIT\r\n")
        client.proc.stdin.flush()
        client.expect("220 2.0.0")
        client.finish()
        status, lines = server.wait_end()
    assert "250 secret-after-starttls" not in client.seen
    assert status == 0
    assert fatal(lines[1:2], "s6-ucspitlsd")  # the handshake on the injected bytes failed
    assert lines[-2:] == ["tls failed", "engine exit 97"]


def test_declined_tls_goes_on_in_cleartext_and_the_engine_exits_0(server_env):
    with smtp_server("decline", server_env=server_env) as server:
        client = raw_client(server.port)
        client.expect("220 ")
        client.send("STARTTLS")
        assert client.expect("454") == "454 4.7.0 TLS not available"
        client.send("ECHO still cleartext")
        assert client.expect("250 ") == "250 still cleartext"
        client.send("QUIT")
        client.expect("221")
        client.finish()
        status, lines = server.wait_end()
    assert status == 0
    assert lines[0].startswith("s6-ucspitlsd: info: peer 127.0.0.1:")
    assert lines[0].endswith(": declined opportunistic TLS")
    assert lines[1] == "engine exit 0"


def test_an_unknown_command_byte_makes_the_engine_exit_100(server_env):
    with smtp_server("N", server_env=server_env) as server:
        client = raw_client(server.port)
        client.expect("220 ")
        client.send("STARTTLS")
        client.expect("220 2.0.0")
        client.finish()
        status, lines = server.wait_end()
    # the engine's line names the client and prog's pid, the one tcpserver knows
    assert connection_fatal(lines[0], "s6-ucspitlsd", server.ended) == (
        "unrecognized command on control socket"
    )
    assert lines[1:] == ["tls failed", "engine exit 100"]
    assert status == 0


def test_a_client_that_never_handshakes_is_dropped_under_K(server_env):
    with smtp_server("Y", ["-K", "300"], server_env=server_env) as server:
        client = raw_client(server.port)
        client.expect("220 ")
        client.send("STARTTLS")
        client.expect("220 2.0.0")
        _status, lines = server.wait_end()
        client.finish()
    assert fatal(lines[1:2], "s6-ucspitlsd") == "handshake timed out"
    assert lines[2:] == ["tls failed", "engine exit 98"]


def test_s6_ucspitlsc_against_s6_ucspitlsd(server_env, client_env):
    with smtp_server("Y", server_env=server_env) as server:
        res = subprocess.run(
            ["tcpclient", "-H", "-R", "-l", "0", "127.0.0.1", str(server.port),
             *UCSPITLSC, "-k", "localhost", "--", *APP, "client", "Y"],
            env=client_env, capture_output=True, timeout=60,
        )  # fmt: skip
        status, lines = server.wait_end()
    out = res.stdout.decode().splitlines()
    assert res.returncode == 0, res.stderr
    assert out[:7] == [
        "S: 220 s6tls.test ESMTP",
        "C: EHLO client.test",
        "S: 250-s6tls.test",
        "S: 250-STARTTLS",
        "S: 250 8BITMIME",
        "C: STARTTLS",
        "S: 220 2.0.0 ready to start TLS",
    ]
    tls = eval(out[7].removeprefix("TLS: "))
    assert tls["SSL_PROTOCOL"] == "TLSv1.3"
    assert tls["SSL_TLS_SNI_SERVERNAME"] == "localhost"  # the name the client sent
    assert "C: ECHO secret sent only inside TLS" in out
    assert "S: 250 secret sent only inside TLS" in out
    assert out[-1] == "S: 221 2.0.0 bye"
    assert res.stderr.decode().splitlines() == ["engine exit 0"]
    assert status == 0 and lines[-1] == "engine exit 0"


def test_s6_ucspitlsc_in_front_of_openssl_s_server(client_env, pki, reap):
    server = subprocess.Popen(
        ["openssl", "s_server", "-accept", "127.0.0.1:0", "-cert", pki["server_cert"],
         "-key", pki["server_key"], "-rev", "-naccept", "1"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    reap.append(server)
    out = LineReader(server.stdout)
    while not (line := out.readline()).startswith("ACCEPT"):
        pass
    port = line.rsplit(":", 1)[1]
    res = subprocess.run(
        ["tcpclient", "-H", "-R", "-l", "0", "127.0.0.1", port,
         *UCSPITLSC, "-k", "localhost", "--", *APP, "direct", "y"],
        env=client_env, capture_output=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.decode().splitlines() == [
        "TLS: {}",
        "S: " + "hello through s6-ucspitlsc"[::-1],
    ]


def test_a_wrong_server_name_fails_the_handshake_and_prog_reads_eof(server_env, client_env):
    with smtp_server("Y", server_env=server_env) as server:
        res = subprocess.run(
            ["tcpclient", "-H", "-R", "-l", "0", "127.0.0.1", str(server.port),
             *UCSPITLSC, "-k", "wrong.example", "--", *APP, "client", "Y"],
            env=client_env, capture_output=True, timeout=60,
        )  # fmt: skip
        server.wait_end()
    out, err = res.stdout.decode().splitlines(), res.stderr.decode().splitlines()
    assert "TLS: None" in out
    assert res.returncode == 1
    reason = fatal(err[:1], "s6-ucspitlsc")
    assert reason.startswith("certificate does not match the server name wrong.example")
    assert err[1:] == ["engine exit 97"]


def test_prog_that_cannot_be_run_is_one_line_and_the_engine_leaves(server_env):
    res = subprocess.run(
        [*UCSPITLSD, "--", "/nonexistent/prog"],
        env=server_env, stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
    )  # fmt: skip
    assert res.returncode == 127
    assert "/nonexistent/prog" in fatal(res.stderr.decode(), "s6-ucspitlsd")


@pytest.mark.parametrize("name", ["s6-ucspitlsd", "s6-ucspitlsc"])
def test_no_environment_means_no_fork_and_exit_100(name):
    env = {k: v for k, v in os.environ.items() if k not in ("CERTFILE", "KEYFILE", "CAFILE")}
    res = subprocess.run(
        [*program(name), "--", "true"], env=env, stdin=subprocess.DEVNULL,
        capture_output=True, timeout=30,
    )  # fmt: skip
    assert res.returncode == 100
    assert fatal(res.stderr.decode(), name)
