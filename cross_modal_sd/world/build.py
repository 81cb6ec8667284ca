"""Builds the mini world's models: a tiny Video-LLaVA target and a tiny EventGPT draft.

Both are trained briefly on CPU on the same questions (the target from 8 RGB frames, the draft
from event images), saved in the real checkpoint layouts and loaded back through the same loaders
as the real models. The result is cached under `checkpoints/mini/<digest>/`, where the digest is
taken over the build config, so changing the world rebuilds and rerunning reuses.

    python -m cross_modal_sd.world.build            # build (or verify and reuse) the default world
    python -m cross_modal_sd.world.build force=true # rebuild it
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cross_modal_sd.data.cache import sha256_file
from cross_modal_sd.models.loading import CheckpointError
from cross_modal_sd.models.prompts import encode_draft_prompt, encode_target_prompt
from cross_modal_sd.world.config import MiniWorld, MiniWorldConfig
from cross_modal_sd.world.qa import questions
from cross_modal_sd.world.tokenizer import build_tokenizer
from cross_modal_sd.world.train import train_both

DEFAULT_ROOT = Path("checkpoints/mini")


# Files every complete build has, relative to its root; checked (with sizes/checksums) on reuse.
REQUIRED = (
    "target/config.json",
    "target/model.safetensors",
    "draft/config.json",
    "draft/model.safetensors",
    "draft/visual_tower/config.json",
    "tokenizer/tokenizer.json",
)


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
            raise CheckpointError(
                f"{path} has {path.stat().st_size} bytes, expected {meta['bytes']}"
            )
        if sha256_file(path) != meta["sha256"]:
            raise CheckpointError(f"{path} does not match its checksum in {stamp}")


def answer_accuracy(world: MiniWorld, split: str = "test", batch_size: int = 48) -> dict:
    """Exact-match accuracy of both models' greedy answers on a held-out split, per question type."""
    from cross_modal_sd.models.generation import generate_draft, generate_target, greedy_kwargs

    tok = world.tokenizer
    target, draft = world.load_target(), world.load_draft()
    kw = greedy_kwargs(
        world.vocab_limit, len(tok), world.config.max_new_tokens, tok.eos_token_id, tok.pad_token_id
    )
    items = [(v, qa) for v in world.scenes(split) for qa in questions(v.scene)]
    hits: dict[str, dict[str, list[int]]] = {"target": {}, "draft": {}}
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        refs = [qa.answer for _, qa in chunk]
        outs = {
            "target": generate_target(
                target,
                [encode_target_prompt(tok, qa.question, world.n_video_tokens) for _, qa in chunk],
                torch.stack([v.frames for v, _ in chunk]),
                kw,
            ),
            "draft": generate_draft(
                draft,
                [encode_draft_prompt(tok, qa.question) for _, qa in chunk],
                torch.stack([v.event_pixels for v, _ in chunk]),
                kw,
            ),
        }
        for name, rows in outs.items():
            for (_, qa), row, ref in zip(chunk, rows, refs, strict=True):
                ok = tok.decode(row, skip_special_tokens=True).strip() == ref
                hits[name].setdefault(qa.qtype, []).append(int(ok))
    report: dict = {"split": split, "n_pairs": len(items)}
    for name, by_type in hits.items():
        report[name] = {
            "exact": float(np.mean([h for v in by_type.values() for h in v])),
            "by_type": {k: float(np.mean(v)) for k, v in sorted(by_type.items())},
        }
    return report


# ----------------------------------------------------------------------------- build


def load_world(root: Path, config: MiniWorldConfig) -> MiniWorld:
    """Opens a verified build."""
    from transformers import PreTrainedTokenizerFast

    verify_build(root)
    tok = PreTrainedTokenizerFast.from_pretrained(root / "tokenizer")
    return MiniWorld(root, config, tok)


def build_mini_world(
    config: MiniWorldConfig | None = None,
    root: str | Path = DEFAULT_ROOT,
    force: bool = False,
    log=print,
) -> MiniWorld:
    """Returns the built world for `config`, building it when missing, incomplete or altered.

    Args:
        config: world config (defaults to MiniWorldConfig()).
        root: parent directory; the build lives in `root/<config digest>/`.
        force: rebuild even when a valid build exists.
        log: callable for one-line messages.
    """
    config = config or MiniWorldConfig()
    out = Path(root) / config.digest()
    if out.exists() and not force:
        try:
            return load_world(out, config)
        except CheckpointError as err:
            log(f"mini world at {out} is unusable ({err}); rebuilding")
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    tok = build_tokenizer()
    tok.save_pretrained(tmp / "tokenizer")
    log(f"building the mini world {config.digest()} (two tiny VLMs trained on CPU; a few minutes)")
    train_both(config, tmp)
    train_s = time.perf_counter() - t0
    world = MiniWorld(tmp, config, tok)
    accuracy = answer_accuracy(world)
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        rel = str(path.relative_to(tmp))
        files[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    stamp = {
        "config": dataclasses.asdict(config),
        "digest": config.digest(),
        "build_seconds": round(time.perf_counter() - t0, 1),
        "train_seconds": round(train_s, 1),
        "accuracy": accuracy,
        "files": files,
    }
    # The stamp is written last: a build without it is incomplete by definition.
    (tmp / "BUILD.json").write_text(json.dumps(stamp, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log(
        f"built in {stamp['build_seconds']} s; test exact match: target "
        f"{accuracy['target']['exact']:.1%}, draft {accuracy['draft']['exact']:.1%}"
    )
    return load_world(out, config)


@hydra.main(config_path="../../conf", config_name="build", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    world = build_mini_world(
        MiniWorldConfig.from_dict(OmegaConf.to_container(cfg.models.world, resolve=True)),
        root=cfg.models.root,
        force=cfg.force,
    )
    stamp = json.loads((world.root / "BUILD.json").read_text())
    print(json.dumps({"root": str(world.root), "accuracy": stamp["accuracy"]}, indent=2))


def main() -> None:
    """``python -m cross_modal_sd.world.build [overrides]`` (see conf/build.yaml)."""
    _main()


if __name__ == "__main__":
    main()
