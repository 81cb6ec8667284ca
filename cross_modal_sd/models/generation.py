"""Greedy generation for both models through transformers' `generate`, ids >= vocab_limit masked.

Batched calls left-pad prompts; they are for accuracy checks. Anything whose tokens must equal
another method's (the SD baseline, teacher-forced extraction) runs one sample at a time.
"""

from __future__ import annotations

import torch

from cross_modal_sd.models.eventgpt import EventGPT


def greedy_kwargs(
    vocab_limit: int | None, vocab_size: int, max_new_tokens: int, eos_id: int, pad_id: int
) -> dict:
    """generate() arguments for plain greedy decoding with the non-text ids suppressed."""
    kw = dict(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    if vocab_limit is not None and vocab_limit < vocab_size:
        kw["suppress_tokens"] = list(range(vocab_limit, vocab_size))
    return kw


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) left-padded ids and attention mask."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, length - len(p) :] = torch.tensor(p)
        mask[r, length - len(p) :] = 1
    return ids, mask


def _strip(out: torch.Tensor, eos_id: int) -> list[list[int]]:
    """New tokens per row up to and including the first EOS."""
    rows = []
    for row in out.tolist():
        if eos_id in row:
            row = row[: row.index(eos_id) + 1]
        rows.append(row)
    return rows


@torch.inference_mode()
def generate_target(
    model, prompts: list[list[int]], frames: torch.Tensor, gen_kwargs: dict
) -> list[list[int]]:
    """Greedy answers of Video-LLaVA for prompts (expanded video tokens) and frames (B, F, 3, H, W)."""
    ids, mask = left_pad(prompts, gen_kwargs["pad_token_id"])
    out = model.generate(
        input_ids=ids.to(model.device),
        attention_mask=mask.to(model.device),
        pixel_values_videos=frames.to(model.device, model.dtype),
        **gen_kwargs,
    )
    return _strip(out[:, ids.shape[1] :].cpu(), gen_kwargs["eos_token_id"])


@torch.inference_mode()
def generate_draft(
    model: EventGPT, prompts: list[list[int]], event_pixels: torch.Tensor, gen_kwargs: dict
) -> list[list[int]]:
    """Greedy answers of EventGPT for prompts (with the event placeholder) and event images."""
    ids, mask = left_pad(prompts, gen_kwargs["pad_token_id"])
    embeds, mask = model.embed(
        ids.to(model.device), event_pixels.to(model.device), mask.to(model.device)
    )
    out = model.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **gen_kwargs)
    # With only inputs_embeds, generate returns just the new tokens.
    return _strip(out.cpu(), gen_kwargs["eos_token_id"])
