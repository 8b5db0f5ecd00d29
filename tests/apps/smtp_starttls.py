"""An SMTP-like line application speaking UCSPI-TLS, for s6-ucspitlsd and s6-ucspitlsc.

Usage:
    smtp_starttls.py server COMMAND   under s6-ucspitlsd (network on fds 0 and 1)
    smtp_starttls.py client COMMAND   under s6-ucspitlsc, against the server above
    smtp_starttls.py direct COMMAND   under s6-ucspitlsc, TLS at once (openssl s_server)

COMMAND is what it writes to SSLCTLFD when TLS is asked for: ``Y`` (and
read the notification block), ``y``, ``decline`` (close SSLCTLFD and go on
in cleartext), or any other single byte (which the engine must refuse).

The server greets, answers EHLO with STARTTLS in its extensions, and on
STARTTLS says 220, sends the command, then serves the same commands over
SSLREADFD/SSLWRITEFD: ``ECHO text`` (250 text), ``FACTS`` (one 250- line
per entry of the notification block), ``QUIT`` (221).  Cleartext lines are
read one byte at a time, so nothing the client sent after STARTTLS is ever
taken as a command.  At the end it reaps the engine (its child) and writes
``engine exit N`` on stderr; on a failed handshake it writes ``tls failed``.

The client roles print the whole dialogue on stdout, one line each way,
``C: `` for what they sent and ``S: `` for what they received.
"""

import os
import sys


def read_line(fd: int) -> bytes:
    """One line from ``fd``, a byte at a time; b"" at EOF."""
    line = bytearray()
    while not line.endswith(b"\n") and len(line) < 1000:
        byte = os.read(fd, 1)
        if not byte:
            break
        line += byte
    return bytes(line)


def write(fd: int, text: str) -> None:
    os.write(fd, text.encode())


def start_tls(command: str) -> dict[str, str | None] | None:
    """Send ``command`` on SSLCTLFD; the notification as a dict (``Y``), {} (``y``), or None.

    None means TLS did not start: the engine closed the socket before the
    end of the block (a failed handshake, a refused command).
    """
    ctl = int(os.environ["SSLCTLFD"])
    os.write(ctl, command.encode())
    block = b""
    while not block.endswith(b"\0\0") and (chunk := os.read(ctl, 4096)):
        block += chunk
    os.close(ctl)
    if command == "y":
        return {} if not block else None
    if not block.endswith(b"\0\0"):
        return None
    facts: dict[str, str | None] = {}
    for entry in block[:-2].split(b"\0"):
        key, eq, value = entry.decode().partition("=")
        facts[key] = value if eq else None
    return facts


def reap() -> None:
    try:
        _pid, status = os.wait()
    except ChildProcessError:
        return
    print(f"engine exit {os.waitstatus_to_exitcode(status)}", file=sys.stderr, flush=True)


def serve(command: str) -> int:
    rfd, wfd = 0, 1
    facts: dict[str, str | None] | None = None
    write(wfd, "220 s6tls.test ESMTP\r\n")
    while line := read_line(rfd):
        verb, _, arg = line.decode(errors="replace").rstrip("\r\n").partition(" ")
        verb = verb.upper()
        if verb in ("EHLO", "HELO"):
            ext = "" if facts is not None else "250-STARTTLS\r\n"
            write(wfd, f"250-s6tls.test\r\n{ext}250 8BITMIME\r\n")
        elif verb == "STARTTLS" and facts is None:
            if command == "decline":
                os.close(int(os.environ["SSLCTLFD"]))
                write(wfd, "454 4.7.0 TLS not available\r\n")
                continue
            write(wfd, "220 2.0.0 ready to start TLS\r\n")
            facts = start_tls(command)
            if facts is None:
                print("tls failed", file=sys.stderr, flush=True)
                break
            rfd, wfd = int(os.environ["SSLREADFD"]), int(os.environ["SSLWRITEFD"])
        elif verb == "ECHO":
            write(wfd, f"250 {arg}\r\n")
        elif verb == "FACTS":
            lines = [f"250-{k}={v}" if v is not None else f"250-{k}" for k, v in facts.items()]
            write(wfd, "".join(f"{line}\r\n" for line in lines) + "250 end\r\n")
        elif verb == "QUIT":
            write(wfd, "221 2.0.0 bye\r\n")
            break
        else:
            write(wfd, "250 ok\r\n")
    os.close(wfd)
    reap()
    return 0


def talk(rfd: int, wfd: int, text: str) -> str:
    """Send one line, print both, return the reply's last line."""
    print(f"C: {text}", flush=True)
    write(wfd, text + "\r\n")
    return expect(rfd)


def expect(rfd: int) -> str:
    """Read and print a (possibly multi-line) reply; return its last line."""
    while True:
        line = read_line(rfd).decode(errors="replace").rstrip("\r\n")
        print(f"S: {line}", flush=True)
        if len(line) < 4 or line[3] != "-":
            return line


def tls_fds(command: str) -> tuple[int, int] | None:
    """Start TLS with ``command``, print what came back; SSLREADFD/SSLWRITEFD, or None."""
    facts = start_tls(command)
    print(f"TLS: {facts}", flush=True)
    if facts is None:
        reap()
        return None
    return int(os.environ["SSLREADFD"]), int(os.environ["SSLWRITEFD"])


def client(command: str) -> int:
    expect(6)
    talk(6, 7, "EHLO client.test")
    if not talk(6, 7, "STARTTLS").startswith("220") or (fds := tls_fds(command)) is None:
        return 1
    rfd, wfd = fds
    talk(rfd, wfd, "EHLO client.test")
    talk(rfd, wfd, "ECHO secret sent only inside TLS")
    talk(rfd, wfd, "QUIT")
    os.close(wfd)
    reap()
    return 0


def direct(command: str) -> int:
    if (fds := tls_fds(command)) is None:
        return 1
    rfd, wfd = fds
    write(wfd, "hello through s6-ucspitlsc\n")
    print(f"S: {read_line(rfd).decode().rstrip()}", flush=True)
    os.close(wfd)
    reap()
    return 0


if __name__ == "__main__":
    role, command = sys.argv[1], sys.argv[2]
    sys.exit({"server": serve, "client": client, "direct": direct}[role](command))
