"""Turning the results into text, a verdict on each target, and a plot.

Every function here reads the results dictionary that ``bench/__main__.py``
builds (and writes as ``latest.json``); none of them measures anything.  A
part that was not run (``--only``) is left out of the report and its
targets are "not run".
"""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .servers import LABELS
from .startup import SERVERS as STARTUP_SERVERS
from .throughput import MODES
from .tunnels import SOCATS

THROUGHPUT_GOALS = {"mbps": 1.5, "cpu_per_gb": 0.8}  # s6tls/socat (issue 5)
BEFORE_GOALS = {"mbps": 0.95, "cpu_per_gb": 1.05}  # s6tls/s6tls-before: no worse (the noise)
STALL_GOAL_MIB = 1.0
# issue 21
VS_S_SERVER = {1: 0.65, 4: 0.9}
VS_REFERENCE = 2.0
CPU_GOAL_MS = 1.5
USS_GOAL_KB = 128
HELD_GOAL = 10_000
GROWTH_GOAL_MB = 5.0


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _spread(stats: dict[str, Any] | None, digits: int = 0) -> str:
    """``median (min-max)``, or FAILED when no run succeeded."""
    if stats is None:
        return "-"
    if not stats["n"]:
        return "FAILED"
    return (
        f"{_num(stats['median'], digits)} "
        f"({_num(stats['min'], digits)}-{_num(stats['max'], digits)})"
    )


def _ratio(comparison: dict[str, Any] | None) -> str:
    if comparison is None or comparison["ratio"] is None:
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


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


# -- targets --------------------------------------------------------------------


def _target(
    name: str, goal: str, value: float | None, met: bool, unit: str = "x", digits: int = 2
) -> dict[str, Any]:
    """One row of the targets table; ``met`` is ignored when nothing was measured."""
    return {
        "target": name,
        "goal": goal,
        "measured": None if value is None else round(value, digits),
        "unit": unit.strip(),
        "met": None if value is None else met,
        "text": "-" if value is None else f"{value:,.{digits}f}{unit}",
    }


