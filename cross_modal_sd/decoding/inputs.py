"""The two models' inputs for one sample (batch size 1), as the decoding code takes them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _check_batch_one(name: str, input_ids: torch.Tensor) -> None:
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"{name}.input_ids must have shape (1, L), got {tuple(input_ids.shape)}")


@dataclass
class TargetInputs:
    """Target prompt (1, L) with `<video>` expanded, and its frames (1, F, 3, H, W)."""

    input_ids: torch.Tensor
    pixel_values_videos: torch.Tensor

    def __post_init__(self):
        _check_batch_one("TargetInputs", self.input_ids)

    @property
    def device(self) -> torch.device:
        return self.input_ids.device


@dataclass
class DraftInputs:
    """Draft prompt (1, L) holding one event placeholder, and event images (1, T, 3, H, W)."""

    input_ids: torch.Tensor
    event_pixels: torch.Tensor

    def __post_init__(self):
        _check_batch_one("DraftInputs", self.input_ids)
