"""``s6tls``: the suite's own small command; ``s6tls demo`` shows the tools at work."""

import sys
from collections.abc import Sequence

USAGE = "usage: s6tls demo\n"


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["demo"]:
        sys.stderr.write(USAGE)
        sys.exit(100)
    from .demo import run

    sys.exit(run())


if __name__ == "__main__":
    main()
