"""Lightning DataModule over a hidden-pair cache, split train/val by group (scene or sequence).

Questions about one scene share its frames and events, so a random per-sample split would leak
scenes from train into val; every split here assigns whole groups.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from cross_modal_sd.data.cache import CacheError, HiddenPairCache
from cross_modal_sd.data.dataset import (
    DistributedShardWindowSampler,
    HiddenPairDataset,
    ShardWindowSampler,
    UnrepeatedDistributedSampler,
    collate_pairs,
)

SPLIT_NAMES = ("train", "val", "test")


def split_groups(groups: Sequence[str], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """Assign whole groups to train/val by a seeded stable hash.

    Groups are ranked by ``sha256(f"{seed}:{group}")`` and the first ``round(val_fraction * G)``
    (at least one when ``val_fraction > 0``) go to val. The result depends only on the set of group
    names and the seed: not on sample order, shard layout or the Python hash seed.

    Args:
        groups: Group name per sample (duplicates allowed).
        val_fraction: Share of groups for val, in [0, 1).
        seed: Split seed.

    Returns:
        ``{"train": [...], "val": [...]}`` sorted group names.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    unique = sorted(set(groups))
    n_val = round(val_fraction * len(unique))
    if val_fraction > 0:
        n_val = max(n_val, 1)
    ranked = sorted(unique, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    return {"train": sorted(ranked[n_val:]), "val": sorted(ranked[:n_val])}


def split_indices(
    groups: Sequence[str],
    val_fraction: float = 0.1,
    seed: int = 0,
    split: Mapping[str, Sequence[str]] | str | os.PathLike | None = None,
) -> dict[str, np.ndarray]:
    """Cache indices of each split, in cache order.

    Args:
        groups: Group name per cache sample (``HiddenPairCache.groups``).
        val_fraction: Used when ``split`` is None; see ``split_groups``.
        seed: Used when ``split`` is None.
        split: Explicit assignment ``{"train": [groups], "val": [groups], "test": [groups]}``
            (``test`` optional), or a JSON file holding it. Every group in the cache must be listed
            exactly once; put held-out groups under ``test``.

    Returns:
        ``{"train": idx, "val": idx}`` plus ``"test"`` for an explicit split that has one; each an
        int64 array.

    Raises:
        ValueError: if an explicit split has unknown keys, a group in two splits, groups absent
            from the cache, or leaves cache groups unassigned.
    """
    if split is None:
        assignment = split_groups(groups, val_fraction, seed)
    else:
        assignment = _load_split(split)
    where: dict[str, str] = {}
    for name, members in assignment.items():
        for g in members:
            if g in where:
                raise ValueError(f"split assigns group {g!r} to both {where[g]!r} and {name!r}")
            where[g] = name
    present = set(groups)
    absent = sorted(set(where) - present)
    if absent:
        raise ValueError(f"split lists group(s) not in the cache: {absent[:10]}")
    unassigned = sorted(present - set(where))
    if unassigned:
        raise ValueError(
            f"split leaves cache group(s) unassigned: {unassigned[:10]}; list held-out groups "
            "under 'test'"
        )
    labels = np.array([where[g] for g in groups], dtype=object)
    return {name: np.flatnonzero(labels == name).astype(np.int64) for name in assignment}


def _load_split(split: Mapping[str, Sequence[str]] | str | os.PathLike) -> dict[str, list[str]]:
    source = "split"
    if isinstance(split, (str, os.PathLike)):
        source = str(split)
        try:
            split = json.loads(Path(split).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{source}: cannot read split file ({e})") from e
    if not isinstance(split, Mapping):
        raise ValueError(f"{source}: a split must map split names to group lists")
    unknown = sorted(set(split) - set(SPLIT_NAMES))
    if unknown or not {"train", "val"} <= set(split):
        raise ValueError(
            f"{source}: split keys must include 'train' and 'val' and be among {SPLIT_NAMES}, "
            f"got {sorted(split)}"
        )
    return {name: [str(g) for g in split[name]] for name in SPLIT_NAMES if name in split}


class HiddenPairDataModule(L.LightningDataModule):
    """Train/val (and optional test) loaders over a hidden-pair cache.

    Train batches come from ``ShardWindowSampler`` (shuffled, near-sequential reads); val and test
    are read in cache order. ``dims``, ``manifest_digest`` and ``lm_head_weight()`` open the cache
    on demand, so a model can be sized before ``setup``.

    Under a distributed Lightning strategy (DDP) every rank memory-maps the same cache and reads
    only its items: train through ``DistributedShardWindowSampler`` (disjoint slices of one
    shuffled order, ``batch_size`` per rank), val and test through
    ``UnrepeatedDistributedSampler`` (each sample on one rank exactly, so the sum-reduced
    metrics equal one process's).

    Args:
        cache_dir: Cache directory.
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes (0 = load in the main process).
        val_fraction: Share of groups held out for val when ``split`` is None.
        seed: Seed of the group split and of the train shuffle.
        split: Explicit group assignment (mapping or JSON file); see ``split_indices``.
        shuffle_window: Shards shuffled together; a value >= the number of shards is a full
            shuffle.
        verify: Checksum policy of ``HiddenPairCache``.
        expected_dims: Optional ``(draft_dim, target_dim)`` the model needs.
        pin_memory: Pin batches for faster host-to-GPU copies.
        multiprocessing_context: ``"fork"``, ``"spawn"`` or None (platform default) for workers.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        batch_size: int = 32,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        split: Mapping[str, Sequence[str]] | str | os.PathLike | None = None,
        shuffle_window: int = 4,
        verify: bool | str = "once",
        expected_dims: tuple[int, int] | None = None,
        pin_memory: bool = False,
        multiprocessing_context: str | None = None,
    ):
        super().__init__()
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.cache_dir = Path(cache_dir)
        self._cache: HiddenPairCache | None = None
        self.splits: dict[str, np.ndarray] = {}
        self.datasets: dict[str, HiddenPairDataset] = {}

    @property
    def cache(self) -> HiddenPairCache:
        """The opened (and verified) cache."""
        if self._cache is None:
            self._cache = HiddenPairCache(
                self.cache_dir,
                verify=self.hparams.verify,
                expected_dims=self.hparams.expected_dims,
            )
        return self._cache

    @property
    def dims(self) -> tuple[int, int]:
        """(draft_dim, target_dim) of the cache: the adapter's in/out widths."""
        return self.cache.dims

    @property
    def manifest_digest(self) -> str:
        """sha256 of the cache's content-defining manifest fields (see ``manifest_digest``)."""
        return self.cache.digest

    def lm_head_weight(self) -> torch.Tensor:
        """The target ``lm_head`` weight (V, Dt) stored with the cache."""
        return self.cache.lm_head_weight()

    def setup(self, stage: str | None = None) -> None:
        """Open the cache and split it.

        Raises:
            CacheError: if the cache holds no samples.
            ValueError: if a split the stage needs is empty.
        """
        cache = self.cache
        if len(cache) == 0:
            raise CacheError(
                f"{self.cache_dir}: the cache is empty (0 samples); run extraction first"
            )
        hp = self.hparams
        self.splits = split_indices(cache.groups, hp.val_fraction, hp.seed, hp.split)
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}
        for name in needed.get(stage or "fit", ()):
            if len(self.splits.get(name, ())) == 0:
                how = (
                    "explicit split"
                    if hp.split is not None
                    else f"val_fraction={hp.val_fraction} of {len(set(cache.groups))} groups"
                )
                raise ValueError(f"{self.cache_dir}: the {name} split has no samples ({how})")
        self.datasets = {name: HiddenPairDataset(cache, idx) for name, idx in self.splits.items()}

    def train_dataloader(self) -> DataLoader:
        ds = self._dataset("train")
        kw = {"window": self.hparams.shuffle_window, "seed": self.hparams.seed}
        ranks = self._ranks()
        if ranks is None:
            sampler = ShardWindowSampler(ds.shard_ids, prefetch=ds.cache.prefetch, **kw)
        else:
            sampler = DistributedShardWindowSampler(
                ds.shard_ids, *ranks, prefetch=ds.cache.prefetch, **kw
            )
        return self._loader(ds, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def _ranks(self) -> tuple[int, int] | None:
        """(num_replicas, rank) under a distributed strategy, else None."""
        trainer = getattr(self, "trainer", None)
        kwargs = trainer.distributed_sampler_kwargs if trainer is not None else None
        if not kwargs or kwargs.get("num_replicas", 1) <= 1:
            return None
        return kwargs["num_replicas"], kwargs["rank"]

    def _eval_loader(self, name: str) -> DataLoader:
        ds = self._dataset(name)
        ranks = self._ranks()
        sampler = None if ranks is None else UnrepeatedDistributedSampler(len(ds), *ranks)
        return self._loader(ds, sampler)

    def _dataset(self, name: str) -> HiddenPairDataset:
        if name not in self.datasets:
            raise RuntimeError(
                f"no {name!r} split for {self.cache_dir}: call setup() first"
                + (
                    "; a test split needs an explicit split with 'test' groups"
                    if name == "test"
                    else ""
                )
            )
        return self.datasets[name]

    def _loader(self, ds: HiddenPairDataset, sampler: Sampler | None) -> DataLoader:
        hp = self.hparams
        workers = hp.num_workers
        return DataLoader(
            ds,
            batch_size=hp.batch_size,
            sampler=sampler,
            shuffle=False,
            collate_fn=collate_pairs,
            num_workers=workers,
            pin_memory=hp.pin_memory,
            persistent_workers=workers > 0,
            multiprocessing_context=hp.multiprocessing_context if workers > 0 else None,
        )
