"""The mini world: scenes, event simulation and rendering, questions, tokenizer, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cross_modal_sd.data.events import (
    EventStream,
    EventStreamError,
    event_images,
    render_event_image,
)
from cross_modal_sd.models.prompts import (
    EVENT_PLACEHOLDER_ID,
    encode_draft_prompt,
    encode_target_prompt,
)
from cross_modal_sd.world.event_sim import simulate_events
from cross_modal_sd.world.qa import EVENT_VISIBLE, RGB_ONLY, questions
from cross_modal_sd.world.samples import render_scene, scene_samples
from cross_modal_sd.world.scenes import RoadObject, Scene, render
from cross_modal_sd.world.tokenizer import build_tokenizer, text_vocab_limit


def _scene(direction: str, colour: str = "yellow", night: bool = False) -> Scene:
    obj = RoadObject(cls="car", colour=colour, lane=1, direction=direction, speed="fast", x0=8.0)
    return Scene("s", night, (obj,))


def test_parked_objects_fire_no_events_and_moving_ones_do():
    assert len(simulate_events(_scene("stopped"))) == 0
    moving = simulate_events(_scene("right"))
    assert len(moving) > 20
    # All events lie in the object's lane rows (8 + 8..15): the sky and other lanes are static.
    assert moving.y.min() >= 16 and moving.y.max() < 24


def test_event_polarity_follows_brightness_at_the_leading_edge():
    # A bright (yellow) car moving right on a darker road brightens pixels ahead of it, so the
    # rightmost events are positive; moving left, the leftmost ones are.
    right = simulate_events(_scene("right"))
    assert right.p[right.x == right.x.max()].mean() > 0.9
    left = simulate_events(_scene("left"))
    assert left.p[left.x == left.x.min()].mean() > 0.9


def test_events_do_not_see_colour_that_rgb_sees():
    red, green = _scene("stopped", "red"), _scene("stopped", "green")
    assert not np.allclose(render(red, 0.0), render(green, 0.0))
    assert len(simulate_events(red)) == len(simulate_events(green)) == 0


def test_render_event_image_latest_event_wins_on_white():
    ev = EventStream(
        x=np.array([1, 1, 2]), y=np.array([0, 0, 1]), t=np.array([0, 5, 6]), p=np.array([1, 0, 1])
    )
    img = render_event_image(ev, (2, 3))
    assert img[0, 1].tolist() == [0, 0, 255]  # negative came last: blue
    assert img[1, 2].tolist() == [255, 0, 0]  # positive: red
    assert img[0, 0].tolist() == [255, 255, 255]


def test_event_images_split_by_equal_count():
    n = 10
    ev = EventStream(x=np.arange(n) % 4, y=np.zeros(n, int), t=np.arange(n), p=np.ones(n, int))
    imgs = event_images(ev, (1, 4), 2)
    assert imgs.shape == (2, 1, 4, 3)
    # first chunk = events 0..4 -> x 0,1,2,3,0: all four pixels lit
    assert (imgs[0, 0, :, 1] == 0).all()


def test_event_images_reject_bad_streams():
    empty = EventStream(*(np.zeros(0, int) for _ in range(4)))
    with pytest.raises(EventStreamError, match="no events"):
        event_images(empty, (4, 4), 2, source="clip-7")
    assert event_images(empty, (4, 4), 2, allow_empty=True).min() == 255
    outside = EventStream(x=np.array([5]), y=np.array([0]), t=np.array([0]), p=np.array([1]))
    with pytest.raises(EventStreamError, match="outside the sensor size 4x4"):
        event_images(outside, (4, 4), 1)


def test_questions_cover_both_views_and_answers_are_10_to_30_tokens():
    tok = build_tokenizer()
    types, lengths = set(), []
    for s in scene_samples(seed=3, split="train", n_scenes=30):
        types.add(s.qa.qtype)
        ids = tok(s.qa.answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
        assert tok.unk_token_id not in ids, s.qa.answer
        lengths.append(len(ids))
        assert tok.decode(ids, skip_special_tokens=True) == s.qa.answer
    assert set(EVENT_VISIBLE) | set(RGB_ONLY) <= types
    assert 10 <= min(lengths) and max(lengths) <= 30


def test_scenes_are_deterministic_and_splits_disjoint():
    a = render_scene(0, "train", 5, 32, 8, 2)
    b = render_scene(0, "train", 5, 32, 8, 2)
    c = render_scene(0, "val", 5, 32, 8, 2)
    assert a.scene == b.scene and torch.equal(a.frames, b.frames)
    assert a.scene.scene_id != c.scene.scene_id
    assert [q.question_id for q in questions(a.scene)] == [
        q.question_id for q in questions(b.scene)
    ]


def test_tokenizer_layout_and_prompts():
    tok = build_tokenizer()
    limit = text_vocab_limit(tok)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert tok.convert_tokens_to_ids(["<image>", "<video>", "<pad>"]) == [
        limit,
        limit + 1,
        limit + 2,
    ]
    ids = encode_target_prompt(tok, "what colour is the car ?", 136)
    assert ids.count(tok.convert_tokens_to_ids("<video>")) == 136
    d = encode_draft_prompt(tok, "what colour is the car ?")
    assert d.count(EVENT_PLACEHOLDER_ID) == 1 and tok.unk_token_id not in d
    assert all(i < limit for i in d if i != EVENT_PLACEHOLDER_ID)
