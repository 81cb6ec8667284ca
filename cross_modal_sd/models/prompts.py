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


def encode_draft_prompt(tokenizer, question: str, wrap: tuple[int, int] | None = None) -> list[int]:
    """EventGPT's prompt ids: the text on either side of `<event>` tokenised separately.

    Each side is tokenised as a whole text (so the trailing space before `<event>` and the newline
    after it keep their tokens), the second side's BOS is dropped and the placeholder id -200 goes
    between them, wrapped in (`<ev_start>`, `<ev_end>`) ids when the checkpoint uses them. The
    same function serves the real Vicuna tokenizer and the mini world's word-level one.
    """
    before, after = draft_prompt(question).split(EVENT_TOKEN)
    head = tokenizer(before).input_ids
    tail = tokenizer(after).input_ids
    if tail and tail[0] == tokenizer.bos_token_id:
        tail = tail[1:]
    middle = [EVENT_PLACEHOLDER_ID] if wrap is None else [wrap[0], EVENT_PLACEHOLDER_ID, wrap[1]]
    return head + middle + tail
