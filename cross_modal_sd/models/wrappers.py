"""One small decoding API over both models: prefill, forward k tokens, crop the KV cache.

Each call returns the final-layer post-norm hidden states together with the logits (ids at or
above the text vocabulary limit masked), because the adapter reads the draft's hidden states and
the target's `lm_head` turns adapted states into draft tokens. Differences between transformers
versions (the cache keyword, the sign convention of `crop`) are handled here and nowhere else.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, LlamaModel

from cross_modal_sd.models.eventgpt import EventGPT

# transformers 5.x renamed `past_key_values` to `cache` (the old name warns until 5.40).
CACHE_KW = (
    "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
)
_NEGATIVE_CROP = "tokens_to_remove" in inspect.signature(DynamicCache.crop).parameters


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Keeps the first `length` positions of every layer of `cache`, in place."""
    current = cache.get_seq_length()
    if length > current:
        raise ValueError(f"cannot crop a cache of {current} positions to {length}")
    if length == current:
        return
    cache.crop(length - current if _NEGATIVE_CROP else length)


def gather_cache(cache: DynamicCache, keep: int, rows: Sequence[int]) -> None:
    """Keeps the first `keep` positions of every layer of `cache`, then the positions `rows`
    (in that order), in place: a draft tree's accepted path after its verification."""
    index = torch.tensor([*range(keep), *rows])
    if hasattr(cache, "layers"):  # transformers >= 4.56: one object per layer
        for layer in cache.layers:
            index = index.to(layer.keys.device)
            layer.keys = layer.keys.index_select(-2, index)
            layer.values = layer.values.index_select(-2, index)
        return
    for i, (keys, values) in enumerate(zip(cache.key_cache, cache.value_cache, strict=True)):
        index = index.to(keys.device)
        cache.key_cache[i] = keys.index_select(-2, index)
        cache.value_cache[i] = values.index_select(-2, index)


class MaskedHead(torch.nn.Module):
    """An `lm_head` whose logits of ids >= `vocab_limit` are -inf (they are never valid text).

    Its own small module, so a drafter can carry the target's head to another process without
    the rest of the target.
    """

    def __init__(self, lm_head: torch.nn.Linear, vocab_limit: int | None):
        super().__init__()
        self.lm_head = lm_head
        self.vocab_limit = vocab_limit

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden.to(self.lm_head.weight.dtype)).float()
        if self.vocab_limit is not None:
            logits[..., self.vocab_limit :] = float("-inf")
        return logits


@dataclass
class ForwardOut:
    """Hidden states (B, k, D), masked logits (B, k, V) and the cache after the call."""

    hidden: torch.Tensor
    logits: torch.Tensor
    cache: DynamicCache


class _Decoder:
    """Shared decoding mechanics; subclasses say how a prompt becomes the first forward."""

    def __init__(self, backbone, lm_head: torch.nn.Linear, vocab_limit: int | None):
        self.backbone = backbone
        self.lm_head = lm_head
        self.vocab_limit = vocab_limit
        self.head = MaskedHead(lm_head, vocab_limit)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head with ids >= vocab_limit masked to -inf (they are never valid text)."""
        return self.head(hidden)

    def _run(self, cache: DynamicCache, keep_last: int | None, **inputs) -> ForwardOut:
        out = self.backbone(**inputs, **{CACHE_KW: cache}, use_cache=True)
        hidden = out.last_hidden_state
        if keep_last is not None:
            hidden = hidden[:, -keep_last:]
        return ForwardOut(hidden=hidden, logits=self.logits(hidden), cache=cache)

    @torch.inference_mode()
    def forward_tokens(
        self,
        tokens: torch.Tensor,
        cache: DynamicCache,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> ForwardOut:
        """Feeds tokens (B, k) after the cached context; returns all k positions.

        A draft tree passes its own 4-D additive ``attention_mask`` (B, 1, k, past + k) and
        ``position_ids`` (B, k); the default is causal, positions after the cache.
        """
        extra = {}
        if attention_mask is not None:
            extra = {"attention_mask": attention_mask, "position_ids": position_ids}
        return self._run(cache, None, input_ids=tokens, **extra)


class TargetDecoder(_Decoder):
    """Video-LLaVA (`VideoLlavaForConditionalGeneration`) behind the decoding API."""

    def __init__(self, model, vocab_limit: int | None):
        super().__init__(model.model, model.lm_head, vocab_limit)
        self.model = model

    @torch.inference_mode()
    def prefill(
        self, input_ids: torch.Tensor, pixel_values_videos: torch.Tensor, keep_last: int | None = 1
    ) -> ForwardOut:
        """Reads prompt (B, L) with expanded video tokens and frames (B, F, 3, H, W)."""
        return self._run(
            DynamicCache(), keep_last, input_ids=input_ids, pixel_values_videos=pixel_values_videos
        )


class DraftDecoder(_Decoder):
    """EventGPT behind the decoding API."""

    def __init__(self, model: EventGPT, vocab_limit: int | None):
        super().__init__(model.language_model.model, model.language_model.lm_head, vocab_limit)
        self.model = model

    @torch.inference_mode()
    def prefill(
        self, input_ids: torch.Tensor, event_pixels: torch.Tensor, keep_last: int | None = 1
    ) -> ForwardOut:
        """Reads prompt (B, L) holding one event placeholder and event images (B, T, 3, H, W)."""
        embeds, mask = self.model.embed(input_ids, event_pixels)
        return self._run(DynamicCache(), keep_last, inputs_embeds=embeds, attention_mask=mask)
