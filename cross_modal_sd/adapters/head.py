"""A feature-level draft head: a decoder layer that reads the target's own hidden states.

EAGLE-style, for the decode phase (docs/design.md §11): with ``σ_i`` the target's final-layer
state at answer position ``i`` (``σ_{-1}`` the prompt's last) and ``y_i`` the answer's tokens,
input pair ``i`` is ``(σ_{i-1}, y_i)`` and output ``i`` estimates ``σ_i``, which the target's
frozen ``lm_head`` reads as the draft for ``y_{i+1}``. While drafting, the head feeds itself its
own estimate and its own draft, ``(σ̂_i, d_{i+1})``; after a verification the target's true states
replace them.

The head sees the answer only (``σ_{-1}`` carries the prompt into pair 0), so its cost does not
grow with the visual prompt. It keeps its own KV cache (`HeadCache`, preallocated: a rewind is a
length change) and is written with plain tensor ops, since on small models a decoder step is
framework overhead.

As an `Adapter` it trains and exports through the same registry and payload: ``in_dim`` =
``out_dim`` = the target's width, ``forward(h, mask, tokens)`` over a whole answer (output i for
pair i) as training needs it, `step` with a cache as decoding needs it; the two agree (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cross_modal_sd.adapters.base import Adapter, zero_padding


@dataclass
class HeadCache:
    """The head's keys and values: ``(layers, 2, heads, capacity, head_dim)``; the first
    ``length`` positions are valid. Derived once per cache from the weights, so that a step is
    few and cheap ops: ``tokens`` (V, D), each token's share of the fused input (its embedding
    through the fusion layer, bias included), read as a row; ``pack``, the weights of every
    linear layer transposed to ``(in, out)`` (a one-row matmul is about twice as fast that
    way on a CPU), the attention scale folded into the query's."""

    kv: Tensor
    tokens: Tensor
    pack: list[dict[str, Tensor]] = field(default_factory=list)
    length: int = 0

    def rewind(self, n_keep: int) -> None:
        """Forgets all but the first ``n_keep`` positions."""
        if not 0 <= n_keep <= self.length:
            raise ValueError(f"cannot rewind a head cache of {self.length} positions to {n_keep}")
        self.length = n_keep


