"""Common base of all adapters: constructor contract, plain-dict config, input checks."""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn


class Adapter(nn.Module):
    """Maps draft hidden states (B, T, in_dim) to the target's hidden space (B, T, out_dim).

    Every subclass is built as ``Cls(in_dim, out_dim, name=None, **hparams)`` and records those
    arguments in :attr:`config`, a plain dict (``_target_`` included) that rebuilds it through
    :func:`cross_modal_sd.adapters.build_adapter` without pickling any class.

    ``forward(h, mask)`` returns the same-position aligned prediction: output ``k`` estimates
    ``h_target[k]``. Where ``mask`` is False (padding) the output is zero, so padded rows never
    carry garbage into a loss.

    Attributes:
        is_sequence: True when outputs mix positions (always causally); False when each position is
            mapped on its own.
        head_names: names of the outputs returned by :meth:`forward_heads`.
    """

    is_sequence: ClassVar[bool] = False
    head_names: ClassVar[tuple[str, ...]] = ("align",)

    def __init__(self, in_dim: int, out_dim: int, name: str | None, hparams: dict[str, Any]):
        super().__init__()
        for field, value in (("in_dim", in_dim), ("out_dim", out_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"{type(self).__name__}: {field} must be a positive int, got {value!r}"
                )
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.name = name
        # The public import path, not the defining module, so a stored config keeps working when
        # classes move between files inside the package.
        package = type(self).__module__.rpartition(".")[0]
        self._config = {
            "_target_": f"{package}.{type(self).__name__}",
            "name": name,
            "in_dim": in_dim,
            "out_dim": out_dim,
            **hparams,
        }

    @property
    def config(self) -> dict[str, Any]:
        """Plain-dict constructor arguments incl. ``_target_``, ``in_dim`` and ``out_dim`` (a copy)."""
        return copy.deepcopy(self._config)

    @property
    def uses_tokens(self) -> bool:
        """Whether ``forward``/``forward_heads`` need the ``tokens`` argument."""
        return False

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameter elements (works on the meta device).

        Args:
            trainable_only: count only parameters with ``requires_grad``.
        """
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def forward_heads(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, Any]:
        """All training outputs by head name; single-head adapters return ``{"align": forward}``.

        Args:
            h: draft hidden states (B, T, in_dim).
            mask: (B, T) bool, True = valid position; None = all valid.

        Returns:
            ``{"align": (B, T, out_dim)}``.
        """
        return {"align": self(h, mask)}

    def _prepare_inputs(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Check shapes/dtypes (no device sync) and zero ``h`` at padded positions.

        Zeroing makes padding content irrelevant: even NaN/inf padding cannot reach valid outputs
        through attention (0 * NaN = NaN) or reach parameter gradients.

        Raises:
            ValueError: wrong shape of ``h`` or ``mask``, or a non-bool ``mask``.
        """
        cls = type(self).__name__
        if h.dim() != 3 or h.shape[-1] != self.in_dim:
            raise ValueError(
                f"{cls}: h must have shape (B, T, {self.in_dim}), got {tuple(h.shape)}"
            )
        if mask is None:
            return h
        if mask.dtype != torch.bool:
            raise ValueError(f"{cls}: mask must be torch.bool (True = valid), got {mask.dtype}")
        if mask.shape != h.shape[:2]:
            raise ValueError(
                f"{cls}: mask shape {tuple(mask.shape)} does not match h's (B, T) "
                f"= {tuple(h.shape[:2])}"
            )
        return zero_padding(h, mask)


def zero_padding(out: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Set outputs at padded positions (mask False) to zero; identity when mask is None."""
    if mask is None:
        return out
    return out.masked_fill(~mask.unsqueeze(-1), 0.0)
