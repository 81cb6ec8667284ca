"""EventGPT: CLIP event encoder -> projector -> feature adaptor -> spatio-temporal pooling -> Llama.

EventGPT is not a transformers class and its config type (`EventChat_llama`) is unknown to
`AutoConfig`, so the model is assembled here from stock parts: a `CLIPVisionModel` reads each
event image, its last hidden state (all patches plus CLS) goes through the projector
(Linear-GELU-Linear) and the feature adaptor (Linear), the T per-image feature maps are pooled into
T temporal tokens (mean over patches) followed by S spatial tokens (mean over images), and the
result replaces the `<event>` placeholder in the embeddings of a stock `LlamaForCausalLM`.

Checkpoints use the original layout: one config.json holding the Llama keys plus the multimodal
keys (`mm_visual_tower`, `event_feature_adaptor`), and state-dict keys prefixed
`model.visual_tower.visual_tower.`, `model.visual_projector.`, `model.feature_adaptor.`, with the
rest being Llama's own (`model.embed_tokens`, `model.layers`, `model.norm`, `lm_head`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from einops import rearrange
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from cross_modal_sd.models.prompts import EVENT_PLACEHOLDER_ID

MODEL_TYPE = "EventChat_llama"
# Original key prefix -> attribute path in this module.
PREFIX_MAP = (
    ("model.visual_tower.visual_tower.", "encoder.visual_tower."),
    ("model.visual_projector.", "encoder.visual_projector."),
    ("model.feature_adaptor.", "encoder.feature_adaptor."),
    ("model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
# Keys of config.json that are not Llama's.
MULTIMODAL_KEYS = ("mm_visual_tower", "event_feature_adaptor", "event_frames")


def spatio_temporal_pool(features: torch.Tensor) -> torch.Tensor:
    """EventGPT's pooling: (B, T, S, D) -> (B, T + S, D).

    T temporal tokens (mean over the S patch tokens of each image) followed by S spatial tokens
    (mean over the T images at each patch position).
    """
    temporal = features.mean(dim=2)  # (B, T, D)
    spatial = features.mean(dim=1)  # (B, S, D)
    return torch.cat([temporal, spatial], dim=1)


class EventEncoder(nn.Module):
    """Event images (B, T, 3, H, W) -> pooled event tokens (B, T + S, D_text)."""

    def __init__(self, vision_config: CLIPVisionConfig, text_hidden: int):
        super().__init__()
        self.visual_tower = CLIPVisionModel(vision_config)
        width = vision_config.hidden_size
        self.visual_projector = nn.Sequential(
            nn.Linear(width, text_hidden), nn.GELU(), nn.Linear(text_hidden, text_hidden)
        )
        self.feature_adaptor = nn.Linear(text_hidden, text_hidden)

    def forward(self, event_pixels: torch.Tensor) -> torch.Tensor:
        b = event_pixels.shape[0]
        flat = rearrange(event_pixels, "b t c h w -> (b t) c h w")
        dtype = self.visual_tower.dtype
        feats = self.visual_tower(pixel_values=flat.to(dtype)).last_hidden_state  # (B*T, S, W)
        feats = self.feature_adaptor(self.visual_projector(feats))  # (B*T, S, D)
        return spatio_temporal_pool(rearrange(feats, "(b t) s d -> b t s d", b=b))


class EventGPT(nn.Module):
    """The draft VLM: an EventEncoder feeding a stock LlamaForCausalLM through `inputs_embeds`."""

    def __init__(self, config: LlamaConfig, vision_config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.vision_config = vision_config
        self.encoder = EventEncoder(vision_config, config.hidden_size)
        self.language_model = LlamaForCausalLM(config)
        self.event_token_id = EVENT_PLACEHOLDER_ID

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.device

    def embed(
        self,
        input_ids: torch.Tensor,
        event_pixels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Splices pooled event tokens in place of each row's single `<event>` placeholder.

        Args:
            input_ids: (B, L) with exactly one `event_token_id` per row.
            event_pixels: (B, T, 3, H, W) normalised event images.
            attention_mask: (B, L) or None.

        Returns:
            inputs_embeds (B, L - 1 + T + S, D) and the matching attention mask.
        """
        is_event = input_ids == self.event_token_id
        counts = is_event.sum(dim=1)
        if not bool((counts == 1).all()):
            raise ValueError(
                f"each prompt needs exactly one <event> placeholder (id {self.event_token_id}); "
                f"got counts {counts.tolist()}"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        events = self.encoder(event_pixels).to(self.dtype)  # (B, N, D)
        safe_ids = input_ids.masked_fill(is_event, 0)
        text = self.language_model.get_input_embeddings()(safe_ids)  # (B, L, D)
        pos = is_event.float().argmax(dim=1)
        rows, masks = [], []
        for i, p in enumerate(pos.tolist()):
            rows.append(torch.cat([text[i, :p], events[i], text[i, p + 1 :]]))
            ev_mask = attention_mask.new_ones(events.shape[1])
            masks.append(torch.cat([attention_mask[i, :p], ev_mask, attention_mask[i, p + 1 :]]))
        return torch.stack(rows), torch.stack(masks)

    def forward(
        self,
        input_ids: torch.Tensor,
        event_pixels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ):
        """Teacher-forced forward; `labels` are aligned with `input_ids` (placeholder included).

        `attention_mask` is (B, L) over `input_ids`, or a prepared (B, 1, L', L') mask over the
        spliced sequence (L' = L - 1 + T + S) that goes to the language model as is, as do
        `position_ids` (B, L').
        """
        prepared = attention_mask is not None and attention_mask.ndim == 4
        embeds, mask = self.embed(input_ids, event_pixels, None if prepared else attention_mask)
        if labels is not None:
            n_extra = embeds.shape[1] - input_ids.shape[1]
            pad = labels.new_full((labels.shape[0], n_extra), -100)
            labels = torch.cat([pad, labels], dim=1)  # prompt positions are ignored anyway
        return self.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask if prepared else mask,
            position_ids=position_ids,
            labels=labels,
        )


