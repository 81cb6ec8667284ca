"""L5: EAGLE-style causal adapter with separate same-position and next-position heads."""

from __future__ import annotations

import torch
from torch import nn

from cross_modal_sd.adapters.base import Adapter, zero_padding
from cross_modal_sd.adapters.bottleneck import BottleneckBlock
from cross_modal_sd.adapters.sequence import CausalTransformerLayer


class EagleAdapter(Adapter):
    """A causal transformer trunk over draft states, optional token fusion, two output heads.

    Structure: ``x = h (+ fuse(embed(tokens)))`` -> one causal pre-LN transformer layer at width
    ``in_dim`` -> two independent residual bottleneck heads (:class:`BottleneckBlock`,
    ``in_dim -> out_dim``):

    * ``align``: output k estimates ``h_target[k]`` from draft states 0..k. This is what
      :meth:`forward` returns and what drafts tokens.
    * ``next``: output k estimates ``h_target[k + 1]`` from the same inputs. Train it against
      ``h_target[:, 1:]`` on ``next[:, :-1]`` (valid where ``mask[:, 1:]``).

    Each head is trained towards its own target only; the prior system pushed one output towards
    both, which makes it a compromise of two different functions.

    Token fusion (``fuse_tokens=True``): ``tokens[:, k]`` is the id of the token *preceding*
    answer position k (``y[k-1]``; for k = 0 the last prompt token), i.e. the token whose draft
    forward produced ``h[:, k]``. It is embedded (a small learned table of width ``embed_dim``),
    projected by a zero-initialised ``Linear(embed_dim, in_dim)`` and added to ``h``, so fusion
    starts as a no-op. Token ids at padded positions are ignored.

    At init the trunk and both heads are identities (when ``in_dim == out_dim``), so both heads
    start by predicting ``h`` itself.

    Args:
        in_dim: draft hidden width.
        out_dim: target hidden width.
        name: level label stored in :attr:`config` (e.g. ``"L5"``).
        num_heads: attention heads of the trunk layer.
        ffn_dim: feed-forward hidden width of the trunk layer.
        head_bottleneck: bottleneck width of each output head.
        fuse_tokens: add an embedding of the previous token to each draft state.
        vocab_size: embedding table size; required when ``fuse_tokens``.
        embed_dim: token embedding width.
        dropout: dropout in the trunk and the heads.
    """

    is_sequence = True
    head_names = ("align", "next")

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        name: str | None = None,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        head_bottleneck: int = 1024,
        fuse_tokens: bool = False,
        vocab_size: int | None = None,
        embed_dim: int = 256,
        dropout: float = 0.0,
    ):
        super().__init__(
            in_dim,
            out_dim,
            name,
            dict(
                num_heads=num_heads,
                ffn_dim=ffn_dim,
                head_bottleneck=head_bottleneck,
                fuse_tokens=fuse_tokens,
                vocab_size=vocab_size,
                embed_dim=embed_dim,
                dropout=dropout,
            ),
        )
        self.fuse_tokens = fuse_tokens
        self.vocab_size = vocab_size
        if fuse_tokens:
            if not isinstance(vocab_size, int) or vocab_size <= 0:
                raise ValueError(
                    f"EagleAdapter: fuse_tokens=True needs a positive int vocab_size, "
                    f"got {vocab_size!r}"
                )
            self.token_embed = nn.Embedding(vocab_size, embed_dim)
            self.token_proj = nn.Linear(embed_dim, in_dim)
            nn.init.zeros_(self.token_proj.weight)
            nn.init.zeros_(self.token_proj.bias)
        self.trunk = CausalTransformerLayer(in_dim, num_heads, ffn_dim, dropout)
        self.align_head = BottleneckBlock(in_dim, out_dim, head_bottleneck, dropout=dropout)
        self.next_head = BottleneckBlock(in_dim, out_dim, head_bottleneck, dropout=dropout)

    @property
    def uses_tokens(self) -> bool:
        """True when token fusion is on and ``tokens`` must be passed."""
        return self.fuse_tokens

    def forward_heads(
        self,
        h: torch.Tensor,
        mask: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Both heads' predictions.

        Args:
            h: draft hidden states (B, T, in_dim).
            mask: (B, T) bool, True = valid; padded positions are zero in both outputs.
            tokens: (B, T) int64 previous-token ids; required iff ``fuse_tokens``.

        Returns:
            ``{"align": (B, T, out_dim) ~ h_target[k], "next": (B, T, out_dim) ~ h_target[k+1]}``;
            position k of both depends on inputs at positions 0..k only.
        """
        h = self._prepare_inputs(h, mask)
        if self.fuse_tokens:
            x = h + self._token_features(tokens, h, mask)
        elif tokens is not None:
            raise ValueError("EagleAdapter: tokens were passed but fuse_tokens is False")
        else:
            x = h
        x = self.trunk(x, mask)
        return {
            "align": zero_padding(self.align_head(x), mask),
            "next": zero_padding(self.next_head(x), mask),
        }

    def forward(
        self,
        h: torch.Tensor,
        mask: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Same-position aligned prediction (the ``align`` head), (B, T, out_dim)."""
        return self.forward_heads(h, mask, tokens)["align"]

    def _token_features(
        self, tokens: torch.Tensor | None, h: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Zero-initialised projection of the previous-token embeddings, (B, T, in_dim)."""
        if tokens is None:
            raise ValueError("EagleAdapter: fuse_tokens=True but no tokens were passed")
        if tokens.shape != h.shape[:2] or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"EagleAdapter: tokens must be an int tensor of shape {tuple(h.shape[:2])}, "
                f"got {tokens.dtype} {tuple(tokens.shape)}"
            )
        # Padded positions may hold any pad/ignore id; map them to 0 so only valid ids are checked.
        if mask is not None:
            tokens = tokens.masked_fill(~mask, 0)
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.vocab_size:
            raise ValueError(
                f"EagleAdapter: token ids must lie in [0, {self.vocab_size}), "
                f"got range [{low}, {high}]"
            )
        return self.token_proj(self.token_embed(tokens))
