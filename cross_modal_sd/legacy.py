"""Import of the prior system's hidden-state caches into this project's cache format.

The prior system wrote a directory::

    index.json                 {"chunks": [{"path", "start_idx", "n_samples"}, ...], "config": {...}}
    chunks/chunk_000000.pt     {"egpt_hidden": (n, T, D) f32, "vl_hidden": (n, T, D) f32,
                                "seq_lens": (n,) i64, "metadata": [{"sample_idx", "question_idx",
                                "question", "egpt_text", "vl_text", "seq_len"}, ...], ...}

Each model generated its own answer and row k of both tensors is that model's state at its own
k-th generated token (rows past `seq_lens` are zero padding): the pairs are matched by index, not
teacher-forced, so the manifest says `pairing: "index"`. The chunks hold no token ids; `tokens`
are recomputed as the target's greedy choice `argmax(lm_head(h_target))` over ids below
`vocab_limit`, which is the token the target produced up to fp16/4-bit near-ties.

Chunks are memory-mapped (`torch.load(mmap=True)`), so a 1.6 GB chunk costs its pages in the page
cache, not in process memory; only the unpadded rows of one shard at a time are held.

    python -m cross_modal_sd.legacy <legacy_dir> <out_dir> --lm-head vl_lm_head.pt
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cross_modal_sd.data.cache import DTYPES, CacheError, CacheWriter
from cross_modal_sd.models.prompts import DRAFT_TEMPLATE, TARGET_TEMPLATE

INDEX_NAME = "index.json"
CHUNKS_DIR = "chunks"
CHUNK_KEYS = ("egpt_hidden", "vl_hidden", "seq_lens")
LM_HEAD_KEYS = ("lm_head_weight", "weight", "lm_head.weight", "language_model.lm_head.weight")
DEFAULT_DRAFT = "EventGPT-7B (prior system)"
DEFAULT_TARGET = "LanguageBind/Video-LLaVA-7B-hf"


class LegacyCacheError(CacheError):
    """A prior-system cache that is malformed; the message names the file and the problem."""


def read_index(root: str | os.PathLike) -> dict[str, Any]:
    """Reads `index.json` and resolves each chunk's path.

    Raises:
        FileNotFoundError: no index, or a chunk it lists is missing.
        LegacyCacheError: the index is not JSON or lacks `chunks`.
    """
    root = Path(root)
    path = root / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no index.json; {root} is not a prior-system chunked cache"
        )
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LegacyCacheError(f"{path}: not valid JSON ({e})") from e
    chunks = index.get("chunks") if isinstance(index, dict) else None
    if not isinstance(chunks, list) or not chunks:
        raise LegacyCacheError(f"{path}: no 'chunks' list")
    for entry in chunks:
        name = entry.get("path") if isinstance(entry, dict) else None
        if not name:
            raise LegacyCacheError(f"{path}: chunk entry {entry!r} has no 'path'")
        candidates = [root / CHUNKS_DIR / name, root / name]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{path} lists chunk {name!r}, missing at {candidates[0]}")
        entry["file"] = found
    return index


def open_chunk(path: Path) -> dict[str, Any]:
    """A chunk with its tensors memory-mapped, checked for the expected keys and shapes.

    Raises:
        LegacyCacheError: not a zip-format torch file, a key missing, or inconsistent shapes.
    """
    try:
        chunk = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises several unrelated types for unreadable files
        raise LegacyCacheError(f"{path}: cannot memory-map this chunk ({e})") from e
    if not isinstance(chunk, Mapping):
        raise LegacyCacheError(f"{path}: holds a {type(chunk).__name__}, not a chunk dict")
    missing = [k for k in CHUNK_KEYS if k not in chunk]
    if missing:
        raise LegacyCacheError(f"{path}: chunk lacks {missing}")
    d, t, lens = chunk["egpt_hidden"], chunk["vl_hidden"], chunk["seq_lens"]
    if d.ndim != 3 or t.ndim != 3 or d.shape[:2] != t.shape[:2] or lens.shape != (d.shape[0],):
        raise LegacyCacheError(
            f"{path}: egpt_hidden {tuple(d.shape)}, vl_hidden {tuple(t.shape)} and seq_lens "
            f"{tuple(lens.shape)} do not fit (n, T, D), (n, T, D'), (n,)"
        )
    if len(lens) and (int(lens.min()) < 1 or int(lens.max()) > d.shape[1]):
        raise LegacyCacheError(f"{path}: seq_lens outside 1..{d.shape[1]}")
    metadata = chunk.get("metadata")
    if metadata is not None and len(metadata) != d.shape[0]:
        raise LegacyCacheError(f"{path}: {len(metadata)} metadata records for {d.shape[0]} samples")
    return chunk


def load_lm_head(path: str | os.PathLike) -> torch.Tensor:
    """The target's `lm_head` weight (V, D) from the prior system's `vl_lm_head.pt`, a
    safetensors file, or a Video-LLaVA checkpoint directory.

    Raises:
        FileNotFoundError: no such file or directory.
        LegacyCacheError: nothing that looks like an lm_head weight in it.
    """
    from cross_modal_sd.models.loading import _iter_tensors, _weight_files

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"lm_head source not found: {path}")
    if path.is_dir():
        found = dict(_iter_tensors(_weight_files(path), keep=lambda k: k in LM_HEAD_KEYS))
    elif path.suffix == ".safetensors":
        found = dict(_iter_tensors([path], keep=lambda k: k in LM_HEAD_KEYS))
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        found = {"weight": obj} if isinstance(obj, torch.Tensor) else dict(obj)
    for key in LM_HEAD_KEYS:
        w = found.get(key)
        if isinstance(w, torch.Tensor) and w.ndim == 2:
            return w
    raise LegacyCacheError(f"{path}: no lm_head weight (looked for {list(LM_HEAD_KEYS)})")


def _records(index: Mapping[str, Any], chunk: Mapping[str, Any], entry: Mapping[str, Any]):
    """(sample_id, group, question_id, extra) of each sample of a chunk."""
    split = (index.get("config") or {}).get("split") or "legacy"
    metadata = chunk.get("metadata")
    start = int(entry.get("start_idx", 0))
    for i in range(int(chunk["seq_lens"].shape[0])):
        meta = metadata[i] if metadata is not None else {}
        scene = meta.get("sample_idx", start + i)
        question = meta.get("question_idx", 0)
        extra = {"legacy_index": start + i}
        for ours, theirs in (
            ("question", "question"),
            ("draft_text", "egpt_text"),
            ("target_text", "vl_text"),
        ):
            if theirs in meta:
                extra[ours] = meta[theirs]
        yield f"{split}/{scene}/q{question}", f"{split}/{scene}", f"q{question}", extra


def iter_legacy_samples(
    root: str | os.PathLike,
) -> Iterator[tuple[str, str, str, torch.Tensor, torch.Tensor, dict]]:
    """(sample_id, group, question_id, h_draft (L, Dd), h_target (L, Dt), extra) per sample.

    Rows are views into the memory-mapped chunk; copy them before the next chunk opens.
    """
    index = read_index(root)
    for entry in index["chunks"]:
        chunk = open_chunk(entry["file"])
        lens = chunk["seq_lens"].tolist()
        for i, rec in enumerate(_records(index, chunk, entry)):
            n = lens[i]
            sample_id, group, qid, extra = rec
            yield (
                sample_id,
                group,
                qid,
                chunk["egpt_hidden"][i, :n],
                chunk["vl_hidden"][i, :n],
                extra,
            )
        del chunk


def import_legacy_cache(
    src: str | os.PathLike,
    out: str | os.PathLike,
    lm_head: str | os.PathLike,
    dtype: str = "float32",
    vocab_limit: int = 32000,
    shard_samples: int = 512,
    draft_model: str = DEFAULT_DRAFT,
    target_model: str = DEFAULT_TARGET,
    groups: Mapping[str, str] | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Converts (or finishes converting) a prior-system chunked cache into a hidden-pair cache.

    Args:
        src: the prior system's directory (index.json + chunks/).
        out: the new cache directory (resumable: rerun to finish an interrupted import).
        lm_head: the target's lm_head (`vl_lm_head.pt`, a safetensors file or a checkpoint dir).
        dtype: stored dtype (float32 keeps the prior values exactly).
        vocab_limit: ids at or above it are never a token (Video-LLaVA's added tokens).
        shard_samples: samples per shard.
        draft_model, target_model: model ids for the manifest.
        groups: optional map from a legacy group (``<split>/<sample_idx>``, one clip) to the
            sequence it was cut from; without it each clip is its own group, and neighbouring
            clips of one sequence can fall on both sides of a train/val split.
        device: where the tokens' argmax over the vocabulary runs (about 4 GFLOP per 30-token
            answer at 4096 x 32000; a GPU makes it free).

    Returns:
        Counts: samples, written, resumed.

    Raises:
        FileNotFoundError, LegacyCacheError: missing or malformed input (the message names it).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    index = read_index(src)
    weight = load_lm_head(lm_head)
    # A first pass over the (memory-mapped, tiny) seq_lens gives dims and the longest answer.
    dims, longest = None, 0
    for entry in index["chunks"]:
        chunk = open_chunk(entry["file"])
        shape = (chunk["egpt_hidden"].shape[2], chunk["vl_hidden"].shape[2])
        if dims is not None and shape != dims:
            raise LegacyCacheError(f"{entry['file']}: hidden dims {shape}, earlier chunks {dims}")
        dims = shape
        if len(chunk["seq_lens"]):
            longest = max(longest, int(chunk["seq_lens"].max()))
        del chunk
    if weight.shape[1] != dims[1] or weight.shape[0] < vocab_limit:
        raise LegacyCacheError(
            f"{lm_head}: lm_head is {tuple(weight.shape)}; the target states are {dims[1]} wide "
            f"and vocab_limit is {vocab_limit}"
        )
    config = index.get("config") or {}
    meta = {
        "pairing": "index",
        "draft_model": draft_model,
        "target_model": target_model,
        "draft_prompt_template": DRAFT_TEMPLATE,
        "target_prompt_template": TARGET_TEMPLATE,
        "draft_dim": int(dims[0]),
        "target_dim": int(dims[1]),
        "dtype": dtype,
        "max_new_tokens": max(int(config.get("max_new_tokens") or 0), longest, 1),
        "vocab_limit": vocab_limit,
        "extra": {
            "source": "prior-system chunked cache",
            "legacy_config": config,
            "tokens": f"argmax(lm_head(h_target)) over ids < {vocab_limit} (not stored by the prior system)",
            "groups": "sequences" if groups else "clips (no sequence map given)",
        },
    }
    head = weight[:vocab_limit].to(device, torch.float32)  # (V, Dt)
    written = resumed = 0
    with CacheWriter(out, meta, shard_samples=shard_samples) as writer:
        writer.set_lm_head(weight)
        done = writer.done_ids()
        for sample_id, group, qid, h_d, h_t, extra in tqdm(
            iter_legacy_samples(src), desc="import", unit="sample", dynamic_ncols=True
        ):
            if sample_id in done:
                resumed += 1
                continue
            tokens = (h_t.to(device, torch.float32) @ head.T).argmax(dim=-1).cpu()  # (L,)
            if groups is not None:
                extra["clip"] = group
                group = groups.get(group, group)
            writer.add(sample_id, group, qid, h_d, h_t, tokens, extra=extra)
            written += 1
    return {
        "out_dir": str(out),
        "samples": written + resumed,
        "written": written,
        "resumed": resumed,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: ``python -m cross_modal_sd.legacy SRC OUT --lm-head FILE``."""
    parser = argparse.ArgumentParser(
        prog="python -m cross_modal_sd.legacy",
        description="Import a prior-system chunked hidden-state cache (index-paired).",
    )
    parser.add_argument("src", help="prior-system directory holding index.json and chunks/")
    parser.add_argument("out", help="new cache directory (rerun to resume)")
    parser.add_argument(
        "--lm-head", required=True, help="vl_lm_head.pt, a .safetensors or a Video-LLaVA dir"
    )
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="stored dtype")
    parser.add_argument("--vocab-limit", type=int, default=32000, help="first non-text token id")
    parser.add_argument("--shard-samples", type=int, default=512, help="samples per shard")
    parser.add_argument(
        "--draft-model", default=DEFAULT_DRAFT, help="draft model id for the manifest"
    )
    parser.add_argument(
        "--target-model", default=DEFAULT_TARGET, help="target model id for the manifest"
    )
    parser.add_argument(
        "--groups", help="JSON {'<split>/<sample_idx>': '<sequence>'} for sequence groups"
    )
    parser.add_argument("--device", default="cpu", help="device of the tokens' argmax (cpu | cuda)")
    args = parser.parse_args(argv)
    groups = json.loads(Path(args.groups).read_text()) if args.groups else None
    result = import_legacy_cache(
        args.src,
        args.out,
        args.lm_head,
        dtype=args.dtype,
        vocab_limit=args.vocab_limit,
        shard_samples=args.shard_samples,
        draft_model=args.draft_model,
        target_model=args.target_model,
        groups=groups,
        device=args.device,
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
