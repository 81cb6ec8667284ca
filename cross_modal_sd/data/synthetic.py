"""Random hidden-pair caches in the real format, for I/O benchmarks and pipeline smoke tests.

    python -m cross_modal_sd.data.synthetic --out /tmp/synth --size-gb 4.5 --dim 4096

Rows are standard-normal states (finite by construction), answers 10-40 tokens, eight questions
per scene group. Everything goes through ``CacheWriter``, so the files are exactly what an
extraction would produce.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cross_modal_sd.data.cache import DTYPES, CacheWriter


def write_synthetic_cache(
    out: str | os.PathLike,
    size_gb: float,
    draft_dim: int,
    target_dim: int,
    dtype: str = "bfloat16",
    min_len: int = 10,
    max_len: int = 40,
    questions_per_group: int = 8,
    shard_samples: int = 512,
    vocab_size: int = 32000,
    lm_head: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write a random cache holding about ``size_gb`` GB (1e9 bytes) of rows.

    Args:
        out: New or empty directory.
        size_gb: Target size of the row data (h_draft + h_target + tokens), excluding lm_head.
        draft_dim: Width of h_draft.
        target_dim: Width of h_target.
        dtype: Cache dtype, one of ``DTYPES``.
        min_len: Shortest answer.
        max_len: Longest answer (also the manifest's ``max_new_tokens``).
        questions_per_group: Samples per scene group.
        shard_samples: Samples per shard.
        vocab_size: Token ids are drawn below it; it is the lm_head's row count.
        lm_head: Also store a random (vocab_size, target_dim) lm_head.
        seed: Seed of all random draws.
        progress: Show a tqdm bar.

    Returns:
        The cache directory.

    Raises:
        FileExistsError: if ``out`` exists and is not empty.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; remove it or choose another --out")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    torch_dtype = DTYPES[dtype]
    row_bytes = (draft_dim + target_dim) * torch_dtype.itemsize + 4  # + int32 token
    target_bytes = int(size_gb * 1e9)
    meta = {
        "pairing": "teacher_forced",
        "draft_model": "synthetic/draft",
        "target_model": "synthetic/target",
        "draft_prompt_template": "USER: <event>\n{question} ASSISTANT:",
        "target_prompt_template": "USER: <video>\n{question} ASSISTANT:",
        "draft_dim": draft_dim,
        "target_dim": target_dim,
        "dtype": dtype,
        "max_new_tokens": max_len,
        "vocab_limit": vocab_size,
        "extra": {"synthetic": True, "seed": seed},
    }
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    written = n = 0
    with (
        CacheWriter(out, meta, shard_samples=shard_samples) as writer,
        tqdm(total=target_bytes, unit="B", unit_scale=True, disable=not progress) as bar,
    ):
        if lm_head:
            writer.set_lm_head(
                torch.randn(vocab_size, target_dim, generator=gen, dtype=torch_dtype)
            )
        # One shard's worth of rows per draw, into buffers reused across shards: a few large
        # randn calls instead of one per sample, and no fresh memory per shard.
        h_draft = torch.empty(shard_samples * max_len, draft_dim, dtype=torch_dtype)
        h_target = torch.empty(shard_samples * max_len, target_dim, dtype=torch_dtype)
        tokens = torch.empty(shard_samples * max_len, dtype=torch.int32)
        while written < target_bytes:
            lengths = rng.integers(min_len, max_len + 1, size=shard_samples)
            rows = int(lengths.sum())
            torch.randn(rows, draft_dim, generator=gen, out=h_draft[:rows])  # (R, Dd)
            torch.randn(rows, target_dim, generator=gen, out=h_target[:rows])  # (R, Dt)
            torch.randint(0, vocab_size, (rows,), generator=gen, out=tokens[:rows])
            splits = lengths.tolist()
            for hd, ht, tk in zip(
                h_draft[:rows].split(splits),
                h_target[:rows].split(splits),
                tokens[:rows].split(splits),
                strict=True,
            ):
                if written >= target_bytes:
                    break
                group = f"scene{n // questions_per_group:06d}"
                question = f"q{n % questions_per_group}"
                writer.add(f"{group}/{question}", group, question, hd, ht, tk)
                written += len(tk) * row_bytes
                bar.update(len(tk) * row_bytes)
                n += 1
    return out


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="new or empty cache directory")
    parser.add_argument("--size-gb", type=float, required=True, help="row data to write, in 1e9 B")
    parser.add_argument("--dim", type=int, default=4096, help="width of both states")
    parser.add_argument("--draft-dim", type=int, help="width of h_draft (default --dim)")
    parser.add_argument("--target-dim", type=int, help="width of h_target (default --dim)")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="cache dtype")
    parser.add_argument("--shard-samples", type=int, default=512, help="samples per shard")
    parser.add_argument(
        "--vocab-size", type=int, default=32000, help="token range and lm_head rows"
    )
    parser.add_argument("--no-lm-head", action="store_true", help="skip the random lm_head")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    # The job is I/O-bound; with one intra-op thread the many ~200 KB row copies never wait on a
    # thread-pool wake-up, which on a busy machine costs more than the copy itself.
    torch.set_num_threads(1)
    out = write_synthetic_cache(
        args.out,
        args.size_gb,
        draft_dim=args.draft_dim or args.dim,
        target_dim=args.target_dim or args.dim,
        dtype=args.dtype,
        shard_samples=args.shard_samples,
        vocab_size=args.vocab_size,
        lm_head=not args.no_lm_head,
        seed=args.seed,
    )
    print(out)


if __name__ == "__main__":
    main()
