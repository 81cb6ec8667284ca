"""`evaluate(cfg)`: one evaluation run of an exported adapter, as a plain function.

``evaluate.py`` only wraps it in ``@hydra.main``; tests call `run_e2e` / `run_offline` with
their own models and samples, or this with the models and samples patched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from cross_modal_sd.config import register_resolvers
from cross_modal_sd.data.sharding import resolve_shard, select_local_gpu
from cross_modal_sd.decoding.budget import DEPLOYMENTS, Budget
from cross_modal_sd.evaluation.e2e import load_head, resolve_max_new_tokens, run_e2e
from cross_modal_sd.evaluation.offline import run_offline
from cross_modal_sd.evaluation.outputs import log_report, make_loggers, write_outputs
from cross_modal_sd.evaluation.sharded import evaluate_part
from cross_modal_sd.exports import ExportError, load_export
from cross_modal_sd.pair import load_pair, make_source
from cross_modal_sd.utils import finish_wandb

log = logging.getLogger(__name__)

MODES = ("e2e", "offline")


def deployments(cfg: DictConfig) -> list[str]:
    """The deployments an e2e run times, each into its own report (``cfg.deployments``).

    Raises:
        ValueError: none, or an unknown one.
    """
    names = [str(d) for d in (cfg.get("deployments") or [])]
    unknown = [d for d in names if d not in DEPLOYMENTS]
    if not names or unknown:
        raise ValueError(
            f"deployments must be a non-empty list of {DEPLOYMENTS}, got {names or None}"
        )
    return list(dict.fromkeys(names))


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """One evaluation run of an exported adapter (``conf/evaluate.yaml``).

    The export ``cfg.ckpt`` is read, and (for e2e) checked against the loaded models, before any
    decoding. An e2e run times every deployment of ``cfg.deployments`` in turn, each under the
    budget ``cfg.cores``, into ``<output_dir>/<deployment>/`` (report.json, report.md,
    samples.jsonl, plots); offline outputs go to ``cfg.output_dir``. Everything is also sent to
    the loggers of ``cfg.logger`` (e2e scalars as ``eval/<deployment>/...``).

    With several ranks (torchrun's ``RANK``/``WORLD_SIZE`` or ``shard.rank``/``shard.world_size``)
    an e2e run times this rank's block of scenes into ``<shard.dir>/<deployment>/parts/`` (see
    `cross_modal_sd.evaluation.sharded`); the last rank to finish writes the merged outputs.

    Returns:
        Offline: the report (also written to ``report.json``). E2E: ``{"mode": "e2e",
        "deployments": {name: report}}``; a rank that did not merge has ``{"sharding": status}``
        in place of that deployment's report.

    Raises:
        ExportError: no ``ckpt``, or a missing or incompatible export.
        ValueError: unknown mode, deployment, strategy or split; bad ``max_new_tokens`` or
            ``cores``.
    """
    register_resolvers()  # a config composed outside an entry point resolves too
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    if not cfg.get("ckpt"):
        # Guessing "the newest export" could evaluate another run's adapter without a word.
        raise ExportError(
            "ckpt is required: pass the export to evaluate, e.g. "
            "`python evaluate.py ckpt=checkpoints/<run>/best_model.pt` (train.py prints its path)"
        )
    export = load_export(cfg.ckpt)
    if export.kind == "head":
        raise ExportError(
            f"ckpt={cfg.ckpt} is a feature head ({export.name}); evaluate.py takes the "
            f"cross-modal adapter as ckpt and a head as head_ckpt=<its best_model.pt>"
        )
    if cfg.mode == "e2e":
        load_head(cfg.get("head_ckpt"))  # a bad head export fails before the models load
    log.info("evaluating %s (adapter %s, run %s)", export.path, export.name, export.run_name)
    out_dir = Path(cfg.output_dir)
    if cfg.mode == "offline":
        report, records = run_offline(export, cfg)
        with _loggers(cfg) as loggers:
            _write_and_log(loggers, report, records, out_dir, prefix="eval")
        return report
    resolve_max_new_tokens(cfg.max_new_tokens, 1)  # bad values fail before the models load
    names = deployments(cfg)
    for name in names:  # a bad budget fails before the models load
        Budget(int(cfg.cores), name, int(cfg.get("draft_cores", 1)), str(cfg.device))
    shard = resolve_shard(cfg.get("shard"))
    select_local_gpu()
    pair = load_pair(cfg.models)
    source = make_source(cfg.source)
    out: dict[str, Any] = {}
    with _loggers(cfg) as loggers:
        for name in names:
            out[name] = _e2e_deployment(cfg, export, pair, source, shard, name, loggers)
    return {"mode": "e2e", "deployments": out}


def _e2e_deployment(cfg, export, pair, source, shard, name, loggers) -> dict[str, Any]:
    """One deployment's run (or this rank's part of it); its outputs under ``<dir>/<name>``."""
    if shard.world_size > 1:
        root = Path(cfg.shard.get("dir") or cfg.output_dir) / name
        status = evaluate_part(cfg, export, pair, shard, root, name)
        if not status["merged"]:
            return {"sharding": status}
        report, records = status.pop("report"), status.pop("records")
    else:
        root = Path(cfg.output_dir) / name
        samples = (s for _, s in source.samples(pair))
        report, records = run_e2e(
            pair, export, samples, cfg, name, cache_dir=cfg.data.get("cache_dir")
        )
    report["config"]["source"] = source.describe()
    _write_and_log(loggers, report, records, root, prefix=f"eval/{name}")
    return report


@contextmanager
def _loggers(cfg: DictConfig) -> Iterator[list[Any]]:
    """The configured loggers for one evaluation; a W&B run is closed at the end."""
    loggers = make_loggers(cfg.get("logger"))
    failed = True
    try:
        yield loggers
        failed = False
    finally:
        finish_wandb(loggers, failed)


def _write_and_log(loggers, report, records, out_dir: Path, prefix: str) -> None:
    plots = write_outputs(report, records, out_dir)
    log_report(loggers, report, records, plots, prefix)
    log.info("report: %s", out_dir / "report.md")
