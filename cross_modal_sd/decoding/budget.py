"""Core budgets and the two deployments every timing runs under (docs/design.md §14).

* ``shared``: every method gets the same ``cores``. The baseline uses all of them for the target;
  SD splits them between its models and never holds more at any moment: the drafter's process
  has ``draft_cores``, the target the rest (what prefill-window drafting costs: a core the
  baseline's prefill has and SD's has not).
* ``own_device``: the drafter runs on a device the target cannot use (the event camera's edge
  accelerator, a second GPU). On a CPU: the drafter's process pinned to ``draft_cores`` cores of
  its own, the target and the baseline pinned to the other ``cores - draft_cores``.

Both are reported, never mixed. On CUDA the drafter stays in this process on its own stream.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from cross_modal_sd.decoding.runners import DraftRunner, LocalRunner, ProcessRunner, pin_process
from cross_modal_sd.decoding.speculative import ThreadPlan

DEPLOYMENTS = ("shared", "own_device")


def machine_cores() -> tuple[int, ...]:
    """The cores this process may run on."""
    return tuple(sorted(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class Budget:
    """A core budget under one deployment.

    Attributes:
        cores: cores every method may use (the first ``cores`` this process may run on).
        deployment: ``shared`` | ``own_device``.
        draft_cores: the drafter's cores (its intra-op threads: one per core).
        device: ``cpu`` | ``cuda[:N]`` (on CUDA the cores only pin host threads).
        machine: the cores this process may run on when the budget is made (read once: pinning
            later narrows what the process sees).

    Raises:
        ValueError: an unknown deployment, a budget larger than this machine's cores, or no core
            left to the target; the message names the setting.
    """

    cores: int
    deployment: str = "shared"
    draft_cores: int = 1
    device: str = "cpu"
    machine: tuple[int, ...] = field(default=(), repr=False)

    def __post_init__(self):
        if self.deployment not in DEPLOYMENTS:
            raise ValueError(f"deployment must be one of {DEPLOYMENTS}, got {self.deployment!r}")
        if not self.machine:
            object.__setattr__(self, "machine", machine_cores())
        available = self.machine
        if not isinstance(self.cores, int) or not 1 <= self.cores <= len(available):
            raise ValueError(
                f"cores={self.cores!r}: this machine lets the run use {len(available)} core(s) "
                f"({list(available)}); set cores between 1 and {len(available)}"
            )
        if not isinstance(self.draft_cores, int) or self.draft_cores < 1:
            raise ValueError(f"draft_cores must be an int >= 1, got {self.draft_cores!r}")
        if self.cpu and self.draft_cores >= self.cores:
            raise ValueError(
                f"cores={self.cores} with draft_cores={self.draft_cores} leaves no core to the "
                f"target while the drafter works ({self.deployment}); raise cores or lower "
                f"draft_cores"
            )

    @property
    def cpu(self) -> bool:
        return torch.device(self.device).type == "cpu"

    @property
    def all_cores(self) -> tuple[int, ...]:
        return self.machine[: self.cores]

    @property
    def drafter_cores(self) -> tuple[int, ...]:
        return self.all_cores[: self.draft_cores]

    @property
    def target_cores(self) -> tuple[int, ...]:
        """The cores the target (and the baseline) may use."""
        if self.deployment == "own_device" and self.cpu:
            return self.all_cores[self.draft_cores :]
        return self.all_cores

    @property
    def sd_cores(self) -> tuple[int, ...]:
        """The target's cores during SD runs: never the drafter's, whose process stays resident
        (in `shared` the baselines have those cores too, SD's target does not)."""
        if self.cpu:
            return self.all_cores[self.draft_cores :]
        return self.target_cores

    @property
    def thread_choices(self) -> list[int]:
        """Intra-op thread counts the target (and the baseline) may be timed at."""
        return list(range(1, len(self.target_cores) + 1))

    def plan(self, decode_threads: int) -> ThreadPlan:
        """The target's threads in an SD run: on a CPU the drafter's process keeps its cores
        for the whole run (it stays resident between rounds, and a target thread on its core
        would contend with it), so the target has the other ``cores - draft_cores``, at most
        ``decode_threads`` after round 1."""
        own = self.cores - self.draft_cores if self.cpu else len(self.target_cores)
        return ThreadPlan(round1=own, decode=min(own, decode_threads))

    @contextmanager
    def pinned(self, cores: tuple[int, ...] | None = None) -> Iterator[None]:
        """This process pinned to ``cores`` (default: the target's and the baselines') for the
        ``with`` body, then back where it was."""
        before = os.sched_getaffinity(0)
        pin_process(cores or self.target_cores)
        try:
            yield
        finally:
            pin_process(before)

    def runner(self, drafter) -> DraftRunner:
        """Where the drafter runs: its own pinned process on a CPU, a thread here on CUDA."""
        if self.cpu:
            return ProcessRunner(drafter, self.drafter_cores, self.draft_cores)
        return LocalRunner(drafter, self.device)

    def to_dict(self) -> dict:
        return {
            "cores": self.cores,
            "deployment": self.deployment,
            "draft_cores": self.draft_cores,
            "target_cores": list(self.target_cores),
            "drafter_cores": list(self.drafter_cores),
            "device": self.device,
        }
