"""Offline evaluation: alignment metrics of an exported adapter on a hidden-pair cache split,
computed by `metrics.offline.offline_metrics` exactly as training validates."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from cross_modal_sd.data.cache import HiddenPairCache
from cross_modal_sd.data.datamodule import split_indices
from cross_modal_sd.exports import AdapterExport, ExportError
from cross_modal_sd.metrics.offline import offline_metrics


def _explicit_split(data_cfg: Mapping[str, Any]) -> Any:
    """``data.split`` as the DataModule takes it: group lists, a JSON file, or None."""
    split = data_cfg.get("split")
    return OmegaConf.to_container(split, resolve=True) if isinstance(split, DictConfig) else split


def run_offline(export: AdapterExport, cfg: DictConfig | Mapping[str, Any]) -> tuple[dict, list]:
    """Alignment metrics of the export on ``cfg.data.cache_dir``, split ``cfg.offline.split``.

    ``val`` is the split training validated on (same group split: ``data.val_fraction``,
    ``data.seed``, explicit ``data.split``); ``all`` is the whole cache.

    Raises:
        FileNotFoundError: no cache at ``data.cache_dir``.
        ExportError: the cache's dims differ from the export's.
        ValueError: unknown split, or the split is empty.
    """
    data, offline = cfg["data"], cfg["offline"]
    cache_dir = Path(data["cache_dir"])
    if not (cache_dir / "manifest.json").is_file():
        raise FileNotFoundError(
            f"data.cache_dir={cache_dir}: no hidden-pair cache there; extract one with "
            f"`python -m cross_modal_sd.extract` (or run train.py, which builds it)"
        )
    cache = HiddenPairCache(cache_dir, verify=data.get("verify", "once"))
    if tuple(cache.dims) != export.dims:
        raise ExportError(
            f"ckpt={export.path}: adapter {export.name} has dims (draft_dim={export.dims[0]}, "
            f"target_dim={export.dims[1]}) but the cache {cache_dir} has (draft_dim="
            f"{cache.dims[0]}, target_dim={cache.dims[1]})"
        )
    warnings = []
    if export.cache_digest and export.cache_digest != cache.digest:
        warnings.append(
            f"the adapter was trained on another cache (digest {export.cache_digest[:12]}, this "
            f"one {cache.digest[:12]}): the val split here is not its validation set"
        )
    split = offline.get("split", "val")
    if split == "all":
        indices = np.arange(len(cache))
    elif split in ("train", "val", "test"):
        splits = split_indices(
            cache.groups, data.get("val_fraction", 0.1), data.get("seed", 0), _explicit_split(data)
        )
        if split not in splits:
            raise ValueError(f"offline.split={split!r}: the cache split has only {sorted(splits)}")
        indices = splits[split]
    else:
        raise ValueError(f"offline.split must be train, val, test or all, got {split!r}")
    if len(indices) == 0:
        raise ValueError(f"offline.split={split!r} of {cache_dir} holds no samples")
    manifest = cache.manifest
    result, rows = offline_metrics(
        export.adapter,
        cache,
        indices,
        cache.lm_head_weight(),
        vocab_limit=manifest.get("vocab_limit"),
        batch_size=int(offline.get("batch_size", 64)),
        max_len=offline.get("max_len"),
        prompt_last_token=(manifest.get("extra") or {}).get("prompt_last_token"),
    )
    report = {
        "mode": "offline",
        "n_samples": len(indices),
        "split": split,
        "cache_dir": str(cache_dir),
        "cache_manifest_digest": cache.digest,
        "checkpoint": {
            "path": str(export.path),
            "adapter": export.name,
            "run_name": export.run_name,
            "dims": {"draft_dim": export.dims[0], "target_dim": export.dims[1]},
            "cache_manifest_digest": export.cache_digest,
        },
        **result,
        "trained_metrics": export.metrics,
        "warnings": warnings,
    }
    return report, rows
