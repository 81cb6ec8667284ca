"""Alignment metrics as plain functions on tensors (one definition; the modules reuse it).

Shapes: ``B`` samples, ``T`` answer positions, ``D`` hidden size, ``V`` vocabulary size.
``mask`` is a (B, T) bool tensor, True at valid positions; valid positions must form a prefix of
each row (answers are stored unpadded and right-padded per batch).

Conventions shared by every function and by :mod:`cross_modal_sd.metrics.modules`:

* Position-level shares (``accept_at``, ``token_match``) average over valid positions.
* Sample-level means (``consecutive_at``, ``token_accept_len``) and the histogram count *samples*:
  rows with at least one valid position. All-padding rows are ignored, not counted as zero runs.
* When there is nothing to average over (no valid position, no sample) the result is NaN, never a
  division warning or an exception.
* The leading run of a row is the number of consecutive hits from position 0, stopping at the
  first miss or the end of the valid prefix. With teacher-forced pairs, the leading run of token
  matches is the number of drafts greedy speculative decoding accepts in its first round.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

NAN = float("nan")


def _check_mask(mask: Tensor, shape: torch.Size, name: str) -> None:
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    if mask.shape != shape[:2] or mask.dim() != 2:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match the (B, T) of {name} {tuple(shape)}"
        )


def nan_ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` in float64, NaN where ``den == 0``."""
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), NAN)


def num_samples(mask: Tensor) -> Tensor:
    """Number of rows with at least one valid position (0-dim int64)."""
    return mask.any(dim=1).sum()


