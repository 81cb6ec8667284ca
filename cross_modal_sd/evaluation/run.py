"""`evaluate(cfg)`: one evaluation run of an exported adapter, as a plain function.

``evaluate.py`` only wraps it in ``@hydra.main``; tests call `run_e2e` / `run_offline` with
their own models and samples, or this with the models and samples patched.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from cross_modal_sd.data.sharding import resolve_shard, select_local_gpu
from cross_modal_sd.evaluation.checkpoint import load_export, resolve_checkpoint
from cross_modal_sd.evaluation.e2e import resolve_max_new_tokens, run_e2e
from cross_modal_sd.evaluation.offline import run_offline
from cross_modal_sd.evaluation.outputs import log_report, make_loggers, write_outputs
from cross_modal_sd.evaluation.sharded import evaluate_part
from cross_modal_sd.extract import load_pair, pair_samples
from cross_modal_sd.training.callbacks import finish_wandb

log = logging.getLogger(__name__)

MODES = ("e2e", "offline")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """One evaluation run of an exported adapter (``conf/evaluate.yaml``).

    The checkpoint is resolved and read, and (for e2e) checked against the loaded models, before
    any decoding. Outputs go to ``cfg.output_dir`` and the loggers of ``cfg.logger``.

    With several ranks (torchrun's ``RANK``/``WORLD_SIZE`` or ``shard.rank``/``shard.world_size``)
    an e2e run times this rank's block of scenes into ``<shard.dir>/parts/`` (see
    `cross_modal_sd.evaluation.sharded`); the last rank to finish writes the merged outputs into
    ``shard.dir`` (default: ``output_dir``) and logs them.

    Returns:
        The report (also written to ``report.json``); a rank that did not merge returns
        ``{"mode": "e2e", "sharding": {rank, world_size, timed, resumed, merged, waiting_for}}``.

    Raises:
        CheckpointError: missing or incompatible checkpoint.
        ValueError: unknown mode, strategy or split; bad ``max_new_tokens``.
    """
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    export = load_export(resolve_checkpoint(cfg))
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
            samples = pair_samples(pair, cfg.data, cfg.split, cfg.start, cfg.n_scenes)
            cache_dir = cfg.data.get("cache_dir")
            report, records = run_e2e(pair, export, samples, cfg, cache_dir=cache_dir)
        unit = "scenes" if cfg.data.get("source", "mini") == "mini" else "clips"
        report["config"]["source"] = (
            f"{cfg.data.get('source', 'mini')} {cfg.split} {unit} "
            f"{cfg.start}..{cfg.start + cfg.n_scenes - 1}"
        )
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
