"""Per-position bottleneck adapters (levels L1-L3) and the residual bottleneck block they stack."""

from __future__ import annotations

import torch
from torch import nn

from cross_modal_sd.adapters.base import Adapter, zero_padding

# alpha scales the residual branch; the branch's last layer starts at zero, so alpha = 1 keeps the
# block an exact identity at init while letting the up-projection receive gradient from step one
# (alpha = 0 together with a zero up-projection would leave both without gradient).
ALPHA_INIT = 1.0


class BottleneckBlock(nn.Module):
    """``y = P(x) + alpha * up(GELU(down(LN(x))))`` with ``up`` zero-initialised.

    ``P`` is the identity when ``in_dim == out_dim``. Otherwise it is a learnable bias-free
    ``Linear(in_dim, out_dim)`` with PyTorch's default init: draft and target spaces of different
    widths share no coordinates, so no identity-like map exists to start from.

    Args:
        in_dim: input width.
        out_dim: output width.
        bottleneck_dim: width of the down-projection.
        mid_norm: put a LayerNorm on the bottleneck (after ``down``, before GELU).
        dropout: dropout on the bottleneck activations.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        bottleneck_dim: int,
        mid_norm: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.skip = nn.Identity() if in_dim == out_dim else nn.Linear(in_dim, out_dim, bias=False)
        self.norm = nn.LayerNorm(in_dim)
        self.down = nn.Linear(in_dim, bottleneck_dim)
        self.mid_norm = nn.LayerNorm(bottleneck_dim) if mid_norm else nn.Identity()
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck_dim, out_dim)
        self.alpha = nn.Parameter(torch.tensor(ALPHA_INIT))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (..., in_dim) to (..., out_dim)."""
        branch = self.up(self.dropout(self.act(self.mid_norm(self.down(self.norm(x))))))
        return self.skip(x) + self.alpha * branch


class BottleneckAdapter(Adapter):
    """Stack of residual bottleneck blocks followed by a final LayerNorm (L1, L2, L3).

    The first block maps ``in_dim -> out_dim`` (see :class:`BottleneckBlock` for the residual
    projection), the others ``out_dim -> out_dim``. Every block is the identity at init, so the
    adapter starts as ``final_norm(h)`` (``final_norm(P(h))`` when the widths differ): the final
    LayerNorm is kept as the design prescribes and starts as plain standardisation (gain 1,
    bias 0), not as the identity.

    Args:
        in_dim: draft hidden width.
        out_dim: target hidden width.
        name: level label stored in :attr:`config` (e.g. ``"L1"``).
        num_blocks: number of stacked blocks.
        bottleneck_dim: bottleneck width of every block.
        mid_norm: LayerNorm on each block's bottleneck.
        dropout: dropout on the bottleneck activations.
    """

    is_sequence = False

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        name: str | None = None,
        num_blocks: int = 1,
        bottleneck_dim: int = 256,
        mid_norm: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__(
            in_dim,
            out_dim,
            name,
            dict(
                num_blocks=num_blocks,
                bottleneck_dim=bottleneck_dim,
                mid_norm=mid_norm,
                dropout=dropout,
            ),
        )
        if num_blocks < 1:
            raise ValueError(f"BottleneckAdapter: num_blocks must be >= 1, got {num_blocks}")
        self.blocks = nn.ModuleList(
            BottleneckBlock(
                in_dim if i == 0 else out_dim, out_dim, bottleneck_dim, mid_norm, dropout
            )
            for i in range(num_blocks)
        )
        self.final_norm = nn.LayerNorm(out_dim)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Map draft states to target states position by position.

        Args:
            h: draft hidden states (B, T, in_dim).
            mask: (B, T) bool, True = valid; outputs at padded positions are zero.

        Returns:
            (B, T, out_dim) aligned prediction of ``h_target``.
        """
        x = self._prepare_inputs(h, mask)
        for block in self.blocks:
            x = block(x)
        return zero_padding(self.final_norm(x), mask)
