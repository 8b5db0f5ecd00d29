"""s6-tlsserver and s6-tlsd under real supervisors, as a user runs them.

- Debian's s6, with the service directory of the README (run, notification-fd,
  log/run with s6-log), read from README.md itself;
- systemd's socket activation (``systemd-socket-activate``), in the
  listening form (LISTEN_FDS, for s6-tlsserver) and the inetd form (one
  s6-tlsd per connection, the socket on its stdin and stdout).
"""

import os
import re
import shlex
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, program
from server_helpers import free_port, tls_connect
from ucspi_helpers import LineReader

S6 = ("s6-svscan", "s6-svlink", "s6-svwait", "s6-svc", "s6-svstat", "s6-svscanctl", "s6-log")

# What the application saw, on its stderr: the logger gets it too.
APP = (
    "#!/bin/sh\n"
    'echo "app saw PROTO=$PROTO TCPREMOTEIP=$TCPREMOTEIP TCPLOCALPORT=$TCPLOCALPORT'
    " SSL_PROTOCOL=$SSL_PROTOCOL SSL_TLS_SNI_SERVERNAME=$SSL_TLS_SNI_SERVERNAME"
    " LC_CTYPE=${LC_CTYPE-unset} LISTEN_FDS=${LISTEN_FDS-unset}"
    ' NOTIFY_SOCKET=${NOTIFY_SOCKET-unset}" >&2\n'
    "exec cat\n"
)


