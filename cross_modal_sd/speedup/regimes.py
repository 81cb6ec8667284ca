"""Where each drafter wins: speedups across cost regimes and deployments, measured and predicted.

`summarise_regimes` turns e2e reports (several worlds, both deployments, repeats) into one row per
(regime, deployment, strategy): the mean of the repeats' speedups, the first repeat's 95%
interval, every repeat's point, the speedup model's mean prediction, the per-round-type τ and the
measured cost shape. `benchmarks/bench_regimes.py` writes them; the notebook
`notebooks/accept_vs_speedup.ipynb` reads them back.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cross_modal_sd.utils import table


def summarise_regimes(reports: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (world, deployment, strategy): the first repeat's interval, every repeat's
    point estimate, the mean prediction and the cost shape."""
    groups: dict[tuple, list[dict]] = {}
    for r in reports:
        for name, s in r["strategies"].items():
            if name == "baseline":
                continue
            key = (r["cost_ratios"]["regime"], r["deployment"], name)
            groups.setdefault(key, []).append((r, s))
    rows = []
    for (regime, deployment, name), runs in groups.items():
        first_report, first = runs[0]
        points = [s["speedup"]["ratio_of_means"] for _, s in runs]
        preds = [(s.get("predicted_speedup") or {}).get("ratio_of_means") for _, s in runs]
        preds = [p for p in preds if p is not None]
        costs = first_report["cost_ratios"]
        rows.append(
            {
                "regime": regime,
                "deployment": deployment,
                "strategy": name,
                "baseline": first_report["strategies"]["baseline"]["method"],
                "speedup": statistics.mean(points),
                "ci95": first["speedup"]["ci95"],
                "repeats": points,
                "predicted": statistics.mean(preds) if preds else None,
                "tau": first.get("tau"),
                "tau_later": first.get("tau_later"),
                "round1_tokens": first.get("round1_tokens"),
                "lossless_rate": first["lossless_rate"],
                "prefill_share": costs["target_prefill_share"],
                "draft_prefill_ratio": costs["draft_prefill_ratio"],
                "draft_token_ratio": costs["draft_token_ratio"],
                "contention": costs["contention"],
                "head_token_ratio": costs.get("head_token_ratio"),
            }
        )
    return rows


def render_regimes(rows: Sequence[Mapping[str, Any]], command: str = "") -> str:
    header = [
        "regime (prefill share)",
        "deployment",
        "strategy",
        "speedup [95% CI of run 1]",
        "repeats",
        "predicted",
        "tau",
        "round-1 tokens",
        "tau later rounds",
        "lossless",
        "draft/target prefill",
        "draft/target per token",
        "head/target per token",
        "contention",
    ]
    body = [
        [
            f"{r['regime']} ({r['prefill_share']:.2f})",
            r["deployment"],
            r["strategy"],
            f"{r['speedup']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]",
            ", ".join(f"{p:.3f}" for p in r["repeats"]),
            r["predicted"],
            r["tau"],
            r["round1_tokens"],
            r["tau_later"],
            r["lossless_rate"],
            r["draft_prefill_ratio"],
            r["draft_token_ratio"],
            r["head_token_ratio"],
            r["contention"],
        ]
        for r in rows
    ]
    lead = f"`{command}` ({time.strftime('%Y-%m-%d')})\n\n" if command else ""
    return lead + table(header, body, digits=3)


def plot_regimes(rows: Sequence[Mapping[str, Any]], path: Path | None = None):
    """Speedup against the target-prefill share per strategy, one panel per deployment, with
    95% intervals and the predictions as crosses; saved to ``path`` (closed) or returned."""
    import matplotlib

    if path is not None:  # a file, not a notebook's inline display
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, deployment in zip(axes, ("shared", "own_device"), strict=True):
        for i, name in enumerate(sorted({r["strategy"] for r in rows})):
            pts = sorted(
                (r["prefill_share"], r["speedup"], r["ci95"], r["predicted"])
                for r in rows
                if r["deployment"] == deployment and r["strategy"] == name
            )
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            # The point is the repeats' mean, the interval the first repeat's: it may lie outside
            # it, and an error bar cannot be negative.
            err = [[max(0.0, y - p[2][0]) for y, p in zip(ys, pts, strict=True)],
                   [max(0.0, p[2][1] - y) for y, p in zip(ys, pts, strict=True)]]  # fmt: skip
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=f"C{i}", label=name)
            preds = [(x, p[3]) for x, p in zip(xs, pts, strict=True) if p[3] is not None]
            if preds:
                ax.plot(*zip(*preds, strict=True), "x", color=f"C{i}", markersize=8)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_title(f"{deployment} (x: predicted)")
        ax.set_xlabel("target prefill share of a baseline answer")
    axes[0].set_ylabel("speedup over the fair baseline")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    if path is None:
        return fig
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