def _hs_ratio(results: dict[str, Any], version: str, n: int, other: str) -> float | None:
    hs = results.get("handshakes")
    if hs is None:
        return None
    key = f"{hs['networks'][0]} {version} {n}"
    comparison = hs["ratios"].get(key, {}).get(other)
    return None if comparison is None else comparison["ratio"]


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issues 21 and 5: what it asks, what was measured, whether it is met."""
    rows = []
    for n in (4, 1):
        ratio = _hs_ratio(results, "TLSv1.3", n, "openssl-s_server")
        goal = VS_S_SERVER[n]
        rows.append(
            _target(
                f"handshakes/s, {n} client{'s' if n > 1 else ''}, vs openssl s_server (TLS 1.3)",
                f">= {goal:.2f}x",
                ratio,
                (ratio or 0) >= goal,
            )
        )
        if n == 4:
            ratio = _hs_ratio(results, "TLSv1.2", 4, "s6-networking")
            rows.append(
                _target(
                    "handshakes/s, 4 clients, vs the real s6-tlsserver (TLS 1.2)",
                    f">= {VS_REFERENCE:.2f}x",
                    ratio,
                    (ratio or 0) >= VS_REFERENCE,
                )
            )
    hs = results.get("handshakes")
    cpu = None
    if hs is not None:
        stats = hs["runs"].get(f"{hs['networks'][0]} TLSv1.3 4", {}).get("s6tls")
        cpu = stats["cpu_ms"]["median"] if stats else None
    rows.append(
        _target(
            "server CPU per handshake, spawn of cat included (TLS 1.3, 4 clients)",
            f"<= {CPU_GOAL_MS:.2f} ms",
            cpu,
            (cpu or 0) <= CPU_GOAL_MS,
            unit=" ms",
        )
    )
    idle = results.get("memory", {}).get("idle", {}).get("s6tls")
    uss = idle["server_uss_kb_per_connection"] if idle else None
    rows.append(
        _target(
            "private memory (USS) per idle connection",
            f"<= {USS_GOAL_KB} kB",
            uss,
            (uss or 0) <= USS_GOAL_KB,
            unit=" kB",
            digits=0,
        )
    )
    held = results.get("scale", {}).get("held")
    count = None
    if held:
        last = held["readings"][-1]
        count = last["applications"] if last["connections"] == held["count"] else None
    rows.append(
        _target(
            "idle connections held by one s6-tlsserver",
            f">= {HELD_GOAL:,}",
            count,
            (count or 0) >= HELD_GOAL,
            unit="",
            digits=0,
        )
    )
    growth = results.get("scale", {}).get("growth")
    mb = None
    if growth:
        first, last = growth["readings"][0], growth["readings"][-1]
        mb = growth["rss_growth_kb"] * 1024 / 1e6
        name = (
            f"worker RSS after {last['connections']:,} connections"
            f" minus after {first['connections']:,}"
        )
    else:
        name = "worker RSS after 100,000 connections minus after 1,000"
    goal_text = f"<= {GROWTH_GOAL_MB:.0f} MB"
    rows.append(_target(name, goal_text, mb, (mb or 0) <= GROWTH_GOAL_MB, " MB"))
    tp = results.get("throughput")
    for mode in MODES:
        for metric, word in (("mbps", "MB/s"), ("cpu_per_gb", "CPU s/GB")):
            ratio = None
            if tp is not None and "s6tls-before" in tp[mode]["ratios"]:
                ratio = tp[mode]["ratios"]["s6tls-before"][metric]["ratio"]
            goal = BEFORE_GOALS[metric]
            met = (ratio or 0) >= goal if metric == "mbps" else (ratio or 0) <= goal
            sign = ">=" if metric == "mbps" else "<="
            name = f"tunnel {word} {mode} vs before"
            rows.append(_target(name, f"{sign} {goal:.2f}x", ratio, met))
    for mode in MODES:
        for socat in SOCATS:
            for metric, word in (("mbps", "MB/s"), ("cpu_per_gb", "CPU s/GB")):
                ratio = None
                if tp is not None:
                    ratio = tp[mode]["ratios"][socat.name][metric]["ratio"]
                goal = THROUGHPUT_GOALS[metric]
                met = (ratio or 0) >= goal if metric == "mbps" else (ratio or 0) <= goal
                sign = ">=" if metric == "mbps" else "<="
                name = f"(issue 5) {word} {mode} vs {socat.name}"
                rows.append(_target(name, f"{sign} {goal:.2f}x", ratio, met))
    stall = results.get("memory", {}).get("stall")
    growth_mib = stall["hwm_growth_kb"] / 1024 if stall else None
    rows.append(
        _target(
            "(issue 5) worker growth under a stalled reader",
            f"< {STALL_GOAL_MIB:.2f} MiB",
            growth_mib,
            (growth_mib or 0) < STALL_GOAL_MIB,
            unit=" MiB",
        )
    )
    return rows


# -- sections ---------------------------------------------------------------------


def _throughput(tp: dict[str, Any]) -> Iterator[str]:
    size = tp["size"] >> 20
    yield (
        f"Throughput, {size} MiB each run, {tp['rounds']} rounds"
        " (median (min-max)); MB/s higher is better, CPU s/GB lower is better"
    )
    names = tp["tunnels"]
    for mode in MODES:
        section = tp[mode]
        rows = [
            ["MB/s", *(_spread(section[n]["mbps"]) for n in names)],
            ["CPU s/GB", *(_spread(section[n]["cpu_per_gb"], 2) for n in names)],
            ["  of it sys", *(_spread(section[n]["sys_per_gb"], 2) for n in names)],
            ["set-up CPU s", *(_spread(section[n]["fixed_cpu"], 3) for n in names)],
        ]
        yield from _table([mode, *names], rows)
        for name in names[1:]:
            ratios = section["ratios"][name]
            yield (
                f"  s6tls/{name}: MB/s {_ratio(ratios['mbps'])},"
                f" CPU/GB {_ratio(ratios['cpu_per_gb'])}"
            )
        for name in names:
            for failure in section[name]["failures"]:
                yield f"  FAILED {failure}"
        yield ""


def _handshakes(hs: dict[str, Any], title: str) -> Iterator[str]:
    """The report of one ``handshakes.measure``: rates, server CPU, ratios, failures."""
    columns = [(v, n) for v in hs["versions"] for n in hs["clients"]]
    header = ["server", *(f"{v.replace('TLSv', 'TLS ')}, {n} cl." for v, n in columns)]
    for net in hs["networks"]:
        runs = hs["runs"]
        yield (
            f"Handshakes per second, openssl s_time {title}, {hs['seconds']} s x {hs['rounds']}"
            f" rounds, network {net}: median (min-max); then server CPU ms per handshake"
        )
        rows, cpu_rows = [], []
        for name in hs["servers"]:
            cells = [runs.get(f"{net} {v} {n}", {}).get(name) for v, n in columns]
            rows.append([LABELS[name], *(_spread(c["rate"] if c else None) for c in cells)])
            cpu_rows.append(
                [LABELS[name], *(_spread(c["cpu_ms"] if c else None, 2) for c in cells)]
            )
        yield from _markdown(header, rows)
        yield ""
        yield from _markdown(header, cpu_rows)
        yield ""
        own_rows = []
        for name in ("s6tls", "stunnel-daemon"):
            cells = [runs.get(f"{net} {v} {n}", {}).get(name) for v, n in columns]
            if any(c and "own_cpu_ms" in c for c in cells):
                own_rows.append(
                    [
                        f"{LABELS[name]} without its applications",
                        *(_spread(c.get("own_cpu_ms") if c else None, 2) for c in cells),
                    ]
                )
        if own_rows:
            yield from _markdown(["server CPU ms per handshake", *header[1:]], own_rows)
            yield ""
        ratio_rows = []
        for name in hs["servers"][1:]:
            cells = [hs["ratios"].get(f"{net} {v} {n}", {}).get(name) for v, n in columns]
            ratio_rows.append([f"s6tls / {LABELS[name]}", *(_ratio(c) for c in cells)])
        yield from _markdown(["ratio of rates", *header[1:]], ratio_rows)
        yield ""
    if hs.get("reuse"):
        shares = hs["resumed"]
        yield "  resumed (lowest share): " + ", ".join(
            f"{name} {'-' if share is None else f'{share:.0%}'}" for name, share in shares.items()
        )
    yield from (f"  FAILED {f}" for f in hs["failures"])
    yield ""


def _startup(st: dict[str, Any]) -> Iterator[str]:
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


def _memory(mem: dict[str, Any]) -> Iterator[str]:
    idle = mem["idle"]
    counts = idle["counts"]
    low, high = min(counts), max(counts)
    yield (
        f"Memory of idle connections (cat waiting in each), network {idle['network']}:"
        f" USS kB; per connection = slope from {low} to {high}"
    )
    header = [
        "server",
        "per connection",
        f"whole server / {high}",
        "application per connection",
        *(f"server USS at {c}" for c in ["0", *map(str, counts)]),
    ]
    rows = []
    for name, figures in idle.items():
        if not isinstance(figures, dict) or "snapshots" not in figures:
            continue
        snaps = figures["snapshots"]
        rows.append(
            [
                LABELS[name],
                f"{figures['server_uss_kb_per_connection']:,.0f}",
                f"{figures['server_uss_kb_whole_per_connection']:,.0f}",
                f"{figures['app_uss_kb_per_connection']:,.0f}",
                *(f"{snaps[str(c)]['server']['uss_kb']:,}" for c in [0, *counts]),
            ]
        )
    yield from _markdown(header, rows)
    if "stall" in mem:
        stall = mem["stall"]
        yield (
            f"Stalled reader, {stall['size'] >> 20} MiB: the worker's VmRSS"
            f" {stall['before']['rss_kb']} kB before, VmHWM {stall['stalled']['hwm_kb']} kB"
            f" stalled and {stall['after']['hwm_kb']} kB after; growth"
            f" {stall['hwm_growth_kb']} kB (USS {stall['uss_growth_kb']:+d} kB);"
            f" {stall['written_before_stall'] >> 10} KiB written before the stall"
        )
    yield from (f"  FAILED {f}" for f in mem["failures"])
    yield ""


def _scale(sc: dict[str, Any]) -> Iterator[str]:
    held = sc.get("held")
    if held:
        last = held["readings"][-1]
        workers = ", ".join(f"{w['rss_kb'] / 1024:.0f}" for w in last["workers"])
        yield (
            f"One s6-tlsserver holding {last['connections']:,} idle connections"
            f" ({last['applications']:,} applications running, descriptor limit"
            f" {held['nofile']:,}): RSS {last['rss_kb'] / 1024:,.0f} MiB in all (supervisor"
            f" {last['supervisor']['rss_kb'] / 1024:.0f}, workers {workers}), USS"
            f" {last['uss_kb'] / 1024:,.0f} MiB; {held['cats_left']} application(s) left after"
        )
        yield "  held: " + ", ".join(
            f"{r['connections']:,} {r['rss_kb'] / 1024:.0f} MiB" for r in held["readings"]
        )
    growth = sc.get("growth")
    if growth:
        readings = ", ".join(
            f"{r['connections']:,}: {r['rss_kb']:,} / {r['uss_kb']:,}" for r in growth["readings"]
        )
        yield f"One worker (--workers 1, application true), VmRSS / USS kB after N: {readings}"
        yield f"  growth {growth['rss_growth_kb']:+,} kB RSS, {growth['uss_growth_kb']:+,} kB USS"
    yield from (f"  FAILED {f}" for f in sc["failures"])
    yield ""


def render(results: dict[str, Any]) -> Iterator[str]:
    """The whole report as lines of text: settings, every section, the targets."""
    machine, settings = results["machine"], results["settings"]
    yield (
        f"s6tls bench, {settings['mode']} run: {machine['cpus']} x {machine['cpu']},"
        f" Python {machine['python']}, pyOpenSSL {machine['pyopenssl']} on {machine['openssl']},"
        f" system {machine['system_openssl'].split(' (')[0]}, {machine['socat']},"
        f" {machine['stunnel']}; commit {machine['commit']}"
        f" (before: {machine.get('before') or '-'}); {results['duration_s']:.0f} s;"
        f" load {results['load_before'][0]:.1f} before, {results['load_after'][0]:.1f} after"
    )
    for part, origin in results.get("carried", {}).items():
        yield f"({part}: carried from the run of {origin['date']}, commit {origin['commit']})"
    yield ""
    if "throughput" in results:
        yield from _throughput(results["throughput"])
    if "handshakes" in results:
        yield from _handshakes(results["handshakes"], "-new")
    if "resumption" in results:
        yield from _handshakes(results["resumption"], "-reuse -www /")
    if "startup" in results:
        yield from _startup(results["startup"])
    if "memory" in results:
        yield from _memory(results["memory"])
    if "scale" in results:
        yield from _scale(results["scale"])
    yield "| target | goal | measured | met |"
    yield "|---|---|---|---|"
    for row in results["targets"]:
        met = {True: "yes", False: "**no**", None: "not run or FAILED"}[row["met"]]
        yield f"| {row['target']} | {row['goal']} | {row['text']} | {met} |"


# -- the plot -------------------------------------------------------------------------


def plot(results: dict[str, Any], path: Path) -> None:
    """Bar charts of the s6tls/other ratios, with the run-by-run range, written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tp, hs = results.get("throughput"), results.get("handshakes")
    panels = [p for p in (tp, hs) if p is not None]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 1, 4.5), squeeze=False)
    left = axes[0][0]
    if tp is not None:
        groups = [(mode, metric) for mode in MODES for metric in ("mbps", "cpu_per_gb")]
        labels = {"mbps": "MB/s", "cpu_per_gb": "CPU s/GB"}
        _bars(
            left,
            [f"{mode}\n{labels[metric]}" for mode, metric in groups],
            {
                name: [tp[mode]["ratios"][name][metric] for mode, metric in groups]
                for name in tp["tunnels"][1:]
            },
        )
        left.set_title("Tunnel throughput: s6tls / other\n(MB/s: higher is better; CPU: lower)")
        left.legend(fontsize=7)
    if hs is not None:
        right = axes[0][-1]
        net = hs["networks"][0]
        _bars(
            right,
            [f"{n} client{'s' if n > 1 else ''}" for n in hs["clients"]],
            {
                name: [hs["ratios"][f"{net} TLSv1.2 {n}"][name] for n in hs["clients"]]
                for name in hs["servers"][1:]
            },
        )
        right.set_title(f"Handshakes/s, TLS 1.2, {net}: s6tls pool / other server")
        right.legend(fontsize=7, loc="upper right")
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
        axes.bar_label(bars, labels=[f"{h:.1f}" for h in heights], fontsize=6, padding=2)
    axes.axhline(1, color="black", linewidth=0.8)
    axes.set_xticks(range(len(groups)), groups, fontsize=8)
    axes.set_ylabel("ratio s6tls / other")
    axes.set_yscale("log")
