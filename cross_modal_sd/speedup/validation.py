"""Predicted against measured speedups, each measured one with its 95% interval.

The rows come from e2e reports (`report.json`): every SD strategy's measured ``speedup`` (ratio
of means over fresh test samples, with its bootstrap ``ci95``) and its ``predicted_speedup``
(component costs from probes, acceptance from the export's validation split: nothing fitted to
the runs it predicts). ``benchmarks/bench_regimes.py`` collects them over regimes and
deployments.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from cross_modal_sd.utils import table


def validation_rows(reports: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per SD strategy of each report that predicted it."""
    rows = []
    for report in reports:
        regime = (report.get("cost_ratios") or {}).get("regime")
        for name, s in report["strategies"].items():
            pred = s.get("predicted_speedup")
            if s.get("kind") != "sd" or not pred:
                continue
            measured = s["speedup"]["ratio_of_means"]
            lo, hi = s["speedup"]["ci95"]
            predicted = pred["ratio_of_means"]
            rows.append(
                {
                    "regime": regime,
                    "deployment": report.get("deployment"),
                    "strategy": name,
                    "n_samples": s["n_samples"],
                    "measured": measured,
                    "ci95": [lo, hi],
                    "predicted": predicted,
                    "error": predicted / measured - 1.0,
                    "within_ci": lo <= predicted <= hi,
                    "measured_tau": s.get("tau"),
                    "predicted_tau": pred.get("tau"),
                }
            )
    return rows


def render_validation(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of `validation_rows`."""
    header = [
        "regime",
        "deployment",
        "strategy",
        "measured speedup [95% CI]",
        "predicted",
        "error",
        "tau meas / pred",
    ]
    body = [
        [
            r["regime"],
            r["deployment"],
            r["strategy"],
            f"{r['measured']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]",
            r["predicted"],
            f"{100 * r['error']:+.1f}%",
            f"{r['measured_tau']:.2f} / {r['predicted_tau']:.2f}",
        ]
        for r in rows
    ]
    return table(header, body, digits=3)
