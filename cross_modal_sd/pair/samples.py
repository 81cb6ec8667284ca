"""One question about one clip, prepared for both models."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PairSample:
    """One question about one clip, prepared for both models (batch dimension 1).

    Attributes:
        sample_id: unique id (``<scene or clip>/<question>``).
        group: scene / sequence id: splits never separate a group.
        question_id: question type (mini) or index (``q0``, ... for DSEC).
        target_ids: (1, L_t) target prompt with the video tokens expanded.
        frames: (1, F, 3, H, W) normalised target frames.
        draft_ids: (1, L_d) draft prompt holding the event placeholder.
        event_pixels: (1, T, 3, H, W) normalised event images.
        reference: the template answer (mini world), None where there is none (DSEC).
    """

    sample_id: str
    group: str
    question_id: str
    target_ids: torch.Tensor
    frames: torch.Tensor
    draft_ids: torch.Tensor
    event_pixels: torch.Tensor
    reference: str | None = None
