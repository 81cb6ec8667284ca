"""`python train.py` as a user runs it: a multirun with W&B offline, and an Optuna sweep."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_training import write_aligned_cache

REPO = Path(__file__).resolve().parents[1]
# W&B's transaction log (`run-<id>.wandb`) is a LevelDB-style log: 32 KiB blocks of records with a
# 7-byte header (crc32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last).
WANDB_BLOCK = 32768
WANDB_HEADER = 7


@pytest.fixture(scope="module")
def aligned_cache(tmp_path_factory) -> Path:
    return write_aligned_cache(tmp_path_factory.mktemp("aligned_cache"))


def run_train(tmp_path: Path, *overrides: str, ok: bool = True) -> subprocess.CompletedProcess:
    """``python train.py <overrides>`` in a subprocess (W&B offline under ``tmp_path``, one
    intra-op thread per process); with ``ok``, fails with its output unless it succeeded."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
    }
    proc = subprocess.run(
        [sys.executable, "train.py", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def wandb_summary(run_file: Path) -> dict[str, str]:
    """Merged summary updates (key -> JSON value) of an offline W&B run, as `wandb sync` sends."""
    from wandb.proto import wandb_internal_pb2

    raw = run_file.read_bytes()
    assert raw[:4] == b":W&B", f"{run_file} is not a W&B transaction log"
    summary: dict[str, str] = {}
    pos, pending = WANDB_HEADER, b""
    while pos + WANDB_HEADER <= len(raw):
        if WANDB_BLOCK - pos % WANDB_BLOCK < WANDB_HEADER:  # block trailer padding
            pos += WANDB_BLOCK - pos % WANDB_BLOCK
            continue
        length, kind = struct.unpack("<HB", raw[pos + 4 : pos + WANDB_HEADER])
        pending += raw[pos + WANDB_HEADER : pos + WANDB_HEADER + length]
        pos += WANDB_HEADER + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "summary":
                for item in record.summary.update:
                    summary[item.key or "/".join(item.nested_key)] = item.value_json
    return summary


def test_multirun_exports_each_point_with_its_own_wandb_run(aligned_cache, tmp_path):
    run_train(
        tmp_path,
        "-m",
        "experiment=smoke",
        "data=cache",
        f"data.cache_dir={aligned_cache}",
        "data.batch_size=16",
        "data.val_fraction=0.2",
        "adapter=L1,L2",
        "trainer.max_epochs=1",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        f"export_dir={tmp_path}/checkpoints/${{run_name}}",
    )
    exports = sorted((tmp_path / "checkpoints").glob("*/best_model.pt"))
    assert [p.parent.name.split("-")[0] for p in exports] == ["L1", "L2"]
    assert [p.parent.name.rsplit("-", 1)[1] for p in exports] == ["0", "1"]  # job numbers
    run_ids = set()
    for export in exports:
        payload = torch.load(export, weights_only=True)
        metrics = json.loads((export.parent / "metrics.json").read_text())
        assert payload["adapter_config"]["name"] == metrics["adapter"]
        (run_file,) = (tmp_path / "multirun" / export.parent.name).glob(
            "wandb/offline-run-*/run-*.wandb"
        )
        run_ids.add(run_file.stem)
        summary = wandb_summary(run_file)
        best = metrics["best"]["metrics"]["val/token_accept_len"]
        assert float(summary["best/val/token_accept_len"]) == pytest.approx(best)
        # One epoch: the last value (W&B's default summary) is the best.
        assert float(summary["val/token_accept_len"]) == pytest.approx(best)
        # The W&B plots' tables: one row per reached position, one per histogram bin.
        assert int(summary["val/position_acceptance_table/nrows"]) == 12
        assert int(summary["val/accepted_length_hist_table/nrows"]) == 13
    assert len(run_ids) == 2  # no W&B run re-used across sweep points


def test_without_logger_a_single_run_writes_no_logs(aligned_cache, tmp_path):
    run_train(
        tmp_path,
        "experiment=smoke",
        "~logger",
        "data=cache",
        f"data.cache_dir={aligned_cache}",
        "trainer.max_epochs=1",
        "run_name=single",
        f"hydra.run.dir={tmp_path / 'out'}",
        f"export_dir={tmp_path / 'export'}",
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        ".hydra",
        "checkpoints",
        "train.log",
    ]
    assert (tmp_path / "out" / "checkpoints" / "last.ckpt").is_file()
    metrics = json.loads((tmp_path / "export" / "metrics.json").read_text())
    assert metrics["run_name"] == "single" and metrics["epochs"] == 1


@pytest.mark.slow
def test_optuna_sweep_over_lr_and_decay(aligned_cache, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    run_train(
        tmp_path,
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2",
        "experiment=smoke",
        "logger=csv",
        "data=cache",
        f"data.cache_dir={aligned_cache}",
        "trainer.max_epochs=1",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        f"export_dir={tmp_path}/checkpoints/${{run_name}}",
    )
    result = yaml.safe_load((tmp_path / "multirun" / "optimization_results.yaml").read_text())
    assert set(result["best_params"]) == {"optimizer.lr", "loss.decay"}
    trials = [
        json.loads(p.read_text()) for p in sorted((tmp_path / "checkpoints").glob("*/metrics.json"))
    ]
    assert len(trials) == 2
    best = max(t["best"]["metrics"]["val/token_accept_len"] for t in trials)
    assert result["best_value"] == pytest.approx(best)  # train.py returned the optimised metric
