"""Teacher-forced extraction of paired hidden states into a resumable cache (docs/design.md §6).

For each sample the target generates its greedy answer y; then each model reads its own prompt
followed by y[:-1] in one forward, and the final-layer post-norm states at the |y| positions that
predict y[0..|y|-1] are stored with y. Because both rows of position k predict the same token of
the same text, the leading run of `argmax(lm_head(adapter(h_draft))) == y` is exactly what greedy
speculative decoding accepts in its first round.

    python -m cross_modal_sd.extract                        # mini world, default scenes
    python -m cross_modal_sd.extract source.count=50 out_dir=<dir>
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
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from cross_modal_sd.config import register_resolvers
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
)
from cross_modal_sd.pair import PairModels, PairSample, SampleSource, load_pair, make_source


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
        cfg: composed `conf/extract.yaml` (keys `models`, `source`, `out_dir`, `dtype`,
            `shard_samples`, `max_new_tokens`, optional `shard.rank`/`shard.world_size`).

    Returns:
        Counts and timing of this process (``samples`` of its block, ``written``, ``resumed``,
        ``seconds``), its ``rank`` and ``world_size``; with parts also ``merged`` (whether this
        rank committed the merged manifest), ``waiting_for`` (ranks not done yet) and
        ``total_samples`` (of the merged cache, when merged).
    """
    register_resolvers()
    shard = resolve_shard(cfg.get("shard"))
    source = make_source(cfg.source)
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
        "extra": {
            "split": source.split,
            "source": OmegaConf.to_container(cfg.source, resolve=True),
        },
    }
    if not sharded:
        stats = _extract_into(pair, source, cfg, out, meta, max_new, None, None, set())
        return {"out_dir": str(out), "rank": 0, "world_size": 1, **stats}

    parts = out / PARTS_DIR
    request = request_digest({"meta": meta, "world_size": shard.world_size})
    clear_done(parts, shard)
    start, n = shard.block(*source.units())
    # Samples another part already holds (an earlier run with another world size, or the
    # single-process cache this one continues) are not extracted again.
    others = set()
    if (out / "manifest.json").is_file():
        others |= {s["id"] for s in load_manifest(out)["samples"]}
    for part in _part_dirs(parts):
        if part.name != shard.name:
            others |= {s["id"] for s in load_manifest(part)["samples"]}
    stats = _extract_into(pair, source, cfg, parts / shard.name, meta, max_new, start, n, others)
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
    source: SampleSource,
    cfg: DictConfig,
    out: Path,
    meta: dict,
    max_new: int,
    start: int | None,
    n: int | None,
    others: set[str],
) -> dict:
    """Extract scenes/clips ``start .. start + n - 1`` (None: the source's own) into the cache
    at ``out``, skipping what it or ``others`` hold."""
    t0 = time.perf_counter()
    written = resumed = 0
    with CacheWriter(out, meta, shard_samples=cfg.shard_samples) as writer:
        writer.set_lm_head(pair.target.lm_head_weight.detach().cpu())
        # Streamed: a DSEC split does not fit in memory, and done samples are never prepared.
        samples = source.samples(pair, skip=writer.done_ids() | others, start=start, count=n)
        for sample_id, sample in tqdm(
            samples, desc=f"extract {source.split}", unit="sample", dynamic_ncols=True
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
        {"models": cfg.models, "source": cfg.source, "out_dir": out},
    )
    # DDP ranks started together (torchrun) take turns: the first extracts, the others find the
    # cache complete. A separate lock file: the writer's own lock fails instead of waiting.
    with exclusive(Path(out).parent / f".{Path(out).name}.ensure.lock"):
        extract(request)
    return out


@hydra.main(config_path="../conf", config_name="extract", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    print(extract(cfg))


def main() -> None:
    """``python -m cross_modal_sd.extract [overrides]`` (see conf/extract.yaml)."""
    register_resolvers()
    _main()


if __name__ == "__main__":
    main()
