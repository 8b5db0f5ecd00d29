"""One of our programs' ``main`` run in a forked child of the test: fast, and patchable."""

import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence


def forked_main(
    main: Callable[[Sequence[str]], object],
    argv: Sequence[str],
    env: Mapping[str, str],
    fds: Sequence[tuple[int, int]],
    *,
    close: Iterable[int] = (),
    new_session: bool = False,
    prepare: Callable[[], None] = lambda: None,
) -> int:
    """Fork; in the child, ``main(argv)`` with ``env`` as its whole environment.

    The child first closes ``close`` (our descriptors it must not hold),
    starts a session with ``new_session``, puts each (source, target) of
    ``fds`` in place and closes the sources that are no target, runs
    ``prepare()`` (which may patch the code in the child only), and exits
    with ``main``'s code: 111 if it raised anything but ``SystemExit``, with
    a ``harness:`` line on fd 2.
    Returns the child's pid.
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 111
        try:
            for fd in close:
                os.close(fd)
            if new_session:
                os.setsid()
            for src, dst in fds:
                os.dup2(src, dst)
            for src in {src for src, _dst in fds} - {dst for _src, dst in fds}:
                os.close(src)
            os.environ.clear()
            os.environ.update(env)
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 - pytest replaced it
            prepare()
            main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 111
        except BaseException as exc:
            os.write(2, f"harness: {type(exc).__name__}: {exc}\n".encode())
        finally:
            os._exit(code)
    return pid