def _to_original_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    tower = "encoder.visual_tower."
    for key, value in state.items():
        # Original checkpoints nest the tower under `vision_model.` (transformers < 5 layout);
        # write that layout whatever the installed transformers keeps in memory.
        if key.startswith(tower) and not key.startswith(tower + "vision_model."):
            key = tower + "vision_model." + key[len(tower) :]
        for orig, ours in PREFIX_MAP:
            if key.startswith(ours):
                out[orig + key[len(ours) :]] = value
                break
        else:
            raise KeyError(f"no EventGPT checkpoint prefix for parameter {key!r}")
    return out


def _from_original_key(key: str) -> str | None:
    for orig, ours in PREFIX_MAP:
        if key.startswith(orig):
            return ours + key[len(orig) :]
    return None


def eventgpt_config_dict(model: EventGPT, visual_tower: str = "visual_tower") -> dict:
    """The original-layout config.json: Llama keys plus EventGPT's multimodal keys."""
    cfg = model.config.to_dict()
    cfg["model_type"] = MODEL_TYPE
    cfg["architectures"] = ["EventChatModel"]
    cfg["mm_visual_tower"] = visual_tower
    cfg["event_feature_adaptor"] = True
    return cfg


def save_eventgpt(model: EventGPT, directory: str | Path) -> None:
    """Writes config.json, model.safetensors (original key prefixes) and the CLIP config."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(eventgpt_config_dict(model), indent=2))
    model.vision_config.save_pretrained(directory / "visual_tower")
    state = {k: v.contiguous() for k, v in _to_original_keys(model.state_dict()).items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


def read_eventgpt_config(directory: Path) -> tuple[LlamaConfig, dict]:
    """Reads an EventGPT config.json into a LlamaConfig plus the multimodal keys."""
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"EventGPT checkpoint has no config.json: {path}")
    raw = json.loads(path.read_text())
    mm = {k: raw.pop(k) for k in MULTIMODAL_KEYS if k in raw}
    raw.pop("model_type", None)
    raw.pop("architectures", None)
    llama = LlamaConfig(**{k: v for k, v in raw.items() if not k.startswith("mm_")})
    return llama, mm
