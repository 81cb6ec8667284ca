"""Bootstrap intervals of speedups over samples: every speedup a report prints carries one."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

N_BOOT = 2000  # resamples: the interval ends move by well under 1% between seeds at this count


def bootstrap_speedup(
    base_ms: Sequence[float],
    own_ms: Sequence[float],
    n_boot: int = N_BOOT,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of a paired speedup.

    Samples are resampled with replacement (pairs kept together); each resample gives the ratio
    of mean times and the mean of per-sample ratios.

    Args:
        base_ms: the baseline's time per sample.
        own_ms: the method's time on the same samples, in the same order.
        n_boot: resamples.
        level: coverage of the interval.
        seed: seeds the resampling (reports are reproducible).

    Returns:
        ``{"ratio_of_means": [lo, hi], "mean_of_ratios": [lo, hi]}``.

    Raises:
        ValueError: unpaired or empty samples, non-positive times, or a level outside (0, 1).
    """
    base, own = np.asarray(base_ms, dtype=float), np.asarray(own_ms, dtype=float)
    if base.shape != own.shape or base.ndim != 1 or not len(base):
        raise ValueError(f"bootstrap needs paired 1-d samples, got {base.shape} and {own.shape}")
    if (base <= 0).any() or (own <= 0).any():
        raise ValueError("bootstrap needs positive times")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    idx = np.random.default_rng(seed).integers(0, len(base), size=(n_boot, len(base)))
    ratio_of_means = base[idx].mean(axis=1) / own[idx].mean(axis=1)
    mean_of_ratios = (base / own)[idx].mean(axis=1)
    tail = 100 * (1 - level) / 2
    return {
        name: [float(v) for v in np.percentile(values, [tail, 100 - tail])]
        for name, values in (("ratio_of_means", ratio_of_means), ("mean_of_ratios", mean_of_ratios))
    }
