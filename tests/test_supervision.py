"""s6-tlsserver under real supervision: Debian's s6, readiness through notification-fd."""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import program
from server_helpers import free_port, tls_connect

S6 = ("s6-svscan", "s6-svlink", "s6-svwait", "s6-svc", "s6-svstat", "s6-svscanctl")


def start_svscan(scan: Path) -> subprocess.Popen:
    """Start s6-svscan on ``scan`` and wait for its readiness notification (-d)."""
    rfd, wfd = os.pipe()
    svscan = subprocess.Popen(
        ["s6-svscan", "-d", str(wfd), str(scan)], pass_fds=(wfd,), stdout=subprocess.DEVNULL
    )
    os.close(wfd)
    with os.fdopen(rfd, "rb") as ready:
        assert ready.readline() == b"\n", "s6-svscan did not notify readiness"
    return svscan


@pytest.fixture
def scandir(tmp_path):
    missing = [tool for tool in S6 if shutil.which(tool) is None]
    assert not missing, f"Debian's s6 is needed: {missing} (./scripts/install --test)"
    d = tmp_path / "scan"
    d.mkdir()
    procs: list[subprocess.Popen] = []
    yield d, procs
    subprocess.run(["s6-svscanctl", "-t", str(d)], timeout=20, check=False)
    for svscan in procs:
        try:
            svscan.wait(timeout=20)
        finally:
            if svscan.poll() is None:
                svscan.kill()
                svscan.wait(timeout=10)


def test_s6_supervise_sees_readiness_and_stops_the_server_cleanly(scandir, pki):
    scandir, procs = scandir
    procs.append(start_svscan(scandir))
    port = free_port()
    service = scandir.parent / "tls"
    service.mkdir()
    (service / "notification-fd").write_text("1\n")
    server = shlex.join([*program("s6-tlsserver"), "-1", "127.0.0.1", str(port), "cat"])
    (service / "run").write_text(
        "#!/bin/sh\n"
        "exec 2>&1\n"
        f"CERTFILE={shlex.quote(pki['server_cert'])} KEYFILE={shlex.quote(pki['server_key'])} \\\n"
        f"  exec {server}\n"
    )
    (service / "run").chmod(0o755)
    # s6-svlink returns once s6-supervise runs on the service: no race with svwait.
    subprocess.run(["s6-svlink", "-t", "20000", str(scandir), str(service)], timeout=30, check=True)
    service = scandir / "tls"
    ready = subprocess.run(
        ["s6-svwait", "-U", "-t", "20000", str(service)], capture_output=True, timeout=30
    )
    assert ready.returncode == 0, ready.stderr
    conn = tls_connect(port, pki["ca"])
    conn.sendall(b"supervised")
    assert conn.recv(100) == b"supervised"
    conn.close()
    subprocess.run(["s6-svc", "-d", str(service)], timeout=20, check=True)
    down = subprocess.run(
        ["s6-svwait", "-D", "-t", "20000", str(service)], capture_output=True, timeout=30
    )
    assert down.returncode == 0, down.stderr
    status = subprocess.run(
        ["s6-svstat", "-e", str(service)], capture_output=True, timeout=20, text=True
    )
    assert status.stdout.strip() == "0", status.stdout  # exited 0 on SIGTERM: a clean stop
    with pytest.raises(ConnectionRefusedError):
        tls_connect(port, pki["ca"])
    assert os.path.exists(service / "supervise")
