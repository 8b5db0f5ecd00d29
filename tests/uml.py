"""Run one command inside a User-Mode-Linux guest whose kernel has kernel TLS.

The machine's own kernel may lack ``CONFIG_TLS``.  Debian 12's
``user-mode-linux`` kernel (6.1) has it as a module: ``scripts/install``
unpacks that package and ``kmod`` into ``.uml/root`` (nothing is installed
system-wide).  ``guest_run`` boots it with the machine's own root file
system (hostfs, read-write), so the guest sees this checkout, its venv and
the Python that runs them; an init script mounts what a system needs
(tmpfs on /run and /dev/shm, and TMPDIR in /run: the host's /tmp, where a
checkout may be, stays visible), brings ``lo`` up, loads the ``tls``
module, runs the command and powers off.  Boot and power-off take about
two seconds.  The guest has one CPU.

UML 6.1 gives the FPU state of its processes to ptrace in a buffer sized
for AVX; a host kernel on a CPU with AVX-512 or AMX answers EFAULT and the
guest dies at its first process.  ``uml_xstate.c``, preloaded into the UML
kernel, passes the whole buffer the host wants.

As a program, ``python tests/uml.py [--] command...`` runs the command in
the guest, prints its output and exits with its status (the bench uses it).
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BOOT_ARGS = [
    "mem=2G",
    "rootfstype=hostfs",
    "rootflags=/",
    "rw",
    "quiet",
    "con=null",
    "con0=null,fd:1",
]
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
GUEST_TMP = "/run/tmp"  # TMPDIR in the guest: a tmpfs of its own


class GuestUnavailable(Exception):
    """The guest cannot start at all; the text says why."""


@dataclass
class GuestResult:
    """How a guest run ended; ``folder`` is readable only inside ``guest_run``."""

    folder: Path  # the run's files: output, status, console.log, and the command's own
    status: int | None  # the command's exit status; None if it never finished
    timed_out: bool

    def tail(self, name: str = "output", lines: int = 40) -> str:
        try:
            text = (self.folder / name).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def uml_root() -> Path:
    """The unpacked packages: this checkout's ``.uml``, else the main checkout's.

    Raises ``GuestUnavailable`` when neither has the kernel.
    """
    places = [ROOT / ".uml"]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        common = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--path-format=absolute", "--git-common-dir"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        if common:
            places.append(Path(common).parent / ".uml")
    for place in places:
        if (place / "root/usr/bin/linux.uml").is_file():
            return place / "root"
    raise GuestUnavailable("no User-Mode-Linux kernel in .uml: run ./scripts/install --test")


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _init_script(run: Path, command: Sequence[str], env: Mapping[str, str]) -> str:
    words = " ".join(f"{k}={_quote(v)}" for k, v in env.items())
    poweroff = "import ctypes; ctypes.CDLL(None).reboot(0x4321FEDC)"
    return f"""#!/bin/sh
export PATH={PATH}
mount -t proc proc /proc
mount -t sysfs sys /sys
mountpoint -q /dev || mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
for d in /dev/shm /run; do mount -t tmpfs tmpfs $d; done
mkdir -p {GUEST_TMP}
ip link set lo up
echo {run}/modprobe >/proc/sys/kernel/modprobe
{run}/modprobe tls
cd {_quote(str(ROOT))}
env -i {words} {" ".join(_quote(a) for a in command)} >{run}/output 2>&1
echo $? >{run}/status
exec {_quote(sys.executable)} -c {_quote(poweroff)}
"""


def _prepare(run: Path, uml: Path, command: Sequence[str], env: Mapping[str, str]) -> None:
    """Write the init, the modprobe wrapper and the shim into the run folder."""
    version = next((uml / "usr/lib/uml/modules").iterdir()).name
    (run / "lib/modules").mkdir(parents=True)
    (run / "lib/modules" / version).symlink_to(uml / "usr/lib/uml/modules" / version)
    (run / "bin").mkdir()
    (run / "bin/modprobe").symlink_to(uml / "bin/kmod")  # kmod acts on its name
    wrapper = f'#!/bin/sh\nexec {run}/bin/modprobe -d {run} "$@"\n'
    for name, text in (("modprobe", wrapper), ("init", _init_script(run, command, env))):
        (run / name).write_text(text)
        (run / name).chmod(0o755)
    try:
        build_preload(Path(__file__).parent / "uml_xstate.c", run / "xstate.so")
    except OSError as exc:
        raise GuestUnavailable(f"unable to build the UML xstate shim: {exc}") from None


def build_preload(source: Path, out: Path) -> None:
    """Compile the C file ``source`` into the LD_PRELOAD library ``out``.

    Raises ``OSError`` with the compiler's complaint if it cannot.
    """
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler: install gcc")
    built = subprocess.run(
        [cc, "-O2", "-shared", "-fPIC", "-o", str(out), str(source), "-ldl"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if built.returncode:
        raise OSError(built.stderr.strip())


@contextlib.contextmanager
def guest_run(
    command: Sequence[str],
    env: Mapping[str, str],
    timeout: float,
    started: Callable[[subprocess.Popen], None] = lambda _proc: None,
) -> Iterator[GuestResult]:
    """Boot the guest, run ``command`` there with exactly ``env`` (plus PATH), power off.

    ``command`` runs in this checkout; ``$S6TLS_GUEST_DIR`` names the run
    folder, visible from both sides,
    where it may leave files for the caller.  The guest is killed after
    ``timeout`` seconds.  ``started`` gets the UML process (to kill it from
    another thread).  Yields the result; the folder is removed afterwards.

    Raises ``GuestUnavailable`` when the kernel is missing, the shim cannot
    be built, or the kernel dies before running the command.
    """
    uml = uml_root()
    run = Path(tempfile.mkdtemp(prefix="s6tls-guest-", dir="/var/tmp"))
    try:
        env = {"PATH": PATH, "TMPDIR": GUEST_TMP, **env, "S6TLS_GUEST_DIR": str(run)}
        _prepare(run, uml, command, env)
        with open(run / "console.log", "wb") as console:
            proc = subprocess.Popen(
                [str(uml / "usr/bin/linux.uml"), *BOOT_ARGS, f"uml_dir={run}", f"init={run}/init"],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env={**os.environ, "LD_PRELOAD": str(run / "xstate.so")},
                start_new_session=True,
            )
        started(proc)
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the guest's host processes too
            proc.wait()
        status_file = run / "status"
        status = int(status_file.read_text()) if status_file.exists() else None
        result = GuestResult(run, status, timed_out)
        if status is None and not timed_out and "Kernel panic" in result.tail("console.log"):
            raise GuestUnavailable(f"the UML kernel died: {result.tail('console.log', 3)}")
        yield result
    finally:
        shutil.rmtree(run, ignore_errors=True)


def main(argv: Sequence[str]) -> int:
    command = list(argv[1:] if argv[:1] == ["--"] else argv)
    if not command:
        sys.stderr.write("usage: python tests/uml.py [--] command...\n")
        return 100
    env = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "S6TLS_SLOW", "TERM")}
    try:
        with guest_run(command, env, timeout=3600) as result:
            sys.stdout.write(result.tail(lines=1_000_000) + "\n")
            return 111 if result.status is None else result.status
    except GuestUnavailable as exc:
        sys.stderr.write(f"uml: fatal: {exc}\n")
        return 111


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
