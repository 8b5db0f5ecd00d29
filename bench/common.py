"""What every benchmark shares: paths, certificates, ports, processes, statistics.

The rule that makes CPU figures trustworthy lives here: every process a run
starts is reaped by :class:`Processes`, which adds up the ``os.wait4`` rusage
of each one, and the benchmark process is a child subreaper, so a grandchild
whose parent died without reaping it is handed to us and counted too.  Nothing
is ever left running: leaving a ``Processes`` block kills every process group
it started, and reaps them, whatever happened inside.
"""

import contextlib
import ctypes
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from s6tls.tls.pki import make_pki

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
# Another checkout of s6tls to measure beside this one (its bin/ and its .venv), and
# the bin/ of the real s6-networking (README.md, section Performance, says how to get both).
BEFORE = Path(os.environ["S6TLS_BEFORE"]) if os.environ.get("S6TLS_BEFORE") else None
REFERENCE = Path(os.environ["S6TLS_REFERENCE"]) if os.environ.get("S6TLS_REFERENCE") else None
ENDPOINT = [PYTHON, "-I", "-S", str(ROOT / "bench" / "endpoint.py")]
SERVER_NAME = "localhost"
PR_SET_CHILD_SUBREAPER = 36


class BenchError(Exception):
    """A run could not be measured: a tool failed, timed out, or lost data."""


def program(name: str, root: Path = ROOT) -> list[str]:
    """The command that runs s6tls program ``name`` from the ``bin/`` of checkout ``root``
    (this one by default), with that checkout's .venv."""
    python = PYTHON if root == ROOT else str(root / ".venv" / "bin" / "python")
    return [python, str(root / "bin" / name)]


def become_subreaper() -> None:
    """Make orphaned descendants our children, so their rusage reaches us."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def raise_nofile(wanted: int) -> int:
    """Let this process (and what it starts from now on) open ``wanted`` descriptors,
    or as many as its hard limit allows when it cannot raise that (no CAP_SYS_RESOURCE);
    return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
        return wanted
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name: [0] is the state, [1] ppid."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_table() -> dict[int, tuple[int, str]]:
    """Every process: pid -> (ppid, command name)."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                text = Path(f"/proc/{entry}/stat").read_text()
                name = text[text.index("(") + 1 : text.rindex(")")]
                table[int(entry)] = (int(text.rsplit(")", 1)[1].split()[1]), name)
    return table


def descendants(pid: int, table: dict[int, tuple[int, str]] | None = None) -> dict[int, str]:
    """The processes below ``pid`` (not itself), with their command names."""
    table = process_table() if table is None else table
    kids: dict[int, list[int]] = {}
    for child, (parent, _name) in table.items():
        kids.setdefault(parent, []).append(child)
    found, todo = {}, list(kids.get(pid, []))
    while todo:
        child = todo.pop()
        found[child] = table[child][1]
        todo += kids.get(child, [])
    return found


def tree_cpu(pid: int, own: bool = True) -> float:
    """CPU seconds of the process tree under ``pid``: every live process's user and
    system time with that of the children it reaped, and ``pid``'s own (unless not
    ``own``: a reaper's wake-ups are not the server's work).  A process that ended
    and was reaped is counted in its reaper's children's time."""
    total = 0.0
    for member in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError):
            ticks = [int(t) for t in stat_fields(member)[11:15]]
            total += sum(ticks if own or member != pid else ticks[2:])
    return total / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Pki:
    """A throw-away CA and an ECDSA P-256 server certificate for ``localhost``/127.0.0.1."""

    ca: str
    cert: str
    key: str

    @classmethod
    def make(cls, directory: Path) -> "Pki":
        paths = make_pki(directory, [SERVER_NAME, "127.0.0.1"])
        return cls(ca=paths["ca"], cert=paths["cert"], key=paths["key"])


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    """A temporary directory, removed on the way out."""
    with tempfile.TemporaryDirectory(prefix="s6tls-bench-") as path:
        yield Path(path)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_listening(port: int, *, udp: bool = False) -> bool:
    """Whether something listens on 127.0.0.1:``port``, read from /proc/net/tcp.

    With ``udp``, whether a UDP socket is bound there, read from
    /proc/net/udp (UDP has no LISTEN state).  Probing with connect() would
    use up the single accept of ``socat OPENSSL-LISTEN`` without ``fork``;
    the kernel's table costs nothing.
    """
    wanted = f"0100007F:{port:04X}"
    with open("/proc/net/udp" if udp else "/proc/net/tcp") as table:
        next(table)
        return any(
            fields[1] == wanted and (udp or fields[3] == "0A") for fields in map(str.split, table)
        )


class Processes:
    """The processes of one run: started in their own sessions, always reaped.

    ``cpu`` is the user+sys time (``sys`` the system part) of everything
    reaped so far: each process
    with the descendants it reaped itself, plus orphans handed to us as
    subreaper.  Use as a context manager; on exit every process group still
    alive is killed with SIGKILL and reaped.
    """

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.cpu = 0.0
        self.sys = 0.0

    def __enter__(self) -> "Processes":
        return self

    def __exit__(self, *exc: object) -> None:
        groups = [proc.pid for proc in self.procs if proc.returncode is None]
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(BenchError):
                self.wait(proc, timeout=10)
        self.reap_orphans(timeout=30, groups=groups)

    def _count(self, usage: resource.struct_rusage) -> None:
        self.cpu += usage.ru_utime + usage.ru_stime
        self.sys += usage.ru_stime

    def start(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        **popen: object,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in a new session (so its whole group can be killed)."""
        full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})}
        proc = subprocess.Popen(argv, env=full_env, start_new_session=True, **popen)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def wait(self, proc: subprocess.Popen[bytes], timeout: float) -> int:
        """Reap ``proc`` within ``timeout`` seconds; return its exit code.

        Raises ``BenchError`` when it is still running after ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while proc.returncode is None:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                self._count(usage)
                proc.returncode = os.waitstatus_to_exitcode(status)
            elif time.monotonic() > deadline:
                raise BenchError(f"{Path(str(proc.args[0])).name} still running after {timeout}s")
            else:
                time.sleep(0.005)
        return proc.returncode

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
        """Send SIGTERM to ``proc`` and reap it; return its exit code.

        Not ``Popen.send_signal``: it polls first, and a process it reaps
        there is lost to our rusage count.
        """
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGTERM)
        return self.wait(proc, timeout)

    def reap_orphans(self, timeout: float, groups: Sequence[int] = ()) -> None:
        """Reap descendants re-parented to us, counting their CPU time.

        Until none is left, and none of the process ``groups`` either: the
        processes of a group killed reach us only once their own parent is
        gone (10,000 applications of a server take a while).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                pid, _status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                if not any(map(_group_alive, groups)):
                    return
                pid, usage = 0, None
            if pid and usage is not None:
                self._count(usage)
            else:
                time.sleep(0.005)


