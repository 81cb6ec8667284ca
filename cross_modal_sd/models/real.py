"""The real pair: Video-LLaVA-7B (target) and EventGPT-7B (draft), and how their inputs are made.

Everything a sample needs is made here, once, for extraction and evaluation alike:

* target: `USER: <video>\\n{q} ASSISTANT:` with `<video>` expanded to 8 x 257 ids, and 8 frames
  resized like the CLIP processors do (PIL bicubic on the short side to 224, centre crop,
  CLIP normalisation) - no torchvision, no processor download;
* draft: the Vicuna v1 prompt tokenised chunk by chunk around the event placeholder (id -200) as
  EventGPT does, and event images made as EventGPT makes them (the stream cut into chunks of
  equal event count, the remainder going to the last; red/blue on white), on a fixed sensor
  canvas, preprocessed like CLIP ViT-L/14-336 (336).

Logits of ids >= `vocab_limit` (32000: the first id past Vicuna's vocabulary) are masked in both
models, so neither can produce `<image>`, `<video>`, `<pad>` or EventGPT's added tokens.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cross_modal_sd.data.events import EventStream, EventStreamError, render_event_image
from cross_modal_sd.models.architectures import EVENT_SIZE, FRAME_SIZE, VIDEO_FRAMES
from cross_modal_sd.models.eventgpt import EventGPT
from cross_modal_sd.models.loading import CheckpointError, load_eventgpt, load_videollava
from cross_modal_sd.models.preprocess import frames_to_pixels
from cross_modal_sd.models.prompts import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    encode_draft_prompt,
    encode_target_prompt,
)

TEXT_VOCAB = 32000  # Vicuna's vocabulary; ids at or above it are never generated
EV_START, EV_END = "<ev_start>", "<ev_end>"  # EventGPT's optional event delimiters
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ------------------------------------------------------------------------------------- pixels


def clip_preprocess(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) images -> normalised (N, 3, size, size), as CLIP's processors do it.

    The short side is resized to `size` with PIL bicubic (the long side truncated, as the
    transformers processors compute it), then `frames_to_pixels` centre-crops and normalises.
    """
    from PIL import Image

    out = []
    for img in images:
        h, w = img.shape[:2]
        if h <= w:
            nh, nw = size, int(size * w / h)
        else:
            nh, nw = int(size * h / w), size
        resized = Image.fromarray(np.ascontiguousarray(img)).resize((nw, nh), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1))  # (3, nh, nw)
    # All images of a call share one size, so they stack; an identity resize is exact.
    return frames_to_pixels(torch.stack(out).float() / 255, size)


def eventgpt_chunk_bounds(n_events: int, n_images: int) -> np.ndarray:
    """EventGPT's split of a stream into `n_images` chunks: `n // T` events each, the remainder
    to the last chunk. Returns the (n_images + 1,) chunk boundaries."""
    per = n_events // n_images
    return np.array([i * per for i in range(n_images)] + [n_events], dtype=np.int64)


def eventgpt_event_images(
    events: EventStream, sensor_size: tuple[int, int], n_images: int, source: str
) -> np.ndarray:
    """uint8 (n_images, H, W, 3) event images of a stream, as EventGPT renders them.

    Raises:
        EventStreamError: the stream is empty or an event lies outside `sensor_size` (H, W).
    """
    events.validate(sensor_size, source)
    if len(events) == 0:
        raise EventStreamError(f"{source}: no events in the window; nothing for the draft to see")
    bounds = eventgpt_chunk_bounds(len(events), n_images)
    arrays = (events.x, events.y, events.t, events.p)
    return np.stack(
        [
            render_event_image(EventStream(*(a[lo:hi] for a in arrays)), sensor_size)
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
        ]
    )


# ------------------------------------------------------------------------------------ prompts


