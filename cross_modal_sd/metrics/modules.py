"""torchmetrics wrappers around :mod:`cross_modal_sd.metrics.functional`.

Every state is a count or a sum reduced with ``dist_reduce_fx="sum"``, so merging ranks (DDP) or
batches is exact: a metric updated batch by batch equals the functional value on all the data.
Cosine moments are float64 so the std survives cos ≈ 1; keep these modules out of a
``module.to(torch.bfloat16)`` conversion (``*-true`` precision), which would cast those sums.
"""

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from cross_modal_sd.metrics.functional import (
    accepted_length_histogram,
    cos_moments,
    cosine,
    draft_tokens,
    leading_run,
    mean_std,
    nan_ratio,
    num_samples,
    position_counts,
)

DEFAULT_TAUS = (0.80, 0.85, 0.90, 0.95)


class _SumMetric(Metric):
    """Metric whose states are all zero-initialised sums."""

    is_differentiable = False
    full_state_update = False

    def _add_sum(self, name: str, shape: tuple[int, ...] = (), dtype=torch.long) -> None:
        self.add_state(name, default=torch.zeros(shape, dtype=dtype), dist_reduce_fx="sum")


class CosineStats(_SumMetric):
    """Mean and population std of the cosine over valid positions.

    ``update(cos, mask)`` takes the (B, T) cosine from :func:`~.functional.cosine` and the (B, T)
    mask; ``compute()`` returns ``{"cos_sim", "cos_sim_std"}`` (NaN before any valid position).
    """

    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._add_sum("cos_sum", dtype=torch.float64)
        self._add_sum("cos_sq_sum", dtype=torch.float64)
        self._add_sum("count")

    def update(self, cos: Tensor, mask: Tensor) -> None:
        total, sq_total, count = cos_moments(cos, mask)
        self.cos_sum += total
        self.cos_sq_sum += sq_total
        self.count += count

    def compute(self) -> dict[str, Tensor]:
        mean, std = mean_std(self.cos_sum, self.cos_sq_sum, self.count)
        return {"cos_sim": mean.float(), "cos_sim_std": std.float()}


class ThresholdAcceptance(_SumMetric):
    """``accept@τ`` and ``consecutive@τ`` for several thresholds at once.

    ``update(cos, mask)`` as :class:`CosineStats`; ``compute()`` returns ``accept@0.80``,
    ``consecutive@0.80``, ... with τ formatted to two decimals.
    """

    higher_is_better = True

    def __init__(self, taus: Sequence[float] = DEFAULT_TAUS, **kwargs) -> None:
        super().__init__(**kwargs)
        if not taus:
            raise ValueError("taus must name at least one threshold")
        self.taus = tuple(float(t) for t in taus)
        self._add_sum("hit_count", (len(self.taus),))
        self._add_sum("run_sum", (len(self.taus),))
        self._add_sum("position_count")
        self._add_sum("sample_count")

    def update(self, cos: Tensor, mask: Tensor) -> None:
        # float32 on both sides, as in functional.accept_at, so cos == τ compares equal.
        taus = torch.tensor(self.taus, dtype=torch.float32, device=cos.device)
        hits = cos.float()[..., None] >= taus  # (B, T, K)
        self.hit_count += (hits & mask[..., None]).sum(dim=(0, 1))
        self.run_sum += leading_run(hits, mask).sum(dim=0)
        self.position_count += mask.sum()
        self.sample_count += num_samples(mask)

    def compute(self) -> dict[str, Tensor]:
        accept = nan_ratio(self.hit_count, self.position_count).float()
        consecutive = nan_ratio(self.run_sum, self.sample_count).float()
        out = {f"accept@{tau:.2f}": accept[i] for i, tau in enumerate(self.taus)}
        out |= {f"consecutive@{tau:.2f}": consecutive[i] for i, tau in enumerate(self.taus)}
        return out


class TokenMatch(_SumMetric):
    """Share of valid positions whose draft token equals the answer token.

    ``update(pred_tokens, tokens, mask)`` with (B, T) ids and mask; ``compute()`` a 0-dim tensor.
    """

    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._add_sum("match_count")
        self._add_sum("position_count")

    def update(self, pred_tokens: Tensor, tokens: Tensor, mask: Tensor) -> None:
        self.match_count += ((pred_tokens == tokens) & mask).sum()
        self.position_count += mask.sum()

    def compute(self) -> Tensor:
        return nan_ratio(self.match_count, self.position_count).float()


class TokenAcceptLength(_SumMetric):
    """Mean leading run of token matches per sample (= first-round accepted drafts).

    ``update(pred_tokens, tokens, mask)``; ``compute()`` a 0-dim tensor.
    """

    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._add_sum("run_sum")
        self._add_sum("sample_count")

    def update(self, pred_tokens: Tensor, tokens: Tensor, mask: Tensor) -> None:
        self.run_sum += leading_run(pred_tokens == tokens, mask).sum()
        self.sample_count += num_samples(mask)

    def compute(self) -> Tensor:
        return nan_ratio(self.run_sum, self.sample_count).float()


