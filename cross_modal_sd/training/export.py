"""Export of a finished run: ``best_model.pt`` (pickle-free) and ``metrics.json``."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cross_modal_sd.adapters import Adapter, adapter_payload, build_adapter

BEST_MODEL_NAME = "best_model.pt"
METRICS_NAME = "metrics.json"
EXPORT_FORMAT = 1


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A Lightning checkpoint of :class:`~cross_modal_sd.training.AdapterModule` on the CPU.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a checkpoint of an ``AdapterModule``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    # The module saves plain hyper-parameters only, so the restricted loader suffices.
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if "state_dict" not in ckpt or not {"adapter", "in_dim", "out_dim"} <= set(hparams):
        raise ValueError(f"{path}: not a checkpoint of an AdapterModule (no adapter hparams)")
    return ckpt


def adapter_from_checkpoint(ckpt: Mapping[str, Any]) -> Adapter:
    """Rebuild the adapter (config + weights) held by a loaded ``AdapterModule`` checkpoint."""
    hp = ckpt["hyper_parameters"]
    adapter = build_adapter(hp["adapter"], hp["in_dim"], hp["out_dim"])
    prefix = "adapter."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    adapter.load_state_dict(state, strict=True)
    return adapter


def check_dims(source: str, in_dim: int, out_dim: int, dims: tuple[int, int]) -> None:
    """Raise a ValueError naming ``source`` unless its (in_dim, out_dim) equal the cache ``dims``."""
    if (in_dim, out_dim) != tuple(dims):
        raise ValueError(
            f"{source}: adapter dims (in_dim={in_dim}, out_dim={out_dim}) do not match the cache "
            f"(draft_dim={dims[0]}, target_dim={dims[1]})"
        )


def json_safe(value: Any) -> Any:
    """Replace NaN/inf floats (nested) by None: strict JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def export_run(
    export_dir: str | os.PathLike,
    adapter: Adapter,
    best: Mapping[str, Any],
    cache_digest: str,
    summary: Mapping[str, Any],
    models: Mapping[str, str] | None = None,
) -> tuple[Path, Path]:
    """Write ``best_model.pt`` and ``metrics.json`` into ``export_dir``.

    ``best_model.pt`` holds plain data only and loads with ``torch.load(weights_only=True)``:
    ``adapter_config`` and ``state_dict`` (as :func:`~cross_modal_sd.adapters.adapter_payload`,
    so :func:`~cross_modal_sd.adapters.load_adapter` reads it), ``cache_manifest_digest``,
    ``dims`` (``{"draft_dim", "target_dim"}``), ``metrics`` (best epoch's ``val/*`` scalars),
    ``curves``, ``epoch``, ``global_step``, ``run_name``, ``export_format`` and the cache's
    ``draft_model`` / ``target_model`` ids when given.

    Args:
        export_dir: directory, created if missing.
        adapter: the best adapter.
        best: the best epoch's ``AdapterModule.val_results``.
        cache_digest: manifest digest of the training cache.
        summary: the content of ``metrics.json`` (best/final metrics, paths, run name).
        models: ``{"draft_model": id, "target_model": id}`` of the training cache.

    Returns:
        Paths of ``best_model.pt`` and ``metrics.json``.
    """
    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    model_path = export_dir / BEST_MODEL_NAME
    payload = {
        **adapter_payload(adapter),
        "export_format": EXPORT_FORMAT,
        "cache_manifest_digest": cache_digest,
        "dims": {"draft_dim": adapter.in_dim, "target_dim": adapter.out_dim},
        "metrics": dict(best.get("metrics", {})),
        "curves": dict(best.get("curves", {})),
        "epoch": best.get("epoch"),
        "global_step": best.get("global_step"),
        "run_name": summary.get("run_name"),
        **(models or {}),
    }
    tmp = model_path.with_name(model_path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, model_path)
    metrics_path = export_dir / METRICS_NAME
    metrics_path.write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n")
    return model_path, metrics_path
