"""Teacher-forced extraction of paired hidden states into a resumable cache (DESIGN §6).

For each sample the target generates its greedy answer y; then each model reads its own prompt
followed by y[:-1] in one forward, and the final-layer post-norm states at the |y| positions that
predict y[0..|y|-1] are stored with y. Because both rows of position k predict the same token of
the same text, the leading run of `argmax(lm_head(adapter(h_draft))) == y` is exactly what greedy
speculative decoding accepts in its first round.

    python -m cross_modal_sd.extract                        # mini world, default split sizes
    python -m cross_modal_sd.extract data.n_scenes=50 out_dir=/tmp/cache
    torchrun --nproc_per_node 4 -m cross_modal_sd.extract   # 4 ranks, one part each, merged

With several ranks (torchrun's ``RANK``/``WORLD_SIZE``, or ``shard.rank``/``shard.world_size``
for SLURM arrays and Hydra multiruns) rank r extracts block r of the scenes/clips into its own
part cache ``<out_dir>/parts/rank-r-of-W/``, and the last rank to finish commits one manifest
at ``<out_dir>`` listing every part's shards (see ``data/sharding.py``). Rerunning any subset of
ranks extracts only what is missing, whatever world size the earlier runs had.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from cross_modal_sd.data.cache import PARTS_DIR, CacheWriter, load_manifest, merge_parts
from cross_modal_sd.data.sharding import (
    clear_done,
    exclusive,
    mark_done,
    missing_ranks,
    request_digest,
    resolve_shard,
    select_local_gpu,
)
from cross_modal_sd.models.generation import greedy_kwargs
from cross_modal_sd.models.prompts import (
    DRAFT_TEMPLATE,
    TARGET_TEMPLATE,
    encode_draft_prompt,
    encode_target_prompt,
)
from cross_modal_sd.models.wrappers import DraftDecoder, TargetDecoder


@dataclass
class PairSample:
    """One question about one clip, prepared for both models (batch dimension 1)."""

    sample_id: str
    group: str  # scene / sequence id: splits never separate a group
    question_id: str
    target_ids: torch.Tensor  # (1, L_t) with expanded video tokens
    frames: torch.Tensor  # (1, F, 3, H, W)
    draft_ids: torch.Tensor  # (1, L_d) with the event placeholder
    event_pixels: torch.Tensor  # (1, T, 3, H, W)
    reference: str | None = None


@dataclass
class PairModels:
    """Both models with the tokenizer and metadata an extraction or evaluation needs."""

    target: TargetDecoder
    draft: DraftDecoder
    tokenizer: object
    target_id: str
    draft_id: str
    n_video_tokens: int
    max_new_tokens: int
    world: object = None  # the MiniWorld when the pair is the mini one
    inputs: object = None  # models.real.RealInputs when the pair is the real one

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id


def load_pair(models_cfg: DictConfig) -> PairModels:
    """Loads the draft/target pair named by a `conf/models/*` config."""
    if models_cfg.kind == "eventgpt_videollava":
        from cross_modal_sd.models.real import load_real_pair

        return load_real_pair(models_cfg)
    if models_cfg.kind != "mini":
        raise ValueError(
            f"unknown models.kind {models_cfg.kind!r}; known: mini, eventgpt_videollava"
        )
    world = mini_world(models_cfg)
    tok = world.tokenizer
    return PairModels(
        target=TargetDecoder(world.load_target(), world.vocab_limit),
        draft=DraftDecoder(world.load_draft(), world.vocab_limit),
        tokenizer=tok,
        target_id=str(world.target_dir),
        draft_id=str(world.draft_dir),
        n_video_tokens=world.n_video_tokens,
        max_new_tokens=world.config.max_new_tokens,
        world=world,
    )


def mini_world(models_cfg: DictConfig):
    """Builds or opens the mini world described by `models_cfg.world`."""
    from cross_modal_sd.world.build import MiniWorldConfig, build_mini_world

    world_cfg = OmegaConf.to_container(models_cfg.world, resolve=True)
    return build_mini_world(MiniWorldConfig.from_dict(world_cfg), root=models_cfg.root)


def mini_samples(pair: PairModels, split: str, start: int, n_scenes: int) -> Iterator[PairSample]:
    """Samples of mini-world scenes start..start+n_scenes-1 of a split."""
    from cross_modal_sd.world.dataset import iter_samples

    tok = pair.tokenizer
    c = pair.world.config
    for s in iter_samples(
        c.seed, split, n_scenes, c.image_size, c.n_frames, c.event_frames, start=start
    ):
        yield PairSample(
            sample_id=s.sample_id,
            group=s.scene.scene_id,
            question_id=s.qa.qtype,
            target_ids=torch.tensor(
                [encode_target_prompt(tok, s.qa.question, pair.n_video_tokens)]
            ),
            frames=s.frames[None],
            draft_ids=torch.tensor([encode_draft_prompt(tok, s.qa.question)]),
            event_pixels=s.event_pixels[None],
            reference=s.qa.answer,
        )


def iter_samples(
    pair: PairModels,
    data_cfg: DictConfig,
    split: str,
    skip: frozenset[str] | set[str] = frozenset(),
    start: int | None = None,
    n: int | None = None,
) -> Iterator[tuple[str, PairSample | None]]:
    """(sample_id, sample) of the data source `data_cfg.source` (mini | dsec), streamed.

    Samples whose id is in `skip` come out as (id, None) without being prepared. `start`/`n`
    select scenes (mini) or clips (dsec); None takes the data config's `start`/`n_scenes`
    (mini) or every clip of the split (dsec).
    """
    source = data_cfg.get("source", "mini")
    if source == "dsec":
        from cross_modal_sd.models.real import dsec_samples

        yield from dsec_samples(pair, data_cfg, split, skip, start or 0, n)
        return
    if source != "mini":
        raise ValueError(f"unknown data.source {source!r}; known: mini, dsec")
    start = data_cfg.start if start is None else start
    n = data_cfg.n_scenes if n is None else n
    for sample in mini_samples(pair, split, start, n):
        yield sample.sample_id, None if sample.sample_id in skip else sample


def pair_samples(
    pair: PairModels, data_cfg: DictConfig, split: str, start: int | None, n: int | None
) -> Iterator[PairSample]:
    """The samples of `iter_samples`, for evaluation."""
    return (s for _, s in iter_samples(pair, data_cfg, split, start=start, n=n))


@torch.inference_mode()
def target_answer(pair: PairModels, sample: PairSample, max_new_tokens: int) -> list[int]:
    """The target's greedy answer (EOS included when reached), one sample at a time."""
    model = pair.target.model
    tok = pair.tokenizer
    kw = greedy_kwargs(
        pair.target.vocab_limit,
        model.config.text_config.vocab_size,
        max_new_tokens,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    out = model.generate(
        input_ids=sample.target_ids.to(model.device),
        pixel_values_videos=sample.frames.to(model.device, model.dtype),
        **kw,
    )
    return out[0, sample.target_ids.shape[1] :].tolist()


@torch.inference_mode()
def teacher_forced_states(
    pair: PairModels, sample: PairSample, answer: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final-layer states of both models at the |y| positions that predict y: (|y|, D) each."""
    n = len(answer)
    fed = torch.tensor([answer[:-1]], dtype=torch.long)  # (1, n - 1)
    t_ids = torch.cat([sample.target_ids, fed], dim=1)
    d_ids = torch.cat([sample.draft_ids, fed], dim=1)
    target, draft = pair.target.model, pair.draft.model
    frames = sample.frames.to(target.device, target.dtype)
    events = sample.event_pixels.to(draft.device, draft.dtype)
    h_t = pair.target.prefill(t_ids.to(target.device), frames, keep_last=n).hidden[0]  # (n, Dt)
    h_d = pair.draft.prefill(d_ids.to(draft.device), events, keep_last=n).hidden[0]  # (n, Dd)
    return h_d, h_t


def extract(cfg: DictConfig) -> dict:
    """Runs (or resumes) one extraction, or this rank's part of a multi-process one.

    Args:
        cfg: composed `conf/extract.yaml` (keys `models`, `data`, `split`, `out_dir`, `dtype`,
            `shard_samples`, `max_new_tokens`, optional `shard.rank`/`shard.world_size`).

    Returns:
        Counts and timing of this process (``samples`` of its block, ``written``, ``resumed``,
        ``seconds``), its ``rank`` and ``world_size``; with parts also ``merged`` (whether this
        rank committed the merged manifest), ``waiting_for`` (ranks not done yet) and
        ``total_samples`` (of the merged cache, when merged).
    """
    shard = resolve_shard(cfg.get("shard"))
    select_local_gpu()
    out = Path(cfg.out_dir)
    # Once a cache has parts, every later run (a single process too) adds a part of its own.
    sharded = shard.world_size > 1 or (out / PARTS_DIR).is_dir()
    if sharded and cfg.models.kind == "mini":
        # Ranks started together would all build a missing mini world into the same folder.
        with exclusive(Path(cfg.models.root) / ".build.lock"):
            pair = load_pair(cfg.models)
    else:
        pair = load_pair(cfg.models)
    max_new = int(cfg.max_new_tokens or pair.max_new_tokens)
    lm_head = pair.target.lm_head_weight
    meta = {
        "pairing": "teacher_forced",
        "draft_model": pair.draft_id,
        "target_model": pair.target_id,
        "draft_prompt_template": DRAFT_TEMPLATE,
        "target_prompt_template": TARGET_TEMPLATE,
        "draft_dim": int(pair.draft.lm_head_weight.shape[1]),
        "target_dim": int(lm_head.shape[1]),
        "dtype": cfg.dtype,
        "max_new_tokens": max_new,
        "vocab_limit": pair.target.vocab_limit,
        "extra": {"split": cfg.split, "data": OmegaConf.to_container(cfg.data, resolve=True)},
    }
    if not sharded:
        stats = _extract_into(pair, cfg, out, meta, max_new, None, None, set())
        return {"out_dir": str(out), "rank": 0, "world_size": 1, **stats}

    parts = out / PARTS_DIR
    request = request_digest({"meta": meta, "world_size": shard.world_size})
    clear_done(parts, shard)
    start, n = shard.block(*_units(cfg.data, cfg.split))
    # Samples another part already holds (an earlier run with another world size, or the
    # single-process cache this one continues) are not extracted again.
    others = set()
    if (out / "manifest.json").is_file():
        others |= {s["id"] for s in load_manifest(out)["samples"]}
    for part in _part_dirs(parts):
        if part.name != shard.name:
            others |= {s["id"] for s in load_manifest(part)["samples"]}
    stats = _extract_into(pair, cfg, parts / shard.name, meta, max_new, start, n, others)
    mark_done(parts, shard, request, units=[start, n], samples=stats["samples"])
    waiting = missing_ranks(parts, shard.world_size, request)
    total = None
    if not waiting:
        total = merge_parts(out, _part_dirs(parts))["n_samples"]
    return {
        "out_dir": str(out),
        "rank": shard.rank,
        "world_size": shard.world_size,
        **stats,
        "merged": not waiting,
        "waiting_for": waiting,
        "total_samples": total,
    }


def _extract_into(
    pair: PairModels,
    cfg: DictConfig,
    out: Path,
    meta: dict,
    max_new: int,
    start: int | None,
    n: int | None,
    others: set[str],
) -> dict:
    """Extract scenes/clips ``start .. start + n - 1`` (None: the data config's) into the cache
    at ``out``, skipping what it or ``others`` hold."""
    t0 = time.perf_counter()
    written = resumed = 0
    with CacheWriter(out, meta, shard_samples=cfg.shard_samples) as writer:
        writer.set_lm_head(pair.target.lm_head_weight.detach().cpu())
        # Streamed: a DSEC split does not fit in memory, and done samples are never prepared.
        samples = iter_samples(
            pair, cfg.data, cfg.split, skip=writer.done_ids() | others, start=start, n=n
        )
        for sample_id, sample in tqdm(
            samples, desc=f"extract {cfg.split}", unit="sample", dynamic_ncols=True
        ):
            if sample is None:
                resumed += 1
                continue
            answer = target_answer(pair, sample, max_new)
            h_d, h_t = teacher_forced_states(pair, sample, answer)
            writer.add(
                sample_id,
                sample.group,
                sample.question_id,
                h_d,
                h_t,
                torch.tensor(answer),
                extra={"reference": sample.reference},
            )
            written += 1
    seconds = time.perf_counter() - t0
    return {
        "samples": written + resumed,
        "written": written,
        "resumed": resumed,
        "seconds": round(seconds, 1),
    }


def _units(data_cfg: DictConfig, split: str) -> tuple[int, int]:
    """(first, count) of the scenes (mini) or clips (dsec) an extraction of `split` covers."""
    if data_cfg.get("source", "mini") == "dsec":
        from cross_modal_sd.data.dsec import DsecReader

        return 0, sum(1 for _ in DsecReader.from_config(data_cfg).clips(split))
    return int(data_cfg.start), int(data_cfg.n_scenes)


_PART_RE = re.compile(r"rank-(\d+)-of-(\d+)")


def _part_dirs(parts: Path) -> list[Path]:
    """Part caches under `parts`, by (world size, rank): one run's parts in sample order."""
    if not parts.is_dir():
        return []
    found = [
        (int(m[2]), int(m[1]), p)
        for p in parts.iterdir()
        if p.is_dir() and (m := _PART_RE.fullmatch(p.name)) and (p / "manifest.json").is_file()
    ]
    return [p for _, _, p in sorted(found)]


def ensure_cache(cfg: DictConfig) -> str:
    """Extracts (or finishes extracting) the cache a training config's `data` names.

    Resuming a complete cache writes nothing, so calling this before every run costs only the
    model load and sample listing.
    """
    out = str(cfg.data.cache_dir)
    request = OmegaConf.merge(
        OmegaConf.create(
            {
                "dtype": "float32",
                "shard_samples": 256,
                "max_new_tokens": None,
                # Every training rank checks the whole cache; extraction is not split here.
                "shard": {"rank": 0, "world_size": 1},
            }
        ),
        {"models": cfg.models, "data": cfg.data, "out_dir": out, "split": cfg.data.source_split},
    )
    # DDP ranks started together (torchrun) take turns: the first extracts, the others find the
    # cache complete. A separate lock file: the writer's own lock fails instead of waiting.
    with exclusive(Path(out).parent / f".{Path(out).name}.ensure.lock"):
        extract(request)
    return out


@hydra.main(config_path="../conf", config_name="extract", version_base="1.3")
def main(cfg: DictConfig) -> None:
    print(extract(cfg))


if __name__ == "__main__":
    main()
