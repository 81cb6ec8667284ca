"""Work split across processes (extraction, E2E evaluation): which rank am I, which units are
mine, and when are all ranks done.

A run with ``world_size`` W splits its units (mini scenes, DSEC clips) into W contiguous blocks;
rank r takes block r, so rank 0's samples, then rank 1's, ... are exactly the single-process
order. Every rank writes its own part (cache shards or sample records) and, when its block is
complete, a done marker naming the request it completed. Whichever rank finishes last sees all W
markers and merges. Nothing waits on a rendezvous, so the ranks may be torchrun processes, srun
tasks, a SLURM array or jobs of a Hydra multirun, started together or one after another; a rank
that died leaves no marker, and rerunning it completes what its part lacks.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

DONE_SUFFIX = ".done.json"


@dataclass(frozen=True)
class Shard:
    """This process's place in a multi-process run.

    Attributes:
        rank: 0-based index of this process.
        world_size: number of processes sharing the work.
    """

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"shard.rank must be in [0, shard.world_size), got rank={self.rank}, "
                f"world_size={self.world_size}"
            )

    @property
    def name(self) -> str:
        """``rank-00001-of-00004``: names this rank's part files."""
        return f"rank-{self.rank:05d}-of-{self.world_size:05d}"

    def block(self, start: int, n: int) -> tuple[int, int]:
        """(first unit, unit count) of this rank among units ``start .. start + n - 1``.

        Contiguous blocks whose sizes differ by at most one, in rank order.
        """
        base, extra = divmod(n, self.world_size)
        first = start + self.rank * base + min(self.rank, extra)
        return first, base + (self.rank < extra)


def resolve_shard(shard_cfg: Mapping[str, Any] | None = None) -> Shard:
    """The shard of this process: ``shard.rank``/``shard.world_size`` when set, else torchrun's
    ``RANK``/``WORLD_SIZE`` environment, else a single process.

    Raises:
        ValueError: a rank outside [0, world_size), or only one of the two given.
    """
    cfg = dict(shard_cfg or {})
    rank, world = cfg.get("rank"), cfg.get("world_size")
    if (rank is None) != (world is None):
        raise ValueError(
            f"set both shard.rank and shard.world_size or neither, got rank={rank}, "
            f"world_size={world}"
        )
    if rank is None:
        rank, world = os.environ.get("RANK", 0), os.environ.get("WORLD_SIZE", 1)
    return Shard(int(rank), int(world))


def select_local_gpu() -> int | None:
    """Under torchrun or srun on a multi-GPU node, make this process's GPU the current CUDA device.

    Every rank is configured with the same ``device: cuda``; with GPU ``LOCAL_RANK`` (torchrun)
    or ``SLURM_LOCALID`` (srun) current, ``cuda`` means this rank's own GPU instead of GPU 0 for
    all. Returns the selected index, or None (no CUDA, or no local rank in the environment).
    """
    local = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID"))
    if local is None or not torch.cuda.is_available():
        return None
    index = int(local) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return index


def request_digest(request: Mapping[str, Any] | DictConfig) -> str:
    """sha256 of a JSON-able request: ranks of one run agree on it, a changed request does not."""
    if isinstance(request, DictConfig):
        request = OmegaConf.to_container(request, resolve=True)
    return hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).hexdigest()


def write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    """Write JSON through a temp file and a rename, so readers see the old or the new file."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing), waiting for it.

    The OS drops the lock when the holder dies, so a killed process never blocks the next one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def done_path(parts: Path, shard: Shard) -> Path:
    """Done marker of ``shard``'s part in the folder ``parts``."""
    return parts / f"{shard.name}{DONE_SUFFIX}"


def clear_done(parts: Path, shard: Shard) -> None:
    """Remove this rank's marker before it works: until it is rewritten, the part is unfinished."""
    done_path(parts, shard).unlink(missing_ok=True)


def mark_done(parts: Path, shard: Shard, request: str, **info: Any) -> None:
    """Record that ``shard`` completed its block of ``request``."""
    payload = {"request": request, "rank": shard.rank, "world_size": shard.world_size, **info}
    write_json_atomic(done_path(parts, shard), payload)


def missing_ranks(parts: Path, world_size: int, request: str) -> list[int]:
    """Ranks of a ``world_size`` run whose block of ``request`` is not (yet) marked done."""
    missing = []
    for rank in range(world_size):
        path = done_path(parts, Shard(rank, world_size))
        try:
            done = json.loads(path.read_text())
        except (OSError, ValueError):
            done = {}
        if done.get("request") != request:
            missing.append(rank)
    return missing
