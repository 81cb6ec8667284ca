"""Scaling out with 2 CPU processes: sharded extraction, DDP training and sharded E2E evaluation
each give what one process gives on the same data, and a rank that dies is completed by a rerun.
`hydra/launcher=slurm` runs through stand-in sbatch/srun/sacct commands (tests/fake_slurm.py).

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

import cross_modal_sd.evaluation.e2e as e2e_module
import cross_modal_sd.extract as extract_module
from cross_modal_sd.config import group_option
from cross_modal_sd.data.cache import PARTS_DIR, CacheError, HiddenPairCache, merge_parts
from cross_modal_sd.data.sharding import Shard, resolve_shard
from cross_modal_sd.decoding import thread_budget
from cross_modal_sd.exports import save_export
from cross_modal_sd.extract import extract

N_SCENES = 3  # about 20 samples of the small world


def _extract_cfg(models, out: Path, **shard):
    return OmegaConf.create(
        {
            "models": models,
            "source": {
                "_target_": "cross_modal_sd.pair.sources.MiniSource",
                "split": "train",
                "start": 600,
                "count": N_SCENES,
            },
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


def test_each_local_rank_makes_its_own_gpu_current(monkeypatch):
    from cross_modal_sd.data import sharding

    chosen = []
    monkeypatch.setattr(sharding.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sharding.torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(sharding.torch.cuda, "set_device", chosen.append)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("SLURM_LOCALID", raising=False)
    assert sharding.select_local_gpu() is None  # a plain process keeps the default GPU
    monkeypatch.setenv("SLURM_LOCALID", "2")
    assert sharding.select_local_gpu() == 2
    monkeypatch.setenv("LOCAL_RANK", "5")  # torchrun's variable wins; wraps past the GPU count
    assert sharding.select_local_gpu() == 1
    assert chosen == [2, 1]
    monkeypatch.setattr(sharding.torch.cuda, "is_available", lambda: False)
    assert sharding.select_local_gpu() is None and chosen == [2, 1]


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
    from test_cache import make_meta, make_samples

    from cross_modal_sd.data.cache import CacheWriter

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


# ------------------------------------------------------------------------------------ training


def test_distributed_samplers_split_without_overlap():
    from cross_modal_sd.data.dataset import (
        DistributedShardWindowSampler,
        ShardWindowSampler,
        UnrepeatedDistributedSampler,
    )

    shard_ids = [0] * 4 + [1] * 4 + [2] * 3  # 11 items
    ranks = [DistributedShardWindowSampler(shard_ids, 2, r, window=2, seed=3) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(1)
    parts = [list(s) for s in ranks]
    assert [len(p) for p in parts] == [6, 6] == [len(s) for s in ranks]  # equal steps per rank
    whole = ShardWindowSampler(shard_ids, window=2, seed=3)
    whole.set_epoch(1)
    order = list(whole)
    # Interleaved slices of the single-process order, padded with its first item.
    assert parts[0] == order[0::2] and parts[1] == order[1::2] + order[:1]
    assert sorted(parts[0] + parts[1][:-1]) == list(range(11))
    val = [list(UnrepeatedDistributedSampler(5, 2, r)) for r in (0, 1)]
    assert val == [[0, 2, 4], [1, 3]]  # nothing repeated: the metric sums count each sample once
    with pytest.raises(ValueError, match="1 evaluation samples cannot be split over 2 ranks"):
        UnrepeatedDistributedSampler(1, 2, 0)


def test_ddp_training_validates_like_one_process(tmp_path):
    import lightning as L
    from omegaconf import open_dict
    from test_train_cli import run_train
    from test_training import make_cfg, read_csv_log, write_aligned_cache

    from cross_modal_sd.training import load_checkpoint
    from cross_modal_sd.training.run import build_datamodule, build_module

    cache = write_aligned_cache(tmp_path / "cache", n_groups=20, per_group=4)
    run = tmp_path / "run"
    overrides = [
        "experiment=smoke",
        "data=cache",
        f"data.cache_dir={cache}",
        "data.batch_size=8",
        "data.val_fraction=0.2",
        "trainer.max_epochs=3",
        "callbacks.early_stopping=null",
        "optimizer.lr=0.03",
        "logger=csv",
        "run_name=ddp",
        f"hydra.run.dir={run}",
        f"export_dir={tmp_path / 'export'}",
    ]
    # Lightning starts rank 1 by re-running this command (its launcher for `devices: 2`).
    run_train(tmp_path, "trainer=ddp_cpu", *overrides)
    summary = json.loads((tmp_path / "export" / "metrics.json").read_text())
    n_train = len(HiddenPairCache(cache)) - 16  # 4 of 20 scenes held out, 4 questions each
    # Each rank ran half of every epoch: 64 train samples, 4 steps of 8 samples per rank.
    assert summary["global_step"] == 3 * -(-n_train // 16)

    # One process validates the weights the DDP run validated (and kept) over the same val split.
    cfg = make_cfg(cache, tmp_path / "single", "data.batch_size=8", "callbacks.early_stopping=null")
    with open_dict(cfg):
        cfg.data.val_fraction = 0.2
    datamodule = build_datamodule(cfg)
    datamodule.setup("validate")
    module = build_module(cfg, datamodule)
    module.load_state_dict(load_checkpoint(summary["best_checkpoint"])["state_dict"])
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with thread_budget(1):
        (logged,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    ddp, single = summary["best"], module.val_results
    assert set(ddp["metrics"]) == set(single["metrics"])
    assert single["metrics"]["val/token_accept_len"] > 0  # trained: the token metrics are not 0
    for key, value in single["metrics"].items():
        if key.startswith("val/cos_sim"):  # float sums, added in another order
            assert ddp["metrics"][key] == pytest.approx(value, rel=1e-6), key
        else:  # ratios of integer counts: exact
            assert ddp["metrics"][key] == value, key
    assert ddp["curves"] == single["curves"]  # counts: exact
    # val/loss (the loss over the whole split) as rank 0 logged it for that epoch.
    (row,) = [r for r in read_csv_log(run) if r["val/loss"] and int(r["epoch"]) == ddp["epoch"]]
    assert float(row["val/loss"]) == pytest.approx(logged["val/loss"], rel=1e-6)


# ---------------------------------------------------------------------------------- evaluation

EVAL_SCENES = 2


@pytest.fixture(scope="module")
def eval_export(small_world_cfg, tmp_path_factory) -> Path:
    """An L1 export sized for the small world (random: SD stays lossless, acceptance is low)."""
    from cross_modal_sd.adapters import build_adapter
    from cross_modal_sd.pair import load_pair

    pair = load_pair(small_world_cfg)
    dims = (pair.draft.lm_head_weight.shape[1], pair.target.lm_head_weight.shape[1])
    path = tmp_path_factory.mktemp("export") / "best_model.pt"
    torch.manual_seed(0)
    save_export(
        build_adapter(group_option("adapter", "L1"), *dims),
        path,
        dims={"draft_dim": dims[0], "target_dim": dims[1]},
    )
    return path


def _eval_cfg(models, ckpt: Path, out: Path, **shard):
    from hydra import compose, initialize_config_dir
    from test_training import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "evaluate",
            overrides=[
                "logger=none",
                f"ckpt={ckpt}",
                f"output_dir={out}",
                f"source.count={EVAL_SCENES}",
                "warmup=0",
                "deployments=[own_device]",
                "cost_profile=false",
                "strategies=[sd_fixed,sd_confidence]",
                "decoding.fixed.gamma=3",  # not `prefill`: round 1's draft count is then timing-free
                *[f"shard.{k}={v}" for k, v in shard.items()],
            ],
        )
    cfg.models = models
    return cfg


def deterministic(record: dict) -> dict:
    """A per-sample record without its timings (`*_ms`, `busy` spans), which no two runs share."""
    if isinstance(record, dict):
        return {
            k: deterministic(v)
            for k, v in record.items()
            if not k.endswith("_ms") and k not in ("busy", "baseline")
        }
    return record


@pytest.mark.slow  # (make test-full; ~55 s) the evaluation's own lossless tests stay in make test
def test_sharded_evaluation_merges_into_the_single_process_report(
    small_world_cfg, eval_export, tmp_path
):
    from cross_modal_sd.evaluation import evaluate

    single = evaluate(_eval_cfg(small_world_cfg, eval_export, tmp_path / "single"))
    single = single["deployments"]["own_device"]
    out = tmp_path / "single" / "own_device"
    want = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]

    shared = tmp_path / "sharded"
    real_inputs = e2e_module._inputs
    calls = []

    def dies_at_second_sample(sample, pair, device):
        calls.append(sample.sample_id)
        if len(calls) == 3:  # the first call prepares warm-up inputs; one sample is then recorded
            os.kill(os.getpid(), signal.SIGKILL)
        return real_inputs(sample, pair, device)

    def work(rank):
        if rank == 1:
            e2e_module._inputs = dies_at_second_sample
        result = evaluate(
            _eval_cfg(small_world_cfg, eval_export, tmp_path / f"out{rank}", dir=shared)
        )
        return result["deployments"]["own_device"]

    codes, results = run_ranks(work, 2, tmp_path)
    assert codes == [0, -signal.SIGKILL]
    assert results[0]["sharding"]["merged"] is False
    assert results[0]["sharding"]["waiting_for"] == [1]
    shared = shared / "own_device"  # each deployment merges into its own folder
    assert not (shared / "report.json").exists()

    # Rank 1 alone, rerun: it times only the samples its part lacks, then merges.
    with thread_budget(1):
        report = evaluate(
            _eval_cfg(
                small_world_cfg,
                eval_export,
                tmp_path / "out1",
                rank=1,
                world_size=2,
                dir=shared.parent,
            )
        )["deployments"]["own_device"]
    merged_by = report["sharding"]["merged_by"]
    assert merged_by["resumed"] == 1
    assert merged_by["timed"] == report["sharding"]["samples_per_rank"][1] - 1
    got = [json.loads(x) for x in (shared / "samples.jsonl").read_text().splitlines()]
    assert [r["sample_id"] for r in got] == [r["sample_id"] for r in want]
    assert [deterministic(r) for r in got] == [deterministic(r) for r in want]
    assert report["n_samples"] == single["n_samples"] == len(want)
    assert report["lossless_rate"] == single["lossless_rate"] == 1.0
    for name in ("sd_fixed_draft_model", "sd_confidence_draft_model"):
        for key in ("tokens", "accept_rate", "tau", "accepted_length_hist"):
            assert report["strategies"][name][key] == single["strategies"][name][key], (name, key)


def test_local_multirun_refuses_a_self_relaunching_ddp_trainer(tmp_path):
    """On Hydra's local launcher Lightning would start rank 1 by re-running `train.py -m ...`,
    i.e. the whole sweep again: check_launch stops the job before any process is started."""
    from test_train_cli import run_train
    from test_training import write_aligned_cache

    cache = write_aligned_cache(tmp_path / "cache", n_groups=10, per_group=4)
    proc = run_train(
        tmp_path,
        "-m",
        "experiment=smoke",
        "trainer=ddp_cpu",
        "adapter=L1",
        "data=cache",
        f"data.cache_dir={cache}",
        "logger=none",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        f"export_dir={tmp_path}/exports/${{run_name}}",
        ok=False,
    )
    assert proc.returncode != 0
    assert "trainer with 2 processes inside a Hydra multirun on the local launcher" in proc.stderr
    assert "Initializing distributed" not in proc.stderr  # no rank was started
    assert not (tmp_path / "exports").exists()


# ------------------------------------------------------------------------------ SLURM (stand-in)


@pytest.mark.slow  # (make test-full; ~40 s) DDP training itself stays in make test
def test_slurm_sweep_runs_each_point_as_a_ddp_job(tmp_path):
    """`train.py -m hydra/launcher=slurm` through stand-in sbatch/srun/sacct (tests/fake_slurm.py):
    one array job for the sweep, the launcher settings in its #SBATCH lines, and each point a
    2-task job that Lightning runs as DDP (SLURM's ranks, no self-relaunch) and exports."""
    from fake_slurm import install, sbatch_options, submit
    from test_train_cli import REPO
    from test_training import write_aligned_cache

    cache = write_aligned_cache(tmp_path / "cache", n_groups=10, per_group=4)
    slurm = install(tmp_path / "slurm")
    setup_log = tmp_path / "setup.log"
    submit(
        slurm,
        [
            "train.py",
            "-m",
            "hydra/launcher=slurm",
            "experiment=smoke",
            "trainer=ddp_cpu",
            "adapter=L1,L2",
            "data=cache",
            f"data.cache_dir={cache}",
            "data.batch_size=8",
            "data.val_fraction=0.2",
            "trainer.max_epochs=1",
            "logger=none",
            f"hydra.sweep.dir={tmp_path / 'multirun'}",
            f"export_dir={tmp_path}/exports/${{run_name}}",
            "hydra.launcher.partition=debug",
            "hydra.launcher.account=cmsd",
            "hydra.launcher.timeout_min=7",
            "hydra.launcher.tasks_per_node=2",  # = trainer.devices of ddp_cpu
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.gpus_per_node=null",
            "hydra.launcher.mem_gb=2",
            "hydra.launcher.array_parallelism=1",  # one point at a time on these 2 cores
            f'hydra.launcher.setup=["echo $SLURM_ARRAY_TASK_ID >> {setup_log}"]',
        ],
        REPO,
    )

    (options,) = sbatch_options(slurm)  # the whole sweep is one array job
    assert options["array"] == "0-1%1"
    assert options["job-name"] == "train"
    assert {k: options[k] for k in ("partition", "account", "time", "mem")} == {
        "partition": "debug",
        "account": "cmsd",
        "time": "7",
        "mem": "2GB",
    }
    assert (options["nodes"], options["ntasks-per-node"], options["cpus-per-task"]) == (
        "1",
        "2",
        "1",
    )
    assert "gpus-per-node" not in options
    assert sorted(setup_log.read_text().split()) == ["0", "1"]  # setup ran in each array task

    exports = sorted((tmp_path / "exports").glob("*/best_model.pt"))
    assert [p.parent.name.split("-")[0] for p in exports] == ["L1", "L2"]
    n_train = 40 - 8  # 2 of 10 scenes held out, 4 questions each
    for export in exports:
        metrics = json.loads((export.parent / "metrics.json").read_text())
        payload = torch.load(export, weights_only=True)
        assert payload["adapter_config"]["name"] == metrics["adapter"] == export.parent.name[:2]
        # Two ranks shared the epoch: 2 steps of 8 samples each (one process would take 4).
        assert metrics["global_step"] == -(-n_train // 16)


@pytest.mark.slow  # (make test-full; ~25 s) the sharded extraction stays in make test
def test_slurm_array_extraction_equals_single_process(small_world_cfg, single_cache, tmp_path):
    """`python -m cross_modal_sd.extract -m hydra/launcher=slurm 'shard.rank=range(2)'`: one
    array task per rank through the stand-in cluster; the merged cache is the single run's."""
    from fake_slurm import install, sbatch_options, submit
    from test_train_cli import REPO

    conf = tmp_path / "conf"
    (conf / "models").mkdir(parents=True)
    (conf / "models" / "small.yaml").write_text(OmegaConf.to_yaml(small_world_cfg))
    slurm = install(tmp_path / "slurm")
    out = tmp_path / "cache"
    submit(
        slurm,
        [
            "-m",
            "cross_modal_sd.extract",
            "--config-dir",
            str(conf),
            "-m",
            "hydra/launcher=slurm",
            "models=small",
            "source.split=train",
            "source.start=600",
            f"source.count={N_SCENES}",
            f"out_dir={out}",
            "shard_samples=2",
            "shard.world_size=2",
            "shard.rank=range(2)",
            "hydra.launcher.gpus_per_node=null",
            f"hydra.sweep.dir={tmp_path / 'multirun'}",
        ],
        REPO,
    )
    (options,) = sbatch_options(slurm)
    assert options["array"] == "0-1%2"  # both ranks at once (array_parallelism 16)
    parts = sorted(p.name for p in (out / PARTS_DIR).iterdir() if p.is_dir())
    assert parts == ["rank-00000-of-00002", "rank-00001-of-00002"]
    assert_same_rows(HiddenPairCache(out), single_cache)
