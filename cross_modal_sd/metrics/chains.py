"""How a feature-level draft head is used: chains of drafts that feed on the head's own output.

A head round at committed answer length ``L + 1`` reads the true pairs ``0..L`` and drafts
``y_{L+1}``, then feeds itself its own estimate and draft for the next one, and so on. The leading
run of drafts equal to the answer is what the target accepts (teacher forcing makes the true pairs
exactly what decoding gives the head after a verification). Validation, exports and the speedup
model all read these runs, not the teacher-forced next-token accuracy alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cross_modal_sd.metrics.functional import rank_of, top_logits
from cross_modal_sd.metrics.offline import TARGET_TOP


@torch.inference_mode()
def chain_runs(
    head,
    h: Tensor,
    tokens: Tensor,
    mask: Tensor,
    lm_head_weight: Tensor,
    vocab_limit: int | None = None,
    k: int = 8,
) -> tuple[Tensor, Tensor]:
    """Accepted drafts of the head's self-fed chain of up to ``k`` drafts from every pair.

    Args:
        head: a `FeatureHead` (anything whose ``head(h, None, tokens)`` gives output per pair).
        h: (B, T, D) target states ``σ_{i-1}`` (a cache's ``h_target``).
        tokens: (B, T) answer tokens.
        mask: (B, T) bool prefix mask.
        lm_head_weight: (V, D) the target's ``lm_head``.
        vocab_limit: ids at or above it are never drafted.
        k: longest chain.

    Returns:
        ``runs`` and ``miss_rank``, (B, T) int64 each: ``runs[b, L]`` is the leading run of
        drafts for ``y_{L+1} ..`` equal to the answer, -1 where the answer has no token after
        ``L``; ``miss_rank[b, L]`` is where the chain's first wrong draft stands among the
        target's `TARGET_TOP` largest logits there (-1: not among them, or no wrong draft
        within ``k``), what sampling at T > 0 may still accept.
    """
    b, t, _ = h.shape
    lengths = mask.sum(dim=1)  # (B,)
    weight = lm_head_weight[:vocab_limit].to(h.device).float()  # (V', D)
    runs = torch.full((b, t), -1, dtype=torch.long, device=h.device)
    miss_rank = torch.full((b, t), -1, dtype=torch.long, device=h.device)
    _, target_ids = top_logits(h, lm_head_weight, TARGET_TOP, vocab_limit)  # (B, T, M)
    dtype = next(head.parameters()).dtype
    for start in range(t - 1):
        rows = (lengths > start + 1).nonzero().squeeze(1)  # answers with a token after `start`
        if rows.numel() == 0:
            break
        feats, toks = h[rows, : start + 1].to(dtype), tokens[rows, : start + 1]
        run = torch.zeros(rows.numel(), dtype=torch.long, device=h.device)
        alive = torch.ones(rows.numel(), dtype=torch.bool, device=h.device)
        for j in range(k):
            pos = start + 1 + j
            if pos >= t:
                break
            out = head(feats, None, toks)[:, -1]  # (R, D): the estimate of σ at start + j
            draft = (out.float() @ weight.T).argmax(dim=-1)  # (R,)
            present = pos < lengths[rows]
            missed = alive & present & (draft != tokens[rows, pos])
            ranks = rank_of(target_ids[rows, pos][:, None], draft[:, None])[:, 0]
            miss_rank[rows[missed], start] = ranks[missed]
            alive &= present & (draft == tokens[rows, pos])
            run += alive
            if not alive.any():
                break
            feats = torch.cat([feats, out[:, None]], dim=1)
            toks = torch.cat([toks, draft[:, None]], dim=1)
        runs[rows, start] = run
    return runs, miss_rank


@torch.inference_mode()
def chain_arrays(
    head,
    cache,
    indices,
    lm_head_weight: Tensor,
    vocab_limit: int | None = None,
    k: int = 8,
    batch_size: int = 64,
) -> dict[str, Tensor]:
    """`chain_runs` of cache samples as an export stores them: ``runs`` (S, T) int16 (-1 past
    each answer's end), ``miss_rank`` (S, T) int8, ``lengths`` (S,) and ``k``."""
    from torch.utils.data import DataLoader

    from cross_modal_sd.data.dataset import HiddenPairDataset, collate_pairs

    loader = DataLoader(
        HiddenPairDataset(cache, indices), batch_size=batch_size, collate_fn=collate_pairs
    )
    rows, misses, lengths = [], [], []
    for batch in loader:
        runs, miss_rank = chain_runs(
            head, batch["h_target"], batch["tokens"], batch["mask"], lm_head_weight, vocab_limit, k
        )
        rows += list(runs)
        misses += list(miss_rank)
        lengths += batch["mask"].sum(dim=1).tolist()
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), -1, dtype=torch.int16)
    miss = torch.full((len(rows), width), -1, dtype=torch.int8)
    for i, (r, m) in enumerate(zip(rows, misses, strict=True)):
        out[i, : len(r)] = r
        miss[i, : len(m)] = m
    return {"runs": out, "miss_rank": miss, "lengths": torch.tensor(lengths), "k": torch.tensor(k)}
