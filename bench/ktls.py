"""``python -m bench.ktls [--size MIB] [--rounds N]``: s6tls with and without kernel TLS.

The same tunnel as ``bench.throughput`` (s6-tlsserver and s6-tlsclient
around two endpoints, one way, every byte counted), once as usual and once
with ``--ktls`` at both ends, alternating run by run, for each suite the
kernel takes (TLS 1.3 AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305, and
TLS 1.2 AES-256-GCM).  MB/s and CPU s/GB are ``bench.throughput``'s (the
marginal cost of the data, set-up and handshake left out).  Each kernel run
must raise /proc/net/tls_stat's TlsTxSw by 2 (both ends in the kernel), and
each userspace run by 0, or it is a failure, never a figure.

It needs a kernel with CONFIG_TLS.  On one without it (this project's
machine kind), it boots the test suite's User-Mode-Linux guest
(``tests/uml.py``) and runs inside it.  The report says whether the
kernel's figures can stand for hardware: a UML kernel, or any kernel whose
AES-GCM is the generic C code (no AES-NI driver in /proc/crypto), runs
kernel TLS far slower than a real machine, and its speeds are labelled
not representative.  Writes ``bench/results/ktls.json``.
"""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .common import ROOT, BenchError, Pki, become_subreaper, scratch, summary
from .throughput import transfer
from .tunnels import s6tls

sys.path.insert(0, str(ROOT / "tests"))
from uml import GuestUnavailable, guest_run

RESULTS = ROOT / "bench" / "results" / "ktls.json"
SUITES = {
    "TLSv1.3 AES-128-GCM": {"TLS_MIN_VERSION": "1.3", "TLS_CIPHERSUITES": "TLS_AES_128_GCM_SHA256"},
    "TLSv1.3 AES-256-GCM": {"TLS_MIN_VERSION": "1.3", "TLS_CIPHERSUITES": "TLS_AES_256_GCM_SHA384"},
    "TLSv1.3 CHACHA20-POLY1305": {
        "TLS_MIN_VERSION": "1.3",
        "TLS_CIPHERSUITES": "TLS_CHACHA20_POLY1305_SHA256",
    },
    "TLSv1.2 AES-256-GCM": {
        "TLS_MAX_VERSION": "1.2",
        "TLS_CIPHERS": "ECDHE-ECDSA-AES256-GCM-SHA384",
    },
}
PATHS = {"userspace": [], "kernel": ["--ktls"]}


def tls_tx() -> int:
    """TlsTxSw from /proc/net/tls_stat: connections whose sending side the kernel ran."""
    for line in Path("/proc/net/tls_stat").read_text().splitlines():
        name, value = line.split()
        if name == "TlsTxSw":
            return int(value)
    raise BenchError("no TlsTxSw in /proc/net/tls_stat")