def read_added_tokens(directory: str | Path) -> dict[str, int]:
    """Added tokens of a checkpoint's tokenizer (token -> id), read from its JSON files.

    Reads `added_tokens.json`, `tokenizer_config.json` (`added_tokens_decoder`) and
    `tokenizer.json` (`added_tokens`), whichever exist; needs no tokenizer library.
    """
    directory = Path(directory)
    found: dict[str, int] = {}
    path = directory / "added_tokens.json"
    if path.is_file():
        found.update({str(k): int(v) for k, v in json.loads(path.read_text()).items()})
    path = directory / "tokenizer_config.json"
    if path.is_file():
        decoder = json.loads(path.read_text()).get("added_tokens_decoder") or {}
        found.update({entry["content"]: int(i) for i, entry in decoder.items()})
    path = directory / "tokenizer.json"
    if path.is_file():
        for entry in json.loads(path.read_text()).get("added_tokens") or []:
            found[entry["content"]] = int(entry["id"])
    return found


# ------------------------------------------------------------------------------------- inputs


@dataclass
class RealInputs:
    """How one question about one clip becomes both models' inputs (batch dimension 1).

    Attributes:
        tokenizer: the target's tokenizer (Vicuna's vocabulary below 32000, shared by both).
        n_video_tokens: ids `<video>` expands to (8 x 257 for Video-LLaVA-7B).
        n_frames: frames the target reads.
        frame_size: the target's input side.
        event_frames: event images the draft reads.
        event_size: the draft's input side.
        event_wrap: (`<ev_start>`, `<ev_end>`) ids around the placeholder, or None.
    """

    tokenizer: object
    n_video_tokens: int
    n_frames: int = VIDEO_FRAMES
    frame_size: int = FRAME_SIZE
    event_frames: int = 5
    event_size: int = EVENT_SIZE
    event_wrap: tuple[int, int] | None = None

    def target_ids(self, question: str) -> torch.Tensor:
        """(1, L) target prompt with `<video>` expanded."""
        return torch.tensor([encode_target_prompt(self.tokenizer, question, self.n_video_tokens)])

    def draft_ids(self, question: str) -> torch.Tensor:
        """(1, L) draft prompt holding the event placeholder."""
        return torch.tensor([encode_draft_prompt(self.tokenizer, question, self.event_wrap)])

    def frames(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (F, H, W, 3) RGB frames -> (1, F, 3, frame_size, frame_size)."""
        if len(images) != self.n_frames:
            raise ValueError(f"the target reads {self.n_frames} frames, got {len(images)}")
        return clip_preprocess(images, self.frame_size)[None]

    def event_pixels(
        self, events: EventStream, sensor_size: tuple[int, int], source: str
    ) -> torch.Tensor:
        """An event stream -> (1, event_frames, 3, event_size, event_size)."""
        images = eventgpt_event_images(events, sensor_size, self.event_frames, source)
        return clip_preprocess(images, self.event_size)[None]


# ------------------------------------------------------------------------------------ loading


def video_token_count(target, n_frames: int = VIDEO_FRAMES) -> int:
    """Ids `<video>` expands to: every patch plus CLS of every frame (video keeps CLS)."""
    vision = target.config.vision_config
    return n_frames * ((vision.image_size // vision.patch_size) ** 2 + 1)


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """`auto` is bf16 on CUDA and fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise ValueError(f"models.dtype must be auto or one of {list(DTYPES)}, got {name!r}")
    return DTYPES[name]


def bnb_4bit_config(compute_dtype: torch.dtype):
    """transformers' 4-bit NF4 config for the target; its `lm_head` stays unquantised because
    the cache stores it and the adapter's draft tokens come from it."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=["lm_head"],
    )


def quantize_4bit_(model: nn.Module, compute_dtype: torch.dtype, skip: Sequence[str]) -> int:
    """Replaces every `nn.Linear` of `model` (except names in `skip`) by a bitsandbytes NF4
    layer, in place; the weights are quantised when the model moves to CUDA. Returns the count.

    This is what transformers does for a stock model given a 4-bit config; EventGPT is not one.
    """
    import bitsandbytes as bnb

    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.Linear) or full in skip:
                continue
            q = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=compute_dtype,
                quant_type="nf4",
                device="meta",
            )
            q.weight = bnb.nn.Params4bit(
                child.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True
            )
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, child_name, q)
            count += 1
    return count


def _check_tokenizer(tokenizer, target, vocab_limit: int, where: str) -> None:
    cfg = target.config
    for token, expected in (
        (IMAGE_TOKEN, cfg.image_token_index),
        (VIDEO_TOKEN, cfg.video_token_index),
    ):
        got = tokenizer.convert_tokens_to_ids(token)
        if got != expected:
            raise CheckpointError(
                f"{where}: tokenizer maps {token} to {got}, the target config to {expected}"
            )
        if got < vocab_limit:
            raise CheckpointError(
                f"{where}: {token} is id {got}, below vocab_limit={vocab_limit}; it would not be "
                "masked"
            )
    if tokenizer.eos_token_id is None:
        raise CheckpointError(f"{where}: tokenizer has no EOS token")


def _event_wrap(draft_dir: Path, vocab_rows: int) -> tuple[int, int] | None:
    """The (`<ev_start>`, `<ev_end>`) ids when the checkpoint's config asks for them."""
    raw = json.loads((draft_dir / "config.json").read_text())
    added = read_added_tokens(draft_dir)
    for token, i in added.items():
        if i >= vocab_rows:
            raise CheckpointError(
                f"{draft_dir}: added token {token!r} has id {i} but the embedding has {vocab_rows} rows"
            )
    if not raw.get("mm_use_im_start_end"):
        return None
    missing = [t for t in (EV_START, EV_END) if t not in added]
    if missing:
        raise CheckpointError(
            f"{draft_dir}/config.json sets mm_use_im_start_end but the tokenizer files "
            f"(added_tokens.json, tokenizer_config.json, tokenizer.json) lack {missing}"
        )
    return added[EV_START], added[EV_END]


@dataclass
class RealModels:
    """The loaded real pair before it is wrapped for decoding (see `cross_modal_sd.pair`)."""

    target: nn.Module  # VideoLlavaForConditionalGeneration
    draft: EventGPT
    tokenizer: Any
    inputs: RealInputs
    vocab_limit: int


def load_real_models(models_cfg: Mapping) -> RealModels:
    """Loads the pair named by `conf/models/eventgpt_videollava.yaml`.

    Raises:
        CheckpointError: a checkpoint misses files or weights, or the tokenizer disagrees with
            the target config.
        ValueError: bad dtype/quantization/device settings.
    """
    from transformers import AutoTokenizer

    device = str(models_cfg.get("device") or "cpu")
    dtype = resolve_dtype(str(models_cfg.get("dtype") or "auto"), device)
    quant = models_cfg.get("quantization")
    if quant not in (None, "4bit"):
        raise ValueError(f"models.quantization must be null or 4bit, got {quant!r}")
    if quant and not device.startswith("cuda"):
        raise ValueError("models.quantization=4bit needs a CUDA device (bitsandbytes)")
    vocab_limit = int(models_cfg.get("vocab_limit") or TEXT_VOCAB)
    target_path = str(models_cfg["target"])
    draft_dir = Path(str(models_cfg["draft"]))

    target = load_videollava(target_path, dtype, device, bnb_4bit_config(dtype) if quant else None)
    tok_path = str(models_cfg.get("tokenizer") or target_path)
    tokenizer = AutoTokenizer.from_pretrained(tok_path)
    _check_tokenizer(tokenizer, target, vocab_limit, tok_path)

    draft: EventGPT = load_eventgpt(
        draft_dir, clip_dir=models_cfg.get("clip"), dtype=dtype, device="cpu" if quant else device
    )
    if quant:
        quantize_4bit_(draft, dtype, skip=("language_model.lm_head",))
        draft.to(device)
    wrap = _event_wrap(draft_dir, draft.config.vocab_size)
    for name, rows in (
        ("target", target.config.text_config.vocab_size),
        ("draft", draft.config.vocab_size),
    ):
        if rows < vocab_limit:
            raise CheckpointError(
                f"{name} has {rows} vocabulary rows, fewer than vocab_limit={vocab_limit}"
            )

    n_frames = int(models_cfg.get("n_frames") or VIDEO_FRAMES)
    inputs = RealInputs(
        tokenizer=tokenizer,
        n_video_tokens=video_token_count(target, n_frames),
        n_frames=n_frames,
        frame_size=target.config.vision_config.image_size,
        event_frames=int(models_cfg.get("event_frames") or 5),
        event_size=draft.vision_config.image_size,
        event_wrap=wrap,
    )
    return RealModels(target, draft, tokenizer, inputs, vocab_limit)
