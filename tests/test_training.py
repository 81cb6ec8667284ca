"""Adapter training: losses, LR schedule, train(cfg) end to end, export, resume, bad input."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import open_dict

from cross_modal_sd.adapters import UnknownAdapterError, build_adapter
from cross_modal_sd.config import group_option
from cross_modal_sd.data.cache import CacheError, CacheWriter, HiddenPairCache
from cross_modal_sd.data.datamodule import split_indices
from cross_modal_sd.data.dataset import collate_pairs
from cross_modal_sd.exports import load_export, save_export
from cross_modal_sd.metrics import functional as MF
from cross_modal_sd.training import (
    AdapterModule,
    AlignmentLoss,
    cosine_loss,
    load_checkpoint,
    position_weights,
    resolve_warmup,
    token_ce_loss,
    train,
    warmup_cosine_factor,
)
from cross_modal_sd.training.run import build_datamodule, build_module

ALIGNED_DIMS = (32, 48)  # (draft_dim, target_dim) of the aligned toy cache
ALIGNED_VOCAB = 50


def toy_manifest(draft_dim: int, target_dim: int, max_len: int, vocab: int) -> dict:
    """The manifest fields of a hand-built teacher-forced cache."""
    return {
        "pairing": "teacher_forced",
        "draft_model": "toy/draft",
        "target_model": "toy/target",
        "draft_prompt_template": "{question}",
        "target_prompt_template": "{question}",
        "draft_dim": draft_dim,
        "target_dim": target_dim,
        "dtype": "float32",
        "max_new_tokens": max_len,
        "vocab_limit": vocab,
    }


def write_aligned_cache(
    root: Path,
    n_groups: int = 40,
    per_group: int = 6,
    dims: tuple[int, int] = ALIGNED_DIMS,
    vocab: int = ALIGNED_VOCAB,
    min_len: int = 4,
    max_len: int = 12,
    seed: int = 0,
) -> Path:
    """A small cache whose pairs an adapter can learn, with meaningful token metrics.

    Per sample, clean states ``x[k]`` map to ``h_target[k] = f(x[k]) + 0.5 f(x[k-1])`` (a fixed
    random MLP ``f``, so the previous position matters as it does for real decoders); the draft
    sees ``x[k]`` plus noise growing with k (later positions are harder, as the real modality
    gap is); ``tokens = argmax(lm_head @ h_target)``, so an adapter that outputs ``h_target``
    exactly has token_match 1.
    """
    draft_dim, target_dim = dims
    gen = torch.Generator().manual_seed(seed)
    w_in = torch.randn(draft_dim, 64, generator=gen) / draft_dim**0.5
    w_out = torch.randn(64, target_dim, generator=gen) / 8.0
    lm_head = torch.randn(vocab, target_dim, generator=gen)
    meta = toy_manifest(draft_dim, target_dim, max_len, vocab)
    with CacheWriter(root, meta, shard_samples=64) as writer:
        writer.set_lm_head(lm_head)
        for g in range(n_groups):
            for q in range(per_group):
                length = int(torch.randint(min_len, max_len + 1, (), generator=gen))
                x = torch.randn(length, draft_dim, generator=gen)  # (L, Dd)
                fx = torch.tanh(x @ w_in) @ w_out  # (L, Dt)
                h_target = fx + 0.5 * torch.cat([torch.zeros(1, target_dim), fx[:-1]])
                noise = (
                    0.1
                    * torch.arange(length)[:, None]
                    * torch.randn(length, draft_dim, generator=gen)
                )
                tokens = (h_target @ lm_head.T).argmax(dim=-1)  # (L,)
                writer.add(f"s{g}/q{q}", f"s{g}", f"q{q}", x + noise, h_target, tokens)
    return root


@pytest.fixture(scope="module")
def aligned_cache(tmp_path_factory) -> Path:
    """Module-wide :func:`write_aligned_cache` (read-only: tests must not modify it)."""
    return write_aligned_cache(tmp_path_factory.mktemp("aligned_cache"))


CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
BATCH = 16
VAL_FRACTION = 0.2


class LrRecorder(L.Callback):
    """Writes (global_step, lr) of every optimizer step to ``path`` as JSON at the end of fit."""

    def __init__(self, path: str):
        self.path = path
        self.steps: list[tuple[int, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append((trainer.global_step, optimizer.param_groups[0]["lr"]))

    def on_fit_end(self, trainer, pl_module):
        Path(self.path).write_text(json.dumps(self.steps))


def make_cfg(cache_dir: Path, out: Path, *overrides: str):
    """The real train.yaml, pointed at a toy cache and shrunk for a CPU test."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "experiment=smoke",
                "data=cache",
                f"data.cache_dir={cache_dir}",
                f"data.batch_size={BATCH}",
                f"data.val_fraction={VAL_FRACTION}",
                "logger=csv",
                "run_name=test",
                *overrides,
            ],
        )
    with open_dict(cfg):
        cfg.output_dir = str(out)
        cfg.export_dir = str(out / "export")
    return cfg


