"""Learning-rate schedule: linear warm-up, then one cosine down to the minimum at the last step.

The cosine's length is the run's total number of optimizer steps, taken from the trainer, so the
learning rate is exactly ``lr · min_lr_ratio`` at the last optimizer step and stays there; it never
restarts (the prior system hard-coded ``T_max = 100`` and never annealed).
"""

from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(
    step: int, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0
) -> float:
    """LR multiplier of optimizer step ``step`` (0-based) of a ``total_steps`` run.

    Warm-up steps ``0 .. W-1`` ramp linearly, ``(s + 1) / (W + 1)``; step ``W`` is the peak (1.0);
    the cosine then falls to ``min_lr_ratio`` at step ``total_steps - 1``. Later steps (if any)
    stay at ``min_lr_ratio``.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = total_steps - 1 - warmup_steps
    progress = 1.0 if span <= 0 else min((step - warmup_steps) / span, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_warmup(total_steps: int, warmup_steps: int | None, warmup_ratio: float) -> int:
    """Warm-up length in optimizer steps from an explicit count or a share of the run.

    Raises:
        ValueError: both given, a negative value, or a warm-up as long as the run.
    """
    if warmup_steps and warmup_ratio:
        raise ValueError(
            f"optimizer.warmup_steps={warmup_steps} and optimizer.warmup_ratio={warmup_ratio} "
            "are both set; set one of them"
        )
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"optimizer.warmup_ratio must be in [0, 1), got {warmup_ratio}")
    steps = warmup_steps if warmup_steps else round(warmup_ratio * total_steps)
    if steps < 0 or (steps and steps >= total_steps):
        raise ValueError(
            f"warm-up of {steps} optimizer steps does not fit a run of {total_steps} steps"
        )
    return steps


def warmup_cosine_schedule(
    optimizer: Optimizer, total_steps: int | float, warmup_steps: int = 0, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """``LambdaLR`` following :func:`warmup_cosine_factor`; step it once per optimizer step.

    The factor is a ``functools.partial`` with no state of its own, so a resumed run keeps the
    scheduler's step count from the checkpoint and takes the length from the current trainer.

    Args:
        optimizer: optimizer whose groups' initial ``lr`` is the peak.
        total_steps: optimizer steps of the whole run (``trainer.estimated_stepping_batches``).
        warmup_steps: linear warm-up steps.
        min_lr_ratio: final LR as a share of the peak.

    Raises:
        ValueError: an unbounded or empty run, or ``min_lr_ratio`` outside [0, 1].
    """
    if not math.isfinite(total_steps) or total_steps < 1:
        raise ValueError(
            f"the cosine schedule needs a finite number of optimizer steps, got {total_steps} "
            "(set trainer.max_epochs or trainer.max_steps)"
        )
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"optimizer.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    factor = partial(
        warmup_cosine_factor,
        total_steps=int(total_steps),
        warmup_steps=warmup_steps,
        min_lr_ratio=min_lr_ratio,
    )
    return LambdaLR(optimizer, factor)
