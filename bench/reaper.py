"""``python -I -S bench/reaper.py PROG...``: run PROG as the child of a child subreaper.

A server measured for CPU may leave orphans: the real s6-networking's
``s6-tlsd`` starts ``s6-tlsd-io`` and then becomes the application (``cat``),
which never reaps it, so each connection's TLS engine ends as an orphan.
Orphans go to the nearest subreaper: this process, which reaps every one
of them, so that their user and system time lands in its own children's
time (``cutime``/``cstime`` of /proc/PID/stat), where
``common.tree_cpu(pid, own=False)`` finds it with that of the live tree
below.  Each server of the per-connection benchmarks runs under one, so
that all are counted the same way.

SIGTERM, SIGINT, SIGHUP and SIGQUIT are passed on to PROG; once PROG has
exited (and what was left to reap without waiting is reaped) this process
exits with PROG's code.  Standard library only, for ``-I -S``.
"""

import ctypes
import os
import signal
import sys

PR_SET_CHILD_SUBREAPER = 36
PASSED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def main() -> int:
    """Start PROG, reap everything, return PROG's exit code."""
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    argv = sys.argv[1:]
    child = os.posix_spawnp(argv[0], argv, os.environ)
    for sig in PASSED:
        signal.signal(sig, lambda signum, _frame: os.kill(child, signum))
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            break
    while True:  # the zombies that are there already, no more
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