def cosine(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Per-position cosine similarity.

    Args:
        pred: (B, T, D) predicted target states, any float dtype.
        target: (B, T, D) true target states.
        mask: (B, T) bool, True at valid positions.

    Returns:
        (B, T) float32 cosine, 0 at masked-out positions. Computed in float32 so 16-bit inputs
        neither overflow the squared norms nor lose precision in the dot product.
    """
    if pred.shape != target.shape or pred.dim() != 3:
        raise ValueError(
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must share a (B, T, D) shape"
        )
    _check_mask(mask, pred.shape, "pred")
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1)  # (B, T)
    return cos.masked_fill(~mask, 0.0)


def cos_moments(cos: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sum, sum of squares (float64) and count (int64) of ``cos`` over valid positions."""
    _check_mask(mask, cos.shape, "cos")
    valid = cos.double().masked_fill(~mask, 0.0)  # (B, T)
    return valid.sum(), valid.square().sum(), mask.sum()


def mean_std(total: Tensor, sq_total: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and population std (ddof=0) from moments; NaN for ``count == 0``."""
    mean = nan_ratio(total, count)
    # Moments are float64, so E[x²] − E[x]² keeps ~1e-9 precision even for cos ≈ 1.
    var = (nan_ratio(sq_total, count) - mean.square()).clamp(min=0.0)
    return mean, var.sqrt()


def cos_sim_stats(pred: Tensor, target: Tensor, mask: Tensor) -> tuple[float, float]:
    """Mean and population std of the cosine over valid positions (NaN, NaN if none).

    Args:
        pred: (B, T, D) predicted target states.
        target: (B, T, D) true target states.
        mask: (B, T) bool.
    """
    mean, std = mean_std(*cos_moments(cosine(pred, target, mask), mask))
    return mean.item(), std.item()


def accept_at(cos: Tensor, mask: Tensor, tau: float) -> float:
    """Share of valid positions with ``cos >= tau`` (NaN if no valid position).

    Args:
        cos: (B, T) cosine, e.g. from :func:`cosine`. Compared in float32, like ``tau``, so a
            value equal to ``tau`` counts however it was produced.
        mask: (B, T) bool.
        tau: threshold.
    """
    _check_mask(mask, cos.shape, "cos")
    return nan_ratio(((cos.float() >= tau) & mask).sum(), mask.sum()).item()


def leading_run(hits: Tensor, mask: Tensor) -> Tensor:
    """Length of the leading run of True among valid positions, per row.

    Args:
        hits: (B, T) or (B, T, *K) bool; trailing dims are independent criteria (e.g. one per
            threshold), each with its own run.
        mask: (B, T) bool, valid positions forming a prefix of each row.

    Returns:
        (B,) or (B, *K) int64 run lengths; 0 for rows without valid positions.

    Raises:
        ValueError: if ``mask`` is not a prefix mask.
    """
    _check_mask(mask, hits.shape, "hits")
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("mask: valid positions must form a prefix of each row")
    valid = hits & mask.view(*mask.shape, *[1] * (hits.dim() - 2))  # (B, T, *K)
    # The running product stays 1 until the first miss, so its sum is the run length.
    return valid.long().cumprod(dim=1).sum(dim=1)


def _sample_mean(run: Tensor, mask: Tensor) -> float:
    return nan_ratio(run.sum(), num_samples(mask)).item()


def consecutive_at(cos: Tensor, mask: Tensor, tau: float) -> float:
    """Mean over samples of the leading run with ``cos >= tau`` (NaN if no sample).

    Args:
        cos: (B, T) cosine.
        mask: (B, T) bool prefix mask.
        tau: threshold.
    """
    return _sample_mean(leading_run(cos.float() >= tau, mask), mask)


def draft_tokens(pred: Tensor, lm_head_weight: Tensor, vocab_limit: int | None = None) -> Tensor:
    """Draft tokens ``argmax(pred @ W.T)`` through the target ``lm_head``.

    Logits are computed in float32: 16-bit logits over a 32k vocabulary tie often, which would make
    the draft depend on rounding. Ties are broken like ``torch.argmax``: the lowest id wins.

    Args:
        pred: (B, T, D) predicted target states.
        lm_head_weight: (V, D) target ``lm_head`` weight, on any device (moved to ``pred``'s).
        vocab_limit: if given, ids ``>= vocab_limit`` are never drafted (the real models mask the
            multimodal placeholder ids ``>= 32000``).

    Returns:
        (B, T) int64 token ids, also at padded positions (mask them downstream).
    """
    vocab, dim = lm_head_weight.shape
    if pred.shape[-1] != dim:
        raise ValueError(f"pred hidden size {pred.shape[-1]} != lm_head_weight in-features {dim}")
    if vocab_limit is not None and not 0 < vocab_limit <= vocab:
        raise ValueError(f"vocab_limit must be in [1, {vocab}], got {vocab_limit}")
    # Slicing the rows masks ids >= vocab_limit without materialising -inf logits.
    weight = lm_head_weight[:vocab_limit].to(device=pred.device, dtype=torch.float32)  # (V', D)
    return (pred.float() @ weight.T).argmax(dim=-1)  # (B, T)


def draft_top1(
    pred: Tensor, lm_head_weight: Tensor, vocab_limit: int | None = None
) -> tuple[Tensor, Tensor]:
    """`draft_tokens` and the drafter's top-1 probability (softmax over the allowed ids) at each
    position, what a confidence-stopped policy reads: ``((B, T) int64, (B, T) float32)``."""
    weight = lm_head_weight if vocab_limit is None else lm_head_weight[:vocab_limit]
    logits = pred.float() @ weight.to(pred.device).float().T  # (B, T, V')
    confidence, _ = logits.softmax(dim=-1).max(dim=-1)
    return draft_tokens(pred, lm_head_weight, vocab_limit), confidence


def top_logits(
    states: Tensor, lm_head_weight: Tensor, m: int, vocab_limit: int | None = None
) -> tuple[Tensor, Tensor]:
    """The ``m`` largest logits of ``lm_head(states)`` over the allowed ids, best first, and
    their ids: ``((B, T, m) float32, (B, T, m) int64)`` (fewer than ``m`` for a smaller
    vocabulary). For the target's states, what the speedup model samples from at T > 0."""
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    weight = lm_head_weight if vocab_limit is None else lm_head_weight[:vocab_limit]
    logits = states.float() @ weight.to(states.device).float().T  # (B, T, V')
    values, ids = logits.topk(min(m, logits.shape[-1]), dim=-1)
    return values, ids


def expected_run(
    target_states: Tensor,
    lm_head_weight: Tensor,
    drafts: Tensor,
    mask: Tensor,
    vocab_limit: int | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """(B,) expected leading run of accepted drafts when the target samples at ``temperature``
    (no top-k or top-p): draft i is accepted with the target's probability of it, ``a_i``, so
    the run's expectation is ``sum_k prod_{i<=k} a_i`` over the valid positions.

    Args:
        target_states: (B, T, D) the target's states whose ``lm_head`` gives each position's
            distribution (a cache's ``h_target``).
        lm_head_weight: (V, D) the target's ``lm_head``.
        drafts: (B, T) the drafter's tokens.
        mask: (B, T) bool prefix mask.
        vocab_limit: ids at or above it are never sampled.
        temperature: > 0.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    weight = lm_head_weight if vocab_limit is None else lm_head_weight[:vocab_limit]
    logits = target_states.float() @ weight.to(target_states.device).float().T
    p = (logits / temperature).softmax(dim=-1)  # (B, T, V')
    accept = p.gather(-1, drafts.unsqueeze(-1)).squeeze(-1) * mask  # (B, T)
    return accept.cumprod(dim=1).sum(dim=1)


def rank_of(ids: Tensor, tokens: Tensor) -> Tensor:
    """(B, T) int64: where each token stands in its row of ``ids`` (B, T, k): 0 for the first,
    -1 where it is not among them."""
    hit = ids == tokens.unsqueeze(-1)  # (B, T, k)
    return torch.where(hit.any(dim=-1), hit.int().argmax(dim=-1), -1)


def token_match(pred_tokens: Tensor, tokens: Tensor, mask: Tensor) -> float:
    """Share of valid positions where ``pred_tokens == tokens`` (NaN if no valid position).

    Args:
        pred_tokens: (B, T) draft token ids.
        tokens: (B, T) target answer ids ``y``.
        mask: (B, T) bool.
    """
    _check_mask(mask, tokens.shape, "tokens")
    return nan_ratio(((pred_tokens == tokens) & mask).sum(), mask.sum()).item()


def token_accept_len(pred_tokens: Tensor, tokens: Tensor, mask: Tensor) -> float:
    """Mean over samples of the leading run of token matches (NaN if no sample).

    This is the mean number of drafts accepted in the first round of greedy speculative decoding.

    Args:
        pred_tokens: (B, T) draft token ids.
        tokens: (B, T) target answer ids.
        mask: (B, T) bool prefix mask.
    """
    return _sample_mean(leading_run(pred_tokens == tokens, mask), mask)


def position_counts(hits: Tensor, mask: Tensor, max_len: int) -> tuple[Tensor, Tensor]:
    """Per position k < ``max_len``: (samples whose leading run > k, samples with position k).

    Both are (max_len,) int64; see :func:`position_acceptance`.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    run = leading_run(hits, mask)  # (B,)
    k = torch.arange(max_len, device=hits.device)  # (L,)
    accepted = (run[:, None] > k).sum(dim=0)  # (L,)
    present = (mask.sum(dim=1)[:, None] > k).sum(dim=0)  # (L,)
    return accepted, present


def position_acceptance(hits: Tensor, mask: Tensor, max_len: int) -> Tensor:
    """First-round acceptance rate by position.

    Args:
        hits: (B, T) bool, e.g. ``pred_tokens == tokens``.
        mask: (B, T) bool prefix mask.
        max_len: number of positions reported; positions ``>= max_len`` are ignored.

    Returns:
        (max_len,) float64: at k, among samples that have a valid position k, the share whose
        leading run is longer than k (position k accepted in the first round). NaN where no
        sample reaches position k.
    """
    return nan_ratio(*position_counts(hits, mask, max_len))


def accepted_length_histogram(hits: Tensor, mask: Tensor, max_len: int) -> Tensor:
    """Counts of samples by leading-run length.

    Args:
        hits: (B, T) bool.
        mask: (B, T) bool prefix mask.
        max_len: runs longer than this are counted in the last bin.

    Returns:
        (max_len + 1,) int64; bin n counts samples whose run is n (the last bin: >= max_len).
        All-padding rows are not samples and are not counted.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    run = leading_run(hits, mask)[mask.any(dim=1)]  # (B',)
    return torch.bincount(run.clamp(max=max_len), minlength=max_len + 1)