def readme_block(name: str) -> str:
    """The README's code block that follows the line naming file ``name``."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^`{re.escape(name)}`:\n\n```(?:sh|ini)?\n(.*?)```", text, re.M | re.S)
    assert match, f"README.md has no block for {name}"
    return match.group(1)


class Supervision:
    """A running s6-svscan on a fresh scan directory; the loggers' copies on ``log``.

    Each service's log/run is the README's with one more s6-log action, ``1``,
    which copies every line to s6-log's stdout: s6-svscan's stdout, a pipe the
    test reads with deadlines.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.scan = root / "scan"
        self.scan.mkdir()
        rfd, wfd = os.pipe()
        self.proc = subprocess.Popen(
            ["s6-svscan", "-d", str(wfd), str(self.scan)],
            pass_fds=(wfd,),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        os.close(wfd)
        with os.fdopen(rfd, "rb") as ready:
            assert ready.readline() == b"\n", "s6-svscan did not notify readiness"
        self.log = LineReader(self.proc.stdout)
        self.seen: list[str] = []

    def service(self, name: str, run: str, notification_fd: str, log_run: str) -> Path:
        """Create service ``name`` (down), link it into the scan directory; its path there."""
        d = self.root / name
        (d / "log").mkdir(parents=True)
        (d / "down").touch()
        (d / "app").write_text(APP)
        (d / "app").chmod(0o755)
        for path, text in ((d / "run", run), (d / "log" / "run", log_run)):
            path.write_text(text)
            path.chmod(0o755)
        (d / "notification-fd").write_text(notification_fd)
        # s6-svlink returns once s6-supervise runs on the service: no race.
        subprocess.run(["s6-svlink", "-t", "20000", str(self.scan), str(d)], timeout=30, check=True)
        return self.scan / name

    def event(self, service: Path, regexp: str, *command: str) -> str:
        """Subscribe to the service's events, run ``command``, return the first matching one."""
        res = subprocess.run(
            ["s6-ftrig-listen1", "-t", "20000", str(service / "event"), regexp, *command],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    def stat(self, service: Path, fields: str) -> list[str]:
        res = subprocess.run(
            ["s6-svstat", "-o", fields, str(service)], capture_output=True, text=True, timeout=20
        )
        return res.stdout.split()

    def until(self, needle: str) -> str:
        """Read the loggers' copies until a line holds ``needle``; that line."""
        while True:
            line = self.log.readline()
            assert line, f"log ended before {needle!r}: {self.seen}"
            self.seen.append(line)
            if needle in line:
                return line

    def close(self) -> None:
        """Stop s6-svscan and everything under it; the loggers then flush and exit."""
        if self.proc.poll() is None:
            subprocess.run(["s6-svscanctl", "-t", str(self.scan)], timeout=20, check=False)
        try:
            self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)
        while line := self.log.readline():
            self.seen.append(line)


@pytest.fixture
def s6(tmp_path):
    missing = [tool for tool in (*S6, "s6-ftrig-listen1") if shutil.which(tool) is None]
    assert not missing, f"Debian's s6 is needed: {missing} (./scripts/install --test)"
    sv = Supervision(tmp_path)
    yield sv
    sv.close()


def readme_service(sv: Supervision, name: str, cert: str, key: str) -> tuple[Path, Path]:
    """The README's service directory, with this test's files: (service, log directory)."""
    logdir = sv.root / f"{name}-logs"
    server = shlex.join(program("s6-tlsserver"))
    run = (
        readme_block("run")
        .replace("/etc/ssl/svc/cert.pem", shlex.quote(cert))
        .replace("/etc/ssl/svc/key.pem", shlex.quote(key))
        .replace("exec s6-tlsserver ", f"exec {server} ")
        .replace(" 0.0.0.0 443 /usr/local/bin/my-inetd-style-app", " 127.0.0.1 0 ./app")
    )
    log_run = (
        readme_block("log/run")
        .replace("/var/log/tls-echo", str(logdir))
        .replace("s6-log -b ", "s6-log -b 1 ")
    )
    assert "./app" in run and str(logdir) in log_run, (run, log_run)
    notification_fd = readme_block("notification-fd")
    return sv.service(name, run, notification_fd, log_run), logdir


def test_readme_service_is_ready_once_bound_logs_every_line_and_never_restarts(s6, pki):
    svc, logdir = readme_service(s6, "tls", pki["server_cert"], pki["server_key"])
    assert s6.event(svc, "[Ud]", "s6-svc", "-u", str(svc)) == "U"  # up and ready
    bound = s6.until("info: listening on ")  # written before the readiness
    port = int(bound.rsplit(":", 1)[1])
    pid = s6.stat(svc, "pid")
    conn = tls_connect(port, pki["ca"])  # ready means bound: no retry, no wait
    for n in range(3):
        conn.sendall(f"hello {n}".encode())
        assert conn.recv(100) == f"hello {n}".encode()
        conn.close()
        s6.until("info: end ")
        if n < 2:
            conn = tls_connect(port, pki["ca"])
    # -v wrote a line per connection event: the server is still the same process
    assert s6.stat(svc, "up,ready,pid") == ["true", "true", *pid]
    subprocess.run(["s6-svc", "-d", str(svc)], timeout=20, check=True)
    subprocess.run(["s6-svwait", "-D", "-t", "20000", str(svc)], timeout=30, check=True)
    assert s6.stat(svc, "up,exitcode") == ["false", "0"]  # SIGTERM: a clean stop
    s6.close()
    logged = [line.split("  ", 1)[1] for line in (logdir / "current").read_text().splitlines()]
    assert logged == s6.seen  # the logger got every line, and nothing else
    assert logged[0] == f"s6-tlsserver: info: listening on 127.0.0.1:{port}"
    infos = [line for line in logged if line.startswith("s6-tlsserver: info: ")]
    assert len(infos) == 1 + 3 * 3 + 1  # listening; allow, peer, end for each; stopped
    apps = [line for line in logged if line.startswith("app saw ")]
    assert len(apps) == 3
    assert all("PROTO=TCP TCPREMOTEIP=127.0.0.1" in line for line in apps)
    assert all("SSL_PROTOCOL=TLSv1.3 SSL_TLS_SNI_SERVERNAME=localhost" in line for line in apps)
    assert logged[-1].endswith("stopped accepting, 0 connections running, 0 handshakes dropped")


@pytest.mark.parametrize("recipe", ["readme", "notification-fd 1 with exec 2>&1"])
def test_a_bad_key_gives_no_readiness_and_its_reason_in_the_log(recipe, s6, pki):
    svc, _logdir = readme_service(s6, "tls", pki["server_cert"], pki["ca"])  # not a key
    if recipe != "readme":  # the recipe that took the fatal line for readiness
        run = svc / "run"
        run.write_text(run.read_text().replace("exec 2>&1 1>&3 3>&-", "exec 2>&1"))
        (svc / "notification-fd").write_text("1\n")
    event = s6.event(svc, "[Ud]", "s6-svc", "-o", str(svc))  # -o: run once
    if recipe != "readme":
        assert event == "U"  # the twin: the fatal line's newline counted as readiness
        return
    assert event == "d"  # went down without ever being ready
    line = s6.until("fatal")
    assert line.startswith(f"s6-tlsserver: fatal: KEYFILE {pki['ca']} "), line
    subprocess.run(["s6-svwait", "-d", "-t", "20000", str(svc)], timeout=30, check=True)
    assert s6.stat(svc, "up,exitcode") == ["false", "96"]


# --- ucspi-tcp --------------------------------------------------------------------


def readme_line(start: str, **words: list[str]) -> tuple[dict[str, str], list[str]]:
    """The README's command line that starts with ``start``: (environment, argv).

    Each word that is a key of ``words`` (``-`` in place of ``.`` and ``=``)
    is replaced with its list of words; ``VAR=value`` words in front go into
    the environment, as a shell does.
    """
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^{re.escape(start)}.*$", text, re.M)
    assert match, f"README.md has no line starting with {start!r}"
    line = shlex.split(match.group())
    argv = [new for word in line for new in words.get(re.sub(r"[.=]", "-", word), [word])]
    env = dict(os.environ)
    while "=" in argv[0]:
        name, _, value = argv.pop(0).partition("=")
        env[name] = value
    return env, argv


def test_readme_tcpserver_recipe_frees_silent_sockets_slots_at_K_for_the_readme_client(pki):
    """The README's tcpserver and s6-tlsclient lines, with this test's files and port.

    Silent sockets take every tcpserver slot; the README's client, queued
    behind them, is served once -K drops them.  To run in seconds, tcpserver
    gets 4 slots (-c) instead of its 40, and -K 2000 instead of the README's 10000.
    """
    env, argv = readme_line(
        "CERTFILE=cert.pem KEYFILE=key.pem tcpserver ",
        **{"CERTFILE-cert-pem": [f"CERTFILE={pki['server_cert']}"]},
        **{"KEYFILE-key-pem": [f"KEYFILE={pki['server_key']}"]},
        tcpserver=["tcpserver", "-1", "-c", "4"],
        **{"0-0-0-0": ["127.0.0.1"], "4433": ["0"], "10000": ["2000"]},
        **{"s6-tlsd": program("s6-tlsd")},
    )
    assert argv[-4:] == ["-K", "2000", "--", "cat"], argv  # the README's has -K 10000
    server = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        port = LineReader(server.stdout).readline()
        silent = [socket.create_connection(("127.0.0.1", int(port)), timeout=30) for _ in range(4)]
        client_env, client = readme_line(
            "CAFILE=ca.pem s6-tlsclient ",
            **{"CAFILE-ca-pem": [f"CAFILE={pki['ca']}"], "s6-tlsclient": program("s6-tlsclient")},
            **{"example-org": ["localhost"], "4433": [port]},
        )
        served = subprocess.run(client, env=client_env, capture_output=True, timeout=30)
        assert (served.returncode, served.stdout) == (0, b"hello\n"), served.stderr
        for sock in silent:
            with sock:
                assert sock.recv(100) == b""  # dropped by s6-tlsd at -K, no byte sent
    finally:
        server.terminate()
        server.communicate(timeout=30)


# --- systemd ---------------------------------------------------------------------


def socket_activate(port: int, *args: str) -> tuple[subprocess.Popen, LineReader]:
    """``systemd-socket-activate -l 127.0.0.1:PORT ARGS``, once it listens."""
    if shutil.which("systemd-socket-activate") is None:
        pytest.fail("Debian's systemd is needed for systemd-socket-activate (./scripts/install)")
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    log = LineReader(proc.stderr)
    assert log.readline() == f"Listening on 127.0.0.1:{port} as 3."
    return proc, log


def tls_env(pki: dict[str, str]) -> list[str]:
    return ["-E", f"CERTFILE={pki['server_cert']}", "-E", f"KEYFILE={pki['server_key']}"]


def test_s6_tlsserver_takes_systemds_socket_and_tells_systemd_it_is_ready(pki, tmp_path, reap):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    app = tmp_path / "app"
    app.write_text(APP)
    app.chmod(0o755)
    port = free_port()  # systemd-socket-activate cannot listen on port 0
    # 192.0.2.1 is no address of this machine: binding it would fail, it must not be bound
    proc, log = socket_activate(
        port,
        *tls_env(pki),
        "-E",
        f"NOTIFY_SOCKET={tmp_path / 'notify'}",
        *program("s6-tlsserver"),
        "-1",
        "-v",
        "192.0.2.1",
        "443",
        str(app),
    )
    reap.append(proc)
    conn = tls_connect(port, pki["ca"])  # the first connection starts the service
    assert proc.stdout.readline() == f"{port}\n".encode()  # -1: the port of systemd's socket
    assert notify.recv(100) == b"READY=1"
    conn.sendall(b"activated")
    assert conn.recv(100) == b"activated"
    conn.close()
    lines = []
    while not (line := log.readline()).startswith("s6-tlsserver: info: end "):
        lines.append(line)
    saw = next(line for line in lines if line.startswith("app saw "))
    assert "TCPLOCALPORT=" + str(port) in saw
    assert "LISTEN_FDS=unset NOTIFY_SOCKET=unset" in saw  # systemd's variables are ours
    assert "LC_CTYPE=unset" in saw  # nor does Python's locale coercion leak to it
    proc.terminate()
    proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_s6_tlsd_under_inetd_style_activation_gives_prog_the_tcp_variables(pki, tmp_path, reap):
    app = tmp_path / "app"
    app.write_text(APP)
    app.chmod(0o755)
    port = free_port()
    proc, log = socket_activate(
        port, "--inetd", "-a", *tls_env(pki), *program("s6-tlsd"), "-v", "2", "--", str(app)
    )
    reap.append(proc)
    conn = tls_connect(port, pki["ca"])
    conn.sendall(b"inetd")
    assert conn.recv(100) == b"inetd"
    local_port = conn.getsockname()[1]
    conn.close()
    saw = ""
    while not saw.startswith("app saw "):
        saw = log.readline()
    assert f"PROTO=TCP TCPREMOTEIP=127.0.0.1 TCPLOCALPORT={port} " in saw, saw
    info = log.readline()
    while not info.startswith("s6-tlsd: info: "):
        info = log.readline()
    assert info.startswith(f"s6-tlsd: info: peer 127.0.0.1:{local_port} pid "), info
    proc.terminate()
    proc.communicate(timeout=30)


@pytest.mark.parametrize(
    ("activation", "reason"),
    [
        (["--inetd"], "stdin is a listening socket, not a connection: give one connection"),
        ([], "systemd passed listening sockets (LISTEN_FDS), not a connection: give one"),
    ],
)
def test_s6_tlsd_given_a_listening_socket_says_so_at_once(activation, reason, pki, reap):
    """Without ``-a`` (a socket unit's Accept=no), s6-tlsd gets no connection: one line, 100."""
    port = free_port()
    proc, log = socket_activate(port, *activation, *tls_env(pki), *program("s6-tlsd"), "--", "cat")
    reap.append(proc)
    with socket.create_connection(("127.0.0.1", port), timeout=30):
        line = next(line for line in iter(log.readline, "") if line.startswith("s6-tlsd: "))
    assert line.startswith(f"s6-tlsd: fatal: {reason}"), line
    proc.terminate()
    proc.communicate(timeout=30)


def test_systemds_socket_still_listens_for_systemd_once_s6_tlsserver_stopped(server_env, pki, reap):
    """systemd keeps its copy of the socket to start the service again on the next client."""
    owner = socket.create_server(("127.0.0.1", 0))  # systemd's copy
    port = owner.getsockname()[1]

    def socket_on_fd_3() -> None:
        os.dup2(owner.fileno(), 3)  # dup2 clears close-on-exec on the copy

    proc = subprocess.Popen(
        [
            "sh",
            "-c",
            'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"',
            "sh",
            *program("s6-tlsserver"),
            "-1",
            "192.0.2.1",
            "443",
            "cat",
        ],
        env=server_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=socket_on_fd_3,
        close_fds=False,  # our own descriptors are close-on-exec anyway
    )
    reap.append(proc)
    assert proc.stdout.readline() == f"{port}\n".encode()
    with tls_connect(port, pki["ca"]) as conn:
        conn.sendall(b"served")
        assert conn.recv(100) == b"served"
    proc.terminate()
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    owner.settimeout(30)
    with socket.create_connection(("127.0.0.1", port), timeout=30):
        accepted, _addr = owner.accept()  # the next client waits for systemd's next start
        accepted.close()
    owner.close()
