"""Wall-clock timing shared by the SD loop, the baseline and the peers.

Every number comes from `time.perf_counter` taken after the device has finished the timed work
(`synchronize`), so a CUDA kernel still in flight is never counted as done. Threads record
`Span`s on the same clock, which is what makes the overlap of target prefill and draft work a
measurement rather than an estimate.

Thread budget: torch's intra-op thread count is process-wide (setting it from any thread changes
it for all). The harness gives every method its threads with `thread_budget`; the SD loop sets
the target's own for round 1 and after (`speculative.ThreadPlan`), and a drafter in its own
process (`runners.ProcessRunner`) has its own.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")


def clock_ms() -> float:
    """Milliseconds on the monotonic high-resolution clock every span uses."""
    return time.perf_counter() * 1e3


def synchronize(device: torch.device | str | None, stream=None) -> None:
    """Waits for queued device work (one stream if given); a no-op on CPU."""
    if device is None or torch.device(device).type != "cuda":
        return
    if stream is not None:
        stream.synchronize()
    else:
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Span:
    """A closed interval [start, end] in `clock_ms` milliseconds."""

    start: float
    end: float

    @property
    def ms(self) -> float:
        return self.end - self.start

    def overlap_ms(self, other: Span) -> float:
        """Length of the intersection with `other` (0 when disjoint)."""
        return max(0.0, min(self.end, other.end) - max(self.start, other.start))


@contextmanager
def timed_span(device: torch.device | str | None, out: list[Span], stream=None) -> Iterator[None]:
    """Appends the synchronised span of the `with` body to `out`."""
    start = clock_ms()
    yield
    synchronize(device, stream)
    out.append(Span(start, clock_ms()))


def time_call(
    fn: Callable[[], T],
    warmup: int = 1,
    repeats: int = 1,
    device: torch.device | str | None = None,
) -> tuple[T, float]:
    """Runs `fn` `warmup` times untimed, then `repeats` times timed.

    Args:
        fn: the work; called without arguments.
        warmup: untimed calls first (allocator, kernel selection, lazy init).
        repeats: timed calls; their median is returned.
        device: synchronised before and after each timed call.

    Returns:
        The result of the last call and the median wall time in ms.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"time_call: need warmup >= 0 and repeats >= 1, got {warmup}, {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = clock_ms()
        result = fn()
        synchronize(device)
        times.append(clock_ms() - start)
    return result, statistics.median(times)


@contextmanager
def thread_budget(threads: int | None) -> Iterator[None]:
    """Sets torch's intra-op thread count for the `with` body and restores it after.

    `None` leaves the current setting alone, so callers can pass a config value straight in.
    """
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"thread budget must be >= 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
