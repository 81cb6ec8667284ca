"""Building, reusing and rejecting mini-world builds; reproducibility; quality of the default world."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cross_modal_sd.models.generation import generate_draft, generate_target, greedy_kwargs
from cross_modal_sd.pair import MiniSource, load_pair
from cross_modal_sd.world import build
from cross_modal_sd.world import train as world_train
from cross_modal_sd.world.build import MiniWorldConfig, build_mini_world
from cross_modal_sd.world.qa import EVENT_VISIBLE


def _world_cfg(small_world_cfg):
    from omegaconf import OmegaConf

    return MiniWorldConfig.from_dict(OmegaConf.to_container(small_world_cfg.world))


def _no_training(*_args, **_kwargs):
    raise RuntimeError("training started")


def test_valid_build_is_reused_without_training(small_world_cfg, monkeypatch):
    monkeypatch.setattr(build, "train_both", _no_training)
    world = build_mini_world(_world_cfg(small_world_cfg), root=small_world_cfg.root)
    assert (world.root / "BUILD.json").is_file()


def test_damaged_build_is_detected_by_name_and_rebuilt(small_world_cfg, tmp_path, monkeypatch):
    cfg = _world_cfg(small_world_cfg)
    copy = tmp_path / cfg.digest()
    shutil.copytree(f"{small_world_cfg.root}/{cfg.digest()}", copy)
    (copy / "draft" / "model.safetensors").unlink()
    messages = []
    monkeypatch.setattr(build, "train_both", _no_training)
    with pytest.raises(RuntimeError, match="training started"):
        build_mini_world(cfg, root=tmp_path, log=messages.append)
    assert "draft/model.safetensors is missing" in messages[0] and "rebuilding" in messages[0]


def test_changed_config_gets_its_own_build():
    a, b = MiniWorldConfig(), MiniWorldConfig(seed=1)
    assert a.digest() != b.digest() and a.digest() == MiniWorldConfig().digest()
    with pytest.raises(ValueError, match="unknown mini-world config keys"):
        MiniWorldConfig.from_dict({"sede": 1})


@pytest.mark.slow  # (make test-full; ~30 s: two builds)
def test_build_is_deterministic_from_its_seed(small_world_cfg, tmp_path):
    """A second build of the same config writes the same weights and losses, byte for byte
    (the models train in two processes that switch thread counts at fixed steps)."""
    import json

    cfg = _world_cfg(small_world_cfg)
    again = build_mini_world(cfg, root=tmp_path, log=lambda *_: None)
    first = json.loads((Path(small_world_cfg.root) / cfg.digest() / "BUILD.json").read_text())
    second = json.loads((again.root / "BUILD.json").read_text())
    compared = [k for k in first["files"] if k.endswith((".safetensors", "_losses.json"))]
    assert len(compared) == 4
    assert {k: second["files"][k]["sha256"] for k in compared} == {
        k: first["files"][k]["sha256"] for k in compared
    }


def test_greedy_outputs_are_reproducible_across_loads(small_world_cfg):
    outs = []
    for _ in range(2):
        pair = load_pair(small_world_cfg)
        tok = pair.tokenizer
        samples = [s for _, s in MiniSource("test", 0, 2).samples(pair)]
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


@pytest.mark.parametrize("kind", ["target", "draft"])
def test_shared_prefix_batches_train_each_question_as_its_own_sequence(kind):
    """A batch of scenes, all questions packed behind one visual prompt, gives every answer
    position the logits of that question's own single-turn forward."""
    from cross_modal_sd.models.architectures import build_draft, build_target
    from cross_modal_sd.models.prompts import encode_draft_prompt, encode_target_prompt
    from cross_modal_sd.world.samples import render_scene
    from cross_modal_sd.world.tokenizer import build_tokenizer

    cfg, tok = MiniWorldConfig(), build_tokenizer()
    views = [render_scene(0, "train", i, cfg.image_size, cfg.n_frames, 2) for i in range(2)]
    torch.manual_seed(0)
    if kind == "target":
        model = build_target(tok, cfg.target_tower, cfg.target_decoder, cfg.image_size, 8)
        n_video = cfg.n_frames * cfg.target_tower.tokens(cfg.image_size)
        prompt, kw, expand = lambda q: encode_target_prompt(tok, q, n_video), "frames", 0
    else:
        model = build_draft(tok, cfg.draft_tower, cfg.draft_decoder, cfg.image_size, 2)
        prompt, kw = lambda q: encode_draft_prompt(tok, q), "event_pixels"
        expand = 2 + cfg.draft_tower.tokens(cfg.image_size) - 1
    arg = "pixel_values_videos" if kind == "target" else "event_pixels"
    pixels = torch.stack([getattr(v, kw) for v in views])
    scenes = world_train._scene_turns(views, prompt, tok)
    assert all(len(s.turns) >= 6 and s.prefix for s in scenes)
    ids, labels, mask, positions = world_train._batch(scenes, [0, 1], tok.pad_token_id, expand)
    model.eval()
    with torch.no_grad():
        packed = model(input_ids=ids, attention_mask=mask, position_ids=positions, **{arg: pixels})
        packed = packed.logits[:, expand:]
        for row, scene in enumerate(scenes):
            start = len(scene.prefix)
            for question, answer in scene.turns:
                alone = torch.tensor([scene.prefix + question + answer])
                ref = model(input_ids=alone, **{arg: pixels[row : row + 1]}).logits[0, expand:]
                n = len(question) + len(answer)
                torch.testing.assert_close(
                    packed[row, start : start + n], ref[len(scene.prefix) :], rtol=0, atol=1e-5
                )
                assert labels[row, start : start + len(question)].eq(-100).all()
                assert labels[row, start + len(question) : start + n].tolist() == answer
                start += n
            assert ids[row, start:].eq(tok.pad_token_id).all()


