"""The TLS servers compared connection by connection, and how each is started.

Every one serves TLS on 127.0.0.1 with the bench's ECDSA P-256 certificate
and runs an application per connection (``cat`` unless told), except
``openssl s_server``, one process with no application at all (an upper bound):

- ``s6tls``: s6-tlsserver of this checkout, a supervisor and ``--workers``
  workers (one per CPU by default), each serving many connections;
- ``s6tls-before``: s6-tlsserver of the checkout ``S6TLS_BEFORE`` names
  (the fork-server of commit d99279d for issue 21's before/after table);
- ``openssl-s_server``: ``openssl s_server -www``, Debian's OpenSSL 3.0;
- ``stunnel-daemon``: stunnel 5.68 as a daemon, its usual mode: one process,
  a thread per connection (Debian builds it with ``Threading:PTHREAD``),
  forking ``exec``'s program per connection;
- ``stunnel-per-connection``: ucspi-tcp's ``tcpserver`` starting stunnel in
  inetd mode per connection, the C way of one process per connection;
- ``s6-networking``: the real s6-tlsserver of s6-networking 2.8.0.1 (C,
  BearSSL: TLS 1.2 only) when ``S6TLS_REFERENCE`` names its ``bin/``:
  s6-tcpserver forks per connection, s6-tlsd starts s6-tlsd-io and becomes
  the application.

Each runs under ``bench/reaper.py`` (a child subreaper), so that the CPU
of its whole tree, orphans included, is ``Running.cpu()``.
"""

import contextlib
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .common import (
    BEFORE,
    PYTHON,
    REFERENCE,
    ROOT,
    Pki,
    Processes,
    descendants,
    free_port,
    program,
    stat_fields,
    tree_cpu,
    wait_listening,
)
from .tunnels import stunnel_config, stunnel_exec

REAPER = [PYTHON, "-I", "-S", str(ROOT / "bench" / "reaper.py")]
ALL = (
    "s6tls",
    "s6tls-before",
    "openssl-s_server",
    "stunnel-daemon",
    "stunnel-per-connection",
    "s6-networking",
)
TLS12_ONLY = {"s6-networking"}
NO_APPLICATION = {"openssl-s_server"}
LABELS = {
    "s6tls": "s6tls pool",
    "s6tls-before": "s6tls fork-server (before)",
    "openssl-s_server": "openssl s_server",
    "stunnel-daemon": "stunnel daemon (threads)",
    "stunnel-per-connection": "stunnel per connection (tcpserver)",
    "s6-networking": "real s6-tlsserver (C)",
}


def available(names: Sequence[str] = ALL) -> list[str]:
    """``names`` without those this run cannot start (no S6TLS_BEFORE, no S6TLS_REFERENCE)."""
    missing = {"s6tls-before": BEFORE is None, "s6-networking": REFERENCE is None}
    return [name for name in names if not missing.get(name)]


def tcpserver(port: int, argv: list[str], maxconn: int = 100) -> list[str]:
    """ucspi-tcp's tcpserver on 127.0.0.1:``port``, no DNS or ident look-ups."""
    return ["tcpserver", "-H", "-R", "-l", "0", "-c", str(maxconn), "127.0.0.1", str(port), *argv]


def _stunnel_serving(pki: Pki, app: str) -> dict[str, str]:
    """stunnel's options for serving with ``pki``'s keypair, running /bin/``app``."""
    return {"cert": pki.cert, "key": pki.key, **stunnel_exec([f"/bin/{app}"])}


def stunnel_inetd_server(tmp: Path, pki: Pki, app: str = "cat") -> list[str]:
    """The command line of stunnel serving its stdin/stdout as TLS, running ``app``."""
    conf = stunnel_config(tmp / f"stunnel-inetd-{app}.conf", _stunnel_serving(pki, app), None)
    return ["stunnel", str(conf)]


def command(
    name: str,
    tmp: Path,
    pki: Pki,
    port: int,
    app: str = "cat",
    maxconn: int = 100,
    options: Sequence[str] = (),
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of server ``name`` on ``port`` running ``app``.

    ``maxconn`` is the connection limit (-c, and -C where the server has
    one: every client is 127.0.0.1); ``options`` go to s6-tlsserver only.
    """
    keys = {"CERTFILE": pki.cert, "KEYFILE": pki.key}
    limits = ["-c", str(maxconn), "-C", str(maxconn)]
    where = ["127.0.0.1", str(port)]
    if name in ("s6tls", "s6tls-before"):
        root = ROOT if name == "s6tls" else BEFORE
        assert root is not None
        return [*program("s6-tlsserver", root), "-H", *limits, *options, *where, app], keys
    if name == "s6-networking":
        assert REFERENCE is not None
        return [str(REFERENCE / "s6-tlsserver"), "-H", *limits, *where, app], keys
    if name == "openssl-s_server":
        argv = ["openssl", "s_server", "-www", "-quiet", "-cert", pki.cert, "-key", pki.key]
        return [*argv, "-accept", f"127.0.0.1:{port}"], {}
    if name == "stunnel-per-connection":
        return tcpserver(port, stunnel_inetd_server(tmp, pki, app), maxconn), {}
    if name == "stunnel-daemon":
        conf = stunnel_config(
            tmp / f"stunnel-daemon-{port}.conf",
            {"foreground": "yes"},
            {"accept": f"127.0.0.1:{port}", **_stunnel_serving(pki, app)},
        )
        return ["stunnel", str(conf)], {}
    raise ValueError(f"no server named {name}")


@dataclass
class Running:
    """A server started by ``start``: its port, and its reaper's process."""

    name: str
    port: int
    proc: "subprocess.Popen[bytes]"

    def cpu(self) -> float:
        """CPU seconds of the server's whole tree so far (see ``bench/reaper.py``)."""
        return tree_cpu(self.proc.pid, own=False)

    def own_cpu(self) -> float:
        """CPU seconds of the server's live processes alone, not of what they reaped.

        For a server that reaps its applications itself (s6tls's workers, the
        stunnel daemon), the server's own work without the applications'.
        """
        total = 0
        for pid in self.processes():
            with contextlib.suppress(OSError):
                total += sum(int(t) for t in stat_fields(pid)[11:13])
        return total / os.sysconf("SC_CLK_TCK")

    def processes(self) -> dict[int, str]:
        """The server's processes (its applications included): pid -> command name."""
        return descendants(self.proc.pid)


def start(
    procs: Processes,
    name: str,
    tmp: Path,
    pki: Pki,
    app: str = "cat",
    maxconn: int = 100,
    options: Sequence[str] = (),
) -> Running:
    """Start server ``name`` under a reaper, its messages to ``tmp/NAME.err``; wait until
    it listens."""
    port = free_port()
    argv, env = command(name, tmp, pki, port, app, maxconn, options)
    with (tmp / f"{name}.err").open("ab") as err:
        proc = procs.start(
            [*REAPER, *argv],
            env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    wait_listening(port, proc)
    return Running(name, port, proc)
