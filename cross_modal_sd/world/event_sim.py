"""Event-camera simulation from high-rate renders by log-intensity threshold crossings."""

from __future__ import annotations

import numpy as np

from cross_modal_sd.data.events import EventStream
from cross_modal_sd.world.scenes import Scene, render

# Rec. 601 luma: an event pixel integrates intensity, it does not see colour.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def simulate_events(
    scene: Scene,
    n_steps: int = 48,
    threshold: float = 0.15,
    size: int = 32,
    noise_rate: float = 0.002,
    rng: np.random.Generator | None = None,
) -> EventStream:
    """Simulates a DVS over the clip.

    Each pixel keeps a reference log intensity; whenever the current log intensity moves by at
    least `threshold` from it, the pixel fires one event per crossed threshold (polarity = sign)
    and the reference moves by the crossed amount. Timestamps are render step indices scaled to
    microseconds over a 1 s clip.

    Args:
        scene: the scene to observe.
        n_steps: number of high-rate renders over the clip.
        threshold: contrast threshold in log intensity.
        size: frame side in pixels.
        noise_rate: probability per pixel per step of a spurious event (sensor noise).
        rng: generator for noise; None means no noise.

    Returns:
        Time-sorted EventStream.
    """
    eps = 1e-3
    ref = np.log(np.tensordot(LUMA, render(scene, 0.0, size), axes=1) + eps)  # (H, W)
    xs, ys, ts, ps = [], [], [], []
    for step in range(1, n_steps):
        t_us = round(1e6 * step / (n_steps - 1))
        cur = np.log(np.tensordot(LUMA, render(scene, step / (n_steps - 1), size), axes=1) + eps)
        diff = cur - ref
        n_cross = np.floor(np.abs(diff) / threshold).astype(np.int64)  # (H, W)
        yy, xx = np.nonzero(n_cross)
        if len(yy):
            counts = n_cross[yy, xx]
            pol = (diff[yy, xx] > 0).astype(np.int8)
            xs.append(np.repeat(xx, counts))
            ys.append(np.repeat(yy, counts))
            ps.append(np.repeat(pol, counts))
            ts.append(np.full(int(counts.sum()), t_us, dtype=np.int64))
            ref[yy, xx] += np.sign(diff[yy, xx]) * counts * threshold
        if rng is not None and noise_rate > 0:
            ny, nx = np.nonzero(rng.random((size, size)) < noise_rate)
            xs.append(nx)
            ys.append(ny)
            ps.append(rng.integers(0, 2, len(nx)).astype(np.int8))
            ts.append(np.full(len(nx), t_us, dtype=np.int64))
    if not ts:
        empty = np.zeros(0, dtype=np.int64)
        return EventStream(empty, empty, empty, empty.astype(np.int8))
    return EventStream(
        x=np.concatenate(xs).astype(np.int16),
        y=np.concatenate(ys).astype(np.int16),
        t=np.concatenate(ts),
        p=np.concatenate(ps),
    )
