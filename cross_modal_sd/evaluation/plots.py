"""PNG plots of an evaluation report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)

from cross_modal_sd.evaluation.report import BASELINE, TIME_KEYS  # noqa: E402

SPEEDUP_PNG = "speedup_distribution.png"
TIMING_PNG = "timing_breakdown.png"
POSITION_PNG = "position_acceptance.png"
HISTOGRAM_PNG = "accepted_length_hist.png"


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _finite(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and not math.isnan(v)]


def speedup_distribution(
    records: Sequence[Mapping[str, Any]], names: Sequence[str], path: Path
) -> str:
    """Per-sample speedup (baseline ms / strategy ms), one box per strategy, 1x marked."""
    data = [
        [r["baseline"]["total_ms"] / r["strategies"][n]["total_ms"] for r in records] for n in names
    ]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 4))
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=20, ha="right", fontsize=8)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_ylabel("speedup per sample (baseline / strategy)")
    ax.set_title("speedup distribution")
    return _save(fig, path)


def timing_breakdown(strategies: Mapping[str, Mapping[str, Any]], path: Path) -> str:
    """Grouped bars of the mean phase times per strategy (phases a strategy lacks are left out)."""
    names = list(strategies)
    keys = [k for k in TIME_KEYS if any(strategies[n][k] is not None for n in names)]
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(2 + 1.4 * len(names), 4))
    for j, key in enumerate(keys):
        values = [strategies[n][key] or 0.0 for n in names]
        xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, values, width, label=key.removesuffix("_ms"))
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("mean ms per sample")
    ax.set_title("timing breakdown")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def position_acceptance(curves: Mapping[str, Sequence[float | None]], path: Path) -> str:
    """Round-1 acceptance by position, one line per configuration (missing points skipped)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        points = [(k, v) for k, v in enumerate(curve) if _finite([v])]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=name)
    ax.set_xlabel("draft position in round 1")
    ax.set_ylabel("accepted share")
    ax.set_ylim(0, 1.02)
    ax.set_title("acceptance by position")
    ax.legend(fontsize=7)
    return _save(fig, path)


def accepted_length_hist(hists: Mapping[str, Sequence[int]], path: Path) -> str:
    """Samples by round-1 accepted length, grouped bars per configuration (last bin: >=)."""
    length = max(
        [max((k for k, c in enumerate(h) if c), default=0) + 1 for h in hists.values()] + [1]
    )
    width = 0.8 / max(1, len(hists))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * length), 4))
    for j, (name, h) in enumerate(hists.items()):
        xs = [k + (j - (len(hists) - 1) / 2) * width for k in range(length)]
        ax.bar(xs, list(h[:length]), width, label=name)
    ax.set_xlabel("accepted drafts in round 1")
    ax.set_ylabel("samples")
    ax.set_title("accepted-length histogram")
    ax.legend(fontsize=7)
    return _save(fig, path)


def e2e_plots(
    report: Mapping[str, Any], records: Sequence[Mapping[str, Any]], out_dir: Path
) -> list[str]:
    """All E2E plots into `out_dir`; returns their file names."""
    out_dir = Path(out_dir)
    strategies = report["strategies"]
    names = [n for n in strategies if n != BASELINE]
    sd = {n: s for n, s in strategies.items() if s["kind"] == "sd"}
    files = [timing_breakdown(strategies, out_dir / TIMING_PNG)]
    if names:
        files.insert(0, speedup_distribution(records, names, out_dir / SPEEDUP_PNG))
    if sd:
        files.append(
            position_acceptance(
                {n: s["position_acceptance"] for n, s in sd.items()}, out_dir / POSITION_PNG
            )
        )
        files.append(
            accepted_length_hist(
                {n: s["accepted_length_hist"] for n, s in sd.items()}, out_dir / HISTOGRAM_PNG
            )
        )
    return files


def offline_plots(curves: Mapping[str, Sequence[Any]], out_dir: Path) -> list[str]:
    """Acceptance-by-position and accepted-length plots of an offline run."""
    out_dir = Path(out_dir)
    return [
        position_acceptance({"offline": curves["position_acceptance"]}, out_dir / POSITION_PNG),
        accepted_length_hist({"offline": curves["accepted_length_hist"]}, out_dir / HISTOGRAM_PNG),
    ]
