"""The one reader and writer of exported adapters: ``best_model.pt`` (+ ``metrics.json``).

An export is plain data and loads with ``torch.load(weights_only=True)``: ``adapter_config``
and ``state_dict`` (`adapters.adapter_payload`), ``export_format``, ``cache_manifest_digest``,
``dims`` (``{"draft_dim", "target_dim"}``), ``metrics`` (the best epoch's ``val/*`` scalars),
``curves`` (its acceptance curves), ``val_acceptance`` (every validation sample's
teacher-forced ``match``/``confidence`` sequences, padded, with ``lengths``; for a feature head
the accepted ``runs`` of its self-fed chains from every position: what the speedup model
replays), ``kind`` (``adapter`` | ``head``), ``lm_head_digest`` (of the target's ``lm_head``: a
head drafts through it), ``epoch``, ``global_step``, ``run_name`` and, when known, the training
cache's ``draft_model`` / ``target_model`` ids. Files written by earlier versions (without
``val_acceptance``, or payloads with only the adapter) load too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cross_modal_sd.adapters import Adapter, adapter_from_payload, adapter_payload
from cross_modal_sd.data.cache import load_manifest, manifest_digest
from cross_modal_sd.pair import PairModels
from cross_modal_sd.utils import write_json

BEST_MODEL_NAME = "best_model.pt"
METRICS_NAME = "metrics.json"
EXPORT_FORMAT = 1


class ExportError(ValueError):
    """An export that is missing, malformed or does not fit the models or cache."""


def tensor_digest(weight: torch.Tensor) -> str:
    """sha256 of a tensor's float32 values (the same weights give the same digest whatever
    their stored dtype was widened from)."""
    import hashlib

    data = weight.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


@dataclass
class AdapterExport:
    """An exported adapter and what the export says about its training.

    Attributes:
        path: the file.
        adapter: the rebuilt adapter (eval mode, CPU).
        dims: (draft_dim, target_dim) of its training cache.
        cache_digest: manifest digest of its training cache (None if not recorded).
        run_name: training run name (None if not recorded).
        metrics: the best epoch's ``val/*`` metrics.
        curves: the best epoch's ``val/*`` curves (acceptance by position, accepted lengths).
        val_acceptance: the validation split's acceptance sequences (``match``, ``confidence``,
            ``lengths`` tensors), None for older exports.
        models: (draft_model, target_model) ids of its training cache, when recorded.
        lm_head_digest: `tensor_digest` of the training cache's target ``lm_head``.
    """

    path: Path
    adapter: Adapter
    dims: tuple[int, int]
    cache_digest: str | None = None
    run_name: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, Any] = field(default_factory=dict)
    val_acceptance: dict[str, torch.Tensor] | None = None
    models: tuple[str, str] | None = None
    lm_head_digest: str | None = None

    @property
    def name(self) -> str | None:
        """Adapter level name (``L1`` ...)."""
        return self.adapter.name

    @property
    def kind(self) -> str:
        """``adapter`` (maps the draft's states) or ``head`` (reads the target's own)."""
        return getattr(self.adapter, "kind", "adapter")


def save_export(adapter: Adapter, path: str | os.PathLike, **extra: Any) -> Path:
    """Writes ``adapter`` (config + weights) and ``extra`` plain-data entries, atomically.

    ``dims`` defaults to the adapter's own; ``extra`` may override it (tests write mismatching
    exports that way).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        **adapter_payload(adapter),
        "export_format": EXPORT_FORMAT,
        "kind": getattr(adapter, "kind", "adapter"),
        "dims": {"draft_dim": adapter.in_dim, "target_dim": adapter.out_dim},
        **extra,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def export_run(
    export_dir: str | os.PathLike,
    adapter: Adapter,
    best: Mapping[str, Any],
    cache_digest: str,
    summary: Mapping[str, Any],
    models: Mapping[str, str] | None = None,
    val_acceptance: Mapping[str, torch.Tensor] | None = None,
    lm_head_digest: str | None = None,
) -> tuple[Path, Path]:
    """A finished training run's ``best_model.pt`` and ``metrics.json`` in ``export_dir``.

    Args:
        export_dir: directory, created if missing.
        adapter: the best adapter.
        best: the best epoch's ``AdapterModule.val_results`` (``metrics``, ``curves``,
            ``epoch``, ``global_step``).
        cache_digest: manifest digest of the training cache.
        summary: the content of ``metrics.json`` (best/final metrics, paths, run name).
        models: ``{"draft_model": id, "target_model": id}`` of the training cache.
        val_acceptance: the best adapter's validation acceptance sequences
            (`metrics.offline.acceptance_arrays`, or `metrics.chains.chain_arrays` for a head).
        lm_head_digest: `tensor_digest` of the cache's target ``lm_head``.

    Returns:
        Paths of ``best_model.pt`` and ``metrics.json``.
    """
    export_dir = Path(export_dir)
    model_path = save_export(
        adapter,
        export_dir / BEST_MODEL_NAME,
        cache_manifest_digest=cache_digest,
        metrics=dict(best.get("metrics", {})),
        curves=dict(best.get("curves", {})),
        epoch=best.get("epoch"),
        global_step=best.get("global_step"),
        run_name=summary.get("run_name"),
        lm_head_digest=lm_head_digest,
        **({"val_acceptance": dict(val_acceptance)} if val_acceptance else {}),
        **(models or {}),
    )
    return model_path, write_json(export_dir / METRICS_NAME, summary)


