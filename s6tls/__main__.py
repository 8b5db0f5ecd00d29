"""``s6tls``: the suite's own small command; ``s6tls demo`` shows the tools at work."""

import sys
from collections.abc import Sequence

from . import __version__

HELP = """usage: s6tls demo | s6tls --help | s6tls --version

The TLS tools of s6-networking in Python: s6-tlsd, s6-tlsc, s6-tlsserver,
s6-tlsclient, s6-ucspitlsd, s6-ucspitlsc, and for datagrams (DTLS) s6-dtlsserver
and s6-dtlsclient (each has its own --help and manual page).

  demo        run a TLS service on loopback with a throw-away certificate and a
              client talking to it; exit 0 if the whole exchange worked
  --help      print this help and exit
  --version   print the version and exit

Exit codes: 0 success, 1 the demo failed, 100 usage.
See man s6-tlsserver.
"""


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--help"]:
        sys.stdout.write(HELP)
        sys.exit(0)
    if args == ["--version"]:
        sys.stdout.write(f"s6tls {__version__}\n")
        sys.exit(0)
    if args != ["demo"]:
        sys.stderr.write("s6tls: usage: s6tls demo | s6tls --help | s6tls --version\n")
        sys.exit(100)
    from .demo import run

    sys.exit(run())


if __name__ == "__main__":
    main()
