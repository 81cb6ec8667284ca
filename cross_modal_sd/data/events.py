"""Event streams and their EventGPT-style rendering into event images.

Shared by the mini world's simulator and the DSEC reader, so the draft model sees the same kind of
picture whichever source the events came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

POSITIVE_RGB = (255, 0, 0)  # brighter: red
NEGATIVE_RGB = (0, 0, 255)  # darker: blue
BACKGROUND_RGB = (255, 255, 255)


class EventStreamError(ValueError):
    """An event stream that cannot be rendered (empty, or outside the sensor)."""


@dataclass(frozen=True)
class EventStream:
    """Events as parallel arrays, sorted by time.

    Attributes:
        x: (N,) int column, 0 <= x < width.
        y: (N,) int row, 0 <= y < height.
        t: (N,) int64 timestamps (microseconds for DSEC; simulator ticks for the mini world).
        p: (N,) int polarity, 1 = brighter, 0 = darker.
    """

    x: np.ndarray
    y: np.ndarray
    t: np.ndarray
    p: np.ndarray

    def __len__(self) -> int:
        return len(self.t)

    def validate(self, sensor_size: tuple[int, int], source: str = "event stream") -> None:
        """Raises EventStreamError when an event lies outside (height, width) = sensor_size."""
        h, w = sensor_size
        if len(self) == 0:
            return
        bad = (self.x < 0) | (self.x >= w) | (self.y < 0) | (self.y >= h)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise EventStreamError(
                f"{source}: {int(bad.sum())} events outside the sensor size {w}x{h} "
                f"(first: x={int(self.x[i])}, y={int(self.y[i])})"
            )


def render_event_image(events: EventStream, sensor_size: tuple[int, int]) -> np.ndarray:
    """Renders events EventGPT-style: white canvas, the latest event at a pixel sets its colour.

    Args:
        events: the events of one chunk.
        sensor_size: (height, width) of the canvas.

    Returns:
        uint8 (height, width, 3) image.
    """
    h, w = sensor_size
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = BACKGROUND_RGB
    if len(events) == 0:
        return img
    flat = events.y.astype(np.int64) * w + events.x.astype(np.int64)
    # Index of the last event at each touched pixel (events are time-sorted), made explicit
    # because numpy leaves the winner of repeated-index assignment unspecified.
    rev_unique, rev_first = np.unique(flat[::-1], return_index=True)
    last = len(flat) - 1 - rev_first
    colours = np.where(events.p[last, None] > 0, POSITIVE_RGB, NEGATIVE_RGB).astype(np.uint8)
    img.reshape(-1, 3)[rev_unique] = colours
    return img


def event_images(
    events: EventStream,
    sensor_size: tuple[int, int],
    n_images: int,
    source: str = "event stream",
    allow_empty: bool = False,
) -> np.ndarray:
    """Splits a stream into n_images chunks of equal event count and renders each.

    Args:
        events: time-sorted events.
        sensor_size: (height, width).
        n_images: number of chunks (EventGPT's temporal frames).
        source: name used in error messages.
        allow_empty: render blank canvases for an empty stream instead of raising.

    Returns:
        uint8 (n_images, height, width, 3).
    """
    events.validate(sensor_size, source)
    if len(events) == 0 and not allow_empty:
        raise EventStreamError(f"{source}: no events in the window; nothing for the draft to see")
    bounds = np.linspace(0, len(events), n_images + 1).round().astype(int)
    return np.stack(
        [
            render_event_image(
                EventStream(*(a[lo:hi] for a in (events.x, events.y, events.t, events.p))),
                sensor_size,
            )
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
        ]
    )