def _group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` still has a process (a zombie counts)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def has_exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether ``proc`` has exited, without reaping it (its rusage stays ours to collect)."""
    if proc.returncode is not None:
        return True
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def wait_listening(
    port: int, proc: subprocess.Popen[bytes], timeout: float = 20, *, udp: bool = False
) -> None:
    """Wait until ``proc`` listens on ``port`` (UDP with ``udp``: see :func:`is_listening`).

    Raises ``BenchError`` if it dies or is slow; never reaps it.
    """
    deadline = time.monotonic() + timeout
    while not is_listening(port, udp=udp):
        if has_exited(proc):
            raise BenchError(f"{Path(str(proc.args[0])).name} exited before listening")
        if time.monotonic() > deadline:
            raise BenchError(f"nothing listens on port {port} after {timeout}s")
        time.sleep(0.005)


def summary(values: Sequence[float | None]) -> dict[str, object]:
    """Median, min, max and the values themselves (JSON-ready); ``None`` is a failed run."""
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0, "median": None, "min": None, "max": None, "values": []}
    return {
        "n": len(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "values": list(values),
    }


def compare(ours: Sequence[float | None], theirs: Sequence[float | None]) -> dict[str, object]:
    """The ratio of medians ours/theirs, and the range of the run-by-run ratios.

    Runs alternate, so run *i* of each tool saw about the same machine load:
    the paired ratios show how much of a difference is noise.  ``None`` is a
    failed run, left out.
    """
    paired = [a / b for a, b in zip(ours, theirs, strict=True) if a is not None and b]
    mine = [v for v in ours if v is not None]
    other = [v for v in theirs if v is not None]
    if not mine or not other or not statistics.median(other):
        return {"ratio": None, "paired_min": None, "paired_max": None}
    return {
        "ratio": statistics.median(mine) / statistics.median(other),
        "paired_min": min(paired, default=None),
        "paired_max": max(paired, default=None),
    }
