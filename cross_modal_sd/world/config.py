"""The mini world's build config (its digest names the build directory) and the handle of a
built world."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from cross_modal_sd.models.architectures import DecoderSize, TowerSize
from cross_modal_sd.models.loading import load_eventgpt, load_videollava
from cross_modal_sd.world.samples import SceneViews, render_scene
from cross_modal_sd.world.tokenizer import text_vocab_limit

BUILD_FORMAT = 4  # bump when the build code changes what a given config produces


@dataclass(frozen=True)
class TrainSpec:
    """Optimiser settings for one model (AdamW, one-cycle). The perception read-outs
    (`cross_modal_sd.world.perception`) first train the vision side alone for
    `perception_steps` steps of `perception_images` independently drawn images (None: a batch's
    worth), then add their loss, scaled by `perception_weight`, to the answers'.

    `second_thread_at`: the share of all its steps (perception, then answers) after which the
    model takes a second intra-op thread (None: never). The two models train side by side on one
    thread each; the switch sits at a fixed step, about where the other (cheaper) model ends on
    a 2-core machine, not at its measured end, so a build is deterministic."""

    steps: int = 560
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    perception_steps: int = 600
    perception_weight: float = 1.0
    perception_images: int | None = None
    second_thread_at: float | None = None


@dataclass(frozen=True)
class MiniWorldConfig:
    """Everything that determines the built world; its digest names the cache directory."""

    regime: str = "reference"  # the cost regime this world's sizes were chosen for (a label)
    seed: int = 0
    image_size: int = 32
    event_size: int | None = None  # the draft tower's input side (None: image_size)
    n_frames: int = 8
    event_frames: int = 2
    train_scenes: int = 1500
    val_scenes: int = 40
    test_scenes: int = 40
    # The reference cost regime (docs/design.md §12): a CLIP tower heavy enough that the target's
    # prefill is compute, not overhead (0.43 of a baseline answer for the real pair).
    target_tower: TowerSize = TowerSize(hidden=256, layers=3, heads=4, mlp=1024)
    target_decoder: DecoderSize = DecoderSize(layers=3)
    draft_tower: TowerSize = TowerSize()
    draft_decoder: DecoderSize = DecoderSize(layers=2)
    target_train: TrainSpec = TrainSpec(second_thread_at=0.33)
    draft_train: TrainSpec = TrainSpec()
    max_new_tokens: int = 40

    @property
    def draft_image_size(self) -> int:
        """Side of the event images the draft's tower reads."""
        return self.event_size or self.image_size

    def digest(self) -> str:
        blob = json.dumps({"format": BUILD_FORMAT, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, d: dict) -> MiniWorldConfig:
        nested = {
            "target_tower": TowerSize,
            "draft_tower": TowerSize,
            "target_decoder": DecoderSize,
            "draft_decoder": DecoderSize,
            "target_train": TrainSpec,
            "draft_train": TrainSpec,
        }
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"unknown mini-world config keys {sorted(unknown)}; known: {sorted(known)}"
            )
        return cls(**{k: nested[k](**v) if k in nested else v for k, v in d.items()})


@dataclass
class MiniWorld:
    """Paths and handles of a built world."""

    root: Path
    config: MiniWorldConfig
    tokenizer: object = field(repr=False)

    @property
    def target_dir(self) -> Path:
        return self.root / "target"

    @property
    def draft_dir(self) -> Path:
        return self.root / "draft"

    @property
    def vocab_limit(self) -> int:
        return text_vocab_limit(self.tokenizer)

    @property
    def n_video_tokens(self) -> int:
        return self.config.n_frames * self.config.target_tower.tokens(self.config.image_size)

    def load_target(self):
        return load_videollava(str(self.target_dir))

    def load_draft(self):
        return load_eventgpt(self.draft_dir)

    def scenes(self, split: str) -> list[SceneViews]:
        n = {
            "train": self.config.train_scenes,
            "val": self.config.val_scenes,
            "test": self.config.test_scenes,
        }[split]
        c = self.config
        return [
            render_scene(c.seed, split, i, c.image_size, c.n_frames, c.event_frames, c.event_size)
            for i in range(n)
        ]
