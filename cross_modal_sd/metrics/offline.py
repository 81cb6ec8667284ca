"""Offline alignment metrics of an adapter over cache samples, as training validates them, and
the per-sample acceptance sequences exports carry for the speedup model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics import Metric

from cross_modal_sd.data.cache import HiddenPairCache
from cross_modal_sd.data.dataset import HiddenPairDataset, collate_pairs
from cross_modal_sd.metrics.functional import (
    cosine,
    draft_top1,
    expected_run,
    leading_run,
    rank_of,
    top_logits,
)
from cross_modal_sd.metrics.modules import DEFAULT_TAUS, AlignmentMetrics

TREE_TOP_K = (2, 4)  # tree widths of the offline `tree_accept_len_top<k>` metrics
# The target's largest logits kept per position: at T > 0 the speedup model samples from them
# (the rest of the vocabulary is dropped, exact for vocabularies this small or top_k <= this).
TARGET_TOP = 32


def previous_tokens(tokens: Tensor, prompt_last_token: int) -> Tensor:
    """(B, T) token before each answer position: ``y[k-1]``, the prompt's last token at 0."""
    start = tokens.new_full((tokens.shape[0], 1), prompt_last_token)
    return torch.cat([start, tokens[:, :-1]], dim=1)


@torch.inference_mode()
def offline_metrics(
    adapter: torch.nn.Module,
    cache: HiddenPairCache,
    indices: Sequence[int] | None,
    lm_head: torch.Tensor,
    vocab_limit: int | None = None,
    batch_size: int = 64,
    max_len: int | None = None,
    taus: Sequence[float] = DEFAULT_TAUS,
    prompt_last_token: int | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Alignment metrics of `adapter` on cache samples, as training's validation computes them.

    The adapter reads the collated, padded batch with its mask; the metrics are one
    `AlignmentMetrics` accumulated over the whole selection.

    Args:
        adapter: the adapter.
        cache: the hidden-pair cache.
        indices: cache indices to use (None: all).
        lm_head: (V, Dt) target ``lm_head`` weight (the cache's).
        vocab_limit: ids at or above it are never drafted.
        batch_size: samples per batch.
        max_len: positions of the curves (None: the cache's max_new_tokens).
        taus: cosine thresholds.
        prompt_last_token: token before answer position 0, for token-fusing adapters.

    Returns:
        ``{"metrics": scalars, "curves": lists}`` (scalars include ``tree_accept_len_top<k>``:
        the mean accepted length of a draft tree holding the top-k at every depth, read off
        ``rank``; ``sampled_accept_len_T1``: round 1's expected accepted length when the
        target samples at T = 1, `functional.expected_run`) and per-sample rows
        (``sample_id``, ``length``, ``accepted_len``, ``token_match``, ``cos_sim``, and per position the teacher-forced
        sequences of the speedup model: ``match``, ``confidence``, ``top_probs`` (the drafter's
        largest ``max(TREE_TOP_K)`` probabilities), ``rank`` (the target's token among them,
        -1: not), ``target_logits`` (the target's `TARGET_TOP` largest) and ``draft_rank``
        (the draft among those, -1: not)).
    """
    if adapter.uses_tokens and prompt_last_token is None:
        raise ValueError(
            f"adapter {adapter.name} fuses token embeddings and needs the prompt's last token id: "
            f"the cache manifest's extra['prompt_last_token'] is missing"
        )
    adapter = adapter.eval()
    max_len = max_len or cache.manifest["max_new_tokens"]
    metrics = AlignmentMetrics(lm_head, taus, max_len, vocab_limit)
    for m in metrics.modules():  # this process's samples only, even inside a DDP job
        if isinstance(m, Metric):
            m.sync_on_compute = m._to_sync = False  # torchmetrics reads the second at compute
    dataset = HiddenPairDataset(cache, indices)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_pairs)
    dtype = next(adapter.parameters()).dtype
    rows = []
    tree_runs = dict.fromkeys(TREE_TOP_K, 0)
    sampled_runs = 0.0
    for batch in loader:
        h, mask, tokens = batch["h_draft"].to(dtype), batch["mask"], batch["tokens"]
        kwargs = {}
        if adapter.uses_tokens:
            kwargs["tokens"] = previous_tokens(tokens, prompt_last_token)
        pred = adapter(h, mask, **kwargs)  # (B, T, Dt)
        metrics.update(pred, batch["h_target"], tokens, mask)
        drafts, confidence = draft_top1(pred, lm_head, vocab_limit)  # (B, T) each
        hits = drafts == tokens  # (B, T)
        logits, ids = top_logits(pred, lm_head, max(TREE_TOP_K), vocab_limit)
        # The drafter's top probabilities from its top logits: p_r = p_0 e^(l_r - l_0).
        probs = confidence.unsqueeze(-1) * (logits - logits[..., :1]).exp()
        rank = rank_of(ids, tokens)  # (B, T)
        target, target_ids = top_logits(batch["h_target"], lm_head, TARGET_TOP, vocab_limit)
        draft_rank = rank_of(target_ids, drafts)
        sampled_runs += float(
            expected_run(batch["h_target"], lm_head, drafts, mask, vocab_limit).sum()
        )
        runs = leading_run(hits, mask)  # (B,)
        for k in TREE_TOP_K:  # the target's token among the drafter's top k: its rank < k
            top = (rank >= 0) & (rank < k)
            tree_runs[k] += int(leading_run(top, mask).sum())
        cos = cosine(pred, batch["h_target"], mask)  # (B, T)
        lengths = mask.sum(dim=1)  # (B,)
        for b, sample_id in enumerate(batch["sample_id"]):
            n = int(lengths[b])
            rows.append(
                {
                    "sample_id": sample_id,
                    "length": n,
                    "accepted_len": int(runs[b]),
                    "token_match": float((hits[b] & mask[b]).sum()) / n,
                    "cos_sim": float(cos[b, :n].mean()),
                    "match": hits[b, :n].tolist(),
                    "confidence": confidence[b, :n].tolist(),
                    "top_probs": probs[b, :n].half().tolist(),
                    "rank": rank[b, :n].tolist(),
                    "target_logits": target[b, :n].half().tolist(),
                    "draft_rank": draft_rank[b, :n].tolist(),
                }
            )
    scalars = {k: float(v) for k, v in metrics.compute().items()}
    for k, total in tree_runs.items():
        scalars[f"tree_accept_len_top{k}"] = total / len(rows) if rows else float("nan")
    scalars["sampled_accept_len_T1"] = sampled_runs / len(rows) if rows else float("nan")
    curves = {k: v.tolist() for k, v in metrics.compute_curves().items()}
    return {"metrics": scalars, "curves": curves}, rows


def acceptance_arrays(rows: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
    """The rows' per-position sequences as padded ``(S, L)`` (``(S, L, k)``) tensors and
    ``(S,)`` lengths (what an export stores; `speedup.Acceptance.from_arrays` reads them).
    ``match`` and ``confidence`` are required; the others are stored where every row has them
    (rows of `offline_metrics` do)."""
    lengths = torch.tensor([len(r["match"]) for r in rows], dtype=torch.long)
    width = int(lengths.max()) if len(rows) else 0
    kinds = {
        "match": torch.bool,
        "confidence": torch.float16,
        "top_probs": torch.float16,
        "rank": torch.int8,
        "target_logits": torch.float16,
        "draft_rank": torch.int8,
    }
    out = {
        key: padded([torch.tensor(r[key], dtype=dtype) for r in rows], width, dtype)
        for key, dtype in kinds.items()
        if key in ("match", "confidence") or all(key in r for r in rows)
    }
    return {**out, "lengths": lengths}


def padded(rows: Sequence[Tensor], width: int, dtype: torch.dtype) -> Tensor:
    """Rows of different lengths (each ``(n_i, ...)``) as one ``(S, width, ...)`` tensor,
    padded with -1 for integer types (no rank, no run) and 0 (False) otherwise."""
    integer = not dtype.is_floating_point and dtype != torch.bool
    shape = (len(rows), width, *(rows[0].shape[1:] if rows else ()))
    out = torch.full(shape, -1 if integer else 0, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out
