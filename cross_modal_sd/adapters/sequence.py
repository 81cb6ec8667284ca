"""Causal sequence adapter (level L4) and the causal transformer layer it shares with L5.

In speculative decoding the adapter runs while the draft is still decoding: at answer position k
only draft states 0..k exist. Every layer here is therefore causal, and positions are counted from
the first answer position, so running on the prefix 0..k gives the same output at k as running on
the whole answer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from cross_modal_sd.adapters.base import Adapter, zero_padding

# Rotary base of the Llama family both models' decoders use; positions stay relative either way.
ROPE_BASE = 10_000.0


def apply_rotary(x: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (half-split layout) on (B, H, T, Dh), position t = index t.

    Draft states already encode absolute position, but attention over them only sees content;
    rotary phases give the adapter relative offsets without adding parameters or a maximum length.
    """
    seq_len, head_dim = x.shape[-2], x.shape[-1]
    half = head_dim // 2
    inv_freq = ROPE_BASE ** (
        -torch.arange(half, device=x.device, dtype=torch.float32) / half
    )  # (Dh/2,)
    angles = torch.arange(seq_len, device=x.device, dtype=torch.float32)[:, None] * inv_freq
    cos, sin = angles.cos(), angles.sin()  # (T, Dh/2)
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.to(x.dtype)


def causal_attention_mask(mask: torch.Tensor) -> torch.Tensor:
    """Boolean SDPA mask (B, 1, T, T), True = may attend: causal and key valid.

    The diagonal is always allowed so that a padded query (or an all-padding row) still has one
    key; otherwise softmax over an empty set gives NaN, which would leak into gradients even though
    padded outputs are zeroed afterwards. Valid queries are unaffected because their own key is
    valid anyway.
    """
    seq_len = mask.shape[1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=mask.device).tril()  # (T, T)
    allowed = causal & mask[:, None, :]  # (B, T, T): query i, key j
    allowed = allowed | torch.eye(seq_len, dtype=torch.bool, device=mask.device)
    return allowed.unsqueeze(1)  # (B, 1, T, T)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with rotary positions and a zero-initialised output.

    Args:
        dim: model width (divisible by ``num_heads``, with an even head width).
        num_heads: attention heads.
        dropout: attention-probability dropout (training only).
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(
                f"CausalSelfAttention: dim {dim} must split into {num_heads} heads of even width"
            )
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        # Zero output: the layer's residual branch starts at zero, so the layer starts as identity.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T, dim) -> (B, T, dim); ``mask`` (B, T) bool or None (all valid)."""
        q, k, v = rearrange(
            self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.num_heads
        )  # each (B, H, T, Dh)
        q, k = apply_rotary(q), apply_rotary(k)
        dropout = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=causal_attention_mask(mask), dropout_p=dropout
            )
        return self.out(rearrange(y, "b h t d -> b t (h d)"))  # (B, T, dim)


class CausalTransformerLayer(nn.Module):
    """Pre-LN transformer layer: ``x + attn(LN(x))`` then ``x + FFN(LN(x))``, identity at init.

    Both residual branches end in a zero-initialised linear, so the layer is an exact identity at
    init (draft and target decoders descend from the same Vicuna-7B, so "target state = draft
    state" is the natural starting guess) and learns a correction from there.

    Args:
        dim: model width.
        num_heads: attention heads.
        ffn_dim: hidden width of the GELU feed-forward block.
        dropout: dropout on attention probabilities and FFN activations.
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, num_heads, dropout)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim)
        )
        nn.init.zeros_(self.ffn[-1].weight)
        nn.init.zeros_(self.ffn[-1].bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T, dim) -> (B, T, dim); ``mask`` (B, T) bool or None (all valid)."""
        x = x + self.attn(self.attn_norm(x), mask)
        return x + self.ffn(self.ffn_norm(x))


class CausalTransformerAdapter(Adapter):
    """L4: one causal pre-LN transformer layer over the draft states + an output projection.

    The layer runs at the draft width ``in_dim`` (no input projection: at 4096 the layer with
    8 heads and FFN 2048 plus a 4096x4096 output projection is already ~100.7M parameters).
    The output projection ``Linear(in_dim, out_dim)`` is initialised to the identity when the
    widths match (default init otherwise), so with the identity layer the adapter starts as
    ``h`` itself.

    Args:
        in_dim: draft hidden width.
        out_dim: target hidden width.
        name: level label stored in :attr:`config` (e.g. ``"L4"``).
        num_heads: attention heads.
        ffn_dim: feed-forward hidden width.
        dropout: dropout on attention probabilities and FFN activations.
    """

    is_sequence = True

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        name: str | None = None,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        dropout: float = 0.0,
    ):
        super().__init__(
            in_dim, out_dim, name, dict(num_heads=num_heads, ffn_dim=ffn_dim, dropout=dropout)
        )
        self.layer = CausalTransformerLayer(in_dim, num_heads, ffn_dim, dropout)
        self.out_proj = nn.Linear(in_dim, out_dim)
        if in_dim == out_dim:
            nn.init.eye_(self.out_proj.weight)
            nn.init.zeros_(self.out_proj.bias)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Causally map draft states to target states.

        Args:
            h: draft hidden states (B, T, in_dim).
            mask: (B, T) bool, True = valid; padded positions neither influence valid outputs
                nor carry output (they are zero).

        Returns:
            (B, T, out_dim); position k depends on ``h[:, :k+1]`` only.
        """
        h = self._prepare_inputs(h, mask)
        return zero_padding(self.out_proj(self.layer(h, mask)), mask)
