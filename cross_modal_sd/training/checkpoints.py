"""Lightning checkpoints of an `AdapterModule` (``last.ckpt`` / the best epoch's), read back."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cross_modal_sd.adapters import Adapter, build_adapter


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