def kernel_crypto() -> dict[str, object]:
    """What the kernel runs AES-GCM with, and whether that stands for hardware."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    uml = "User Mode Linux" in cpuinfo or "model name\t: UML" in cpuinfo
    drivers = [
        line.split(":", 1)[1].strip()
        for line in Path("/proc/crypto").read_text().splitlines()
        if line.startswith("driver") and "gcm" in line
    ]
    accelerated = any("aesni" in d or "vaes" in d or "ce" in d.split("-") for d in drivers)
    why = []
    if uml:
        why.append("User-Mode-Linux guest")
    if not accelerated:
        why.append(f"no AES-NI in the kernel's AES-GCM ({', '.join(drivers) or 'none loaded'})")
    return {
        "kernel": os.uname().release,
        "gcm_drivers": drivers,
        "representative": not why,
        "why_not": "; ".join(why),
    }


def measure(size: int, rounds: int, log: Any) -> dict[str, object]:
    """Every suite, both paths, ``rounds`` rounds: raw figures and summaries."""
    become_subreaper()
    timeout = 120 + size / 2e6
    out: dict[str, object] = {"size": size, "rounds": rounds}
    with scratch() as tmp:
        pki = Pki.make(tmp)
        for suite, env in SUITES.items():
            figures: dict[str, dict[str, list[Any]]] = {
                path: {"mbps": [], "cpu_per_gb": [], "failures": []} for path in PATHS
            }
            for round_no in range(rounds):
                for path, options in PATHS.items():
                    tunnel = s6tls(f"s6tls-{path}", options, env)
                    got = figures[path]
                    try:
                        before = tls_tx()
                        empty = transfer(tunnel, pki, "oneway", 0, timeout)
                        full = transfer(tunnel, pki, "oneway", size, timeout)
                        moved = tls_tx() - before
                        if moved != (4 if path == "kernel" else 0):
                            raise BenchError(f"{moved} sending sides in the kernel, not as asked")
                    except BenchError as exc:
                        got["failures"].append(f"round {round_no + 1}: {exc}")
                        log(f"  FAILED {suite} {path} round {round_no + 1}: {exc}")
                        continue
                    got["mbps"].append(full.payload / full.seconds / 1e6)
                    got["cpu_per_gb"].append((full.cpu - empty.cpu) / (full.payload / 1e9))
                    log(
                        f"  {suite} {path} round {round_no + 1}: {got['mbps'][-1]:.1f} MB/s,"
                        f" {got['cpu_per_gb'][-1]:.2f} CPU s/GB"
                    )
            out[suite] = {
                path: {
                    "mbps": summary(f["mbps"]),
                    "cpu_per_gb": summary(f["cpu_per_gb"]),
                    "failures": f["failures"],
                }
                for path, f in figures.items()
            }
    out["crypto"] = kernel_crypto()
    return out


def render(results: dict[str, Any]) -> str:
    """The report: one line per suite, both paths side by side."""
    crypto = results["crypto"]
    size_mib = results["size"] >> 20
    lines = [
        f"kernel TLS against userspace, s6-tlsserver | s6-tlsclient, {size_mib} MiB one way,"
        f" {results['rounds']} rounds, kernel {crypto['kernel']} (medians)",
    ]
    if not crypto["representative"]:
        lines.append(
            f"NOT REPRESENTATIVE OF HARDWARE: {crypto['why_not']}; these kernel TLS speeds"
            " are not those of kernel TLS on a real machine"
        )
    lines.append(f"{'suite':28} {'userspace':>22} {'kernel TLS':>22}")
    for suite in SUITES:
        cells = []
        for path in PATHS:
            got = results[suite][path]
            if got["failures"]:
                cells.append(f"FAILED ({len(got['failures'])})")
            else:
                mbps, cpu = got["mbps"]["median"], got["cpu_per_gb"]["median"]
                cells.append(f"{mbps:7.1f} MB/s {cpu:6.2f} s/GB")
        lines.append(f"{suite:28} {cells[0]:>22} {cells[1]:>22}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ktls", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--size", type=int, default=64, help="MiB per run (default 64)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--here", action="store_true", help="run on this kernel, never in a guest")
    args = parser.parse_args()

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    if args.here or Path("/proc/net/tls_stat").exists():
        results = measure(args.size << 20, args.rounds, log)
    else:
        log("this kernel has no kernel TLS: running inside the User-Mode-Linux guest")
        try:
            results = _in_guest(args.size, args.rounds)
        except (GuestUnavailable, BenchError) as exc:
            log(f"bench.ktls: fatal: {exc}")
            return 2
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(render(results))
    failed = any(results[s][p]["failures"] for s in SUITES for p in PATHS)
    return 1 if failed else 0


def _in_guest(size: int, rounds: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.ktls", "--here", "--size", str(size)]
    command += ["--rounds", str(rounds)]
    env = {"HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
    RESULTS.unlink(missing_ok=True)
    with guest_run(command, env, timeout=7200) as result:
        if result.status is None or not RESULTS.exists():
            raise BenchError(f"the guest run did not finish:\n{result.tail(lines=20)}")
        found: dict[str, Any] = json.loads(RESULTS.read_text())
    return found


if __name__ == "__main__":
    sys.exit(main())
