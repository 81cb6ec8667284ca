"""One builder of both architectures' configs, at any size: the mini world's tiny models, the
real pair's shapes (random weights for cost checks) and the CLIP tower EventGPT reads.

Every setting that differs between the sizes is a named field or argument here (the vision
feature layer, the RMSNorm epsilon, the position limit, the token ids), never a default that
one builder sets and another does not.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig

from cross_modal_sd.models.eventgpt import EventGPT


@dataclass(frozen=True)
class TowerSize:
    """A CLIP vision tower (the image side apart)."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    mlp: int = 256
    patch: int = 8
    projection: int | None = None  # CLIP's projection_dim (None: `hidden`); unused by the VLMs

    def config(self, image_size: int) -> CLIPVisionConfig:
        return CLIPVisionConfig(
            hidden_size=self.hidden,
            intermediate_size=self.mlp,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            image_size=image_size,
            patch_size=self.patch,
            projection_dim=self.projection or self.hidden,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
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
    max_positions: int = 512
    rms_norm_eps: float = 1e-6

    def config(self, ids: TokenIds, vocab_size: int) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden,
            intermediate_size=self.mlp,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=self.max_positions,
            rms_norm_eps=self.rms_norm_eps,
            pad_token_id=ids.pad,
            bos_token_id=ids.bos,
            eos_token_id=ids.eos,
            tie_word_embeddings=False,
        )


@dataclass(frozen=True)
class TokenIds:
    """The special ids and vocabulary sizes a pair's configs carry.

    Attributes:
        pad / bos / eos: the decoders' special ids.
        image / video: Video-LLaVA's `<image>` / `<video>` placeholders.
        target_pad: the `VideoLlavaConfig`'s own pad id.
        target_vocab / draft_vocab: embedding rows of each decoder.
    """

    pad: int
    bos: int
    eos: int
    image: int
    video: int
    target_pad: int
    target_vocab: int
    draft_vocab: int

    @classmethod
    def of_tokenizer(cls, tokenizer) -> TokenIds:
        """The ids of a tokenizer laid out like Vicuna's (the mini world's)."""
        return cls(
            pad=tokenizer.pad_token_id,
            bos=tokenizer.bos_token_id,
            eos=tokenizer.eos_token_id,
            image=tokenizer.convert_tokens_to_ids("<image>"),
            video=tokenizer.convert_tokens_to_ids("<video>"),
            target_pad=tokenizer.pad_token_id,
            target_vocab=len(tokenizer),
            draft_vocab=len(tokenizer),
        )


# The real pair: Video-LLaVA-7B-hf's text config (Llama-7B) equals Vicuna-v1.5-7B's, EventGPT's
# decoder; both read CLIP ViT-L/14 (Video-LLaVA at 224, EventGPT at 336).
LLAMA_7B = DecoderSize(
    hidden=4096, layers=32, heads=32, mlp=11008, max_positions=4096, rms_norm_eps=1e-5
)
CLIP_VIT_L14 = TowerSize(hidden=1024, layers=24, heads=16, mlp=4096, patch=14, projection=768)
REAL_IDS = TokenIds(
    pad=0,
    bos=1,
    eos=2,
    image=32000,
    video=32001,
    target_pad=32001,
    target_vocab=32064,  # Video-LLaVA-7B-hf's rows: <image>, <video>, <pad>, padding
    draft_vocab=32003,  # EventGPT-7B's rows: Vicuna's 32000 + <ev_patch>, <ev_start>, <ev_end>
)
VIDEO_FRAMES = 8  # frames Video-LLaVA reads
FRAME_SIZE = 224  # Video-LLaVA's CLIP input side
EVENT_SIZE = 336  # EventGPT's CLIP ViT-L/14-336 input side


def clip_vit_l14_336_config() -> CLIPVisionConfig:
    """The vision config of CLIP ViT-L/14-336, the tower every EventGPT-7B checkpoint uses."""
    return CLIP_VIT_L14.config(EVENT_SIZE)


def videollava_config(
    tower: TowerSize,
    decoder: DecoderSize,
    ids: TokenIds,
    image_size: int,
    n_frames: int,
    feature_layer: int,
    feature_strategy: str,
) -> VideoLlavaConfig:
    """A Video-LLaVA config.

    Args:
        feature_layer / feature_strategy: which tower layer the projector reads and whether CLS
            is kept for images (``"default"`` drops it, ``"full"`` keeps it); video frames keep
            every token either way.
    """
    tokens = tower.tokens(image_size)
    cfg = VideoLlavaConfig(
        vision_config=tower.config(image_size).to_dict(),
        text_config=decoder.config(ids, ids.target_vocab).to_dict(),
        image_token_index=ids.image,
        video_token_index=ids.video,
        projector_hidden_act="gelu",
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=feature_strategy,
        image_seq_length=tokens - 1 if feature_strategy == "default" else tokens,
        video_seq_length=n_frames * tokens,
    )
    cfg.pad_token_id = ids.target_pad
    return cfg


