"""Offline evaluation: alignment metrics of an exported adapter on a hidden-pair cache split,
computed with `AlignmentMetrics` over padded, masked batches exactly as training validates."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from cross_modal_sd.adapters import Adapter
from cross_modal_sd.data.cache import HiddenPairCache
from cross_modal_sd.data.datamodule import split_indices
from cross_modal_sd.data.dataset import HiddenPairDataset, collate_pairs
from cross_modal_sd.evaluation.checkpoint import AdapterExport, CheckpointError
from cross_modal_sd.metrics import DEFAULT_TAUS, AlignmentMetrics, cosine, draft_tokens, leading_run


@torch.inference_mode()
def offline_metrics(
    adapter: Adapter,
    cache: HiddenPairCache,
    indices: Sequence[int] | None,
    lm_head: torch.Tensor,
    vocab_limit: int | None = None,
    batch_size: int = 64,
    max_len: int | None = None,
    taus: Sequence[float] = DEFAULT_TAUS,
    prompt_last_token: int | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Alignment metrics of `adapter` on cache samples, as training's validation computes them.

    The adapter reads the collated, padded batch with its mask; the metrics are one
    `AlignmentMetrics` accumulated over the whole selection.

    Args:
        adapter: the adapter.
        cache: the hidden-pair cache.
        indices: cache indices to use (None: all).
        lm_head: (V, Dt) target ``lm_head`` weight (the cache's).
        vocab_limit: ids at or above it are never drafted.
        batch_size: samples per batch.
        max_len: positions of the curves (None: the cache's max_new_tokens).
        taus: cosine thresholds.
        prompt_last_token: token before answer position 0, for token-fusing adapters.

    Returns:
        ``{"metrics": scalars, "curves": lists}`` and per-sample rows (``sample_id``, ``length``,
        ``accepted_len``, ``token_match``, ``cos_sim``).
    """
    if adapter.uses_tokens and prompt_last_token is None:
        raise ValueError(
            f"adapter {adapter.name} fuses token embeddings and needs the prompt's last token id: "
            f"the cache manifest's extra['prompt_last_token'] is missing"
        )
    adapter = adapter.eval()
    max_len = max_len or cache.manifest["max_new_tokens"]
    metrics = AlignmentMetrics(lm_head, taus, max_len, vocab_limit)
    dataset = HiddenPairDataset(cache, indices)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_pairs)
    dtype = next(adapter.parameters()).dtype
    rows = []
    for batch in loader:
        h, mask, tokens = batch["h_draft"].to(dtype), batch["mask"], batch["tokens"]
        kwargs = {}
        if adapter.uses_tokens:
            start = tokens.new_full((tokens.shape[0], 1), prompt_last_token)
            kwargs["tokens"] = torch.cat([start, tokens[:, :-1]], dim=1)  # (B, T): y[k-1]
        pred = adapter(h, mask, **kwargs)  # (B, T, Dt)
        metrics.update(pred, batch["h_target"], tokens, mask)
        hits = draft_tokens(pred, lm_head, vocab_limit) == tokens  # (B, T)
        runs = leading_run(hits, mask)  # (B,)
        cos = cosine(pred, batch["h_target"], mask)  # (B, T)
        lengths = mask.sum(dim=1)  # (B,)
        for b, sample_id in enumerate(batch["sample_id"]):
            n = int(lengths[b])
            rows.append(
                {
                    "sample_id": sample_id,
                    "length": n,
                    "accepted_len": int(runs[b]),
                    "token_match": float((hits[b] & mask[b]).sum()) / n,
                    "cos_sim": float(cos[b, :n].mean()),
                }
            )
    scalars = {k: float(v) for k, v in metrics.compute().items()}
    curves = {k: v.tolist() for k, v in metrics.compute_curves().items()}
    return {"metrics": scalars, "curves": curves}, rows


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
        CheckpointError: the cache's dims differ from the export's.
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
        raise CheckpointError(
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
