"""``train(cfg)``: the whole training run as a plain function of a composed Hydra config.

``train.py`` only wraps it in ``@hydra.main``; tests and notebooks call it directly with a config
from Hydra's compose API (setting ``output_dir``, which otherwise comes from Hydra's run dir).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from cross_modal_sd.config import multirun_suffix, register_resolvers
from cross_modal_sd.data.datamodule import HiddenPairDataModule
from cross_modal_sd.exports import (
    BEST_MODEL_NAME,
    METRICS_NAME,
    ExportError,
    check_dims,
    export_run,
    load_export,
    tensor_digest,
)
from cross_modal_sd.metrics.chains import chain_arrays
from cross_modal_sd.metrics.offline import TREE_TOP_K, acceptance_arrays, offline_metrics
from cross_modal_sd.training.callbacks import WandbValCurves
from cross_modal_sd.training.checkpoints import adapter_from_checkpoint, load_checkpoint
from cross_modal_sd.training.module import CHAIN_K, AdapterModule
from cross_modal_sd.utils import finish_wandb, instantiate_group

log = logging.getLogger(__name__)


def build_datamodule(cfg: DictConfig) -> HiddenPairDataModule:
    """The cache DataModule of ``cfg.data``; extracts the cache first (``cfg.models`` reading
    ``cfg.source``) when ``data.build_if_missing`` is true."""
    data_cfg = cfg.data
    if data_cfg.get("build_if_missing", False):
        # Imported here: extraction pulls in the model stack, which a plain cache does not need.
        from cross_modal_sd.extract import ensure_cache

        cache_dir = ensure_cache(cfg)
    else:
        cache_dir = data_cfg.cache_dir
    split = data_cfg.get("split")
    if isinstance(split, DictConfig):
        split = OmegaConf.to_container(split, resolve=True)
    return HiddenPairDataModule(
        cache_dir=cache_dir,
        batch_size=data_cfg.batch_size,
        num_workers=data_cfg.num_workers,
        val_fraction=data_cfg.val_fraction,
        seed=data_cfg.seed,
        split=split,
        shuffle_window=data_cfg.get("shuffle_window", 4),
        verify=data_cfg.get("verify", "once"),
        pin_memory=data_cfg.get("pin_memory", False),
    )


def build_module(cfg: DictConfig, datamodule: HiddenPairDataModule) -> AdapterModule:
    """An :class:`AdapterModule` sized by the cache, optionally initialised from ``init_from``."""
    in_dim, out_dim = datamodule.dims
    manifest = datamodule.cache.manifest
    module = AdapterModule(
        adapter=OmegaConf.to_container(cfg.adapter, resolve=True),
        in_dim=in_dim,
        out_dim=out_dim,
        lm_head_weight=datamodule.lm_head_weight(),
        vocab_limit=manifest.get("vocab_limit"),
        loss=OmegaConf.to_container(cfg.loss, resolve=True),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        taus=list(cfg.metrics.taus),
        max_len=cfg.metrics.max_len or manifest["max_new_tokens"],
        prompt_last_token=(manifest.get("extra") or {}).get("prompt_last_token"),
        cache_digest=datamodule.manifest_digest,
    )
    if cfg.get("init_from"):
        init_adapter(module, cfg.init_from, datamodule.dims)
    return module


def init_adapter(module: AdapterModule, path: str | os.PathLike, dims: tuple[int, int]) -> None:
    """Load the adapter weights of an exported ``best_model.pt`` into ``module``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: its dims differ from the cache's, or its weights do not fit the configured
            adapter.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_from: adapter file not found: {path}")
    try:
        adapter = load_export(path).adapter
    except ExportError as err:
        raise ValueError(f"init_from: {err}") from err
    check_dims(f"init_from={path}", adapter.in_dim, adapter.out_dim, dims)
    try:
        module.adapter.load_state_dict(adapter.state_dict(), strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"init_from={path}: its {adapter.name} weights do not fit the configured "
            f"adapter {module.adapter.name}: {err}"
        ) from err


