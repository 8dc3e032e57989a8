"""Medians over runs, ratios between systems, issue 8's targets, and the Markdown tables.

The targets table is built from ``TargetCheck`` values. ``issuance_targets`` makes the
ones this bench measures (targets 1, 2 and 4); other scripts (the soak for target 3, the
storm for target 5) make their own with ``TargetCheck`` and pass them to ``markdown`` or
``targets_markdown``, so every target ends up in one table.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "COMPARISONS",
    "Summary",
    "TargetCheck",
    "issuance_targets",
    "markdown",
    "summarize",
    "targets_markdown",
]

MEMORY_BASELINE = "openbao"  # OpenBao's in-memory dev server: stores nothing durably
DURABLE_BASELINE = "openbao-raft"  # OpenBao with raft storage and a file audit device

#: (candidate, baseline) pairs whose ratios are tabulated at every shared concurrency.
COMPARISONS = (
    ("meshca", MEMORY_BASELINE),
    ("meshca", DURABLE_BASELINE),
    ("meshca-tls", MEMORY_BASELINE),
    ("meshca-tls", DURABLE_BASELINE),
    ("meshca-pg", DURABLE_BASELINE),
)

_MEDIAN_FIELDS = (
    "req_per_s",
    "p50_ms",
    "p99_ms",
    "server_cpu_cores",
    "server_cpu_ms_per_cert",
    "h2load_cpu_cores",
    "idle_servers_cpu_cores",
    "other_cpu_cores",
    "machine_busy",
    "machine_steal",
)


@dataclass(frozen=True)
class TargetCheck:
    """One row of the targets table: a measured figure against its threshold.

    ``measured`` is the figure the verdict is taken on (for this bench, from the medians
    of the valid runs); ``per_run`` shows the same figure run by run. ``measured=None``
    means the target could not be evaluated (no valid measurement), which is never MET.
    """

    target: str
    what: str
    measured: float | None
    comparison: str  # ">=" or "<"
    threshold: float
    unit: str = "x"  # "x" (a ratio), "ms", "s", "%", ...
    per_run: tuple[float, ...] = ()
    detail: str = ""

    def __post_init__(self) -> None:
        if self.comparison not in (">=", "<"):
            raise ValueError(f"comparison must be '>=' or '<', not {self.comparison!r}")

    @property
    def met(self) -> bool | None:
        if self.measured is None:
            return None
        if self.comparison == ">=":
            return self.measured >= self.threshold
        return self.measured < self.threshold

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "per_run": list(self.per_run), "met": self.met}


@dataclass(frozen=True)
class Summary:
    medians: list[dict[str, Any]]
    ratios: list[dict[str, Any]]
    targets: list[TargetCheck] = field(default_factory=list)


def summarize(measurements: Sequence[dict[str, Any]]) -> Summary:
    """Per (system, concurrency): the median of each figure over the valid runs only."""
    keys = sorted({(m["system"], m["concurrency"]) for m in measurements})
    medians = []
    for system, concurrency in keys:
        rows = [m for m in measurements if (m["system"], m["concurrency"]) == (system, concurrency)]
        valid = [m for m in rows if m["valid"]]
        entry: dict[str, Any] = {
            "system": system,
            "concurrency": concurrency,
            "valid_runs": len(valid),
            "runs": len(rows),
        }
        for name in _MEDIAN_FIELDS:
            values = [m[name] for m in valid if m[name] is not None]
            entry[name] = statistics.median(values) if values else None
        medians.append(entry)
    by_key = {(m["system"], m["concurrency"]): m for m in medians}
    ratios = []
    for candidate, baseline in COMPARISONS:
        for concurrency in sorted({c for _, c in keys}):
            cand = by_key.get((candidate, concurrency))
            base = by_key.get((baseline, concurrency))
            if not (cand and base and cand["req_per_s"] and base["req_per_s"]):
                continue
            ratios.append(
                {
                    "candidate": candidate,
                    "baseline": baseline,
                    "concurrency": concurrency,
                    "throughput_ratio": cand["req_per_s"] / base["req_per_s"],
                    "p50_ratio": cand["p50_ms"] / base["p50_ms"],
                    "p99_ratio": cand["p99_ms"] / base["p99_ms"],
                    "paired_throughput_ratios": _paired(
                        measurements, candidate, baseline, concurrency, "req_per_s"
                    ),
                }
            )
    return Summary(medians=medians, ratios=ratios, targets=issuance_targets(by_key, measurements))


def _paired(
    measurements: Sequence[dict[str, Any]],
    candidate: str,
    baseline: str,
    concurrency: int,
    figure: str,
) -> list[float]:
    """candidate/baseline ``figure`` within each run where both are valid.

    The two measurements of a pair ran within minutes of each other, so each ratio saw
    much the same background load.
    """
    by_run: dict[int, dict[str, float]] = {}
    for m in measurements:
        if m["concurrency"] == concurrency and m["valid"]:
            by_run.setdefault(m["run"], {})[m["system"]] = m[figure]
    return [
        pair[candidate] / pair[baseline]
        for _, pair in sorted(by_run.items())
        if candidate in pair and baseline in pair and pair[baseline]
    ]


def _per_run(
    measurements: Sequence[dict[str, Any]], system: str, concurrency: int, figure: str
) -> tuple[float, ...]:
    return tuple(
        m[figure]
        for m in sorted(measurements, key=lambda m: m["run"])
        if (m["system"], m["concurrency"]) == (system, concurrency) and m["valid"]
    )


def issuance_targets(
    by_key: dict[tuple[str, int], dict[str, Any]], measurements: Sequence[dict[str, Any]]
) -> list[TargetCheck]:
    """Issue 8's targets 1, 2 and 4, from the medians (and, per run, the measurements).

    1. c=64, SQLite: meshca >= 1.0x OpenBao in memory, >= 2.5x durable OpenBao, p99 under
       40 ms; plaintext, and the same figures again with TLS (meshca's default).
    2. c=1: meshca's p50 below durable OpenBao's (their ratio below 1).
    4. c=64, PostgreSQL: meshca >= 1.5x durable OpenBao.
    """

    def rate_ratio(target: str, cand: str, base: str, conc: int, need: float) -> TargetCheck:
        c, b = by_key.get((cand, conc)), by_key.get((base, conc))
        ok = c and b and c["req_per_s"] and b["req_per_s"]
        return TargetCheck(
            target=target,
            what=f"{cand} / {base} cert/s, c={conc}",
            measured=c["req_per_s"] / b["req_per_s"] if ok else None,
            comparison=">=",
            threshold=need,
            per_run=tuple(_paired(measurements, cand, base, conc, "req_per_s")),
            detail=f"{c['req_per_s']:,.0f} vs {b['req_per_s']:,.0f} cert/s" if ok else "",
        )

    def p99(target: str, system: str, conc: int, below_ms: float) -> TargetCheck:
        m = by_key.get((system, conc))
        return TargetCheck(
            target=target,
            what=f"{system} p99, c={conc}",
            measured=m["p99_ms"] if m else None,
            comparison="<",
            threshold=below_ms,
            unit="ms",
            per_run=_per_run(measurements, system, conc, "p99_ms"),
        )

    def p50_ratio(target: str, cand: str, base: str, conc: int) -> TargetCheck:
        c, b = by_key.get((cand, conc)), by_key.get((base, conc))
        ok = c and b and c["p50_ms"] is not None and b["p50_ms"]
        return TargetCheck(
            target=target,
            what=f"{cand} p50 / {base} p50, c={conc}",
            measured=c["p50_ms"] / b["p50_ms"] if ok else None,
            comparison="<",
            threshold=1.0,
            per_run=tuple(_paired(measurements, cand, base, conc, "p50_ms")),
            detail=f"{c['p50_ms']:.2f} vs {b['p50_ms']:.2f} ms" if ok else "",
        )

    checks = []
    for label, system in (("1", "meshca"), ("1 (TLS)", "meshca-tls")):
        checks += [
            rate_ratio(label, system, MEMORY_BASELINE, 64, 1.0),
            rate_ratio(label, system, DURABLE_BASELINE, 64, 2.5),
            p99(label, system, 64, 40.0),
        ]
    checks.append(p50_ratio("2", "meshca", DURABLE_BASELINE, 1))
    checks.append(rate_ratio("4", "meshca-pg", DURABLE_BASELINE, 64, 1.5))
    return checks


def _num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _pct(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.0f}%"


def _with_unit(value: float, unit: str) -> str:
    return f"{value:.2f}x" if unit == "x" else f"{value:,.2f} {unit}"


def targets_markdown(checks: Sequence[TargetCheck]) -> list[str]:
    """The targets table: one row per check, in the order given."""
    lines = [
        "| target | figure | measured | per run | threshold | verdict |",
        "|---|---|---:|---|---|---|",
    ]
    for check in checks:
        if check.measured is None:
            measured, verdict = "n/a", "NOT EVALUATED (no valid measurement)"
        else:
            measured = _with_unit(check.measured, check.unit)
            if check.detail:
                measured += f" ({check.detail})"
            verdict = "MET" if check.met else "NOT MET"
        per_run = ", ".join(_with_unit(v, check.unit) for v in check.per_run) or "n/a"
        unit = "x" if check.unit == "x" else f" {check.unit}"
        threshold = f"{check.comparison} {check.threshold:g}{unit}"
        lines.append(
            f"| {check.target} | {check.what} | {measured} | {per_run} | {threshold} | {verdict} |"
        )
    return lines


def markdown(summary: Summary, runs: int, more_targets: Sequence[TargetCheck] = ()) -> str:
    """The medians table, the ratio table and the targets table.

    ``more_targets`` are rows measured elsewhere (targets 3 and 5); they join this
    bench's rows in the same targets table.
    """
    lines = [
        f"Medians of {runs} run(s); only runs that passed validation are counted.",
        "",
        "| concurrency | system | cert/s | p50 ms | p99 ms | server CPU | CPU ms/cert "
        "| h2load CPU | idle peers CPU | other CPU | machine busy | steal | valid runs |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in sorted(summary.medians, key=lambda m: (m["concurrency"], m["system"])):
        lines.append(
            f"| {m['concurrency']} | {m['system']} | {_num(m['req_per_s'], 0)} "
            f"| {_num(m['p50_ms'], 2)} | {_num(m['p99_ms'], 2)} "
            f"| {_num(m['server_cpu_cores'], 2)} | {_num(m['server_cpu_ms_per_cert'], 2)} "
            f"| {_num(m['h2load_cpu_cores'], 2)} "
            f"| {_num(m['idle_servers_cpu_cores'], 2)} | {_num(m['other_cpu_cores'], 2)} "
            f"| {_pct(m['machine_busy'])} "
            f"| {_pct(m['machine_steal'])} | {m['valid_runs']}/{m['runs']} |"
        )
    lines += [
        "",
        "CPU columns are cores averaged over the measured run: the loaded system's "
        "processes (meshca-pg's include its PostgreSQL) and its CPU time per certificate, "
        "h2load, the idle systems' servers, and everything else on the machine (other jobs, "
        "kernel threads); busy and steal are shares of all cores.",
    ]
    if summary.ratios:
        lines += [
            "",
            "| concurrency | candidate / baseline | cert/s | same, per run | p50 | p99 |",
            "|---:|---|---:|---|---:|---:|",
        ]
        for r in sorted(summary.ratios, key=lambda r: r["concurrency"]):
            paired = ", ".join(f"{x:.2f}x" for x in r["paired_throughput_ratios"]) or "n/a"
            lines.append(
                f"| {r['concurrency']} | {r['candidate']} / {r['baseline']} "
                f"| {r['throughput_ratio']:.2f}x | {paired} "
                f"| {r['p50_ratio']:.2f}x | {r['p99_ratio']:.2f}x |"
            )
        lines += [
            "",
            "Ratios are of the medians above; 'per run' pairs the two systems within each run.",
        ]
    checks = [*summary.targets, *more_targets]
    if checks:
        lines += ["", "Issue 8's targets:", "", *targets_markdown(checks), ""]
        lines.append(
            "'measured' is taken on the medians of the valid runs; for ratios, 'per run' "
            "pairs the two systems within each run. Target 1 is meshca plaintext on SQLite; "
            "'1 (TLS)' repeats its figures with TLS, meshca's default."
        )
        if runs < 3:
            lines.append(
                f"Only {runs} run(s): issue 8 asks for medians of at least 3 runs, so these "
                "verdicts are indicative."
            )
    return "\n".join(lines)