def record_lr(out: Path) -> str:
    return f"+callbacks.lr_recorder={{_target_: test_training.LrRecorder, path: '{out}/lr.json'}}"


def read_csv_log(out: Path) -> list[dict[str, str]]:
    with open(out / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def train_batches(cache_dir: Path) -> int:
    cache = HiddenPairCache(cache_dir)
    n_train = len(split_indices(cache.groups, VAL_FRACTION, 0)["train"])
    return math.ceil(n_train / BATCH)


# ----------------------------------------------------------------------------------- losses


def test_position_weights_and_weighted_cosine_by_hand():
    torch.testing.assert_close(position_weights(3, 0.5), torch.exp(torch.tensor([0.0, -0.5, -1.0])))
    target = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])  # (1, 3, 2)
    pred = torch.tensor([[[-3.0, 0.0], [0.0, 1.0], [float("nan"), 1.0]]])  # cos -1, 1, padding
    mask = torch.tensor([[True, True, False]])
    w = torch.tensor([1.0, 0.25, 7.0])
    # (w0 * (1 - -1) + w1 * (1 - 1)) / (w0 + w1) = 2 / 1.25
    assert cosine_loss(pred, target, mask, w).item() == pytest.approx(1.6)
    assert cosine_loss(target, target, mask, w).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="loss.decay must be >= 0"):
        position_weights(3, -0.1)


def test_token_ce_matches_cross_entropy_on_valid_positions():
    gen = torch.Generator().manual_seed(0)
    pred, head = torch.randn(2, 4, 6, generator=gen), torch.randn(9, 6, generator=gen)
    tokens = torch.randint(0, 9, (2, 4), generator=gen)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    tokens[0, 3] = 1000  # padding id out of the vocabulary must not matter
    w = position_weights(4, 0.3)
    ce = F.cross_entropy(pred[mask] @ head.T, tokens[mask], reduction="none")
    weights = w.expand(2, 4)[mask]
    expected = (ce * weights).sum() / weights.sum()
    torch.testing.assert_close(token_ce_loss(pred, head, tokens, mask, w), expected)


def test_alignment_loss_terms_and_next_head_shift():
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(2, 5, 8, generator=gen)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    tokens = torch.zeros(2, 5, dtype=torch.long)
    nxt = torch.cat([target[:, 1:], torch.randn(2, 1, 8, generator=gen)], dim=1)  # k -> k+1
    loss = AlignmentLoss(decay=0.1, mse_weight=0.5, next_weight=2.0)
    terms = loss({"align": target, "next": nxt}, target, tokens, mask)
    assert set(terms) == {"loss", "cos", "mse", "next_cos", "next_mse"}
    for name in ("cos", "mse", "next_cos", "next_mse"):
        assert terms[name].item() == pytest.approx(0.0, abs=1e-6)
    shifted = loss({"align": target, "next": target}, target, tokens, mask)
    expected = cosine_loss(target[:, :-1], target[:, 1:], mask[:, 1:], position_weights(5, 0.1)[1:])
    torch.testing.assert_close(shifted["next_cos"], expected)
    assert shifted["loss"].item() == pytest.approx(
        2.0 * (shifted["next_cos"] + 0.5 * shifted["next_mse"]).item(), rel=1e-5
    )
    with pytest.raises(ValueError, match="all 0; nothing to train"):
        AlignmentLoss(cos_weight=0.0)
    with pytest.raises(ValueError, match="needs the target lm_head"):
        AlignmentLoss(ce_weight=1.0)({"align": target}, target, tokens, mask)


# --------------------------------------------------------------------------------- schedule