class _Block(nn.Module):
    """Pre-norm causal self-attention and a SiLU MLP.

    With a cache the attention is written out (two matmuls and a softmax): for the one or few
    positions of a decoding step that is a few small ops, where the fused kernel's math path is
    many (and GELU's CPU kernel alone costs a sizeable share of a step at this width).
    """

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, mlp)
        self.down = nn.Linear(mlp, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (B, T, D), causally."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, H, T, Dh)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.silu(self.up(self.norm2(x))))

    @torch.no_grad()
    def pack(self) -> dict[str, Tensor]:
        """The linear layers' weights as `step` reads them (see `HeadCache`)."""
        d = self.proj.weight.shape[0]
        scale = (d // self.heads) ** -0.5
        qkv, bias = self.qkv.weight.t().clone(), self.qkv.bias.clone()
        qkv[:, :d] *= scale
        bias[:d] *= scale
        out = {"qkv": qkv, "qkv_bias": bias}
        for name in ("proj", "up", "down"):
            out[name] = getattr(self, name).weight.t().contiguous()
        return out

    def step(self, x: Tensor, pack: dict[str, Tensor], past: Tensor, start: int) -> Tensor:
        """``x`` (T, D) after ``start`` cached positions of ``past`` (2, H, capacity, Dh)."""
        t, d = x.shape
        y = F.layer_norm(x, (d,), self.norm1.weight, self.norm1.bias)
        qkv = torch.addmm(pack["qkv_bias"], y, pack["qkv"])  # (T, 3D), q pre-scaled
        q, k, v = qkv.view(t, 3, self.heads, d // self.heads).permute(1, 2, 0, 3)  # (H, T, Dh)
        past[0, :, start : start + t] = k
        past[1, :, start : start + t] = v
        scores = q @ past[0, :, : start + t].transpose(1, 2)  # (H, T, S)
        if t > 1:  # the new positions see the cache and, causally, each other
            mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(start)
            scores = scores.masked_fill(~mask, float("-inf"))
        att = scores.softmax(dim=-1) @ past[1, :, : start + t]  # (H, T, Dh)
        x = x + torch.addmm(self.proj.bias, att.transpose(0, 1).reshape(t, d), pack["proj"])
        y = F.layer_norm(x, (d,), self.norm2.weight, self.norm2.bias)
        hidden = F.silu(torch.addmm(self.up.bias, y, pack["up"]))
        return x + torch.addmm(self.down.bias, hidden, pack["down"])


class FeatureHead(Adapter):
    """One (or a few) decoder layers over ``(target state, token)`` pairs; see the module doc.

    Args:
        in_dim / out_dim: the target's hidden width (equal).
        name: level name (``H1`` ...).
        vocab_size: token embedding rows (the target's vocabulary).
        layers: decoder layers.
        heads: attention heads.
        mlp: MLP width (default 4 x width).
        token_dim: width of the head's own token embedding (fused with the state).
        max_len: longest answer (positions of the learned position table, cache capacity).
        noise: in training, uniform noise of this amplitude added to the input states (the
            head reads its own inexact estimates while it drafts; EAGLE trains with 0.1).
    """

    is_sequence = True
    kind = "head"

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        name: str | None = None,
        vocab_size: int | None = None,
        layers: int = 1,
        heads: int = 4,
        mlp: int | None = None,
        token_dim: int = 64,
        max_len: int = 128,
        noise: float = 0.0,
    ):
        if vocab_size is None:
            raise ValueError("FeatureHead needs vocab_size (the target's vocabulary)")
        mlp = mlp or 4 * out_dim
        super().__init__(
            in_dim,
            out_dim,
            name,
            {
                "vocab_size": vocab_size,
                "layers": layers,
                "heads": heads,
                "mlp": mlp,
                "token_dim": token_dim,
                "max_len": max_len,
                "noise": noise,
            },
        )
        if in_dim != out_dim:
            raise ValueError(f"FeatureHead maps the target's states: in_dim {in_dim} != {out_dim}")
        if out_dim % heads:
            raise ValueError(f"FeatureHead: width {out_dim} is not a multiple of heads={heads}")
        self.max_len = max_len
        self.noise = noise
        self.embed = nn.Embedding(vocab_size, token_dim)
        self.fuse = nn.Linear(in_dim + token_dim, out_dim)
        self.pos = nn.Embedding(max_len, out_dim)
        self.blocks = nn.ModuleList(_Block(out_dim, heads, mlp) for _ in range(layers))
        self.norm = nn.LayerNorm(out_dim)
        self.out = nn.Linear(out_dim, out_dim)
        nn.init.normal_(self.pos.weight, std=1.0 / math.sqrt(out_dim))

    @property
    def uses_tokens(self) -> bool:
        return True

    def _input(self, h: Tensor, tokens: Tensor, start: int) -> Tensor:
        t = h.shape[1]
        if start + t > self.max_len:
            raise ValueError(f"FeatureHead: position {start + t} past max_len={self.max_len}")
        return (
            self.fuse(torch.cat([h, self.embed(tokens)], dim=-1))
            + self.pos.weight[start : start + t]
        )

    def forward(
        self, h: Tensor, mask: Tensor | None = None, tokens: Tensor | None = None
    ) -> Tensor:
        """Output i for pair i, ``(h[:, i], tokens[:, i])``, causally over the answer.

        Args:
            h: (B, T, D) target states ``σ_{i-1}`` (a cache's ``h_target`` rows).
            mask: (B, T) bool prefix mask (padding at the end).
            tokens: (B, T) answer tokens ``y_i``.

        Returns:
            (B, T, D) estimates of ``σ_i`` (zero at padding).
        """
        if tokens is None:
            raise ValueError("FeatureHead.forward needs the answer tokens")
        if self.training and self.noise > 0:
            h = h + (torch.rand_like(h) * 2 - 1) * self.noise
        x = self._input(
            self._prepare_inputs(h, mask),
            tokens.masked_fill(~mask, 0) if mask is not None else tokens,
            0,
        )
        for block in self.blocks:
            x = block(x)
        return zero_padding(self.out(self.norm(x)), mask)

    @torch.no_grad()
    def new_cache(self, device: torch.device | str | None = None) -> HeadCache:
        """An empty cache for one answer (batch size 1), for the current weights."""
        block = self.blocks[0]
        shape = (len(self.blocks), 2, block.heads, self.max_len, self.out_dim // block.heads)
        device = device or self.out.weight.device
        weight = self.fuse.weight[:, self.in_dim :]  # (D, token_dim): the token's columns
        table = F.linear(self.embed.weight, weight, self.fuse.bias)  # (V, D)
        kv = torch.zeros(shape, dtype=self.out.weight.dtype, device=device)
        pack = [b.pack() for b in self.blocks]
        pack.append(
            {
                "fuse": self.fuse.weight[:, : self.in_dim].t().contiguous(),
                "out": self.out.weight.t().contiguous(),
            }
        )
        pack = [{k: v.to(device) for k, v in p.items()} for p in pack]
        return HeadCache(kv, table.to(device).contiguous(), pack)

    def step(self, cache: HeadCache, h: Tensor, tokens: Tensor) -> Tensor:
        """Reads pairs ``(h[:, j], tokens[:, j])`` after the cached ones; returns their outputs.

        Args:
            cache: updated in place (its length grows by the pairs read).
            h: (1, k, D) states.
            tokens: (1, k) tokens.

        Returns:
            (1, k, D) outputs, equal to `forward`'s at the same positions.
        """
        start, t = cache.length, h.shape[1]
        if start + t > self.max_len:
            raise ValueError(f"FeatureHead: position {start + t} past max_len={self.max_len}")
        top = cache.pack[-1]
        x = torch.addmm(cache.tokens[tokens[0]], h[0], top["fuse"])  # (T, D)
        x = x + self.pos.weight[start : start + t]
        for i, block in enumerate(self.blocks):
            x = block.step(x, cache.pack[i], cache.kv[i], start)
        cache.length += t
        y = F.layer_norm(x, (self.out_dim,), self.norm.weight, self.norm.bias)
        return torch.addmm(self.out.bias, y, top["out"])[None]
