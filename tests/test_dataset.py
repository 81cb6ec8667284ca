"""Dataset, collate, shard-window sampler, group split and DataModule over small caches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cross_modal_sd.data.cache import CacheError, CacheWriter, HiddenPairCache
from cross_modal_sd.data.datamodule import HiddenPairDataModule, split_groups, split_indices
from cross_modal_sd.data.dataset import HiddenPairDataset, ShardWindowSampler, collate_pairs

DD, DT = 4, 3
META = {
    "pairing": "teacher_forced",
    "draft_model": "d",
    "target_model": "t",
    "draft_prompt_template": "{q}",
    "target_prompt_template": "{q}",
    "draft_dim": DD,
    "target_dim": DT,
    "dtype": "float32",
    "max_new_tokens": 8,
}


def build_cache(root, n_groups=10, per_group=3, shard_samples=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with CacheWriter(root, META, shard_samples=shard_samples) as writer:
        writer.set_lm_head(torch.eye(DT).repeat(4, 1))  # (12, DT)
        for g in range(n_groups):
            for q in range(per_group):
                length = 2 + (g + q) % 6
                writer.add(
                    f"g{g}/q{q}",
                    f"g{g}",
                    f"q{q}",
                    torch.randn(length, DD, generator=gen),
                    torch.randn(length, DT, generator=gen),
                    torch.randint(0, 12, (length,), generator=gen),
                )
    return root


def test_collate_pads_to_longest_and_masks():
    a = {"h_draft": torch.ones(2, DD), "h_target": torch.full((2, DT), 2.0),
         "tokens": torch.tensor([5, 6], dtype=torch.int32), "sample_id": "a"}  # fmt: skip
    b = {"h_draft": torch.full((3, DD), 3.0), "h_target": torch.full((3, DT), 4.0),
         "tokens": torch.tensor([7, 8, 9]), "sample_id": "b"}  # fmt: skip
    batch = collate_pairs([a, b])
    assert batch["h_draft"].shape == (2, 3, DD) and batch["h_target"].shape == (2, 3, DT)
    assert batch["tokens"].dtype == torch.long
    assert batch["tokens"].tolist() == [[5, 6, 0], [7, 8, 9]]
    assert batch["mask"].tolist() == [[True, True, False], [True, True, True]]
    assert batch["h_draft"][0, 2].abs().sum() == 0 and batch["h_target"][0, 1, 0] == 2.0
    assert batch["sample_id"] == ["a", "b"]
    with pytest.raises(ValueError, match="empty batch"):
        collate_pairs([])


def test_dataset_subset_and_batched_fetch(tmp_path):
    cache = HiddenPairCache(build_cache(tmp_path))
    ds = HiddenPairDataset(cache, [7, 2, 29])
    assert len(ds) == 3 and ds[0]["sample_id"] == cache.sample_ids[7]
    assert ds.shard_ids.tolist() == [1, 0, 7]
    batch = ds.__getitems__([2, 0])
    assert [x["sample_id"] for x in batch] == [cache.sample_ids[29], cache.sample_ids[7]]
    assert torch.equal(batch[0]["h_target"], cache[29]["h_target"])
    with pytest.raises(IndexError, match=r"must lie in \[0, 30\)"):
        HiddenPairDataset(cache, [30])


@pytest.mark.parametrize(("context", "workers"), [("fork", 2), ("spawn", 1)])
def test_dataloader_workers_match_main_process(tmp_path, context, workers):
    cache = HiddenPairCache(build_cache(tmp_path))
    cache[0]  # map a shard in the parent first, so forked workers inherit an open mapping
    ds = HiddenPairDataset(cache, list(range(3, 30)))
    kw = {"batch_size": 4, "collate_fn": collate_pairs}
    serial = list(DataLoader(ds, **kw))
    parallel = list(DataLoader(ds, num_workers=workers, multiprocessing_context=context, **kw))
    assert len(parallel) == len(serial) == 7
    for p, s in zip(parallel, serial, strict=True):
        assert p["sample_id"] == s["sample_id"]
        assert torch.equal(p["h_draft"], s["h_draft"]) and torch.equal(p["mask"], s["mask"])


def test_shard_window_sampler_is_a_local_permutation():
    shard_ids = np.repeat(np.arange(6), 5)  # 6 shards x 5 items
    sampler = ShardWindowSampler(shard_ids, window=2, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(30))
    windows = [set(shard_ids[order[i : i + 10]]) for i in range(0, 30, 10)]
    assert all(len(w) == 2 for w in windows)  # each run of 10 items comes from 2 shards
    assert set().union(*windows) == set(range(6))
    assert list(ShardWindowSampler(shard_ids, window=2, seed=3)) == order  # deterministic
    sampler.set_epoch(1)
    assert list(sampler) != order
    full = list(ShardWindowSampler(shard_ids, window=6, seed=3))
    assert sorted(full) == list(range(30)) and full != sorted(full)


def test_shard_window_sampler_prefetches_one_window_ahead():
    shard_ids = np.repeat(np.arange(5), 2)  # windows of 2 shards: 4 + 4 + 2 items
    seen, calls = [], []
    sampler = ShardWindowSampler(
        shard_ids, window=2, seed=0, prefetch=lambda shards: calls.append((len(seen), set(shards)))
    )
    for i in sampler:
        seen.append(int(shard_ids[i]))
    windows = [set(seen[0:4]), set(seen[4:8]), set(seen[8:10])]
    # Before item 0: windows 0 and 1; before item 4 (window 1 starts): window 2; then nothing.
    assert calls == [(0, windows[0] | windows[1]), (4, windows[2])]


def test_split_groups_is_deterministic_and_disjoint():
    groups = [f"scene{i}" for i in range(40) for _ in range(3)]
    a = split_groups(groups, 0.25, seed=0)
    assert a == split_groups(list(reversed(groups)), 0.25, seed=0)  # order-independent
    assert len(a["val"]) == 10 and len(a["train"]) == 30
    assert not set(a["val"]) & set(a["train"])
    assert split_groups(groups, 0.25, seed=1)["val"] != a["val"]
    assert len(split_groups(groups[:6], 0.1, seed=0)["val"]) == 1  # at least one group
    idx = split_indices(groups, 0.25, seed=0)
    assert sorted(np.concatenate([idx["train"], idx["val"]]).tolist()) == list(range(120))
    assert {groups[i] for i in idx["val"]} == set(a["val"])


def test_explicit_split_is_validated(tmp_path):
    groups = ["a", "a", "b", "c", "d"]
    idx = split_indices(groups, split={"train": ["a", "b"], "val": ["c"], "test": ["d"]})
    assert {k: v.tolist() for k, v in idx.items()} == {"train": [0, 1, 2], "val": [3], "test": [4]}
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": ["a", "b", "d"], "val": ["c"]}))
    assert split_indices(groups, split=path)["val"].tolist() == [3]
    with pytest.raises(ValueError, match="assigns group 'b' to both 'train' and 'val'"):
        split_indices(groups, split={"train": ["a", "b"], "val": ["b", "c", "d"]})
    with pytest.raises(ValueError, match=r"leaves cache group\(s\) unassigned: \['d'\]"):
        split_indices(groups, split={"train": ["a", "b"], "val": ["c"]})
    with pytest.raises(ValueError, match=r"lists group\(s\) not in the cache: \['z'\]"):
        split_indices(groups, split={"train": ["a", "b", "d"], "val": ["c", "z"]})
    with pytest.raises(ValueError, match="split keys must include 'train' and 'val'"):
        split_indices(groups, split={"train": groups})


def test_datamodule_splits_by_group(tmp_path):
    root = build_cache(tmp_path)
    dm = HiddenPairDataModule(root, batch_size=4, val_fraction=0.2, seed=0)
    assert dm.dims == (DD, DT)  # available before setup, to size the adapter
    assert dm.manifest_digest == HiddenPairCache(root).digest
    assert dm.lm_head_weight().shape == (12, DT)
    dm.setup("fit")
    train_groups = {dm.cache.groups[i] for i in dm.splits["train"]}
    val_groups = {dm.cache.groups[i] for i in dm.splits["val"]}
    assert len(val_groups) == 2 and not train_groups & val_groups
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == 30

    val_ids = [sid for b in dm.val_dataloader() for sid in b["sample_id"]]
    assert val_ids == [dm.cache.sample_ids[i] for i in dm.splits["val"]]  # cache order
    loader = dm.train_dataloader()
    epoch0 = [sid for b in loader for sid in b["sample_id"]]
    loader.sampler.set_epoch(1)
    epoch1 = [sid for b in loader for sid in b["sample_id"]]
    assert (
        sorted(epoch0)
        == sorted(epoch1)
        == sorted(dm.cache.sample_ids[i] for i in dm.splits["train"])
    )
    assert epoch0 != epoch1
    batch = next(iter(loader))
    assert batch["h_draft"].shape[0] == 4 and batch["mask"].dtype == torch.bool


def test_datamodule_setup_errors(tmp_path):
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        HiddenPairDataModule(tmp_path, val_fraction=1.0)
    empty = tmp_path / "empty"
    CacheWriter(empty, META).close()
    with pytest.raises(CacheError, match="the cache is empty"):
        HiddenPairDataModule(empty).setup("fit")
    root = build_cache(tmp_path / "c")
    with pytest.raises(
        ValueError, match=r"the val split has no samples \(val_fraction=0.0 of 10 groups\)"
    ):
        HiddenPairDataModule(root, val_fraction=0.0).setup("fit")
    dm = HiddenPairDataModule(root)
    dm.setup("fit")
    with pytest.raises(RuntimeError, match="a test split needs an explicit split"):
        dm.test_dataloader()
    with pytest.raises(CacheError, match="draft_dim is 4 but 16 was expected"):
        HiddenPairDataModule(root, expected_dims=(16, DT)).setup("fit")
