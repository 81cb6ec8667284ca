"""The baseline and the peers, timed by the same harness as speculative decoding.

* `hf_greedy`: the target's own `generate` (greedy, ids >= the vocab limit suppressed) — the
  baseline every speedup divides by.
* `hf_prompt_lookup`: HF prompt-lookup decoding (`prompt_lookup_num_tokens`).
* `hf_assisted`: HF assisted generation with a text-only assistant (the draft's
  `LlamaForCausalLM`, no events). HF feeds the assistant the target's own input ids (when
  vocabulary sizes match; otherwise it re-tokenises text, which needs `tokenizer` and
  `assistant_tokenizer`); it offers no hook to give the assistant a different prompt.
* `wrapper_greedy`: greedy decoding through the same `TargetDecoder` calls the SD loop makes, to
  separate harness overhead from the gain of speculation.

All are lossless: greedy, their tokens must equal the baseline's; sampling (`DecodeSpec.sampling`,
`hf_greedy` and `wrapper_greedy` only), their tokens are distributed as the target's sampling. Each returns a
`GenerationRecord` whose `total_ms` excludes `warmup` untimed calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import GenerationConfig

from cross_modal_sd.decoding.inputs import TargetInputs
from cross_modal_sd.decoding.sampling import GREEDY, Sampling, TokenChooser
from cross_modal_sd.decoding.speculative import TargetState, extend_answer, verify
from cross_modal_sd.decoding.timing import time_call
from cross_modal_sd.models.generation import greedy_kwargs
from cross_modal_sd.models.wrappers import TargetDecoder


@dataclass(frozen=True)
class DecodeSpec:
    """What every method must reproduce: the target's decoding with these limits (greedy, or
    its sampling distribution).

    Attributes:
        max_new_tokens: answer length cap (EOS included).
        vocab_limit: ids at or above it are never generated.
        eos_token_id: the answer ends after this token.
        sampling: greedy (default) or sampling settings.
    """

    max_new_tokens: int
    vocab_limit: int
    eos_token_id: int | None
    sampling: Sampling = GREEDY


@dataclass
class GenerationRecord:
    """Per-sample record of a baseline or peer run (`to_dict` for reports)."""

    method: str
    tokens: list[int]
    total_ms: float

    @property
    def n_new(self) -> int:
        return len(self.tokens)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "n_new": self.n_new}


def greedy_generation_config(model, spec: DecodeSpec, **overrides) -> GenerationConfig:
    """A complete config (greedy, or the spec's sampling with every warper set explicitly), so
    no default of the model's own generation config leaks in."""
    text = model.config.get_text_config()
    kwargs = greedy_kwargs(
        spec.vocab_limit, text.vocab_size, spec.max_new_tokens, spec.eos_token_id, text.pad_token_id
    )
    return GenerationConfig(**{**kwargs, **spec.sampling.generate_kwargs()}, **overrides)


def _hf_generate(model, inputs: TargetInputs, config: GenerationConfig, **kwargs) -> list[int]:
    seed = kwargs.pop("seed", None)
    if config.do_sample and seed is not None:  # generate samples from torch's global stream
        torch.manual_seed(seed)
    ids = inputs.input_ids
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values_videos=inputs.pixel_values_videos,
        generation_config=config,
        **kwargs,
    )
    return out[0, ids.shape[1] :].tolist()


def _timed(method: str, fn: Callable[[], list[int]], warmup: int, device) -> GenerationRecord:
    tokens, ms = time_call(fn, warmup=warmup, device=device)
    return GenerationRecord(method, tokens, ms)


def hf_greedy(
    model, inputs: TargetInputs, spec: DecodeSpec, warmup: int = 1, seed: int | None = None
) -> GenerationRecord:
    """The target's own `generate`: greedy (the baseline), or sampling at the spec's settings
    from `seed` (default ``spec.sampling.seed``)."""
    config = greedy_generation_config(model, spec)
    seed = spec.sampling.seed if seed is None else seed
    method = "greedy" if spec.sampling.greedy else "sample"
    return _timed(
        method, lambda: _hf_generate(model, inputs, config, seed=seed), warmup, inputs.device
    )


def hf_prompt_lookup(
    model,
    inputs: TargetInputs,
    spec: DecodeSpec,
    num_tokens: int = 10,
    max_ngram: int = 2,
    warmup: int = 1,
) -> GenerationRecord:
    """HF prompt-lookup decoding: drafts copied from n-gram matches in the prompt.

    Args:
        num_tokens: tokens proposed per match (`prompt_lookup_num_tokens`).
        max_ngram: longest n-gram matched (`max_matching_ngram_size`).
    """
    config = greedy_generation_config(
        model, spec, prompt_lookup_num_tokens=num_tokens, max_matching_ngram_size=max_ngram
    )
    return _timed(
        "prompt_lookup", lambda: _hf_generate(model, inputs, config), warmup, inputs.device
    )


def hf_assisted(
    model,
    inputs: TargetInputs,
    assistant,
    spec: DecodeSpec,
    warmup: int = 1,
    **generate_kwargs,
) -> GenerationRecord:
    """HF assisted generation with a text-only assistant (e.g. `EventGPT.language_model`).

    The assistant drafts with its own `generation_config` (HF defaults: 20 tokens per round,
    constant schedule); `generate_kwargs` (e.g. `tokenizer`, `assistant_tokenizer`) go to
    `generate` unchanged.
    """
    config = greedy_generation_config(model, spec)

    def run() -> list[int]:
        return _hf_generate(model, inputs, config, assistant_model=assistant, **generate_kwargs)

    return _timed("assisted", run, warmup, inputs.device)


def loop_tokens(
    target: TargetDecoder,
    inputs: TargetInputs,
    spec: DecodeSpec,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Decoding through the `TargetDecoder` calls the SD loop makes (untimed): greedy, or the
    spec's sampling from `generator` (default: seeded with ``spec.sampling.seed``; one draw a
    token, as `generate` draws, so the same seed gives `generate`'s tokens)."""
    chooser = TokenChooser(spec.sampling, generator)
    out = target.prefill(inputs.input_ids, inputs.pixel_values_videos)
    _, first = chooser.choose(out.logits[0, -1:], [])
    state = TargetState(out.cache, out.cache.get_seq_length(), first)
    answer, done = extend_answer([], state.answer, spec.eos_token_id, spec.max_new_tokens)
    while not done:
        state, _, committed = verify(target, state, [], chooser)
        answer, done = extend_answer(answer, committed, spec.eos_token_id, spec.max_new_tokens)
    return answer


def wrapper_greedy(
    target: TargetDecoder,
    inputs: TargetInputs,
    spec: DecodeSpec,
    warmup: int = 1,
    seed: int | None = None,
) -> GenerationRecord:
    """`loop_tokens`, timed like the other methods (sampling: from `seed`, default
    ``spec.sampling.seed``)."""

    def run() -> list[int]:
        if spec.sampling.greedy:
            return loop_tokens(target, inputs, spec)
        s = spec.sampling.seed if seed is None else seed
        return loop_tokens(target, inputs, spec, torch.Generator().manual_seed(s))

    return _timed("wrapper_greedy", run, warmup, inputs.device)
