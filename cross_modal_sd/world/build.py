"""Builds the mini world's models: a tiny Video-LLaVA target and a tiny EventGPT draft.

Both are trained briefly on CPU on the same questions (the target from 8 RGB frames, the draft
from event images), saved in the real checkpoint layouts and loaded back through the same loaders
as the real models. The result is cached under `checkpoints/mini/<digest>/`, where the digest is
taken over the build config, so changing the world rebuilds and rerunning reuses.

    python -m cross_modal_sd.world.build            # build (or verify and reuse) the default world
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cross_modal_sd.models.loading import CheckpointError, load_eventgpt, load_videollava
from cross_modal_sd.models.mini import DecoderSize, TowerSize, build_draft, build_target
from cross_modal_sd.models.prompts import encode_draft_prompt, encode_target_prompt
from cross_modal_sd.models.eventgpt import save_eventgpt
from cross_modal_sd.world.dataset import SceneViews, render_scene
from cross_modal_sd.world.qa import QA, questions
from cross_modal_sd.world.tokenizer import build_tokenizer, text_vocab_limit

BUILD_FORMAT = 1  # bump when the build code changes what a given config produces
DEFAULT_ROOT = Path("checkpoints/mini")


@dataclass(frozen=True)
class TrainSpec:
    """Optimiser settings for one model (AdamW, one-cycle)."""

    steps: int = 1200
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.01


@dataclass(frozen=True)
class MiniWorldConfig:
    """Everything that determines the built world; its digest names the cache directory."""

    seed: int = 0
    image_size: int = 32
    n_frames: int = 8
    event_frames: int = 2
    train_scenes: int = 1500
    val_scenes: int = 40
    test_scenes: int = 40
    target_tower: TowerSize = TowerSize()
    target_decoder: DecoderSize = DecoderSize(layers=3)
    draft_tower: TowerSize = TowerSize()
    draft_decoder: DecoderSize = DecoderSize(layers=2)
    target_train: TrainSpec = TrainSpec()
    draft_train: TrainSpec = TrainSpec()
    max_new_tokens: int = 40

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
            raise ValueError(f"unknown mini-world config keys {sorted(unknown)}; known: {sorted(known)}")
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
        n = {"train": self.config.train_scenes, "val": self.config.val_scenes, "test": self.config.test_scenes}[split]
        c = self.config
        return [render_scene(c.seed, split, i, c.image_size, c.n_frames, c.event_frames) for i in range(n)]


# Files every complete build has, relative to its root; checked (with sizes/checksums) on reuse.
REQUIRED = (
    "target/config.json",
    "target/model.safetensors",
    "draft/config.json",
    "draft/model.safetensors",
    "draft/visual_tower/config.json",
    "tokenizer/tokenizer.json",
)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_build(root: Path) -> None:
    """Raises CheckpointError naming the first missing, truncated or altered file of a build."""
    stamp = root / "BUILD.json"
    if not stamp.is_file():
        raise CheckpointError(f"{stamp} is missing: the build never finished")
    files = json.loads(stamp.read_text())["files"]
    for rel in REQUIRED:
        if rel not in files:
            raise CheckpointError(f"{stamp} does not list {rel}")
    for rel, meta in files.items():
        path = root / rel
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        if path.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"{path} has {path.stat().st_size} bytes, expected {meta['bytes']}")
        if _sha256(path) != meta["sha256"]:
            raise CheckpointError(f"{path} does not match its checksum in {stamp}")


# ----------------------------------------------------------------------------- training


@dataclass
class _Example:
    scene: int
    prompt: list[int]
    answer: list[int]  # answer ids followed by EOS


def _examples(scenes: list[SceneViews], encode, tokenizer) -> list[_Example]:
    out = []
    for i, v in enumerate(scenes):
        for qa in questions(v.scene):
            answer = tokenizer(qa.answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            out.append(_Example(i, encode(qa), answer))
    return out


def _collate(batch: list[_Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 outside answers)."""
    length = max(len(e.prompt) + len(e.answer) for e in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for r, e in enumerate(batch):
        seq = e.prompt + e.answer
        ids[r, : len(seq)] = torch.tensor(seq)
        labels[r, len(e.prompt) : len(seq)] = torch.tensor(e.answer)
        mask[r, : len(seq)] = 1
    return ids, mask, labels


def train_vlm(model, examples: list[_Example], visuals: torch.Tensor, visual_kw: str, spec: TrainSpec,
              seed: int, pad_id: int, progress: Progress | None = None, desc: str = "train") -> list[float]:
    """Teacher-forced cross-entropy on answers; returns the loss per step."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.steps, pct_start=0.1)
    task = progress.add_task(desc, total=spec.steps, loss=float("nan")) if progress else None
    losses = []
    for _ in range(spec.steps):
        idx = torch.randint(len(examples), (spec.batch_size,), generator=gen)
        batch = [examples[i] for i in idx.tolist()]
        ids, mask, labels = _collate(batch, pad_id)
        vis = visuals[[e.scene for e in batch]]
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, **{visual_kw: vis}).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress is not None:
            progress.update(task, advance=1, loss=float(np.mean(losses[-20:])))
    model.eval()
    return losses