def test_perception_labels_show_what_each_sensor_records():
    from cross_modal_sd.data.events import EventStream
    from cross_modal_sd.world.perception import perception_labels
    from cross_modal_sd.world.samples import SceneViews
    from cross_modal_sd.world.scenes import RoadObject, Scene

    car = RoadObject("car", "red", lane=1, direction="right", speed="slow", x0=3.0)  # 7x4 px
    truck = RoadObject("truck", "blue", lane=2, direction="stopped", speed="fast", x0=20.0)
    scene = Scene("hand", night=True, objects=(car, truck))
    n = 100  # events evenly spread over the clip: two chunks cover [0, 0.495] and [0.505, 1]
    t = np.linspace(0, 1_000_000, n).astype(np.int64)
    events = EventStream(np.zeros(n, int), np.zeros(n, int), t, np.ones(n, int))
    views = SceneViews(scene, frames=None, events=events, event_pixels=None)

    rgb = perception_labels(views, "rgb", n_images=8, grid=4)
    cls = rgb["cls"].view(8, 4, 4)
    # Frame 0: the car spans x 3..10 (patch columns 0-1) in the middle lane (patch row 2);
    # frame 7: x 9..16 (column 1). The parked truck (x 20..31, near lane) is in row 3.
    assert cls[0].tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 2, 2]]
    assert cls[7].tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 2, 2]]
    assert rgb["colour"].view(8, 4, 4)[0, 2, 0] == 1 and rgb["colour"].view(8, 4, 4)[0, 3, 3] == 3
    assert rgb["heading"].view(8, 4, 4)[0, 2, 0] == 2 and rgb["heading"].view(8, 4, 4)[0, 3, 3] == 3
    assert rgb["night"] == 1

    ev = perception_labels(views, "events", n_images=2, grid=4)
    assert set(ev) == {"cls", "heading"}  # no colour, no light
    cls = ev["cls"].view(2, 4, 4)
    # Chunk 0 sweeps x 3..13 (columns 0-1), chunk 1 x 6..16 (columns 0-1); the truck fires nothing.
    assert cls[0].tolist() == cls[1].tolist() == [[0] * 4, [0] * 4, [1, 1, 0, 0], [0] * 4]
    with pytest.raises(ValueError, match="unknown sensor 'lidar'"):
        perception_labels(views, "lidar", n_images=1, grid=4)
