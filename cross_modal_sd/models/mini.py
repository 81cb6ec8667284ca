"""Tiny configurations of the two real architectures, for the mini world.

Decoder widths are equal (as in the real pair, 4096 both); the target reads 8 frames x 17 tokens
= 136 video tokens, the draft T + 17 = 19 pooled event tokens (real: 2056 vs 578); the draft's
decoder is shallower so that its per-token cost sits below the target's (real: ~0.7x).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
)

from cross_modal_sd.models.eventgpt import EventGPT


@dataclass(frozen=True)
class TowerSize:
    """A CLIP vision tower."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    mlp: int = 256
    patch: int = 8

    def config(self, image_size: int) -> CLIPVisionConfig:
        return CLIPVisionConfig(
            hidden_size=self.hidden,
            intermediate_size=self.mlp,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            image_size=image_size,
            patch_size=self.patch,
            projection_dim=self.hidden,
        )

    def tokens(self, image_size: int) -> int:
        """Tokens per image: patches plus CLS."""
        return (image_size // self.patch) ** 2 + 1


@dataclass(frozen=True)
class DecoderSize:
    """A Llama decoder."""

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    mlp: int = 344

    def config(self, vocab_size: int, pad_id: int, bos_id: int, eos_id: int) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden,
            intermediate_size=self.mlp,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=512,
            pad_token_id=pad_id,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            tie_word_embeddings=False,
        )


def build_target(
    tokenizer, tower: TowerSize, decoder: DecoderSize, image_size: int, n_frames: int
) -> VideoLlavaForConditionalGeneration:
    """A randomly initialised Video-LLaVA with tiny sub-configs."""
    text = decoder.config(
        len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    )
    cfg = VideoLlavaConfig(
        vision_config=tower.config(image_size).to_dict(),
        text_config=text.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_seq_length=tower.tokens(image_size),
        video_seq_length=n_frames * tower.tokens(image_size),
    )
    cfg.pad_token_id = tokenizer.pad_token_id
    return VideoLlavaForConditionalGeneration(cfg)


def build_draft(
    tokenizer, tower: TowerSize, decoder: DecoderSize, image_size: int, event_frames: int
) -> EventGPT:
    """A randomly initialised EventGPT with tiny sub-configs."""
    text = decoder.config(
        len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    )
    text.event_frames = event_frames
    return EventGPT(text, tower.config(image_size))