def load_export(path: str | os.PathLike) -> AdapterExport:
    """Reads an export.

    Raises:
        ExportError: no such file, or not an adapter export.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ckpt={path}: no such file (pass an exported best_model.pt)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for a non-checkpoint file
        raise ExportError(f"ckpt={path}: not a readable torch file ({err})") from err
    if not isinstance(payload, Mapping):
        raise ExportError(f"ckpt={path}: holds a {type(payload).__name__}, not an export dict")
    try:
        adapter = adapter_from_payload(payload).eval()
    except ValueError as err:
        raise ExportError(f"ckpt={path}: {err}") from err
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
        curves=dict(payload.get("curves") or {}),
        val_acceptance=payload.get("val_acceptance"),
        models=models,
        lm_head_digest=payload.get("lm_head_digest"),
    )


def check_dims(source: str, in_dim: int, out_dim: int, dims: tuple[int, int]) -> None:
    """Raise a ValueError naming ``source`` unless its (in_dim, out_dim) equal the cache ``dims``."""
    if (in_dim, out_dim) != tuple(dims):
        raise ValueError(
            f"{source}: adapter dims (in_dim={in_dim}, out_dim={out_dim}) do not match the cache "
            f"(draft_dim={dims[0]}, target_dim={dims[1]})"
        )


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
    (same manifest digest). A feature head is checked against the target alone: its width,
    vocabulary and ``lm_head`` digest.

    Returns:
        The report's ``checkpoint`` entry (path, adapter, run, dims, digest, ``models_verified``).

    Raises:
        ExportError: dims or model ids differ; the message names both sides.
    """
    if export.kind == "head":
        return _check_head_fits(export, pair)
    draft_dim = int(pair.draft.lm_head_weight.shape[1])
    target_dim = int(pair.target.lm_head_weight.shape[1])
    if export.dims != (draft_dim, target_dim):
        raise ExportError(
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
                raise ExportError(
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


def _check_head_fits(export: AdapterExport, pair: PairModels) -> dict[str, Any]:
    """A feature head drafts through the target's ``lm_head`` from its states: width,
    vocabulary and ``lm_head`` weights must be the ones it was trained with.

    Raises:
        ExportError: any of them differ; the message names both sides.
    """
    weight = pair.target.lm_head_weight
    vocab, dim = (int(n) for n in weight.shape)
    head = export.adapter
    theirs = (head.out_dim, head.config.get("vocab_size"))
    if theirs != (dim, vocab):
        raise ExportError(
            f"ckpt={export.path}: head {export.name} was trained for a target of width "
            f"{theirs[0]} and {theirs[1]} vocabulary rows, but the loaded target "
            f"({pair.target_id}) has width {dim} and {vocab} rows; train a head for it"
        )
    if export.lm_head_digest and export.lm_head_digest != tensor_digest(weight):
        raise ExportError(
            f"ckpt={export.path}: head {export.name} was trained against another lm_head than "
            f"the loaded target's ({pair.target_id}): its drafts would be read by other weights; "
            f"train a head for this target"
        )
    return {
        "path": str(export.path),
        "adapter": export.name,
        "kind": "head",
        "run_name": export.run_name,
        "dims": {"target_dim": dim, "vocab": vocab},
        "cache_manifest_digest": export.cache_digest,
        "lm_head_verified": export.lm_head_digest is not None,
        "num_parameters": head.num_parameters(),
    }
