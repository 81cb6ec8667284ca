"""Adapter exports for evaluation: find the newest, read one, check it fits the models."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from cross_modal_sd.adapters import Adapter, adapter_from_payload
from cross_modal_sd.data.cache import load_manifest, manifest_digest
from cross_modal_sd.extract import PairModels

BEST_MODEL = "best_model.pt"


class CheckpointError(ValueError):
    """An adapter export that is missing, malformed or does not fit the models or cache."""


# ----------------------------------------------------------------------------------- checkpoint


@dataclass
class AdapterExport:
    """An exported adapter (``best_model.pt``) and what the export says about its training.

    Attributes:
        path: the file.
        adapter: the rebuilt adapter (eval mode, CPU).
        dims: (draft_dim, target_dim) of its training cache.
        cache_digest: manifest digest of its training cache (None if not recorded).
        run_name: training run name (None if not recorded).
        metrics: the best epoch's ``val/*`` metrics recorded at export.
        models: (draft_model, target_model) ids of its training cache, when the export records
            them.
    """

    path: Path
    adapter: Adapter
    dims: tuple[int, int]
    cache_digest: str | None = None
    run_name: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    models: tuple[str, str] | None = None

    @property
    def name(self) -> str | None:
        """Adapter level name (``L1`` ...)."""
        return self.adapter.name


def load_export(path: str | os.PathLike) -> AdapterExport:
    """Reads a ``best_model.pt`` written by training's export (or `save_adapter`).

    Raises:
        CheckpointError: no such file, or not an adapter export.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ckpt={path}: no such file (pass an exported best_model.pt)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for a non-checkpoint file
        raise CheckpointError(f"ckpt={path}: not a readable torch file ({err})") from err
    if not isinstance(payload, Mapping):
        raise CheckpointError(f"ckpt={path}: holds a {type(payload).__name__}, not an export dict")
    try:
        adapter = adapter_from_payload(payload).eval()
    except ValueError as err:
        raise CheckpointError(f"ckpt={path}: {err}") from err
    dims = payload.get("dims") or {}
    models = None
    if payload.get("draft_model") and payload.get("target_model"):
        models = (str(payload["draft_model"]), str(payload["target_model"]))
    return AdapterExport(
        path=path,
        adapter=adapter,
        dims=(
            int(dims.get("draft_dim", adapter.in_dim)),
            int(dims.get("target_dim", adapter.out_dim)),
        ),
        cache_digest=payload.get("cache_manifest_digest"),
        run_name=payload.get("run_name"),
        metrics=dict(payload.get("metrics") or {}),
        models=models,
    )


def _export_adapter_name(path: Path) -> str | None:
    """Adapter name of an export: from its ``metrics.json`` when present (no weight loading)."""
    summary = path.with_name("metrics.json")
    if summary.is_file():
        try:
            name = json.loads(summary.read_text()).get("adapter")
        except (OSError, ValueError):
            name = None
        if name:
            return str(name)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return (payload.get("adapter_config") or {}).get("name")
    except Exception:  # an unreadable file is listed as such, not fatal to the search
        return None


def find_export(root: str | os.PathLike, adapter_name: str) -> Path:
    """The newest ``<root>/*/best_model.pt`` (by modification time) of adapter `adapter_name`.

    Raises:
        CheckpointError: none matches; the message lists the exports found.
    """
    root = Path(root)
    found = sorted(root.glob(f"*/{BEST_MODEL}"), key=lambda p: p.stat().st_mtime, reverse=True)
    names = {p: _export_adapter_name(p) for p in found}
    for path in found:
        if names[path] == adapter_name:
            return path
    listing = ", ".join(f"{p} ({names[p] or 'unreadable'})" for p in found) or "none"
    raise CheckpointError(
        f"no exported adapter named {adapter_name!r} under {root}/*/{BEST_MODEL} (found: "
        f"{listing}); train one with `python train.py adapter={adapter_name}`, or pass "
        f"ckpt=<path to best_model.pt> or adapter_name=<another level>"
    )


def resolve_checkpoint(cfg: DictConfig) -> Path:
    """``cfg.ckpt``, or the newest export of ``cfg.adapter_name`` under ``cfg.checkpoints_dir``."""
    if cfg.ckpt:
        return Path(cfg.ckpt)
    return find_export(cfg.checkpoints_dir, cfg.adapter_name)


def _same_model(a: str, b: str) -> bool:
    """Model ids name the same model: equal strings, or paths to the same directory."""
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def check_export_fits(
    export: AdapterExport, pair: PairModels, cache_dir: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Fails before any decoding when the export was trained for other models.

    Dims are always compared with the loaded models' hidden sizes. Model ids are compared when
    the export records them, or when the cache at `cache_dir` is the one it was trained on
    (same manifest digest).

    Returns:
        The report's ``checkpoint`` entry (path, adapter, run, dims, digest, ``models_verified``).

    Raises:
        CheckpointError: dims or model ids differ; the message names both sides.
    """
    draft_dim = int(pair.draft.lm_head_weight.shape[1])
    target_dim = int(pair.target.lm_head_weight.shape[1])
    if export.dims != (draft_dim, target_dim):
        raise CheckpointError(
            f"ckpt={export.path}: adapter {export.name} was trained on a cache with "
            f"draft_dim={export.dims[0]}, target_dim={export.dims[1]}, but the loaded models have "
            f"draft hidden size {draft_dim} ({pair.draft_id}) and target hidden size {target_dim} "
            f"({pair.target_id}); evaluate it with the models it was trained for"
        )
    models = export.models
    if models is None and cache_dir is not None and export.cache_digest:
        try:
            manifest = load_manifest(cache_dir)
        except (FileNotFoundError, ValueError):
            manifest = None
        if manifest is not None and manifest_digest(manifest) == export.cache_digest:
            models = (manifest["draft_model"], manifest["target_model"])
    if models is not None:
        for role, theirs, ours in (
            ("draft", models[0], pair.draft_id),
            ("target", models[1], pair.target_id),
        ):
            if not _same_model(theirs, ours):
                raise CheckpointError(
                    f"ckpt={export.path}: adapter {export.name} was trained with {role} model "
                    f"{theirs!r}, but the loaded {role} model is {ours!r}; evaluate it with the "
                    f"models it was trained for"
                )
    return {
        "path": str(export.path),
        "adapter": export.name,
        "run_name": export.run_name,
        "dims": {"draft_dim": export.dims[0], "target_dim": export.dims[1]},
        "cache_manifest_digest": export.cache_digest,
        "models_verified": models is not None,
        "num_parameters": export.adapter.num_parameters(),
    }
