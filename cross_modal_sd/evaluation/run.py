"""`evaluate(cfg)`: one evaluation run of an exported adapter, as a plain function.

``evaluate.py`` only wraps it in ``@hydra.main``; tests call `run_e2e` / `run_offline` with
their own models and samples, or this with the models and samples patched.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from cross_modal_sd.config import register_resolvers
from cross_modal_sd.data.sharding import resolve_shard, select_local_gpu
from cross_modal_sd.evaluation.e2e import resolve_max_new_tokens, run_e2e
from cross_modal_sd.evaluation.offline import run_offline
from cross_modal_sd.evaluation.outputs import log_report, make_loggers, write_outputs
from cross_modal_sd.evaluation.sharded import evaluate_part
from cross_modal_sd.exports import ExportError, load_export
from cross_modal_sd.pair import load_pair, make_source
from cross_modal_sd.utils import finish_wandb

log = logging.getLogger(__name__)

MODES = ("e2e", "offline")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """One evaluation run of an exported adapter (``conf/evaluate.yaml``).

    The export ``cfg.ckpt`` is read, and (for e2e) checked against the loaded models, before any
    decoding. Outputs go to ``cfg.output_dir`` and the loggers of ``cfg.logger``.

    With several ranks (torchrun's ``RANK``/``WORLD_SIZE`` or ``shard.rank``/``shard.world_size``)
    an e2e run times this rank's block of scenes into ``<shard.dir>/parts/`` (see
    `cross_modal_sd.evaluation.sharded`); the last rank to finish writes the merged outputs into
    ``shard.dir`` (default: ``output_dir``) and logs them.

    Returns:
        The report (also written to ``report.json``); a rank that did not merge returns
        ``{"mode": "e2e", "sharding": {rank, world_size, timed, resumed, merged, waiting_for}}``.

    Raises:
        ExportError: no ``ckpt``, or a missing or incompatible export.
        ValueError: unknown mode, strategy or split; bad ``max_new_tokens``.
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
    log.info("evaluating %s (adapter %s, run %s)", export.path, export.name, export.run_name)
    out_dir = Path(cfg.output_dir)
    if cfg.mode == "e2e":
        resolve_max_new_tokens(cfg.max_new_tokens, 1)  # bad values fail before the models load
        shard = resolve_shard(cfg.get("shard"))
        select_local_gpu()
        pair = load_pair(cfg.models)
        if shard.world_size > 1:
            out_dir = Path(cfg.shard.get("dir") or cfg.output_dir)
            status = evaluate_part(cfg, export, pair, shard, out_dir)
            if not status["merged"]:
                return {"mode": "e2e", "sharding": status}
            report, records = status.pop("report"), status.pop("records")
        else:
            samples = (s for _, s in make_source(cfg.source).samples(pair))
            cache_dir = cfg.data.get("cache_dir")
            report, records = run_e2e(pair, export, samples, cfg, cache_dir=cache_dir)
        report["config"]["source"] = make_source(cfg.source).describe()
    else:
        report, records = run_offline(export, cfg)
    plots = write_outputs(report, records, out_dir)
    loggers = make_loggers(cfg.get("logger"))
    failed = True
    try:
        log_report(loggers, report, records, plots)
        failed = False
    finally:
        finish_wandb(loggers, failed)
    log.info("report: %s", out_dir / "report.md")
    return report
