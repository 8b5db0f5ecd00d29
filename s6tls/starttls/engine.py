"""STARTTLS for s6-ucspitlsd and s6-ucspitlsc: the UCSPI-TLS protocol's two processes.

``start`` makes two pipes and a control socketpair, then forks:

- the **parent** execs prog, with the network still on its fds (0 and 1 for
  the server, 6 and 7 or -6/-7 for the client) for the cleartext phase, and
  ``SSLCTLFD``, ``SSLREADFD``, ``SSLWRITEFD`` in its environment;
- the **child** is the TLS engine.  It waits for prog's command on the
  control socket (``control``): EOF declines TLS (exit 0); ``Y`` or ``y``
  starts the handshake on the network fds, which prog no longer reads or
  writes; after ``Y`` the TLS facts go back as the notification block.
  Then the engine moves data between the network and prog's two pipes, as
  s6-tlsd's does, with no application pid to wait for: prog is its parent.

So prog keeps its pid (the one the super-server knows), and a failed
handshake reaches prog as EOF on the control socket and on SSLREADFD.
"""

import os
import socket
from typing import NoReturn

from ..cli import Log, failure
from ..errors import ExitCode, SystemFailure
from ..selfpipe import SelfPipe
from ..serve.app import application_env
from ..serve.connection import Setup
from ..serve.tunnel import establish, pump, summary
from ..tls.context import keep_session
from ..tls.handshake import connection_facts
from .control import Command, encode_notification, parse_command


def start(setup: Setup, net: tuple[int, int], peer: str) -> NoReturn:
    """Fork the engine, then exec prog; never returns.

    ``net`` is the network's read and write fds, which both processes keep;
    ``peer`` names the other end in the engine's log lines.  Raises
    ``SystemFailure`` if the pipes, the fork or the exec fail (after a
    failed exec the engine sees its control socket close and exits 0).
    """
    cfg = setup.cfg
    from_app_r, from_app_w = os.pipe()  # prog writes SSLWRITEFD, the engine reads
    to_app_r, to_app_w = os.pipe()  # the engine writes, prog reads SSLREADFD
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(from_app_w)
        os.close(to_app_r)
        theirs.close()
        _engine_main(setup, net, (from_app_r, to_app_w), ours, setup.log.about(peer, parent))
    os.close(from_app_r)
    os.close(to_app_w)
    ours.close()
    ctl = theirs.detach()
    for fd in (ctl, to_app_r, from_app_w):
        os.set_inheritable(fd, True)
    ssl_fds = {"SSLCTLFD": str(ctl), "SSLREADFD": str(to_app_r), "SSLWRITEFD": str(from_app_w)}
    env = application_env(setup.environ, keep_secrets=cfg.options.keep_env, extra=ssl_fds)
    prog = setup.app
    try:
        os.execvpe(prog[0], list(prog), env)
    except OSError as exc:
        raise SystemFailure(f"unable to exec {prog[0]}: {exc.strerror}") from None


def _engine_main(
    setup: Setup, net: tuple[int, int], app: tuple[int, int], ctl: socket.socket, log: Log
) -> NoReturn:
    """The child: wait for the command, handshake, notify, pump; always ``os._exit``.

    Its fatal line is the program's own (``s6-ucspitlsd: fatal: ...``), as
    for s6-tlsd: the engine is the process that ends; like every line of
    ``log``, it names the peer and prog's pid.
    """
    code: int = ExitCode.SYSTEM
    try:
        _release_stdio(net)
        code = engine(setup, net, app, ctl, log)
    except BaseException as exc:  # whatever it is: one line, and the child still exits
        code, line = failure(exc)
        log.fatal(line)
    finally:
        os._exit(code)


def engine(
    setup: Setup, net: tuple[int, int], app: tuple[int, int], ctl: socket.socket, log: Log
) -> int:
    """Wait for the command on ``ctl``, then run TLS between ``net`` and ``app``.

    ``app`` is (prog's output, prog's input): the pipes' engine ends; ``log``
    the connection's.  Owns every descriptor it is given.  Returns 0 when
    prog declined TLS or the tunnel ended cleanly.  Raises ``UsageError``
    (100) for an unknown command, the handshake's errors (97, 98) and
    ``TlsRuntimeError`` (98).
    """
    cfg = setup.cfg
    command = parse_command(ctl.recv(1))
    if command is Command.DECLINE:
        log.info("declined opportunistic TLS")
        return 0
    if command is Command.QUIET:
        ctl.close()
    else:
        ctl.shutdown(socket.SHUT_RD)
    log.info("accepted opportunistic TLS")
    setup.drop_privileges()
    link = establish(cfg, setup.ctx, *net)
    facts = connection_facts(link.conn)
    if command is Command.NOTIFY:
        try:
            ctl.sendall(encode_notification(facts))
        except OSError as exc:
            raise SystemFailure(f"unable to write the notification block: {exc.strerror}") from None
        ctl.close()
    with SelfPipe() as selfpipe:
        _status, stats = pump(cfg, link, (app[0], app[1], selfpipe.fileno()), None)
    keep_session(link.conn, log.warn)
    log.info(summary(facts, stats))
    return 0


def _release_stdio(net: tuple[int, int]) -> None:
    """Put /dev/null on the engine's fds 0 and 1 unless they are the network.

    The client's engine must not hold prog's stdin and stdout open: whoever
    reads prog's output would wait for the engine's end too.
    """
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        if fd not in net:
            os.dup2(null, fd)
    os.close(null)