def eventgpt_configs(
    tower: TowerSize, decoder: DecoderSize, ids: TokenIds, image_size: int, event_frames: int
) -> tuple[LlamaConfig, CLIPVisionConfig]:
    """EventGPT's (`LlamaConfig`, `CLIPVisionConfig`)."""
    llama = decoder.config(ids, ids.draft_vocab)
    llama.event_frames = event_frames
    return llama, tower.config(image_size)


def build_target(tokenizer, tower: TowerSize, decoder: DecoderSize, image_size: int, n_frames: int):
    """A randomly initialised mini-world Video-LLaVA: the last tower layer, CLS kept."""
    from transformers import VideoLlavaForConditionalGeneration

    ids = TokenIds.of_tokenizer(tokenizer)
    cfg = videollava_config(tower, decoder, ids, image_size, n_frames, -1, "full")
    return VideoLlavaForConditionalGeneration(cfg)


def build_draft(
    tokenizer, tower: TowerSize, decoder: DecoderSize, image_size: int, event_frames: int
) -> EventGPT:
    """A randomly initialised mini-world EventGPT."""
    ids = TokenIds.of_tokenizer(tokenizer)
    return EventGPT(*eventgpt_configs(tower, decoder, ids, image_size, event_frames))


@dataclass(frozen=True)
class PairShapes:
    """Sizes of both real architectures, for models built with random weights (no checkpoint).

    Attributes:
        name: label (``real`` or ``tiny``).
        decoder: both decoders.
        tower: both vision towers (image size apart).
        frame_size: side of the target's frames.
        event_size: side of the draft's event images.
    """

    name: str
    decoder: DecoderSize
    tower: TowerSize
    frame_size: int = FRAME_SIZE
    event_size: int = EVENT_SIZE

    def tokens_per_image(self, size: int) -> int:
        """Tower tokens of one image: every patch plus CLS."""
        return self.tower.tokens(size)

    def target_config(self, n_frames: int = VIDEO_FRAMES) -> VideoLlavaConfig:
        """LanguageBind/Video-LLaVA-7B-hf's config at these shapes (second-to-last layer, CLS
        dropped for images)."""
        return videollava_config(
            self.tower, self.decoder, REAL_IDS, self.frame_size, n_frames, -2, "default"
        )

    def draft_configs(self, event_frames: int = 5) -> tuple[LlamaConfig, CLIPVisionConfig]:
        """EventGPT-7B's configs at these shapes."""
        return eventgpt_configs(self.tower, self.decoder, REAL_IDS, self.event_size, event_frames)


PAIR_SHAPES = {
    "real": PairShapes("real", LLAMA_7B, CLIP_VIT_L14),
    # Every width and depth scaled down (MLP/width ratios kept); images at a quarter of the side
    # with the same patch, so the target still reads 8 x 17 = 136 video tokens against the
    # draft's T + 37 (real: 8 x 257 against T + 577). Runs on a CPU in seconds.
    "tiny": PairShapes(
        "tiny",
        DecoderSize(hidden=64, layers=2, heads=4, mlp=172, max_positions=4096, rms_norm_eps=1e-5),
        TowerSize(hidden=32, layers=2, heads=2, mlp=128, patch=14, projection=24),
        frame_size=FRAME_SIZE // 4,
        event_size=EVENT_SIZE // 4,
    ),
}


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """torch's default floating dtype for the `with` body (modules built inside use it)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def random_pair(
    shapes: PairShapes, device: str, dtype: torch.dtype, event_frames: int = 5, seed: int = 0
):
    """Video-LLaVA and EventGPT at `shapes` with random weights, built on `device` in `dtype`.

    Parameters are allocated and initialised where they live, in their final dtype: at the real
    shapes (7.4 B + 7.1 B parameters, ~29 GB in bf16) nothing goes through a CPU float32 copy.
    Costs do not depend on weight values, so these time like the released checkpoints.

    Returns:
        (`VideoLlavaForConditionalGeneration`, `EventGPT`), both in eval mode.
    """
    from transformers import VideoLlavaForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        target = VideoLlavaForConditionalGeneration(shapes.target_config())
        draft = EventGPT(*shapes.draft_configs(event_frames))
    return target.eval(), draft.eval()
