"""Medians over runs, the meshca/OpenBao ratios, the team's target and the Markdown tables."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["TARGET_P99_MS", "TARGET_RATIO", "Summary", "markdown", "summarize"]

#: The team's target: at concurrency 64, meshca >= 1.5x OpenBao's rate with p99 < 40 ms.
TARGET_CONCURRENCY = 64
TARGET_RATIO = 1.5
TARGET_P99_MS = 40.0
BASELINE = "openbao"
CANDIDATE = "meshca"
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
class Summary:
    medians: list[dict[str, Any]]
    ratios: list[dict[str, Any]]
    target: dict[str, Any]


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
        for field in _MEDIAN_FIELDS:
            entry[field] = statistics.median(m[field] for m in valid) if valid else None
        medians.append(entry)
    by_key = {(m["system"], m["concurrency"]): m for m in medians}
    ratios = []
    for concurrency in sorted({c for _, c in keys}):
        base = by_key.get((BASELINE, concurrency))
        cand = by_key.get((CANDIDATE, concurrency))
        if not (base and cand and base["req_per_s"] and cand["req_per_s"]):
            continue
        ratios.append(
            {
                "concurrency": concurrency,
                "throughput_ratio": cand["req_per_s"] / base["req_per_s"],
                "p50_ratio": cand["p50_ms"] / base["p50_ms"],
                "p99_ratio": cand["p99_ms"] / base["p99_ms"],
                "paired_throughput_ratios": _paired_ratios(measurements, concurrency),
            }
        )
    return Summary(medians=medians, ratios=ratios, target=_target(by_key, ratios))


def _paired_ratios(measurements: Sequence[dict[str, Any]], concurrency: int) -> list[float]:
    """meshca/OpenBao cert/s within each run where both are valid.

    The two measurements of a pair ran within a minute of each other, so each ratio saw
    much the same background load.
    """
    by_run: dict[int, dict[str, float]] = {}
    for m in measurements:
        if m["concurrency"] == concurrency and m["valid"]:
            by_run.setdefault(m["run"], {})[m["system"]] = m["req_per_s"]
    return [
        pair[CANDIDATE] / pair[BASELINE]
        for _, pair in sorted(by_run.items())
        if CANDIDATE in pair and BASELINE in pair and pair[BASELINE]
    ]


def _target(by_key: dict[tuple[str, int], dict[str, Any]], ratios: list[dict[str, Any]]) -> dict:
    ratio = next((r for r in ratios if r["concurrency"] == TARGET_CONCURRENCY), None)
    cand = by_key.get((CANDIDATE, TARGET_CONCURRENCY))
    result: dict[str, Any] = {
        "concurrency": TARGET_CONCURRENCY,
        "min_throughput_ratio": TARGET_RATIO,
        "max_p99_ms": TARGET_P99_MS,
        "throughput_ratio": ratio["throughput_ratio"] if ratio else None,
        "meshca_p99_ms": cand["p99_ms"] if cand else None,
    }
    if ratio is None or cand is None or cand["p99_ms"] is None:
        result["met"] = None
    else:
        result["throughput_met"] = ratio["throughput_ratio"] >= TARGET_RATIO
        result["p99_met"] = cand["p99_ms"] < TARGET_P99_MS
        result["met"] = result["throughput_met"] and result["p99_met"]
    return result


def _num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _pct(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.0f}%"


def markdown(summary: Summary, runs: int) -> str:
    """The medians table, the ratio table and one line on the target."""
    lines = [
        f"Medians of {runs} run(s); only runs that passed validation are counted.",
        "",
        "| concurrency | system | cert/s | p50 ms | p99 ms | server CPU | CPU ms/cert "
        "| h2load CPU | idle peer CPU | other CPU | machine busy | steal | valid runs |",
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
        "CPU columns are cores averaged over the measured run: the loaded server's process "
        "group (and its CPU time per certificate), h2load, the idle peer server, and "
        "everything else on the machine (other jobs, kernel threads); busy and steal are "
        "shares of all cores.",
    ]
    if summary.ratios:
        lines += [
            "",
            "| concurrency | meshca/OpenBao cert/s | same, per run | meshca/OpenBao p50 "
            "| meshca/OpenBao p99 |",
            "|---:|---:|---|---:|---:|",
        ]
        for r in summary.ratios:
            paired = ", ".join(f"{x:.2f}x" for x in r["paired_throughput_ratios"]) or "n/a"
            lines.append(
                f"| {r['concurrency']} | {r['throughput_ratio']:.2f}x | {paired} "
                f"| {r['p50_ratio']:.2f}x | {r['p99_ratio']:.2f}x |"
            )
        lines += [
            "",
            "Ratios are of the medians above; 'per run' pairs the two systems within each run.",
        ]
    t = summary.target
    if t["met"] is None:
        verdict = "not evaluated (no valid c=64 result for both systems)"
    else:
        verdict = (
            f"{'MET' if t['met'] else 'NOT MET'}: throughput ratio "
            f"{t['throughput_ratio']:.2f}x (need >= {TARGET_RATIO}x, "
            f"{'ok' if t['throughput_met'] else 'missed'}), meshca p99 "
            f"{t['meshca_p99_ms']:.1f} ms (need < {TARGET_P99_MS:.0f} ms, "
            f"{'ok' if t['p99_met'] else 'missed'})"
        )
    lines += ["", f"Target at concurrency {t['concurrency']}: {verdict}"]
    return "\n".join(lines)
