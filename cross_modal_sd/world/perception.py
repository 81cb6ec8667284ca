"""Perception read-outs that stand in for the real models' pretrained vision encoders.

The real Video-LLaVA and EventGPT start from CLIP towers that already see objects, their colour
and where they are; the mini towers start from random weights and get a few hundred steps. While
the mini VLMs train, linear heads read every visual token where the language model receives it
and are trained to name what its patch shows: the object there (class, colour, heading), the
patch's row, and for the CLS token the light. Their loss is added to the answer loss, so the
tokens carry those facts early; the heads are then discarded and the saved models are plain VLMs.

Each sensor is asked only what it records: events show no colour, no light and nothing that does
not move, and an event image shows where objects went during its chunk of events.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from cross_modal_sd.world.samples import SceneViews
from cross_modal_sd.world.scenes import (
    CLASS_SIZE,
    CLASSES,
    COLOURS,
    DIRECTIONS,
    LANE_ROWS,
    SKY_ROWS,
)

SENSORS = ("rgb", "events")
# Per-patch read-outs: name -> classes (0 = no object in the patch).
PATCH_READOUTS = {
    "rgb": {"cls": 1 + len(CLASSES), "colour": 1 + len(COLOURS), "heading": 1 + len(DIRECTIONS)},
    "events": {"cls": 1 + len(CLASSES), "heading": 1 + len(DIRECTIONS)},
}
# Read-outs of the CLS token: name -> classes.
SCENE_READOUTS = {"rgb": {"night": 2}, "events": {}}
MIN_OVERLAP = 1.0  # pixels (at the 32 px reference) of an object a patch must hold to show it


def image_windows(views: SceneViews, sensor: str, n_images: int) -> list[tuple[float, float]]:
    """Clip-time span [t0, t1] (in [0, 1]) each image of `sensor` records: the instant of each
    RGB frame, or the first to last event of each equal-count event chunk."""
    if sensor == "rgb":
        return [(float(t), float(t)) for t in np.linspace(0.0, 1.0, n_images)]
    t = views.events.t / 1e6
    if len(t) == 0:
        return [(0.0, 0.0)] * n_images
    bounds = np.linspace(0, len(t), n_images + 1).round().astype(int)
    return [
        (float(t[lo]), float(t[max(hi - 1, lo)]))
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def perception_labels(views: SceneViews, sensor: str, n_images: int, grid: int) -> dict:
    """What each image of `sensor` shows of a scene, patch by patch.

    Returns:
        Per-patch ``(n_images, grid * grid)`` long tensors for the sensor's
        ``PATCH_READOUTS`` (row-major patches, 0 = nothing) and a scalar per ``SCENE_READOUTS``.
    """
    if sensor not in SENSORS:
        raise ValueError(f"unknown sensor {sensor!r}; expected one of {SENSORS}")
    scene = views.scene
    px = 32 / grid  # patch side at the 32 px reference layout
    labels = {
        k: torch.zeros(n_images, grid, grid, dtype=torch.long) for k in PATCH_READOUTS[sensor]
    }
    edges = np.arange(grid + 1) * px
    for obj in scene.objects:
        if sensor == "events" and not obj.moving:
            continue
        ids = {
            "cls": 1 + CLASSES.index(obj.cls),
            "colour": 1 + list(COLOURS).index(obj.colour),
            "heading": 1 + DIRECTIONS.index(obj.direction),
        }
        w, h = CLASS_SIZE[obj.cls]
        top = SKY_ROWS + obj.lane * LANE_ROWS + (LANE_ROWS - h) / 2
        rows = np.flatnonzero(np.minimum(edges[1:], top + h) - np.maximum(edges[:-1], top) > 0)
        for i, (t0, t1) in enumerate(image_windows(views, sensor, n_images)):
            left = min(obj.x_at(t0), obj.x_at(t1))
            right = max(obj.x_at(t0), obj.x_at(t1)) + w
            overlap = np.minimum(edges[1:], right) - np.maximum(edges[:-1], left)
            cols = np.flatnonzero(overlap >= MIN_OVERLAP)
            for name, grid_labels in labels.items():
                grid_labels[i][np.ix_(rows, cols)] = ids[name]
    out = {k: rearrange(v, "n r c -> n (r c)") for k, v in labels.items()}
    scene_ids = {"night": torch.tensor(int(scene.night))}
    return out | {k: scene_ids[k] for k in SCENE_READOUTS[sensor]}


class PerceptionHeads(nn.Module):
    """Linear heads over images' tokens (CLS, then a row-major `grid` x `grid` of patches).

    Args:
        dim: token width.
        grid: patches per side.
        sensor: ``rgb`` or ``events`` (which read-outs exist).
    """

    def __init__(self, dim: int, grid: int, sensor: str):
        super().__init__()
        self.grid = grid
        self.patch = nn.ModuleDict(
            {k: nn.Linear(dim, n) for k, n in PATCH_READOUTS[sensor].items()}
        )
        self.scene = nn.ModuleDict(
            {k: nn.Linear(dim, n) for k, n in SCENE_READOUTS[sensor].items()}
        )
        self.row = nn.Linear(dim, grid)

    def loss(self, tokens: Tensor, labels: dict[str, Tensor]) -> Tensor:
        """Mean cross-entropy of all heads.

        Args:
            tokens: (N, 1 + grid², D) tokens of N images.
            labels: per image, ``(N, grid²)`` patch labels and ``(N,)`` scene labels.
        """
        patches = tokens[:, 1:]
        losses = []
        for k, head in self.patch.items():
            ce = F.cross_entropy(
                rearrange(head(patches), "n p k -> (n p) k"), labels[k].flatten(), reduction="none"
            )
            # Objects cover a few patches of each image: their patches and the empty ones count
            # as much, or the heads learn "nothing here" and little else.
            shown = labels[k].flatten() > 0
            losses += [ce[shown].mean() if shown.any() else ce.sum() * 0, ce[~shown].mean()]
        losses += [F.cross_entropy(head(tokens[:, 0]), labels[k]) for k, head in self.scene.items()]
        rows = torch.arange(self.grid, device=tokens.device).repeat_interleave(self.grid)
        row_logits = rearrange(self.row(patches), "n p k -> (n p) k")
        losses.append(F.cross_entropy(row_logits, rows.repeat(len(tokens))))
        return torch.stack(losses).mean()


@dataclass
class Perception:
    """Where a VLM's visual tokens are read, the heads reading them and the scenes' labels.

    Args:
        tap: module whose output is the (scenes x images per scene, tokens, D) visual tokens.
        encode: runs the vision side (through `tap`) on a batch of scenes' pixels.
        heads: the read-out heads.
        labels: per scene, ``perception_labels`` stacked along a leading scene axis.
    """

    tap: nn.Module
    encode: Callable[[Tensor], object]
    heads: PerceptionHeads
    labels: dict[str, Tensor]

    @classmethod
    def for_scenes(
        cls,
        tap: nn.Module,
        encode: Callable[[Tensor], object],
        dim: int,
        views: list[SceneViews],
        sensor: str,
        n_images: int,
        grid: int,
    ) -> Perception:
        """Heads of width `dim` over a `grid` x `grid` tap, labelled for `views`."""
        rows = [perception_labels(v, sensor, n_images, grid) for v in views]
        labels = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        return cls(tap, encode, PerceptionHeads(dim, grid, sensor), labels)

    def capture(self) -> tuple[dict[str, Tensor], torch.utils.hooks.RemovableHandle]:
        """Hooks the tap; the returned dict holds its latest output under ``tokens``."""
        seen: dict[str, Tensor] = {}
        handle = self.tap.register_forward_hook(lambda m, i, out: seen.update(tokens=out))
        return seen, handle

    @property
    def images_per_scene(self) -> int:
        return next(v.shape[1] for v in self.labels.values() if v.ndim == 3)

    def loss(self, tokens: Tensor, scene_ids: Tensor, image_ids: Tensor | None = None) -> Tensor:
        """Heads' loss on the captured tokens of a batch.

        Args:
            tokens: the tap's output.
            scene_ids: (B,) scenes of the batch.
            image_ids: (B,) one image of each scene (the tap saw B images), or None (the tap
                saw every image of each scene, scene-major).
        """
        labels = {}
        for k, v in self.labels.items():
            v = v[scene_ids]  # (B, n_images, P) or (B,)
            if v.ndim == 3 and image_ids is not None:
                labels[k] = v[torch.arange(len(v)), image_ids]
            elif v.ndim == 3:
                labels[k] = rearrange(v, "b n p -> (b n) p")
            else:
                labels[k] = v.repeat_interleave(len(tokens) // len(scene_ids))
        return self.heads.loss(tokens, labels)

    def pretrain_step(self, visuals: Tensor, n: int, gen: torch.Generator) -> Tensor:
        """Loss of `n` images drawn independently (scene and image): as diverse as a batch gets.

        Args:
            visuals: (n_scenes, n_images, ...) pixels of the labelled scenes.
            n: images in the batch.
            gen: random generator.
        """
        scene_ids = torch.randint(len(visuals), (n,), generator=gen)
        image_ids = torch.randint(self.images_per_scene, (n,), generator=gen)
        seen, handle = self.capture()
        try:
            self.encode(visuals[scene_ids, image_ids][:, None])
        finally:
            handle.remove()
        return self.loss(seen["tokens"], scene_ids, image_ids)
