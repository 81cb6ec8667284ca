"""The draft/target pair behind the decoding API, loaded from a `conf/models/*` config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cross_modal_sd.models.real import RealInputs, load_real_models
from cross_modal_sd.models.wrappers import DraftDecoder, TargetDecoder
from cross_modal_sd.world.build import MiniWorld, MiniWorldConfig, build_mini_world

KINDS = ("mini", "eventgpt_videollava")


@dataclass
class PairModels:
    """Both models with the tokenizer and metadata an extraction or evaluation needs.

    Attributes:
        target: Video-LLaVA behind the decoding API.
        draft: EventGPT behind the decoding API.
        tokenizer: the shared tokenizer (Vicuna's vocabulary below the vocab limit).
        target_id / draft_id: model ids written into cache manifests and checked by exports.
        n_video_tokens: ids `<video>` expands to in the target prompt.
        max_new_tokens: the models config's answer cap.
        world: the built mini world (mini pair only): its samples come from it.
        inputs: how a DSEC clip becomes both models' inputs (real pair only).
    """

    target: TargetDecoder
    draft: DraftDecoder
    tokenizer: Any
    target_id: str
    draft_id: str
    n_video_tokens: int
    max_new_tokens: int
    world: MiniWorld | None = None
    inputs: RealInputs | None = None

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id


def mini_world(models_cfg: Mapping[str, Any]) -> MiniWorld:
    """Builds or opens the mini world described by ``models_cfg.world``."""
    world = models_cfg["world"]
    if isinstance(world, DictConfig):
        world = OmegaConf.to_container(world, resolve=True)
    return build_mini_world(MiniWorldConfig.from_dict(dict(world)), root=models_cfg["root"])


def load_pair(models_cfg: Mapping[str, Any]) -> PairModels:
    """Loads the draft/target pair named by a `conf/models/*` config (``kind`` picks the loader).

    Raises:
        ValueError: an unknown ``kind``; the loaders' own errors for bad checkpoints.
    """
    kind = models_cfg.get("kind")
    if kind == "mini":
        world = mini_world(models_cfg)
        return PairModels(
            target=TargetDecoder(world.load_target(), world.vocab_limit),
            draft=DraftDecoder(world.load_draft(), world.vocab_limit),
            tokenizer=world.tokenizer,
            target_id=str(world.target_dir),
            draft_id=str(world.draft_dir),
            n_video_tokens=world.n_video_tokens,
            max_new_tokens=world.config.max_new_tokens,
            world=world,
        )
    if kind == "eventgpt_videollava":
        real = load_real_models(models_cfg)
        return PairModels(
            target=TargetDecoder(real.target, real.vocab_limit),
            draft=DraftDecoder(real.draft, real.vocab_limit),
            tokenizer=real.tokenizer,
            target_id=str(models_cfg.get("target_id") or models_cfg["target"]),
            draft_id=str(models_cfg.get("draft_id") or models_cfg["draft"]),
            n_video_tokens=real.inputs.n_video_tokens,
            max_new_tokens=int(models_cfg.get("max_new_tokens") or 50),
            inputs=real.inputs,
        )
    raise ValueError(f"unknown models.kind {kind!r}; known: {', '.join(KINDS)}")