def check_resume(ckpt_path: str | os.PathLike, module: AdapterModule) -> None:
    """Fail before training when ``ckpt_path`` cannot continue this run.

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: not an ``AdapterModule`` checkpoint, dims other than the cache's, or an
            adapter of another structure than the configured one.
    """
    ckpt = load_checkpoint(ckpt_path)
    hp = ckpt["hyper_parameters"]
    check_dims(
        f"ckpt_path={ckpt_path}",
        hp["in_dim"],
        hp["out_dim"],
        (module.hparams.in_dim, module.hparams.out_dim),
    )
    theirs = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items() if k.startswith("adapter.")}
    ours = {f"adapter.{k}": tuple(v.shape) for k, v in module.adapter.state_dict().items()}
    if theirs != ours:
        raise ValueError(
            f"ckpt_path={ckpt_path}: it holds a {hp['adapter'].get('name')} adapter whose weights "
            f"differ in structure from the configured {module.adapter.name} "
            f"(resume with the same adapter config)"
        )
    if hp.get("cache_digest") != module.hparams.cache_digest:
        log.warning("ckpt_path=%s was trained on a cache with another manifest digest", ckpt_path)


def check_launch(trainer: L.Trainer) -> None:
    """Refuse multi-process training that Lightning would start by re-running this command
    inside a Hydra multirun: each child would re-run the whole sweep.

    Raises:
        ValueError: a multirun job whose trainer has several processes and no external launcher
            (torchrun, SLURM) that started them.
    """
    if not multirun_suffix() or trainer.world_size <= 1:
        return
    if trainer.strategy.cluster_environment.creates_processes_externally:
        return
    raise ValueError(
        f"trainer with {trainer.world_size} processes inside a Hydra multirun on the local "
        "launcher: Lightning would start the extra ranks by re-running the whole sweep. Run one "
        "job per sweep point with hydra/launcher=slurm (tasks_per_node = trainer.devices), or "
        "launch each point with torchrun"
    )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one adapter and export its best epoch.

    Everything that can be checked without training is checked first: the cache (present,
    non-empty, with an lm_head), the val split (non-empty), the adapter (known, dims matching the
    cache), ``init_from`` and ``ckpt_path``.

    Args:
        cfg: composed ``conf/train.yaml`` (see its comments for every key).

    Returns:
        The content of ``metrics.json``: ``run_name``, ``best`` and ``final`` val results
        (``epoch``, ``global_step``, ``metrics`` of ``val/*`` scalars, ``curves``), ``monitor``,
        paths (``best_model``, ``metrics_json``, ``best_checkpoint``, ``last_checkpoint``,
        ``cache_dir``), ``cache_manifest_digest``, ``dims``, ``num_parameters``, ``global_step``,
        ``epochs`` and ``interrupted``.

    Raises:
        FileNotFoundError, ValueError (incl. ``CacheError``, ``UnknownAdapterError``): bad input,
            before training starts.
    """
    register_resolvers()  # a config composed outside an entry point resolves too
    if cfg.get("float32_matmul_precision"):
        torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")  # raises on an empty cache or an empty split, before any training
    module = build_module(cfg, datamodule)
    if cfg.ckpt_path:
        check_resume(cfg.ckpt_path, module)

    callbacks = instantiate_group(cfg.get("callbacks"))
    checkpoint = callbacks.get("model_checkpoint")
    if not isinstance(checkpoint, ModelCheckpoint) or checkpoint.monitor is None:
        raise ValueError(
            "callbacks.model_checkpoint must be a ModelCheckpoint with a monitor: it selects "
            "the epoch exported as best_model.pt"
        )
    if cfg.ckpt_path:
        # Continue in the resumed run's checkpoint folder: ModelCheckpoint restores its best
        # score only when its dirpath is unchanged, and would otherwise call any next epoch best.
        checkpoint.dirpath = os.path.realpath(Path(cfg.ckpt_path).parent)
    loggers = list(instantiate_group(cfg.get("logger")).values())
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        callbacks["wandb_val_curves"] = WandbValCurves()
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=list(callbacks.values()), logger=loggers or False
    )
    check_launch(trainer)

    failed = True
    try:
        for lg in loggers:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        summary = _export(cfg, trainer, module, checkpoint, datamodule)
        for lg in loggers:
            # Other DDP ranks hold a placeholder W&B experiment without a summary.
            if isinstance(lg, WandbLogger) and trainer.is_global_zero:
                lg.experiment.summary.update(
                    {f"best/{k}": v for k, v in summary["best"]["metrics"].items()}
                    | {"best/epoch": summary["best"]["epoch"], "best_model": summary["best_model"]}
                )
        failed = False
    finally:
        finish_wandb(loggers, failed)
    return summary


def _export(
    cfg: DictConfig,
    trainer: L.Trainer,
    module: AdapterModule,
    checkpoint: ModelCheckpoint,
    datamodule: HiddenPairDataModule,
) -> dict[str, Any]:
    """Write best_model.pt + metrics.json from the monitored best checkpoint (rank 0)."""
    if not checkpoint.best_model_path:
        raise RuntimeError(
            f"no checkpoint monitored by {checkpoint.monitor} was saved (did validation run? "
            f"trainer.limit_val_batches must be > 0)"
        )
    best_ckpt = load_checkpoint(checkpoint.best_model_path)
    adapter = adapter_from_checkpoint(best_ckpt)
    export_dir = Path(cfg.export_dir)
    summary = {
        "run_name": cfg.run_name,
        "adapter": adapter.name,
        "num_parameters": adapter.num_parameters(),
        "monitor": checkpoint.monitor,
        "best": best_ckpt.get("val_results", {}),
        "final": module.val_results,
        "best_model": str(export_dir / BEST_MODEL_NAME),
        "metrics_json": str(export_dir / METRICS_NAME),
        "best_checkpoint": checkpoint.best_model_path,
        "last_checkpoint": checkpoint.last_model_path or None,
        "cache_dir": str(datamodule.cache_dir),
        "cache_manifest_digest": datamodule.manifest_digest,
        "dims": {"draft_dim": adapter.in_dim, "target_dim": adapter.out_dim},
        "global_step": trainer.global_step,
        "epochs": trainer.current_epoch,
        "interrupted": trainer.interrupted,
    }
    if trainer.is_global_zero:
        manifest = datamodule.cache.manifest
        models = {key: manifest[key] for key in ("draft_model", "target_model")}
        # The speedup model replays SD over these (docs/design.md §13): every val sample's
        # teacher-forced acceptance under the exported (best) adapter, or a head's chains.
        lm_head, limit = datamodule.lm_head_weight(), manifest.get("vocab_limit")
        if module.is_head:
            acceptance = chain_arrays(
                adapter,
                datamodule.cache,
                datamodule.splits["val"],
                lm_head,
                limit,
                CHAIN_K,
                tree_k=max(TREE_TOP_K),
            )
        else:
            _, rows = offline_metrics(
                adapter,
                datamodule.cache,
                datamodule.splits["val"],
                lm_head,
                vocab_limit=limit,
                max_len=module.hparams.max_len,
                prompt_last_token=module.hparams.prompt_last_token,
            )
            acceptance = acceptance_arrays(rows)
        export_run(
            export_dir,
            adapter,
            summary["best"],
            datamodule.manifest_digest,
            summary,
            models,
            acceptance,
            lm_head_digest=tensor_digest(lm_head),
        )
        best = summary["best"]
        log.info(
            "exported %s: %s = %.4f at epoch %s",
            summary["best_model"],
            checkpoint.monitor,
            best.get("metrics", {}).get(checkpoint.monitor, float("nan")),
            best.get("epoch"),
        )
    return summary
