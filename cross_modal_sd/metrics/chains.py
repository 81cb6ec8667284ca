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
from cross_modal_sd.metrics.offline import TARGET_TOP, padded


@torch.inference_mode()
def chain_runs(
    head,
    h: Tensor,
    tokens: Tensor,
    mask: Tensor,
    lm_head_weight: Tensor,
    vocab_limit: int | None = None,
    k: int = 8,
    tree_k: int = 0,
) -> dict[str, Tensor]:
    """Accepted drafts of the head's self-fed chain of up to ``k`` drafts from every pair.

    Args:
        head: a `FeatureHead` (anything whose ``head(h, None, tokens)`` gives output per pair).
        h: (B, T, D) target states ``σ_{i-1}`` (a cache's ``h_target``).
        tokens: (B, T) answer tokens.
        mask: (B, T) bool prefix mask.
        lm_head_weight: (V, D) the target's ``lm_head``.
        vocab_limit: ids at or above it are never drafted.
        k: longest chain.
        tree_k: > 0: also score the head's draft trees: its top ``tree_k`` at every depth of
            the chain that reads the answer's tokens and its own estimates (a tree's path of
            right tokens), for as long as the answer's token is among them.

    Returns:
        ``runs`` and ``miss_rank``, (B, T) int64 each: ``runs[b, L]`` is the leading run of
        drafts for ``y_{L+1} ..`` equal to the answer, -1 where the answer has no token after
        ``L``; ``miss_rank[b, L]`` is where the chain's first wrong draft stands among the
        target's `TARGET_TOP` largest logits there (-1: not among them, or no wrong draft
        within ``k``), what sampling at T > 0 may still accept. With ``tree_k``: ``tree_top``
        (B, T, k, tree_k) the head's largest probabilities at depth j of the chain from ``L``
        and ``tree_rank`` (B, T, k) the answer's token among them (-1: not, or past the end).
    """
    b, t, _ = h.shape
    lengths = mask.sum(dim=1)  # (B,)
    weight = lm_head_weight[:vocab_limit].to(h.device).float()  # (V', D)
    runs = torch.full((b, t), -1, dtype=torch.long, device=h.device)
    miss_rank = torch.full((b, t), -1, dtype=torch.long, device=h.device)
    tree_top = torch.zeros((b, t, k, tree_k), device=h.device)
    tree_rank = torch.full((b, t, k), -1, dtype=torch.long, device=h.device)
    _, target_ids = top_logits(h, lm_head_weight, TARGET_TOP, vocab_limit)  # (B, T, M)
    dtype = next(head.parameters()).dtype
    for start in range(t - 1):
        rows = (lengths > start + 1).nonzero().squeeze(1)  # answers with a token after `start`
        if rows.numel() == 0:
            break
        feats, toks = h[rows, : start + 1].to(dtype), tokens[rows, : start + 1]
        run = torch.zeros(rows.numel(), dtype=torch.long, device=h.device)
        alive = torch.ones(rows.numel(), dtype=torch.bool, device=h.device)
        in_tree = torch.full_like(alive, tree_k > 0)  # the answer's path is still in the tree
        for j in range(k):
            pos = start + 1 + j
            if pos >= t:
                break
            out = head(feats, None, toks)[:, -1]  # (R, D): the estimate of σ at start + j
            logits = out.float() @ weight.T  # (R, V')
            draft = logits.argmax(dim=-1)  # (R,)
            present = pos < lengths[rows]
            right = tokens[rows, pos]
            missed = alive & present & (draft != right)
            ranks = rank_of(target_ids[rows, pos][:, None], draft[:, None])[:, 0]
            miss_rank[rows[missed], start] = ranks[missed]
            alive &= present & (draft == right)
            run += alive
            if tree_k:
                best = logits.softmax(dim=-1).topk(min(tree_k, logits.shape[-1]), dim=-1)
                tree_top[rows, start, j, : best.values.shape[-1]] = best.values
                rank = rank_of(best.indices[:, None], right[:, None])[:, 0]
                tree_rank[rows, start, j] = torch.where(in_tree & present, rank, -1)
                in_tree &= present & (rank >= 0)
            if not (alive | in_tree).any():
                break
            # The answer's token: the draft while the chain is right, a tree's right branch after.
            feats = torch.cat([feats, out[:, None]], dim=1)
            toks = torch.cat([toks, torch.where(present, right, draft)[:, None]], dim=1)
        runs[rows, start] = run
    out = {"runs": runs, "miss_rank": miss_rank}
    if tree_k:
        out |= {"tree_top": tree_top, "tree_rank": tree_rank}
    return out


@torch.inference_mode()
def chain_arrays(
    head,
    cache,
    indices,
    lm_head_weight: Tensor,
    vocab_limit: int | None = None,
    k: int = 8,
    batch_size: int = 64,
    tree_k: int = 0,
) -> dict[str, Tensor]:
    """`chain_runs` of cache samples as an export stores them: ``runs`` (S, T) int16 (-1 past
    each answer's end), ``miss_rank`` (S, T) int8, with ``tree_k`` ``tree_top`` (S, T, k,
    tree_k) float16 and ``tree_rank`` (S, T, k) int8; ``lengths`` (S,) and ``k``."""
    from torch.utils.data import DataLoader

    from cross_modal_sd.data.dataset import HiddenPairDataset, collate_pairs

    loader = DataLoader(
        HiddenPairDataset(cache, indices), batch_size=batch_size, collate_fn=collate_pairs
    )
    parts: dict[str, list[Tensor]] = {}
    lengths: list[int] = []
    for batch in loader:
        scored = chain_runs(
            head,
            batch["h_target"],
            batch["tokens"],
            batch["mask"],
            lm_head_weight,
            vocab_limit,
            k,
            tree_k,
        )
        for key, value in scored.items():
            parts.setdefault(key, []).extend(value)
        lengths += batch["mask"].sum(dim=1).tolist()
    kinds = {"runs": torch.int16, "miss_rank": torch.int8, "tree_rank": torch.int8}
    width = max((len(r) for r in parts.get("runs", [])), default=0)
    out = {key: padded(rows, width, kinds.get(key, torch.float16)) for key, rows in parts.items()}
    return {**out, "lengths": torch.tensor(lengths), "k": torch.tensor(k)}
