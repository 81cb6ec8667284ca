"""Deterministic mini-world samples: (8 RGB frames, event stream, event images, question, answer).

Scenes are drawn from a generator seeded by (world seed, split, scene index), so any sample can be
regenerated alone, and train/val/test never share a scene.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from cross_modal_sd.data.events import EventStream, event_images
from cross_modal_sd.models.preprocess import frames_to_pixels
from cross_modal_sd.world.event_sim import simulate_events
from cross_modal_sd.world.qa import QA, questions
from cross_modal_sd.world.scenes import Scene, render_clip, sample_scene

SPLITS = ("train", "val", "test")


@dataclass
class MiniSample:
    """One scene-question pair with both views, ready for either model."""

    scene: Scene
    qa: QA
    frames: torch.Tensor  # (F, 3, H, W) normalised target frames
    events: EventStream
    event_pixels: torch.Tensor  # (T, 3, H, W) normalised event images

    @property
    def sample_id(self) -> str:
        return self.qa.question_id


@dataclass
class SceneViews:
    """What both sensors recorded of one scene."""

    scene: Scene
    frames: torch.Tensor
    events: EventStream
    event_pixels: torch.Tensor


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Generator for one scene; stable across runs and Python versions."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def render_scene(
    seed: int,
    split: str,
    index: int,
    size: int,
    n_frames: int,
    event_frames: int,
    event_size: int | None = None,
) -> SceneViews:
    """Draws scene `index` of `split` and records it with both sensors (both `size` pixels wide);
    the event images are resized to `event_size` for the draft's tower (None: `size`), as the
    real draft resizes DSEC's 480 x 640 event canvas to its 336 px tower."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rng = scene_rng(seed, split, index)
    scene = sample_scene(f"{split}-{index:05d}", rng, size)
    frames = render_clip(scene, n_frames, size)  # (F, 3, H, W) in [0, 1]
    events = simulate_events(scene, size=size, rng=rng)
    images = event_images(
        events, (size, size), event_frames, source=scene.scene_id, allow_empty=True
    )
    images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # (T, 3, H, W)
    return SceneViews(
        scene,
        frames_to_pixels(torch.from_numpy(frames)),
        events,
        frames_to_pixels(images, event_size),
    )


def scene_samples(
    seed: int,
    split: str,
    n_scenes: int,
    size: int = 32,
    n_frames: int = 8,
    event_frames: int = 2,
    start: int = 0,
    event_size: int | None = None,
) -> Iterator[MiniSample]:
    """Yields every question of scenes start..start+n_scenes-1 of a split."""
    for i in range(start, start + n_scenes):
        v = render_scene(seed, split, i, size, n_frames, event_frames, event_size)
        for qa in questions(v.scene):
            yield MiniSample(v.scene, qa, v.frames, v.events, v.event_pixels)