def test_warmup_cosine_factor_known_values():
    values = [warmup_cosine_factor(s, 5, 0, 0.1) for s in range(7)]
    cos = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]
    assert values[:5] == pytest.approx([0.1 + 0.9 * c for c in cos])
    assert values[4] == 0.1 and values[5] == values[6] == 0.1  # ends at the minimum, stays there
    warm = [warmup_cosine_factor(s, 6, 2) for s in range(6)]
    assert warm[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and warm[5] == 0.0
    assert resolve_warmup(100, 0, 0.05) == 5 and resolve_warmup(100, 7, 0.0) == 7
    with pytest.raises(ValueError, match="both set"):
        resolve_warmup(100, 5, 0.1)
    with pytest.raises(ValueError, match="does not fit a run of 4 steps"):
        resolve_warmup(4, 4, 0.0)


@pytest.mark.parametrize(("epochs", "accumulate"), [(1, 1), (3, 1), (1, 5), (3, 5)])
def test_lr_reaches_minimum_at_last_optimizer_step(aligned_cache, tmp_path, epochs, accumulate):
    warmup = 1  # the smallest case has 3 optimizer steps: warm-up, peak, minimum
    cfg = make_cfg(
        aligned_cache,
        tmp_path,
        f"trainer.max_epochs={epochs}",
        f"trainer.accumulate_grad_batches={accumulate}",
        "callbacks.early_stopping=null",
        "optimizer.lr=0.004",
        "optimizer.min_lr_ratio=0.05",
        f"optimizer.warmup_steps={warmup}",
        record_lr(tmp_path),
    )
    train(cfg)
    steps = json.loads((tmp_path / "lr.json").read_text())
    total = math.ceil(train_batches(aligned_cache) / accumulate) * epochs
    assert [s for s, _ in steps] == list(range(total))  # one lr per optimizer step
    lrs = np.array([lr for _, lr in steps])
    assert lrs[-1] == pytest.approx(0.004 * 0.05, rel=1e-12)  # eta_min exactly at the last step
    assert lrs[warmup] == pytest.approx(0.004)  # peak right after warm-up
    assert np.all(np.diff(lrs[: warmup + 1]) > 0)
    assert np.all(np.diff(lrs[warmup:]) <= 0)  # never restarts
    rows = read_csv_log(tmp_path)
    logged = {int(r["step"]): float(r["train/lr"]) for r in rows if r["train/lr"]}
    assert logged == pytest.approx({s: lr for s, lr in steps})  # train/lr every step
    assert [int(r["step"]) for r in rows if r["train/loss"]] == list(range(total))


# ----------------------------------------------------------------------------- end to end


def train_once(cache: Path, tmp_path_factory, name: str, *overrides: str):
    """(run directory, `train` result) of one run on ``cache`` with ``overrides``."""
    out = tmp_path_factory.mktemp(name)
    return out, train(make_cfg(cache, out, *overrides))


@pytest.fixture(scope="module")
def trained(aligned_cache, tmp_path_factory):
    """One 3-epoch L1 run (shared by several tests)."""
    return train_once(
        aligned_cache,
        tmp_path_factory,
        "trained",
        "trainer.max_epochs=3",
        "optimizer.lr=0.003",
        "callbacks.early_stopping=null",
    )


def offline_metrics(adapter, cache_dir: Path) -> dict[str, float]:
    """All val metrics from the functional definitions, on the whole val split in one batch."""
    cache = HiddenPairCache(cache_dir)
    val = split_indices(cache.groups, VAL_FRACTION, 0)["val"]
    batch = collate_pairs(cache.get_many(val.tolist()))
    mask, target, tokens = batch["mask"], batch["h_target"], batch["tokens"]
    with torch.no_grad():
        pred = adapter.eval()(batch["h_draft"].float(), mask)
    cos = MF.cosine(pred, target, mask)
    mean, std = MF.cos_sim_stats(pred, target, mask)
    draft = MF.draft_tokens(pred, cache.lm_head_weight(), cache.manifest["vocab_limit"])
    out = {"val/cos_sim": mean, "val/cos_sim_std": std}
    for tau in (0.80, 0.85, 0.90, 0.95):
        out[f"val/accept@{tau:.2f}"] = MF.accept_at(cos, mask, tau)
        out[f"val/consecutive@{tau:.2f}"] = MF.consecutive_at(cos, mask, tau)
    out["val/token_match"] = MF.token_match(draft, tokens, mask)
    out["val/token_accept_len"] = MF.token_accept_len(draft, tokens, mask)
    max_len = cache.manifest["max_new_tokens"]
    out["position_acceptance"] = MF.position_acceptance(draft == tokens, mask, max_len).tolist()
    out["hist"] = MF.accepted_length_histogram(draft == tokens, mask, max_len).tolist()
    return out


def test_export_and_logged_val_metrics_equal_offline_computation(aligned_cache, trained):
    out, summary = trained
    payload = torch.load(summary["best_model"], weights_only=True)
    assert payload["cache_manifest_digest"] == HiddenPairCache(aligned_cache).digest
    assert payload["dims"] == {"draft_dim": 32, "target_dim": 48}
    assert (payload["draft_model"], payload["target_model"]) == ("toy/draft", "toy/target")
    assert payload["adapter_config"]["name"] == "L1" and payload["run_name"] == "test"
    adapter = load_export(summary["best_model"]).adapter
    offline = offline_metrics(adapter, aligned_cache)
    best = summary["best"]
    scalars = {k: v for k, v in offline.items() if k.startswith("val/")}
    assert set(best["metrics"]) == set(scalars)
    assert best["metrics"] == pytest.approx(scalars, abs=1e-6)
    assert payload["metrics"] == best["metrics"]
    assert best["curves"]["val/position_acceptance"] == pytest.approx(
        offline["position_acceptance"], nan_ok=True
    )
    assert best["curves"]["val/accepted_length_hist"] == offline["hist"]
    # The CSV log of the chosen epoch holds the same numbers, and it is the best epoch.
    rows = [r for r in read_csv_log(out) if r["val/token_accept_len"]]
    assert len(rows) == 3
    chosen = max(rows, key=lambda r: float(r["val/token_accept_len"]))
    assert int(chosen["epoch"]) == best["epoch"]
    assert {k: float(chosen[k]) for k in scalars} == pytest.approx(scalars, abs=1e-6)
    on_disk = json.loads(Path(summary["metrics_json"]).read_text())
    assert on_disk["best"]["metrics"] == pytest.approx(best["metrics"])
    assert on_disk["best_model"] == summary["best_model"]


def test_training_improves_token_acceptance(aligned_cache, trained):
    _, summary = trained
    untrained = offline_metrics(
        build_adapter(group_option("adapter", "L1"), *HiddenPairCache(aligned_cache).dims),
        aligned_cache,
    )
    assert (
        summary["best"]["metrics"]["val/token_accept_len"] > untrained["val/token_accept_len"] + 0.2
    )


def test_resume_continues_global_step_schedule_and_best(aligned_cache, tmp_path):
    per_epoch = train_batches(aligned_cache)
    common = ("trainer.max_epochs=3", "optimizer.lr=0.003", "callbacks.early_stopping=null")
    full = train(
        make_cfg(
            aligned_cache,
            tmp_path / "full",
            *common,
            "callbacks.model_checkpoint.save_top_k=-1",
            record_lr(tmp_path / "full"),
        )
    )
    assert full["global_step"] == 3 * per_epoch
    # Resume in place from the end of epoch 0, as after a crash.
    first_epoch = next((tmp_path / "full" / "checkpoints").glob("epoch000-*.ckpt"))
    resumed = train(
        make_cfg(
            aligned_cache,
            tmp_path / "resumed",
            *common,
            f"ckpt_path={first_epoch}",
            record_lr(tmp_path / "resumed"),
        )
    )
    assert resumed["global_step"] == 3 * per_epoch
    lrs = json.loads((tmp_path / "full" / "lr.json").read_text())
    again = json.loads((tmp_path / "resumed" / "lr.json").read_text())
    assert again[0][0] == per_epoch  # the first step after resuming continues the count
    np.testing.assert_allclose(again, lrs[per_epoch:], rtol=1e-12)  # the same schedule
    assert resumed["final"]["metrics"] == pytest.approx(full["final"]["metrics"], abs=1e-5)
    # The best score survived the restart, so the same epoch is exported.
    assert resumed["best"]["epoch"] == full["best"]["epoch"]
    assert Path(resumed["best_checkpoint"]).parent == first_epoch.parent

    # The last.ckpt of a finished run extends it: two more epochs.
    more = make_cfg(
        aligned_cache,
        tmp_path / "more",
        "trainer.max_epochs=5",
        "callbacks.early_stopping=null",
        f"ckpt_path={resumed['last_checkpoint']}",
    )
    assert train(more)["global_step"] == 5 * per_epoch


@pytest.mark.parametrize("level", ["L4", "L5"])
def test_sequence_levels_train_and_export(aligned_cache, tmp_path, level):
    cfg = make_cfg(
        aligned_cache,
        tmp_path,
        f"adapter={level}",
        "adapter.ffn_dim=64",
        "trainer.max_epochs=1",
        "logger=none",
    )
    summary = train(cfg)
    assert not (tmp_path / "csv").exists()
    offline = offline_metrics(load_export(summary["best_model"]).adapter, aligned_cache)
    assert summary["best"]["metrics"] == pytest.approx(
        {k: v for k, v in offline.items() if k.startswith("val/")}, abs=1e-6
    )


def test_eagle_token_fusion_feeds_previous_tokens():
    adapter_cfg = {
        "_target_": "cross_modal_sd.adapters.EagleAdapter",
        "name": "L5",
        "num_heads": 2,
        "ffn_dim": 16,
        "head_bottleneck": 8,
        "fuse_tokens": True,
    }
    head = torch.randn(11, 6)
    with pytest.raises(ValueError, match="prompt_last_token"):
        AdapterModule(adapter_cfg, 4, 6, lm_head_weight=head)
    module = AdapterModule(adapter_cfg, 4, 6, lm_head_weight=head, prompt_last_token=7)
    assert module.adapter.vocab_size == 11
    torch.nn.init.normal_(module.adapter.token_proj.weight)  # make fusion visible
    batch = {
        "h_draft": torch.randn(2, 3, 4),
        "tokens": torch.tensor([[1, 2, 3], [4, 5, 0]]),
        "mask": torch.tensor([[True, True, True], [True, True, False]]),
    }
    previous = torch.tensor([[7, 1, 2], [7, 4, 5]])
    expected = module.adapter.forward_heads(batch["h_draft"], batch["mask"], previous)
    got = module.forward_heads(batch)
    torch.testing.assert_close(got["align"], expected["align"])
    torch.testing.assert_close(got["next"], expected["next"])


# -------------------------------------------------------------------------------- bad input


def assert_nothing_trained(out: Path):
    assert not (out / "checkpoints").exists() and not (out / "export").exists()


def test_adapter_config_dims_must_match_cache(aligned_cache, tmp_path):
    cfg = make_cfg(aligned_cache, tmp_path, "+adapter.in_dim=64")
    with pytest.raises(ValueError, match="in_dim=64 but in_dim=32 was requested"):
        train(cfg)
    assert_nothing_trained(tmp_path)


def test_checkpoint_dims_must_match_cache(aligned_cache, trained, tmp_path):
    out, summary = trained
    ckpt = load_checkpoint(out / "checkpoints" / "last.ckpt")
    ckpt["hyper_parameters"]["in_dim"] = 16
    torch.save(ckpt, tmp_path / "other.ckpt")
    cfg = make_cfg(aligned_cache, tmp_path, f"ckpt_path={tmp_path / 'other.ckpt'}")
    with pytest.raises(ValueError, match=r"adapter dims \(in_dim=16, out_dim=48\) do not match"):
        train(cfg)
    save_export(build_adapter(group_option("adapter", "L1"), 16, 48), tmp_path / "small.pt")
    cfg = make_cfg(aligned_cache, tmp_path, f"init_from={tmp_path / 'small.pt'}")
    with pytest.raises(ValueError, match=r"init_from=.*small.pt: adapter dims \(in_dim=16"):
        train(cfg)
    cfg = make_cfg(aligned_cache, tmp_path, "adapter=L2", f"ckpt_path={summary['last_checkpoint']}")
    with pytest.raises(ValueError, match="holds a L1 adapter whose weights differ in structure"):
        train(cfg)
    assert_nothing_trained(tmp_path)


def test_init_from_exported_model_starts_from_its_weights(aligned_cache, trained, tmp_path):
    _, summary = trained
    cfg = make_cfg(aligned_cache, tmp_path, f"init_from={summary['best_model']}")
    module = build_module(cfg, build_datamodule(cfg))
    exported = load_export(summary["best_model"]).adapter.state_dict()
    for name, value in module.adapter.state_dict().items():
        torch.testing.assert_close(value, exported[name])


def test_empty_cache_and_empty_val_split_fail_before_training(aligned_cache, tmp_path):
    empty = tmp_path / "empty"
    meta = HiddenPairCache(aligned_cache).manifest
    keys = ("pairing", "draft_model", "target_model", "draft_prompt_template")
    keys += ("target_prompt_template", "draft_dim", "target_dim", "dtype", "max_new_tokens")
    with CacheWriter(empty, {k: meta[k] for k in keys}) as writer:
        writer.set_lm_head(torch.zeros(5, 48))
    with pytest.raises(CacheError, match="the cache is empty"):
        train(make_cfg(empty, tmp_path))
    with pytest.raises(ValueError, match="the val split has no samples"):
        train(make_cfg(aligned_cache, tmp_path, "data.val_fraction=0.0"))
    with pytest.raises(FileNotFoundError, match="not a hidden-pair cache"):
        train(make_cfg(tmp_path / "nowhere", tmp_path))
    assert_nothing_trained(tmp_path)


def test_unknown_adapter_fails_before_training(aligned_cache, tmp_path):
    with pytest.raises(MissingConfigException, match="adapter/L9"):
        make_cfg(aligned_cache, tmp_path, "adapter=L9")
    cfg = make_cfg(aligned_cache, tmp_path, "adapter._target_=cross_modal_sd.adapters.Nope")
    with pytest.raises(UnknownAdapterError, match="unknown adapter _target_"):
        train(cfg)
    assert_nothing_trained(tmp_path)


def test_model_checkpoint_is_required(aligned_cache, tmp_path):
    cfg = make_cfg(aligned_cache, tmp_path, "callbacks.model_checkpoint=null")
    with pytest.raises(ValueError, match="callbacks.model_checkpoint must be a ModelCheckpoint"):
        train(cfg)


def test_config_groups_inherit(aligned_cache, tmp_path):
    ddp = make_cfg(aligned_cache, tmp_path, "trainer=ddp").trainer
    assert (ddp.strategy, ddp.accelerator, ddp.precision) == ("ddp", "gpu", "bf16-mixed")
    assert ddp.gradient_clip_val == 1.0  # from trainer/cpu.yaml
    loss = make_cfg(aligned_cache, tmp_path, "loss=cosine_mse").loss
    assert (loss.mse_weight, loss.ce_weight, loss.cos_weight) == (0.1, 0.0, 1.0)


# ------------------------------------------------------------------------------ feature heads

HEAD_DIM, HEAD_VOCAB = 32, 24


def write_head_cache(root: Path, n_groups: int = 30, per_group: int = 4, seed: int = 1) -> Path:
    """A cache whose target states follow a fixed recurrence a feature head can learn:
    ``h[k + 1] = tanh(W h[k] + E[y[k]])`` with ``y[k] = argmax(lm_head h[k])`` (the target's
    greedy token read off its own state). A head that outputs ``h[k + 1]`` from ``(h[k], y[k])``
    has zero regression loss and accepts every chain."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(HEAD_DIM, HEAD_DIM, generator=gen) * 0.8 / HEAD_DIM**0.5
    embed = torch.randn(HEAD_VOCAB, HEAD_DIM, generator=gen)
    lm_head = torch.randn(HEAD_VOCAB, HEAD_DIM, generator=gen)
    meta = toy_manifest(8, HEAD_DIM, 12, HEAD_VOCAB)
    with CacheWriter(root, meta, shard_samples=64) as writer:
        writer.set_lm_head(lm_head)
        for g in range(n_groups):
            for q in range(per_group):
                length = int(torch.randint(6, 13, (), generator=gen))
                h = [torch.randn(HEAD_DIM, generator=gen)]
                tokens = []
                for _ in range(length):
                    tokens.append(int((lm_head @ h[-1]).argmax()))
                    h.append(torch.tanh(w @ h[-1] + embed[tokens[-1]]))
                h_target = torch.stack(h[:length])  # (L, D): h[k] reads y[k]
                writer.add(
                    f"s{g}/q{q}",
                    f"s{g}",
                    f"q{q}",
                    torch.zeros(length, 8),
                    h_target,
                    torch.tensor(tokens),
                )
    return root


@pytest.fixture(scope="module")
def head_cache(tmp_path_factory) -> Path:
    return write_head_cache(tmp_path_factory.mktemp("head_cache"))


@pytest.fixture(scope="module")
def trained_head(head_cache, tmp_path_factory):
    return train_once(
        head_cache,
        tmp_path_factory,
        "head",
        "experiment=head",
        "adapter.heads=2",
        "adapter.max_len=16",
        "trainer.max_epochs=20",
        "optimizer.lr=0.01",
        "callbacks.rich_progress_bar=null",
        "callbacks.early_stopping=null",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.num_sanity_val_steps=0",
    )


def test_head_training_reaches_a_known_loss(head_cache, trained_head):
    """The floor of the head's loss (cosine + MSE + token CE) on this cache is the CE of the
    true next states through the lm_head (cosine and MSE are 0 there); training must come within
    0.45 of it from over 1.5 above, and its self-fed chains must be accepted for tokens."""
    out, summary = trained_head
    cache = HiddenPairCache(head_cache)
    val = split_indices(cache.groups, VAL_FRACTION, 0)["val"]
    batch = collate_pairs(cache.get_many(val.tolist()))
    mask, states, tokens = batch["mask"][:, 1:], batch["h_target"][:, 1:], batch["tokens"][:, 1:]
    logits = states.float() @ cache.lm_head_weight().T
    floor = F.cross_entropy(logits[mask], tokens[mask]).item()
    assert (logits.argmax(-1) == tokens)[mask].all()  # the cache's tokens are the greedy ones
    rows = [r for r in read_csv_log(out) if r["val/loss"]]
    first, best = float(rows[0]["val/loss"]), min(float(r["val/loss"]) for r in rows)
    assert summary["monitor"] == "val/chain_accept_len"
    assert first > floor + 1.5 and best < floor + 0.45
    assert summary["best"]["metrics"]["val/chain_accept_len"] > 2.0
    assert summary["best"]["metrics"]["val/token_match"] > 0.75


def test_head_export_holds_its_chains_and_target(head_cache, trained_head):
    from cross_modal_sd.exports import tensor_digest
    from cross_modal_sd.metrics.chains import chain_runs

    _, summary = trained_head
    export = load_export(summary["best_model"])
    cache = HiddenPairCache(head_cache)
    assert export.kind == "head" and export.adapter.config["vocab_size"] == HEAD_VOCAB
    assert export.lm_head_digest == tensor_digest(cache.lm_head_weight())
    val = split_indices(cache.groups, VAL_FRACTION, 0)["val"]
    batch = collate_pairs(cache.get_many(val.tolist()))
    scored = chain_runs(
        export.adapter.eval(),
        batch["h_target"],
        batch["tokens"],
        batch["mask"],
        cache.lm_head_weight(),
        HEAD_VOCAB,
        k=8,
        tree_k=4,
    )
    runs = scored["runs"]
    val = export.val_acceptance
    assert torch.equal(val["runs"][:, : runs.shape[1]].long(), runs)
    for key in ("miss_rank", "tree_rank"):
        assert torch.equal(val[key][:, : runs.shape[1]].long(), scored[key]), key
    top = val["tree_top"][:, : runs.shape[1]].float()
    assert torch.allclose(top, scored["tree_top"], atol=1e-3)
    assert export.val_acceptance["lengths"].tolist() == batch["mask"].sum(1).tolist()
    # The logged chain metric is the mean of these runs.
    mean_run = runs[runs >= 0].float().mean().item()
    assert summary["best"]["metrics"]["val/chain_accept_len"] == pytest.approx(mean_run, abs=1e-5)


def test_head_export_is_refused_for_another_target(head_cache, trained_head):
    from types import SimpleNamespace

    from cross_modal_sd.exports import ExportError, check_export_fits

    export = load_export(trained_head[1]["best_model"])

    def pair(weight):
        return SimpleNamespace(target=SimpleNamespace(lm_head_weight=weight), target_id="toy")

    weight = HiddenPairCache(head_cache).lm_head_weight()
    fits = check_export_fits(export, pair(weight))
    assert fits["kind"] == "head" and fits["lm_head_verified"]
    with pytest.raises(ExportError, match="width 64 and 24 rows"):
        check_export_fits(export, pair(torch.zeros(HEAD_VOCAB, 64)))
    with pytest.raises(ExportError, match="width 32 and 30 rows"):
        check_export_fits(export, pair(torch.zeros(30, HEAD_DIM)))
    with pytest.raises(ExportError, match="another lm_head"):
        check_export_fits(export, pair(weight + 0.01))