class PositionAcceptance(_SumMetric):
    """First-round acceptance rate by position, see :func:`~.functional.position_acceptance`.

    ``update(hits, mask)`` with (B, T) bool hits; ``compute()`` a (max_len,) float tensor, NaN at
    positions no sample reached.
    """

    higher_is_better = True

    def __init__(self, max_len: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.max_len = max_len
        self._add_sum("accepted", (max_len,))
        self._add_sum("present", (max_len,))

    def update(self, hits: Tensor, mask: Tensor) -> None:
        accepted, present = position_counts(hits, mask, self.max_len)
        self.accepted += accepted
        self.present += present

    def compute(self) -> Tensor:
        return nan_ratio(self.accepted, self.present).float()


class AcceptedLengthHistogram(_SumMetric):
    """Counts of samples by leading-run length, runs ``>= max_len`` in the last bin.

    ``update(hits, mask)``; ``compute()`` a (max_len + 1,) int64 tensor.
    """

    def __init__(self, max_len: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.max_len = max_len
        self._add_sum("counts", (max_len + 1,))

    def update(self, hits: Tensor, mask: Tensor) -> None:
        self.counts += accepted_length_histogram(hits, mask, self.max_len)

    def compute(self) -> Tensor:
        return self.counts.clone()


class AlignmentMetrics(nn.Module):
    """All alignment metrics fed from one ``update(pred, target, tokens, mask)``.

    A plain module holding the metrics as children, so ``.to(device)`` moves states and the
    ``lm_head`` weight together, and each child syncs across ranks in its own ``compute()``.

    Args:
        lm_head_weight: (V, D_out) target ``lm_head`` weight, or None to skip the token metrics.
            Kept as a non-persistent float32 buffer: not trained, not saved in checkpoints.
        taus: cosine thresholds for ``accept@τ`` / ``consecutive@τ``.
        max_len: positions covered by the acceptance curve and histogram.
        vocab_limit: ids ``>= vocab_limit`` are never drafted (32000 for the real models).
    """

    def __init__(
        self,
        lm_head_weight: Tensor | None = None,
        taus: Sequence[float] = DEFAULT_TAUS,
        max_len: int = 32,
        vocab_limit: int | None = None,
    ) -> None:
        super().__init__()
        self.cosine = CosineStats()
        self.thresholds = ThresholdAcceptance(taus)
        self.token_match = TokenMatch()
        self.token_accept_len = TokenAcceptLength()
        self.position_acceptance = PositionAcceptance(max_len)
        self.accepted_length_hist = AcceptedLengthHistogram(max_len)
        if lm_head_weight is not None:
            if vocab_limit is not None and not 0 < vocab_limit <= lm_head_weight.shape[0]:
                raise ValueError(
                    f"vocab_limit must be in [1, {lm_head_weight.shape[0]}], got {vocab_limit}"
                )
            # Slice and cast once here instead of on every update.
            lm_head_weight = lm_head_weight.detach()[:vocab_limit].float()  # (V', D_out)
        self.register_buffer("lm_head_weight", lm_head_weight, persistent=False)

    def update(self, pred: Tensor, target: Tensor, tokens: Tensor | None, mask: Tensor) -> None:
        """Accumulate one batch.

        Args:
            pred: (B, T, D_out) adapter output.
            target: (B, T, D_out) true target states.
            tokens: (B, T) answer ids ``y``; may be None only without an ``lm_head``.
            mask: (B, T) bool prefix mask.
        """
        cos = cosine(pred, target, mask)  # (B, T)
        self.cosine.update(cos, mask)
        self.thresholds.update(cos, mask)
        if self.lm_head_weight is None:
            return
        if tokens is None:
            raise ValueError("tokens are required when AlignmentMetrics has an lm_head_weight")
        pred_tokens = draft_tokens(pred, self.lm_head_weight)  # (B, T)
        hits = pred_tokens == tokens  # (B, T)
        self.token_match.update(pred_tokens, tokens, mask)
        self.token_accept_len.update(pred_tokens, tokens, mask)
        self.position_acceptance.update(hits, mask)
        self.accepted_length_hist.update(hits, mask)

    def compute(self) -> dict[str, Tensor]:
        """Scalar metrics: ``cos_sim``, ``cos_sim_std``, ``accept@τ``, ``consecutive@τ`` and, with
        an ``lm_head``, ``token_match`` and ``token_accept_len`` (0-dim tensors, unprefixed)."""
        out = self.cosine.compute() | self.thresholds.compute()
        if self.lm_head_weight is not None:
            out["token_match"] = self.token_match.compute()
            out["token_accept_len"] = self.token_accept_len.compute()
        return out

    def compute_curves(self) -> dict[str, Tensor]:
        """Non-scalar metrics: ``position_acceptance`` (max_len,) and ``accepted_length_hist``
        (max_len + 1,); empty without an ``lm_head``."""
        if self.lm_head_weight is None:
            return {}
        return {
            "position_acceptance": self.position_acceptance.compute(),
            "accepted_length_hist": self.accepted_length_hist.compute(),
        }

    def _metrics(self) -> dict[str, Metric]:
        return {name: m for name, m in self.named_children() if isinstance(m, Metric)}

    def reset(self) -> None:
        """Clear all accumulated states (call after each epoch's ``compute``)."""
        for metric in self._metrics().values():
            metric.reset()

    def merge_state(self, other: "AlignmentMetrics") -> None:
        """Add another instance's states into this one (what a DDP sum-reduce does)."""
        theirs = other._metrics()
        for name, metric in self._metrics().items():
            metric.merge_state(theirs[name])
