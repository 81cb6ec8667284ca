"""Adapter training loss (docs/design.md §9): position-weighted cosine, optional MSE and token CE.

Every term is a weighted mean over valid positions, ``Σ_bt w_t m_bt x_bt / Σ_bt w_t m_bt``, with
``w_t = exp(-decay · t)`` for answer position ``t``. Greedy speculative decoding accepts drafts up
to the first miss, so a miss at position t costs every later draft of the round; geometric decay
mirrors the chance that position t is reached at all and spends the adapter's capacity where
acceptance is decided.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torchmetrics import Metric


def position_weights(length: int, decay: float, device: torch.device | None = None) -> Tensor:
    """Weights ``exp(-decay · t)`` for ``t = 0 .. length - 1`` as a (length,) float32 tensor.

    Raises:
        ValueError: a negative ``decay`` (weights growing with position).
    """
    if decay < 0:
        raise ValueError(f"loss.decay must be >= 0, got {decay}")
    return torch.exp(-decay * torch.arange(length, dtype=torch.float32, device=device))


def weighted_mean(values: Tensor, weights: Tensor, mask: Tensor) -> Tensor:
    """``Σ w_t m_bt v_bt / Σ w_t m_bt`` of (B, T) ``values``; 0 (still differentiable) if nothing
    is valid, so an all-padding batch contributes no gradient instead of NaN. Values at padded
    positions are ignored even when they are NaN."""
    w = weights[None, :] * mask  # (B, T)
    total = (values.masked_fill(~mask, 0.0) * w).sum()
    return total / w.sum().clamp(min=torch.finfo(w.dtype).tiny)


def cosine_loss(pred: Tensor, target: Tensor, mask: Tensor, weights: Tensor) -> Tensor:
    """Position-weighted ``1 − cos(pred_t, target_t)`` over valid positions.

    Args:
        pred: (B, T, D) adapter output.
        target: (B, T, D) target states.
        mask: (B, T) bool, True = valid.
        weights: (T,) position weights.
    """
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1)  # (B, T)
    return weighted_mean(1.0 - cos, weights, mask)


def mse_loss(pred: Tensor, target: Tensor, mask: Tensor, weights: Tensor) -> Tensor:
    """Position-weighted mean squared error (mean over the hidden dim), same args as
    :func:`cosine_loss`."""
    per_position = (pred.float() - target.float()).square().mean(dim=-1)  # (B, T)
    return weighted_mean(per_position, weights, mask)


def token_ce_loss(
    pred: Tensor, lm_head_weight: Tensor, tokens: Tensor, mask: Tensor, weights: Tensor
) -> Tensor:
    """Position-weighted cross-entropy of ``pred @ lm_head_weight.T`` against the answer tokens.

    Args:
        pred: (B, T, D) adapter output.
        lm_head_weight: (V', D) frozen target ``lm_head`` rows that may be drafted (ids >=
            ``vocab_limit`` already sliced off, so they get no probability mass).
        tokens: (B, T) int64 answer ids ``y``, all ``< V'`` at valid positions.
        mask: (B, T) bool.
        weights: (T,) position weights.
    """
    logits = pred.float() @ lm_head_weight.T  # (B, T, V')
    # Padded positions may hold any id; 0 keeps cross_entropy in range, the mask drops them.
    targets = tokens.masked_fill(~mask, 0)
    ce = F.cross_entropy(
        rearrange(logits, "b t v -> (b t) v"), rearrange(targets, "b t -> (b t)"), reduction="none"
    )
    return weighted_mean(rearrange(ce, "(b t) -> b t", b=tokens.shape[0]), weights, mask)


class AlignmentLoss(nn.Module):
    """Weighted sum of the loss terms for the adapter's heads.

    ``align`` (same-position) output k is trained towards ``h_target[k]`` and ``tokens[k]``; an
    optional ``next`` output (L5) k towards ``h_target[k + 1]`` and ``tokens[k + 1]``, with the
    position weights of the target position ``k + 1``, scaled by ``next_weight``.

    Args:
        decay: position-weight decay (0 = uniform).
        cos_weight: weight of ``1 − cos``.
        mse_weight: weight of the MSE (0 = not computed).
        ce_weight: weight of the token cross-entropy through the ``lm_head`` (0 = not computed).
        next_weight: weight of the ``next`` head's terms relative to ``align``'s.
    """

    def __init__(
        self,
        decay: float = 0.0,
        cos_weight: float = 1.0,
        mse_weight: float = 0.0,
        ce_weight: float = 0.0,
        next_weight: float = 1.0,
    ):
        super().__init__()
        position_weights(1, decay)  # validates decay
        for name, value in (
            ("cos_weight", cos_weight),
            ("mse_weight", mse_weight),
            ("ce_weight", ce_weight),
            ("next_weight", next_weight),
        ):
            if value < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {value}")
        if cos_weight == mse_weight == ce_weight == 0:
            raise ValueError(
                "loss: cos_weight, mse_weight and ce_weight are all 0; nothing to train"
            )
        self.decay = decay
        self.cos_weight = cos_weight
        self.mse_weight = mse_weight
        self.ce_weight = ce_weight
        self.next_weight = next_weight

    @property
    def needs_lm_head(self) -> bool:
        """Whether :meth:`forward` needs the target ``lm_head`` weight."""
        return self.ce_weight > 0

    def forward(
        self,
        heads: dict[str, Tensor],
        target: Tensor,
        tokens: Tensor,
        mask: Tensor,
        lm_head_weight: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Loss terms of one batch.

        Args:
            heads: ``{"align": (B, T, D)}`` plus optionally ``"next": (B, T, D)``.
            target: (B, T, D) target states.
            tokens: (B, T) answer ids.
            mask: (B, T) bool.
            lm_head_weight: (V', D) frozen ``lm_head``; needed iff ``ce_weight > 0``.

        Returns:
            ``loss`` (the total to minimise) and the unweighted terms that were computed: ``cos``
            (mean ``1 − cos``), ``mse``, ``ce``, and ``next_cos``/``next_mse``/``next_ce`` with a
            ``next`` head.
        """
        if self.needs_lm_head and lm_head_weight is None:
            raise ValueError("loss.ce_weight > 0 needs the target lm_head weight")
        weights = position_weights(target.shape[1], self.decay, target.device)  # (T,)
        terms = self._terms(heads["align"], target, tokens, mask, weights, lm_head_weight)
        total = self._total(terms)
        if "next" in heads:
            # Output k of the next head predicts position k + 1: drop its last output and the
            # first target, and weight by the target position.
            nxt = self._terms(
                heads["next"][:, :-1],
                target[:, 1:],
                tokens[:, 1:],
                mask[:, 1:],
                weights[1:],
                lm_head_weight,
            )
            total = total + self.next_weight * self._total(nxt)
            terms |= {f"next_{name}": value for name, value in nxt.items()}
        return {"loss": total, **terms}

    def term_weights(self, terms: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        """``Σ_bt w_t m_bt`` of each term of :meth:`forward`'s output: what its mean divides by.

        Args:
            terms: :meth:`forward`'s output (its names say which terms and heads there are).
            mask: (B, T) bool mask of the batch.
        """
        weights = position_weights(mask.shape[1], self.decay, mask.device)  # (T,)
        align = (weights[None, :] * mask).sum()
        nxt = (weights[None, 1:] * mask[:, 1:]).sum()
        return {
            name: nxt if name.startswith("next_") else align for name in terms if name != "loss"
        }

    def combine(self, means: dict[str, Tensor]) -> Tensor:
        """The total loss from term means, weighted as :meth:`forward` weights them."""
        align = {k: v for k, v in means.items() if not k.startswith("next_")}
        nxt = {k[len("next_") :]: v for k, v in means.items() if k.startswith("next_")}
        total = self._total(align)
        return total + self.next_weight * self._total(nxt) if nxt else total

    def _terms(
        self,
        pred: Tensor,
        target: Tensor,
        tokens: Tensor,
        mask: Tensor,
        weights: Tensor,
        lm_head_weight: Tensor | None,
    ) -> dict[str, Tensor]:
        terms = {}
        if self.cos_weight > 0:
            terms["cos"] = cosine_loss(pred, target, mask, weights)
        if self.mse_weight > 0:
            terms["mse"] = mse_loss(pred, target, mask, weights)
        if self.ce_weight > 0:
            terms["ce"] = token_ce_loss(pred, lm_head_weight, tokens, mask, weights)
        return terms

    def _total(self, terms: dict[str, Tensor]) -> Tensor:
        scale = {"cos": self.cos_weight, "mse": self.mse_weight, "ce": self.ce_weight}
        return sum(scale[name] * value for name, value in terms.items())


class SplitLoss(Metric):
    """An :class:`AlignmentLoss` over a whole split: each term's ``Σ w m x / Σ w m`` summed over
    all batches before dividing, then combined as the loss combines them.

    A mean of per-batch losses depends on how samples are batched, which differs between one
    process and several (each rank batches its own share); these sums do not, and sum-reduce
    across ranks exactly like the alignment metrics.

    Args:
        loss: the loss whose terms are accumulated.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    TERMS = ("cos", "mse", "ce", "next_cos", "next_mse", "next_ce")

    def __init__(self, loss: AlignmentLoss, **kwargs) -> None:
        super().__init__(**kwargs)
        self.loss = loss
        for name in ("num", "den"):
            zeros = torch.zeros(len(self.TERMS), dtype=torch.float64)
            self.add_state(name, default=zeros, dist_reduce_fx="sum")

    def update(self, terms: dict[str, Tensor], mask: Tensor) -> None:
        """Add one batch: :meth:`AlignmentLoss.forward`'s ``terms`` and the batch's (B, T) mask."""
        for name, den in self.loss.term_weights(terms, mask).items():
            k = self.TERMS.index(name)
            den = den.detach().double()
            self.num[k] += terms[name].detach().double() * den
            self.den[k] += den

    def compute(self) -> Tensor:
        """The split's loss (float32); terms without valid positions count 0, as in a batch."""
        means = {
            name: self.num[k] / self.den[k] if self.den[k] > 0 else self.num[k]
            for k, name in enumerate(self.TERMS)
        }
        return self.loss.combine(means).float()
