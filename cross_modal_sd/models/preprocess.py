"""Pixel preprocessing shared by extraction and evaluation, so both see identical inputs."""

from __future__ import annotations

import torch

# CLIP's normalisation constants (both real towers are CLIP ViTs).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def frames_to_pixels(frames: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Normalises images (..., 3, H, W) in [0, 1] with CLIP statistics, resizing to size x size.

    Resizing is bicubic on the short side followed by a centre crop, as CLIP's processor does.
    """
    x = frames.float()
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        lead = x.shape[:-3]
        x = x.reshape(-1, *x.shape[-3:])
        h, w = x.shape[-2:]
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top : top + size, left : left + size].clamp(0, 1)
        x = x.reshape(*lead, *x.shape[-3:])
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std
