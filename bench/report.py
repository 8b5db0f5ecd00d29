"""Turning the results into text, a verdict on each target, and a plot.

Every function here reads the results dictionary that ``bench/__main__.py``
builds (and writes as ``latest.json``); none of them measures anything.
"""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .handshakes import CLIENTS
from .handshakes import SERVERS as HANDSHAKE_SERVERS
from .startup import SERVERS as STARTUP_SERVERS
from .throughput import MODES
from .tunnels import SOCATS, TUNNELS

C_TUNNELS = [t.name for t in TUNNELS[1:]]
THROUGHPUT_GOALS = {"mbps": 1.5, "cpu_per_gb": 0.8}  # s6tls/socat
HANDSHAKE_GOAL = 3.0  # s6-tlsserver / stunnel per connection
USS_GOAL_MIB = 2.0
STALL_GOAL_MIB = 1.0


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _spread(stats: dict[str, Any], digits: int = 0) -> str:
    """``median (min-max)``, or FAILED when no run succeeded."""
    if not stats["n"]:
        return "FAILED"
    return (
        f"{_num(stats['median'], digits)} "
        f"({_num(stats['min'], digits)}-{_num(stats['max'], digits)})"
    )


def _ratio(comparison: dict[str, Any]) -> str:
    if comparison["ratio"] is None:
        return "-"
    return (
        f"{comparison['ratio']:.2f}x (run by run {comparison['paired_min']:.2f}"
        f"-{comparison['paired_max']:.2f})"
    )


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issue 5: what it asks, what was measured, whether it is met."""
    rows = []
    for mode in MODES:
        for socat in SOCATS:
            ratios = results["throughput"][mode]["ratios"][socat.name]
            speed, cpu = ratios["mbps"]["ratio"], ratios["cpu_per_gb"]["ratio"]
            goal = THROUGHPUT_GOALS["mbps"]
            rows.append(
                _target(
                    f"MB/s {mode} vs {socat.name}", f">= {goal:.2f}x", speed, (speed or 0) >= goal
                )
            )
            goal = THROUGHPUT_GOALS["cpu_per_gb"]
            rows.append(
                _target(
                    f"CPU s/GB {mode} vs {socat.name}", f"<= {goal:.2f}x", cpu, (cpu or 0) <= goal
                )
            )
    for n in CLIENTS:
        ratio = results["handshakes"][f"{n}_clients"]["ratios"]["stunnel-per-connection"]["ratio"]
        rows.append(
            _target(
                f"handshakes/s, {n} client(s), vs stunnel per connection",
                f">= {HANDSHAKE_GOAL:.2f}x",
                ratio,
                (ratio or 0) >= HANDSHAKE_GOAL,
            )
        )
    idle = results["memory"].get("idle")
    uss = idle["uss_kb_per_connection"] / 1024 if idle else None
    rows.append(
        _target(
            "private memory (USS) per connection",
            f"<= {USS_GOAL_MIB:.2f} MiB",
            uss,
            (uss or 0) <= USS_GOAL_MIB,
            unit=" MiB",
        )
    )
    stall = results["memory"].get("stall")
    growth = stall["hwm_growth_kb"] / 1024 if stall else None
    rows.append(
        _target(
            "engine growth under a stalled reader",
            f"< {STALL_GOAL_MIB:.2f} MiB",
            growth,
            (growth or 0) < STALL_GOAL_MIB,
            unit=" MiB",
        )
    )
    return rows


def _target(
    name: str, goal: str, value: float | None, met: bool, unit: str = "x"
) -> dict[str, Any]:
    """One row of the targets table; ``met`` is ignored when nothing was measured."""
    return {
        "target": name,
        "goal": goal,
        "measured": None if value is None else round(value, 2),
        "unit": unit.strip(),
        "met": None if value is None else met,
        "text": "-" if value is None else f"{value:.2f}{unit}",
    }


def _handshakes(hs: dict[str, Any], title: str) -> Iterator[str]:
    """The report of one ``handshakes.measure``: rates, server CPU, ratios, failures."""
    runs = f"{hs['seconds']} s x {hs['rounds']} rounds"
    yield f"Handshakes per second, openssl s_time {title}, {runs}"
    rows = []
    for n in CLIENTS:
        section = hs[f"{n}_clients"]
        rows.append([f"{n} client(s)", *(_spread(section[s]) for s in HANDSHAKE_SERVERS)])
        rows.append(
            ["  server CPU ms each", *(_spread(section["cpu_ms"][s], 2) for s in HANDSHAKE_SERVERS)]
        )
    if hs.get("reuse"):
        shares = hs["resumed"]
        rows.append(
            ["  resumed (lowest)", *(
                "-" if shares[s] is None else f"{shares[s]:.0%}" for s in HANDSHAKE_SERVERS
            )]
        )  # fmt: skip
    yield from _table(["", *HANDSHAKE_SERVERS], rows)
    for n in CLIENTS:
        for name, comparison in hs[f"{n}_clients"]["ratios"].items():
            yield f"  {n} client(s): s6tls/{name} {_ratio(comparison)}"
    yield from (f"  FAILED {f}" for f in hs["failures"])
    yield ""


def render(results: dict[str, Any]) -> Iterator[str]:
    """The whole report as lines of text: settings, every section, the targets."""
    machine, settings = results["machine"], results["settings"]
    yield (
        f"s6tls bench, {settings['mode']} run: {machine['cpus']} x {machine['cpu']},"
        f" Python {machine['python']}, pyOpenSSL {machine['pyopenssl']} on {machine['openssl']},"
        f" system {machine['system_openssl'].split(' (')[0]}, {machine['socat']},"
        f" {machine['stunnel']}; commit {machine['commit']}; {results['duration_s']:.0f} s"
    )
    yield ""
    size = results["throughput"]["size"] >> 20
    yield (
        f"Throughput, {size} MiB each run, {results['throughput']['rounds']} rounds"
        " (median (min-max)); MB/s higher is better, CPU s/GB lower is better"
    )
    for mode in MODES:
        section = results["throughput"][mode]
        names = [t.name for t in TUNNELS]
        rows = [
            ["MB/s", *(_spread(section[n]["mbps"]) for n in names)],
            ["CPU s/GB", *(_spread(section[n]["cpu_per_gb"], 2) for n in names)],
            ["  of it sys", *(_spread(section[n]["sys_per_gb"], 2) for n in names)],
            ["set-up CPU s", *(_spread(section[n]["fixed_cpu"], 3) for n in names)],
        ]
        yield from _table([mode, *names], rows)
        for name in C_TUNNELS:
            ratios = section["ratios"][name]
            yield (
                f"  s6tls/{name}: MB/s {_ratio(ratios['mbps'])},"
                f" CPU/GB {_ratio(ratios['cpu_per_gb'])}"
            )
        for name in names:
            for failure in section[name]["failures"]:
                yield f"  FAILED {failure}"
        yield ""
    for key, title in (("handshakes", "-new"), ("resumption", "-reuse -www /")):
        yield from _handshakes(results[key], title)
    st = results["startup"]
    yield f"Connect to handshake done, ms, {st['connections']} sequential connections each"
    yield from _table(
        ["", *STARTUP_SERVERS], [["ms", *(_spread(st[s], 1) for s in STARTUP_SERVERS)]]
    )
    yield f"  s6-tlsd - stunnel: {_spread(st['python_overhead_ms'], 1)} ms per connection"
    yield f"  s6-tlsd/stunnel: {_ratio(st['ratios']['stunnel'])}"
    imports = st["importtime"]
    yield (
        f"  s6-tlsd imports {imports['modules']} modules in {imports['total_ms']:.1f} ms;"
        " largest cumulative:"
    )
    for entry in imports["top"]:
        yield f"    {entry['cumulative_ms']:6.1f} ms  {'  ' * entry['depth']}{entry['module']}"
    yield from (f"  FAILED {f}" for f in st["failures"])
    yield ""
    mem = results["memory"]
    if "idle" in mem:
        idle = mem["idle"]
        yield (
            f"Memory, s6-tlsserver with {idle['connections']} idle connections"
            f" ({idle['children']} children): USS {idle['uss_kb_per_connection']:.0f} kB,"
            f" PSS {idle['pss_kb_per_connection']:.0f} kB per connection"
            f" (the applications add {idle['app_uss_kb_per_connection']:.0f} kB USS);"
            " the spare child, before any connection: USS"
            f" {', '.join(str(kb) for kb in idle['spare_uss_kb'])} kB"
        )
    if "stall" in mem:
        stall = mem["stall"]
        yield (
            f"Stalled reader, {stall['size'] >> 20} MiB: VmRSS {stall['before']['rss_kb']} kB"
            f" before, VmHWM {stall['stalled']['hwm_kb']} kB stalled and"
            f" {stall['after']['hwm_kb']} kB after; growth {stall['hwm_growth_kb']} kB"
            f" (USS {stall['uss_growth_kb']:+d} kB);"
            f" {stall['written_before_stall'] >> 10} KiB written before the stall"
        )
    yield from (f"  FAILED {f}" for f in mem["failures"])
    yield ""
    yield "| target | goal | measured | met |"
    yield "|---|---|---|---|"
    for row in results["targets"]:
        met = {True: "yes", False: "**no**", None: "FAILED"}[row["met"]]
        yield f"| {row['target']} | {row['goal']} | {row['text']} | {met} |"


def plot(results: dict[str, Any], path: Path) -> None:
    """Bar charts of the s6tls/C ratios, with the run-by-run range, written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), width_ratios=[2, 1])
    groups = [(mode, metric) for mode in MODES for metric in ("mbps", "cpu_per_gb")]
    labels = {"mbps": "MB/s", "cpu_per_gb": "CPU s/GB"}
    _bars(
        left,
        [f"{mode}\n{labels[metric]}" for mode, metric in groups],
        {
            name: [results["throughput"][mode]["ratios"][name][metric] for mode, metric in groups]
            for name in C_TUNNELS
        },
    )
    left.set_title("Tunnel throughput: s6tls / C tool\n(MB/s: higher is better; CPU: lower)")
    for i, (_mode, metric) in enumerate(groups):
        goal = THROUGHPUT_GOALS[metric]
        label = "target vs socat" if i == 0 else None
        left.plot([i - 0.45, i + 0.45], [goal, goal], "g--", linewidth=1, label=label)
    left.legend(fontsize=8)
    hs = results["handshakes"]
    _bars(
        right,
        [f"{n} client{'s' if n > 1 else ''}" for n in CLIENTS],
        {
            name: [hs[f"{n}_clients"]["ratios"][name] for n in CLIENTS]
            for name in HANDSHAKE_SERVERS[1:]
        },
    )
    right.axhline(HANDSHAKE_GOAL, color="g", linestyle="--", linewidth=1, label="target vs stunnel")
    right.set_title("Handshakes/s: s6-tlsserver / C server")
    right.set_ylim(0, max(right.get_ylim()[1], HANDSHAKE_GOAL * 1.25))
    right.legend(fontsize=8, loc="upper right")
    machine = results["machine"]
    fig.suptitle(
        f"s6tls bench ({results['settings']['mode']}), {machine['cpus']} x {machine['cpu']},"
        f" {results['date']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _bars(axes: Any, groups: list[str], series: dict[str, list[dict[str, Any]]]) -> None:
    """Grouped bars of ratios with the paired min-max as error bars, and the parity line."""
    width = 0.8 / len(series)
    for i, (name, comparisons) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        heights = [c["ratio"] or 0 for c in comparisons]
        errors = [
            [max(0, (c["ratio"] or 0) - (c["paired_min"] or c["ratio"] or 0)) for c in comparisons],
            [max(0, (c["paired_max"] or c["ratio"] or 0) - (c["ratio"] or 0)) for c in comparisons],
        ]
        bars = axes.bar(xs, heights, width, yerr=errors, capsize=3, label=f"vs {name}")
        axes.bar_label(bars, labels=[f"{h:.2f}" for h in heights], fontsize=7, padding=2)
    axes.axhline(1, color="black", linewidth=0.8)
    axes.set_xticks(range(len(groups)), groups, fontsize=8)
    axes.set_ylabel("ratio s6tls / C")
