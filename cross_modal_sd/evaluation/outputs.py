"""Evaluation outputs: report files and plots in the run directory, the same to the loggers."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cross_modal_sd.evaluation.plots import e2e_plots, offline_plots
from cross_modal_sd.evaluation.report import render_e2e, render_offline
from cross_modal_sd.utils import instantiate_group, json_safe, write_json


def write_outputs(
    report: dict[str, Any], records: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike
) -> list[Path]:
    """``report.json``, ``report.md``, ``samples.jsonl`` and the plots into `out_dir`.

    Returns:
        The plot paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if report["mode"] == "e2e":
        plots = e2e_plots(report, records, out)
        markdown = render_e2e(report, plots)
    else:
        plots = offline_plots(report["curves"], out)
        markdown = render_offline(report, plots)
    report["plots"] = plots
    write_json(out / "report.json", report)
    (out / "report.md").write_text(markdown)
    with open(out / "samples.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
    return [out / p for p in plots]


def scalar_metrics(report: Mapping[str, Any], prefix: str = "eval") -> dict[str, float]:
    """The report's scalars as ``<prefix>/...`` keys (``<prefix>/<strategy>/<name>`` per
    strategy; a speedup's interval as ``..._ci95_lo`` / ``..._ci95_hi``)."""
    out: dict[str, float] = {f"{prefix}/n_samples": report["n_samples"]}
    if report["mode"] == "offline":
        out |= {f"{prefix}/{k}": v for k, v in report["metrics"].items()}
        return {k: v for k, v in out.items() if v is not None}
    out[f"{prefix}/lossless_rate"] = report["lossless_rate"]
    for k, v in (report.get("cost_ratios") or {}).items():
        if isinstance(v, (int, float)):
            out[f"{prefix}/cost/{k}"] = v
    for name, s in report["strategies"].items():
        for key, value in s.items():
            if key.startswith("speedup") or key == "predicted_speedup":
                for how, v in (value or {}).items():
                    if isinstance(v, list) and len(v) == 2:
                        out[f"{prefix}/{name}/{key}_{how}_lo"] = v[0]
                        out[f"{prefix}/{name}/{key}_{how}_hi"] = v[1]
                    elif isinstance(v, (int, float)):
                        out[f"{prefix}/{name}/{key}_{how}"] = v
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{prefix}/{name}/{key}"] = value
    return {k: float(v) for k, v in out.items() if v is not None}


def make_loggers(logger_cfg: Mapping[str, Any] | None) -> list[Any]:
    """Loggers of the ``logger`` group; a W&B run is tagged ``job_type=evaluate``."""
    node = (
        OmegaConf.to_container(logger_cfg, resolve=True)
        if isinstance(logger_cfg, DictConfig)
        else dict(logger_cfg or {})
    )
    for entry in node.values():
        if isinstance(entry, dict) and str(entry.get("_target_", "")).endswith("WandbLogger"):
            entry["job_type"] = "evaluate"
    return list(instantiate_group(node).values())


def report_tables(
    report: Mapping[str, Any], records: Sequence[Mapping[str, Any]], prefix: str = "eval"
) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """The W&B tables of a report: key -> (columns, rows).

    E2E: ``<prefix>/strategies`` (one row per strategy) and ``<prefix>/samples`` (per sample:
    answer, each method's ms and whether it equals HF generate's output). Offline:
    ``<prefix>/samples``.
    """
    if report["mode"] != "e2e":
        cols = list(records[0]) if records else ["sample_id"]
        return {f"{prefix}/samples": (cols, [[r[c] for c in cols] for r in records])}
    keys = ("method", "total_ms", "slower_share", "tau", "accept_rate", "lossless_rate")
    strategies = report["strategies"]
    table = [
        [
            name,
            *[s[k] for k in keys],
            s["speedup"]["ratio_of_means"],
            *s["speedup"]["ci95"],
            s["speedup"]["mean_of_ratios"],
            s["speedup_vs_generate"]["ratio_of_means"],
        ]
        for name, s in strategies.items()
    ]
    cols = [
        "strategy",
        *keys,
        "speedup_ratio_of_means",
        "ci95_lo",
        "ci95_hi",
        "speedup_mean_of_ratios",
        "speedup_vs_generate",
    ]
    names = list(strategies)[1:]  # all but the baseline
    samples = [
        [
            r["sample_id"],
            r["answer"],
            r["baseline"]["total_ms"],
            *[r["strategies"][n]["total_ms"] for n in names],
            *[r["strategies"][n]["lossless"] for n in names],
        ]
        for r in records
    ]
    sample_cols = [
        "sample_id",
        "answer",
        "baseline_ms",
        *[f"{n}_ms" for n in names],
        *[f"{n}_lossless" for n in names],
    ]
    return {f"{prefix}/strategies": (cols, table), f"{prefix}/samples": (sample_cols, samples)}


def log_report(
    loggers: Sequence[Any],
    report: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    plots: Sequence[Path],
    prefix: str = "eval",
) -> None:
    """Scalars to every logger; tables and images to W&B loggers (all at step 0), under
    ``prefix``."""
    from lightning.pytorch.loggers import WandbLogger

    scalars = scalar_metrics(report, prefix)
    for logger in loggers:
        logger.log_metrics(scalars, step=0)
        if not isinstance(logger, WandbLogger):
            logger.save()
            continue
        for key, (cols, rows) in report_tables(report, records, prefix).items():
            logger.log_table(key, columns=cols, data=rows, step=0)
        for path in plots:
            logger.log_image(f"{prefix}/{path.stem}", images=[str(path)], step=0)
