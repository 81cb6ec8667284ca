"""Building, reusing and rejecting mini-world builds; reproducibility; quality of the default world."""

from __future__ import annotations

import shutil

import pytest
import torch

from cross_modal_sd.extract import load_pair, mini_samples
from cross_modal_sd.models.generation import generate_draft, generate_target, greedy_kwargs
from cross_modal_sd.world import build
from cross_modal_sd.world.build import MiniWorldConfig, build_mini_world
from cross_modal_sd.world.qa import EVENT_VISIBLE


def _world_cfg(small_world_cfg):
    from omegaconf import OmegaConf

    return MiniWorldConfig.from_dict(OmegaConf.to_container(small_world_cfg.world))


def _no_training(*_args, **_kwargs):
    raise RuntimeError("training started")


def test_valid_build_is_reused_without_training(small_world_cfg, monkeypatch):
    monkeypatch.setattr(build, "_train_both", _no_training)
    world = build_mini_world(_world_cfg(small_world_cfg), root=small_world_cfg.root)
    assert (world.root / "BUILD.json").is_file()


def test_damaged_build_is_detected_by_name_and_rebuilt(small_world_cfg, tmp_path, monkeypatch):
    cfg = _world_cfg(small_world_cfg)
    copy = tmp_path / cfg.digest()
    shutil.copytree(f"{small_world_cfg.root}/{cfg.digest()}", copy)
    (copy / "draft" / "model.safetensors").unlink()
    messages = []
    monkeypatch.setattr(build, "_train_both", _no_training)
    with pytest.raises(RuntimeError, match="training started"):
        build_mini_world(cfg, root=tmp_path, log=messages.append)
    assert "draft/model.safetensors is missing" in messages[0] and "rebuilding" in messages[0]


def test_changed_config_gets_its_own_build():
    a, b = MiniWorldConfig(), MiniWorldConfig(seed=1)
    assert a.digest() != b.digest() and a.digest() == MiniWorldConfig().digest()
    with pytest.raises(ValueError, match="unknown mini-world config keys"):
        MiniWorldConfig.from_dict({"sede": 1})


def test_greedy_outputs_are_reproducible_across_loads(small_world_cfg):
    outs = []
    for _ in range(2):
        pair = load_pair(small_world_cfg)
        tok = pair.tokenizer
        samples = list(mini_samples(pair, "test", 0, 2))
        kw = greedy_kwargs(
            pair.target.vocab_limit, len(tok), 12, tok.eos_token_id, tok.pad_token_id
        )
        t = generate_target(
            pair.target.model,
            [s.target_ids[0].tolist() for s in samples],
            torch.cat([s.frames for s in samples]),
            kw,
        )
        d = generate_draft(
            pair.draft.model,
            [s.draft_ids[0].tolist() for s in samples],
            torch.cat([s.event_pixels for s in samples]),
            kw,
        )
        outs.append((t, d))
    assert outs[0] == outs[1]


@pytest.mark.slow
def test_default_world_quality():
    """The default world (built here if missing: minutes) answers well from RGB, and from events
    answers motion/lane questions better than colour ones."""
    world = build_mini_world()
    acc = build.answer_accuracy(world)
    assert acc["n_pairs"] >= 200
    assert acc["target"]["exact"] >= 0.8, acc
    draft = acc["draft"]["by_type"]
    assert min(draft[t] for t in EVENT_VISIBLE if t != "moving") > draft["colour"], acc
