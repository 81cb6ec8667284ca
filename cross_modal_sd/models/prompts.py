"""Prompt templates of the two models, used identically at extraction and evaluation."""

from __future__ import annotations

# Vicuna v1 system prompt, as EventGPT uses it.
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
TARGET_TEMPLATE = "USER: <video>\n{question} ASSISTANT:"
DRAFT_TEMPLATE = "{system} USER: <event>\n{question} ASSISTANT:"

VIDEO_TOKEN = "<video>"
IMAGE_TOKEN = "<image>"
EVENT_TOKEN = "<event>"
# EventGPT splices the event placeholder in as this id (not a vocabulary entry), like LLaVA's -200.
EVENT_PLACEHOLDER_ID = -200


def target_prompt(question: str) -> str:
    """Video-LLaVA prompt for one question; `<video>` is expanded by the processor."""
    return TARGET_TEMPLATE.format(question=question)


def draft_prompt(question: str, system: str = VICUNA_SYSTEM) -> str:
    """EventGPT prompt for one question; `<event>` is replaced by pooled event features."""
    return DRAFT_TEMPLATE.format(system=system, question=question)


def encode_target_prompt(tokenizer, question: str, n_video_tokens: int) -> list[int]:
    """Token ids of the target prompt with `<video>` expanded to one id per video feature."""
    ids = tokenizer(target_prompt(question)).input_ids
    video_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    if ids.count(video_id) != 1:
        raise ValueError(f"target prompt must hold one {VIDEO_TOKEN}: {target_prompt(question)!r}")
    i = ids.index(video_id)
    return ids[:i] + [video_id] * n_video_tokens + ids[i + 1 :]


def encode_draft_prompt(tokenizer, question: str, system: str = VICUNA_SYSTEM) -> list[int]:
    """Token ids of the draft prompt with the event placeholder as EVENT_PLACEHOLDER_ID."""
    before, after = draft_prompt(question, system).split(EVENT_TOKEN)
    head = tokenizer(before.rstrip()).input_ids
    tail = tokenizer(after.strip(), add_special_tokens=False).input_ids
    return head + [EVENT_PLACEHOLDER_ID] + tail
