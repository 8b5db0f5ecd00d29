"""s6-tlsserver before TLS, as real processes: PROXY header, access rules, names, banner.

Clients are raw loopback sockets that send what the test says (a PROXY
header, one byte at a time if need be) and then, if they get that far, a
real TLS handshake with the standard library.  The PROXY header lets a
loopback client stand for any address, which is how the rules are tested
on addresses other than 127.0.0.1.
"""

import ipaddress
import os
import select
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time

import pytest
from server_helpers import child_pids, start_server
from test_rules import write_rules
from ucspi_helpers import touch_then

PRINT_ENV = [sys.executable, "-c", "import os,sys; sys.stdout.write(repr(dict(os.environ)))"]
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v2_header(src: str, dst: str, sport: int, dport: int) -> bytes:
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    body = a.packed + b.packed + struct.pack("!HH", sport, dport)
    fam = 0x11 if a.version == 4 else 0x21
    return V2_SIGNATURE + bytes([0x21, fam]) + struct.pack("!H", len(body)) + body


def raw(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def tls_env(sock: socket.socket, cafile: str) -> dict[str, str]:
    """Handshake on ``sock`` (verifying localhost), then read prog's environment."""
    ctx = ssl.create_default_context(cafile=cafile)
    with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    return eval(data)


def until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends before it closes (a reset counts as the close).

    A server that closes with the client's bytes unread sends a reset: what
    matters is that not one byte (no ServerHello, no alert) came before.
    """
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    return got


def refused(sock: socket.socket) -> bytes:
    """Everything the server sends before it closes; the client sends a ClientHello."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    hello = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        hello.do_handshake()
    sock.sendall(outgoing.read())
    return until_closed(sock)


def log_lines_until(proc: subprocess.Popen, needle: str) -> list[str]:
    assert proc.stderr is not None
    lines = []
    while True:
        line = proc.stderr.readline().decode()
        assert line, f"server log ended before {needle!r}: {lines}"
        lines.append(line.rstrip("\n"))
        if needle in line:
            return lines


@pytest.fixture
def serve(server_env, reap):
    def start(args, prog=PRINT_ENV, env=None):
        proc, port = start_server(args, prog, env or server_env)
        reap.append(proc)
        return proc, port

    return start


@pytest.mark.parametrize(
    ("header", "remote", "local"),
    [
        (b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 443\r\n", ("192.0.2.10", "56324"),
         ("198.51.100.1", "443")),
        (b"PROXY TCP6 2001:db8::10 2001:db8::1 40000 8443\r\n", ("2001:db8::10", "40000"),
         ("2001:db8::1", "8443")),
        (v2_header("203.0.113.9", "10.1.1.1", 1234, 443), ("203.0.113.9", "1234"),
         ("10.1.1.1", "443")),
        (v2_header("2001:db8::9", "2001:db8::1", 1, 2), ("2001:db8::9", "1"),
         ("2001:db8::1", "2")),
    ],
)  # fmt: skip
@pytest.mark.parametrize("trickle", [False, True])
def test_the_proxy_header_names_the_client(serve, pki, header, remote, local, trickle):
    _server, port = serve(["-H", "-L", "-K", "10000"])
    sock = raw(port)
    if trickle:
        for i in range(len(header)):
            sock.send(header[i : i + 1])
    else:
        sock.sendall(header)
    env = tls_env(sock, pki["ca"])
    assert (env["TCPREMOTEIP"], env["TCPREMOTEPORT"]) == remote
    assert (env["TCPLOCALIP"], env["TCPLOCALPORT"]) == local


@pytest.mark.parametrize("header", [b"PROXY UNKNOWN\r\n", V2_SIGNATURE + b"\x20\x00\x00\x00"])
def test_unknown_and_local_headers_keep_the_real_addresses(serve, pki, header):
    _server, port = serve(["-H", "-L"])
    sock = raw(port)
    ours = str(sock.getsockname()[1])
    sock.sendall(header)
    env = tls_env(sock, pki["ca"])
    assert (env["TCPREMOTEIP"], env["TCPREMOTEPORT"]) == ("127.0.0.1", ours)


@pytest.mark.parametrize(
    ("stream", "why"),
    [
        (b"PROXY TCP4 192.0.2.10 198.51.100.1 99999 443\r\n", "invalid port in PROXY line"),
        (b"GET / HTTP/1.0\r\n\r\n", "invalid PROXY header signature"),
        (V2_SIGNATURE + b"\x21\x11\x00\x05" + b"\x00" * 5, "PROXY v2 address block too short"),
        (b"PROXY TCP4 1.2.3.4\x1b[2J 5.6.7.8 1 2\r\n", "invalid address in PROXY line"),
    ],
)
def test_a_malformed_header_gets_one_line_and_no_tls(serve, tmp_path, stream, why):
    marker = tmp_path / "started"
    server, port = serve(["-H", "-L", "-K", "10000"], touch_then(marker, "cat"))
    sock = raw(port)
    sock.sendall(stream)
    assert until_closed(sock) == b""  # closed, and not one TLS byte
    lines = log_lines_until(server, why)
    assert len(lines) == 1 and ": warning: " in lines[0], lines
    assert not marker.exists()


def test_a_header_that_never_comes_times_out_under_K(serve, tmp_path):
    marker = tmp_path / "started"
    server, port = serve(["-H", "-L", "-K", "500"], touch_then(marker, "cat"))
    sock = raw(port)
    start = time.monotonic()
    assert until_closed(sock) == b""
    assert 0.4 < time.monotonic() - start < 10
    assert "PROXY header timed out" in log_lines_until(server, "PROXY header timed out")[-1]
    assert not marker.exists()


def test_a_tls_client_that_sends_no_header_gets_no_tls(serve):
    server, port = serve(["-H", "-L", "-K", "10000"])
    assert refused(raw(port)) == b""
    assert "invalid PROXY header signature" in log_lines_until(server, "PROXY")[-1]


# -- access rules ---------------------------------------------------------------------

RULES = {
    "ip4/192.0.2.0_24": {"allow": True, "env": {"RELAYCLIENT": b"\n", "GREETING": b"hi  \n"}},
    "ip4/192.0.2.128_25": {"deny": True},
    "ip6/2001:db8::_32": {"allow": True, "env": {"NET": b"doc6\n"}},
    "ip6/2001:db8:bad::_48": {"deny": True},
    "ip4/127.0.0.1_32": {"allow": True},
    "ip4/0.0.0.0_0": {"deny": True},
}


@pytest.fixture(params=["-i", "-x"])
def rules(request, tmp_path):
    """The option and path of RULES, as a directory (-i) or compiled (-x)."""
    root = tmp_path / "rules"
    write_rules(root, RULES)
    if request.param == "-i":
        return ["-i", str(root)]
    cdb = tmp_path / "rules.cdb"
    subprocess.run(["s6-accessrules-cdb-from-fs", str(cdb), str(root)], check=True, timeout=30)
    return ["-x", str(cdb)]


@pytest.mark.parametrize(
    ("client", "extra"),
    [
        ("192.0.2.7", {"RELAYCLIENT": "", "GREETING": "hi"}),
        ("2001:db8:1::7", {"NET": "doc6"}),
    ],
)
def test_an_allowed_client_gets_the_rule_env(serve, pki, rules, client, extra):
    _server, port = serve(["-H", "-L", *rules])
    sock = raw(port)
    fam = "TCP6" if ":" in client else "TCP4"
    dst = "2001:db8::1" if ":" in client else "192.0.2.1"
    sock.sendall(f"PROXY {fam} {client} {dst} 1000 443\r\n".encode())
    env = tls_env(sock, pki["ca"])
    assert {k: env.get(k) for k in extra} == extra
    assert "TCPREMOTEHOST" not in env


@pytest.mark.parametrize(
    ("client", "rule"),
    [
        ("192.0.2.200", "ip4/192.0.2.128_25"),
        ("198.51.100.1", "ip4/0.0.0.0_0"),
        ("2001:db8:bad::1", "ip6/2001:db8:bad::_48"),
    ],
)
def test_a_denied_client_never_sees_a_tls_handshake(serve, tmp_path, rules, client, rule):
    marker = tmp_path / "started"
    server, port = serve(["-v", "-H", "-L", *rules], touch_then(marker, "cat"))
    sock = raw(port)
    fam = "TCP6" if ":" in client else "TCP4"
    dst = "2001:db8::1" if ":" in client else "192.0.2.1"
    sock.sendall(f"PROXY {fam} {client} {dst} 1000 443\r\n".encode())
    assert refused(sock) == b""  # not a ServerHello, not an alert: nothing
    line = log_lines_until(server, "denied")[-1]
    assert f"denied by rule {rule}" in line and client in line
    assert not marker.exists()


def test_rules_apply_to_a_direct_client_too(serve, pki, tmp_path):
    write_rules(tmp_path / "r", {"ip4/127.0.0.0_8": {"allow": True, "env": {"LOOP": b"yes\n"}}})
    _server, port = serve(["-H", "-i", str(tmp_path / "r")])
    assert tls_env(raw(port), pki["ca"])["LOOP"] == "yes"


def test_an_exec_rule_replaces_prog(serve, pki, tmp_path):
    write_rules(
        tmp_path / "r", {"ip4/127.0.0.1_32": {"allow": True, "exec": "echo {'BY': 'exec'}"}}
    )
    _server, port = serve(["-H", "-i", str(tmp_path / "r")])
    assert tls_env(raw(port), pki["ca"]) == {"BY": "exec"}


def test_a_rules_file_that_is_no_cdb_stops_the_server_at_start(server_env, tmp_path):
    from conftest import program
    from ucspi_helpers import fatal

    bad = tmp_path / "rules.cdb"
    bad.write_text("not a cdb")
    res = subprocess.run(
        [*program("s6-tlsserver"), "-x", str(bad), "127.0.0.1", "0", "true"],
        env=server_env, capture_output=True, timeout=30,
    )  # fmt: skip
    assert res.returncode == 111
    assert fatal(res.stderr.decode(), "s6-tlsserver").startswith("unable to open rules file")


# -- names, banner ------------------------------------------------------------------


def test_names_come_from_the_system_resolver_by_default(serve, pki):
    _server, port = serve([])
    env = tls_env(raw(port), pki["ca"])
    assert env["TCPREMOTEHOST"] == "localhost"  # /etc/hosts, both ways
    assert env["TCPLOCALHOST"] == "localhost"
    assert "TCPREMOTEINFO" not in env


def test_paranoid_keeps_a_name_that_resolves_back(serve, pki):
    _server, port = serve(["-p", "-w", "-l", "me.example"])
    env = tls_env(raw(port), pki["ca"])
    assert env["TCPREMOTEHOST"] == "localhost"
    assert env["TCPLOCALHOST"] == "me.example"


def test_no_dns_sets_no_names(serve, pki):
    _server, port = serve(["-H", "-l", "me.example"])
    env = tls_env(raw(port), pki["ca"])
    assert "TCPREMOTEHOST" not in env
    assert env["TCPLOCALHOST"] == "me.example"


def test_a_name_rule_lets_localhost_in(serve, pki, tmp_path):
    write_rules(tmp_path / "r", {"reversedns/localhost": {"allow": True, "env": {"N": b"1\n"}}})
    _server, port = serve(["-i", str(tmp_path / "r")])
    assert tls_env(raw(port), pki["ca"])["N"] == "1"


def test_the_banner_comes_before_tls(serve, pki):
    _server, port = serve(["-H", "-B", "220 s6tls ready\r\n"])
    sock = raw(port)
    got = b""
    while not got.endswith(b"\r\n"):
        got += sock.recv(100)
    assert got == b"220 s6tls ready\r\n"
    assert tls_env(sock, pki["ca"])["PROTO"] == "TCP"


# -- TLS settings per client, from the rules' env/ ----------------------------------


def served_certificate(port: int, cafile: str, header: bytes) -> bytes:
    """The DER certificate the server shows a client that the PROXY ``header`` names."""
    ctx = ssl.create_default_context(cafile=cafile)
    sock = raw(port)
    sock.sendall(header)
    with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
        return tls.getpeercert(binary_form=True)


def test_a_rules_certfile_and_keyfile_are_that_clients_and_a_bad_one_refuses_it_alone(
    serve, pki, ca, tmp_path
):
    """As s6-tlsd reads the CERTFILE/KEYFILE that s6-tcpserver-access set: the rule's
    keypair for its clients, the default one for the others; a rule whose file cannot be
    used refuses its clients, one line naming the rule, and the server goes on.  The
    files are read once (a cache), and again by the workers a SIGHUP starts."""
    other = ca.issue_cert("localhost")
    cert, key = tmp_path / "other.pem", tmp_path / "other.key"
    other.cert_chain_pems[0].write_to_path(str(cert))
    other.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    rules = tmp_path / "rules"
    write_rules(
        rules,
        {
            "ip4/192.0.2.0_24": {"allow": True, "env": {"CERTFILE": b"%s\n" % bytes(cert),
                                                         "KEYFILE": b"%s\n" % bytes(key)}},
            "ip4/198.51.100.0_24": {"allow": True, "env": {"CERTFILE": b"/nonexistent\n"}},
            "ip4/0.0.0.0_0": {"allow": True},
        },
    )  # fmt: skip
    server, port = serve(["-v", "-H", "-L", "-i", str(rules), "--workers", "1"])
    header = b"PROXY TCP4 %s 203.0.113.1 1000 443\r\n"
    ruled = served_certificate(port, pki["ca"], header % b"192.0.2.7")
    default = served_certificate(port, pki["ca"], header % b"203.0.113.7")
    assert ruled != default
    assert ruled == ssl.PEM_cert_to_DER_cert(cert.read_text())
    for _ in range(2):  # read once, refused each time
        sock = raw(port)
        sock.sendall(header % b"198.51.100.7")
        assert refused(sock) == b""
        line = log_lines_until(server, "rule ip4/198.51.100.0_24")[-1]
        assert line.startswith("s6-tlsserver: warning: peer 198.51.100.7:1000 pid ")
        assert line.endswith(
            "rule ip4/198.51.100.0_24: unable to read CERTFILE /nonexistent:"
            " No such file or directory"
        )
    cert.rename(tmp_path / "moved.pem")  # read once: still served from memory
    assert served_certificate(port, pki["ca"], header % b"192.0.2.8") == ruled
    (old,) = child_pids(server.pid)
    gone = os.pidfd_open(old)
    server.send_signal(signal.SIGHUP)  # new workers, which read the rules' files again
    log_lines_until(server, "reloaded the keypairs")
    assert select.select([gone], [], [], 30)[0]  # the old worker, and its cache, are gone
    os.close(gone)
    sock = raw(port)
    sock.sendall(header % b"192.0.2.9")
    assert refused(sock) == b""
    assert "unable to read" in log_lines_until(server, "peer 192.0.2.9:1000")[-1]
    assert served_certificate(port, pki["ca"], header % b"203.0.113.8") == default
