"""``s6tls demo``: a TLS service on loopback and a client talking to it.

No certificate is needed from the user: a throw-away CA and server
certificate are made in a temporary directory, ``s6-tlsserver`` serves a
small application on a loopback port the system picks, ``s6-tlsclient`` connects to it,
and both applications print the TLS facts they were given.  Everything is
cleaned up; the exit code is 0 only if the whole exchange worked.  The last
line names the command that shows the manual (``manual_command``).
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile

# Each application prints what it saw.  The server's answers every line, upper-cased.
SERVER_APP = r"""
import os, sys
facts = " ".join(f"{k}={os.environ.get(k, '-')}" for k in
                 ("SSL_PROTOCOL", "SSL_CIPHER", "SSL_TLS_SNI_SERVERNAME", "TCPREMOTEIP"))
sys.stderr.write(f"  server application saw: {facts}\n")
for line in sys.stdin:
    sys.stdout.write("server says: " + line.upper())
    sys.stdout.flush()
"""
CLIENT_APP = r"""
import os, sys
facts = " ".join(f"{k}={os.environ.get(k, '-')}" for k in
                 ("SSL_PROTOCOL", "SSL_CIPHER", "SSL_PEER_CERT_SUBJECT", "TCPREMOTEPORT"))
sys.stderr.write(f"  client application saw: {facts}\n")
os.write(7, b"hello over TLS\n")
os.close(7)
with os.fdopen(6, "rb") as net:
    reply = net.read().decode()
sys.stderr.write(f"  client application got back: {reply}")
sys.exit(0 if reply == "server says: HELLO OVER TLS\n" else 1)
"""


def _program(module: str) -> list[str]:
    return [sys.executable, "-c", f"from s6tls.{module} import main; main()"]


def run() -> int:
    """Run the demo; return 0 on success, 1 otherwise."""
    from .tls.pki import make_pki

    with tempfile.TemporaryDirectory(prefix="s6tls-demo-") as tmp:
        pki = make_pki(tmp, ["localhost", "127.0.0.1"])
        server_cmd = [
            *_program("tlsserver"),
            "-1",
            "-v",
            "127.0.0.1",
            "0",
            sys.executable,
            "-c",
            SERVER_APP,
        ]
        print(f"s6tls demo: throw-away CA and certificate in {tmp}")
        print("$ CERTFILE=cert.pem KEYFILE=key.pem s6-tlsserver -1 -v 127.0.0.1 0 app")
        server_env = {**os.environ, "CERTFILE": pki["cert"], "KEYFILE": pki["key"]}
        server = subprocess.Popen(
            server_cmd, env=server_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        client = None
        try:
            assert server.stdout is not None
            ready = server.stdout.readline()  # -1: the port, once the server listens
            if ready.strip().isdigit():
                port = ready.decode().strip()
                print(f"$ CAFILE=ca.pem s6-tlsclient -v -k localhost 127.0.0.1 {port} app")
                client = subprocess.run(
                    [
                        *_program("tlsclient"),
                        "-v",
                        "-k",
                        "localhost",
                        "127.0.0.1",
                        port,
                        sys.executable,
                        "-c",
                        CLIENT_APP,
                    ],
                    env={**os.environ, "CAFILE": pki["ca"]},
                    capture_output=True,
                    timeout=30,
                    check=False,
                )
        finally:
            server.send_signal(signal.SIGTERM)
            _out, server_log = server.communicate(timeout=30)
        print("--- what the client side printed:")
        print(client.stderr.decode() if client else "(the client did not run)", end="")
        print("--- what the server side printed:")
        print(server_log.decode(), end="")
        ok = client is not None and client.returncode == 0 and server.returncode == 0
        print(f"s6tls demo: {'success' if ok else 'FAILED'}")
        if ok:
            print(f"s6tls demo: next, read the manual: {manual_command('s6-tlsserver')}")
        return 0 if ok else 1


def manual_command(page: str) -> str:
    """The command that shows the section 1 ``page`` here, as the user's PATH stands.

    ``man PAGE`` when man finds it (an install whose ``bin`` is on PATH);
    otherwise ``man -l FILE`` on the page of this install, or of the
    checkout it runs from (``./scripts/demo`` installs into ``.venv``, which
    is not on PATH).
    """
    if shutil.which("man"):
        found = subprocess.run(["man", "-w", page], capture_output=True, timeout=30, check=False)
        if found.returncode == 0:
            return f"man {page}"
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for folder in (os.path.join(sys.prefix, "share", "man", "man1"), os.path.join(checkout, "man")):
        path = os.path.join(folder, f"{page}.1")
        if os.path.exists(path):
            return f"man -l {path}"
    return f"man {page}"
