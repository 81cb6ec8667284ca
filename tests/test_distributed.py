"""Scaling out with 2 CPU processes: sharded extraction, DDP training and sharded E2E evaluation
each give what one process gives on the same data, and a rank that dies is completed by a rerun.

Child processes are forked (no re-import: seconds, not tens of seconds) and run with one
intra-op thread, as the single-process references in this process do, so float results are
bit-identical where the claim is bit-identity.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import cross_modal_sd.extract as extract_module
from cross_modal_sd.data.cache_format import PARTS_DIR, CacheError, HiddenPairCache, merge_parts
from cross_modal_sd.data.sharding import Shard, resolve_shard
from cross_modal_sd.decoding import thread_budget
from cross_modal_sd.extract import extract

N_SCENES = 3  # about 20 samples of the small world


def _extract_cfg(models, out: Path, **shard):
    return OmegaConf.create(
        {
            "models": models,
            "data": {"source_split": "train", "start": 600, "n_scenes": N_SCENES},
            "split": "train",
            "out_dir": str(out),
            "dtype": "float32",
            "shard_samples": 2,
            "max_new_tokens": None,
            "shard": {"rank": shard.get("rank"), "world_size": shard.get("world_size")},
        }
    )


def run_ranks(
    work: Callable[[int], dict], world_size: int, out: Path, env: bool = True
) -> tuple[list[int], list[dict | None]]:
    """Run ``work(rank)`` in ``world_size`` forked processes at once, one thread each.

    With ``env`` the ranks learn their place as under torchrun (``RANK``/``WORLD_SIZE``).
    Returns each process's exit code and the JSON result it wrote (None if it died).
    """

    def child(rank: int) -> None:
        torch.set_num_threads(1)
        if env:
            os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size)})
        result = work(rank)
        (out / f"result-{rank}.json").write_text(json.dumps(result))

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=child, args=(r,)) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    results = []
    for r in range(world_size):
        path = out / f"result-{r}.json"
        results.append(json.loads(path.read_text()) if path.is_file() else None)
        path.unlink(missing_ok=True)
    return [p.exitcode for p in procs], results


def assert_same_rows(got: HiddenPairCache, want: HiddenPairCache) -> None:
    """Same sample ids in the same order, and byte-identical rows and records."""
    assert got.sample_ids == want.sample_ids
    assert got.groups == want.groups and list(got.lengths) == list(want.lengths)
    for i in range(len(want)):
        a, b = got[i], want[i]
        for key in ("h_draft", "h_target", "tokens"):
            assert a[key].dtype == b[key].dtype
            assert (
                a[key].contiguous().view(torch.uint8).equal(b[key].contiguous().view(torch.uint8))
            )
    torch.testing.assert_close(got.lm_head_weight(), want.lm_head_weight(), rtol=0, atol=0)


@pytest.fixture(scope="module")
def single_cache(small_world_cfg, tmp_path_factory) -> HiddenPairCache:
    """One process, one thread: the reference extraction."""
    out = tmp_path_factory.mktemp("single") / "cache"
    with thread_budget(1):
        extract(_extract_cfg(small_world_cfg, out))
    return HiddenPairCache(out)


# ------------------------------------------------------------------------------- sharding unit


def test_blocks_partition_the_units_in_rank_order():
    blocks = [Shard(r, 4).block(10, 10) for r in range(4)]
    assert blocks == [(10, 3), (13, 3), (16, 2), (18, 2)]
    assert [Shard(r, 3).block(0, 2)[1] for r in range(3)] == [1, 1, 0]
    assert Shard(1, 4).name == "rank-00001-of-00004"


def test_shard_comes_from_config_then_torchrun_env(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_shard({"rank": None, "world_size": None}) == Shard(1, 2)
    assert resolve_shard({"rank": 2, "world_size": 3}) == Shard(2, 3)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert resolve_shard(None) == Shard(0, 1)
    with pytest.raises(ValueError, match=r"shard.rank must be in \[0, shard.world_size\)"):
        resolve_shard({"rank": 2, "world_size": 2})
    with pytest.raises(ValueError, match="set both shard.rank and shard.world_size or neither"):
        resolve_shard({"rank": 0, "world_size": None})


# ---------------------------------------------------------------------------------- extraction


def test_sharded_extraction_equals_single_process(small_world_cfg, single_cache, tmp_path):
    out = tmp_path / "cache"
    codes, results = run_ranks(lambda r: extract(_extract_cfg(small_world_cfg, out)), 2, tmp_path)
    assert codes == [0, 0]
    assert sum(r["samples"] for r in results) == len(single_cache)
    assert any(r["merged"] for r in results)  # the rank that finished last merged
    merged = HiddenPairCache(out)
    # Each rank wrote its own part; the merged manifest points at their shards, in rank order.
    files = [s["file"] for s in merged.manifest["shards"]]
    assert all(f.startswith(f"{PARTS_DIR}/rank-0000") for f in files)
    assert {f.split("/")[1] for f in files} == {"rank-00000-of-00002", "rank-00001-of-00002"}
    assert_same_rows(merged, single_cache)


def test_rerun_after_a_rank_died_extracts_only_its_missing_samples(
    small_world_cfg, single_cache, tmp_path
):
    out = tmp_path / "cache"
    real = extract_module.teacher_forced_states
    calls = []

    def dies_at_third_sample(pair, sample, answer):
        calls.append(sample.sample_id)
        if len(calls) == 3:  # two samples are in a committed shard, the third never will be
            os.kill(os.getpid(), signal.SIGKILL)
        return real(pair, sample, answer)

    def work(rank):
        if rank == 1:
            extract_module.teacher_forced_states = dies_at_third_sample
        return extract(_extract_cfg(small_world_cfg, out))

    codes, results = run_ranks(work, 2, tmp_path)
    assert codes == [0, -signal.SIGKILL] and results[1] is None
    assert results[0]["merged"] is False and results[0]["waiting_for"] == [1]
    assert not (out / "manifest.json").exists()  # no merged cache while a rank is missing

    with thread_budget(1):
        again = [extract(_extract_cfg(small_world_cfg, out, rank=r, world_size=2)) for r in (0, 1)]
    assert again[0]["written"] == 0 and again[0]["merged"] is False
    assert again[1]["resumed"] == 2 and again[1]["written"] == again[1]["samples"] - 2
    assert again[1]["merged"] is True and again[1]["total_samples"] == len(single_cache)
    assert_same_rows(HiddenPairCache(out), single_cache)

    # A later single-process run (another world size) finds everything done and re-merges.
    with thread_budget(1):
        last = extract(_extract_cfg(small_world_cfg, out))
    assert last["written"] == 0 and last["merged"] is True
    assert_same_rows(HiddenPairCache(out), single_cache)


def test_merge_rejects_parts_of_other_extractions(tmp_path):
    from test_cache_format import make_meta, make_samples

    from cross_modal_sd.data.cache_format import CacheWriter

    samples = make_samples(4)
    for name, meta, rows in (
        ("rank-00000-of-00002", make_meta(), samples[:2]),
        ("rank-00001-of-00002", make_meta(dtype="float16"), samples[2:]),
    ):
        with CacheWriter(tmp_path / PARTS_DIR / name, meta) as writer:
            for row in rows:
                writer.add(*row)
    with pytest.raises(CacheError, match=r"differing fields \['dtype'\]"):
        merge_parts(tmp_path)
    dup = tmp_path / "dup"
    for name in ("a", "b"):
        with CacheWriter(dup / PARTS_DIR / name, make_meta()) as writer:
            writer.add(*samples[0])
    with pytest.raises(CacheError, match="sample 's000' is also in .*parts/a/manifest.json"):
        merge_parts(dup)
