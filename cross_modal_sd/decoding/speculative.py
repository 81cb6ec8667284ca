"""Lossless greedy cross-modal speculative decoding (docs/design.md §11), batch size 1.

Round 1: the target prefill and the draft (prefill, then drafting) run at the same time in two
threads (on CUDA each on its own stream). The target's prefill logits give its own first token
t0; the drafts d0, d1, ... propose answer positions 0, 1, .... d0 is checked against t0 directly;
if it matches, one target forward over [d0 .. d(k-1)] yields the target's greedy tokens for
positions 1..k, which check d1..d(k-1) and give one bonus token.

Later rounds (`decode`): ``"autoregressive"`` decodes with the target alone (the prior system);
``"draft_model"`` syncs the drafter to the committed answer, drafts again and verifies the
drafts in one forward over [last committed token, drafts...].

Target invariant between rounds: its cache holds prompt + answer[:-1]; the last committed token
is the next forward's first input. Output equals the target's greedy decoding token for token.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from transformers import DynamicCache

from cross_modal_sd.decoding.drafters import (
    Drafter,
    DraftPolicy,
    DraftState,
    Proposal,
    common_prefix_len,
    propose,
    sync,
)
from cross_modal_sd.decoding.inputs import TargetInputs
from cross_modal_sd.decoding.timing import Span, clock_ms, synchronize, thread_budget, timed_span
from cross_modal_sd.models.wrappers import TargetDecoder, crop_cache

DECODE_PHASES = ("autoregressive", "draft_model")


@dataclass(frozen=True)
class SDConfig:
    """One speculative-decoding configuration.

    Attributes:
        policy: draft length per round.
        decode: what follows round 1: ``"autoregressive"`` (target alone) or ``"draft_model"``
            (keep drafting and verifying).
        max_new_tokens: answer length cap (EOS included).
        eos_token_id: the answer ends after this token (None: only the cap ends it).
        split_threads: on CPU, halve torch's intra-op threads while target and draft run
            concurrently, so SD uses no more cores than the budget the baseline got (a budget
            of 1 still gives each of the two threads one).
    """

    policy: DraftPolicy = field(default_factory=DraftPolicy)
    decode: Literal["autoregressive", "draft_model"] = "draft_model"
    max_new_tokens: int = 32
    eos_token_id: int | None = None
    split_threads: bool = True

    def __post_init__(self):
        if self.decode not in DECODE_PHASES:
            raise ValueError(f"SDConfig.decode must be one of {DECODE_PHASES}, got {self.decode!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(
                f"SDConfig.max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}"
            )

    @property
    def name(self) -> str:
        """Method label for reports, e.g. ``sd/fixed-5/draft_model`` (for people: code reads
        `to_dict`, never the label)."""
        return f"sd/{self.policy.name}/{self.decode}"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict; `from_dict` rebuilds the configuration."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SDConfig:
        """The configuration of `to_dict` (``policy`` a dict or a `DraftPolicy`)."""
        d = dict(d)
        policy = d.pop("policy", {})
        if not isinstance(policy, DraftPolicy):
            policy = DraftPolicy(**policy)
        return cls(policy=policy, **d)


@dataclass
class TargetState:
    """The target between rounds: cache = prompt + answer[:-1] (updated in place by calls)."""

    cache: DynamicCache
    prompt_len: int
    answer: list[int]


@dataclass
class SDResult:
    """Per-sample record of one speculative decoding run (`to_dict` for reports).

    `config` is the `SDConfig.to_dict` the run used, so readers never parse `method` back.

    Counts: `rounds` drafting/verification rounds; `drafted[i]`/`accepted[i]` per round (round 0
    is the one overlapped with the target prefill); `target_forwards` counts the prefill, every
    verification forward and every autoregressive step.

    Times (ms): `prefill_ms` target prefill; `draft_prefill_ms` draft prefill; `draft_ms` all
    drafting after the draft prefill (round 1 and later rounds incl. resyncs); `verify_ms` all
    verification forwards (plain greedy steps of the autoregressive phase are not verification;
    they count in `decode_ms` only); `decode_ms` wall time after round 1; `total_ms` wall time of
    the call; `overlap_ms` measured intersection of the target prefill with the draft's round-1
    work (prefill + drafting); `wait_ms` time the target, done prefilling, waited for the drafts.
    """

    method: str
    config: dict[str, Any]
    tokens: list[int]
    rounds: int
    drafted: list[int]
    accepted: list[int]
    target_forwards: int
    stop: Literal["eos", "max_new_tokens"]
    prefill_ms: float
    draft_prefill_ms: float
    draft_ms: float
    verify_ms: float
    decode_ms: float
    total_ms: float
    overlap_ms: float
    wait_ms: float

    @property
    def n_new(self) -> int:
        return len(self.tokens)

    @property
    def tau(self) -> float:
        """Tokens committed per target forward."""
        return self.n_new / self.target_forwards

    @property
    def accept_rate(self) -> float:
        """Accepted / drafted over all rounds (0.0 when nothing was drafted)."""
        drafted = sum(self.drafted)
        return sum(self.accepted) / drafted if drafted else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict, derived fields included."""
        return {
            **asdict(self),
            "n_new": self.n_new,
            "tau": self.tau,
            "accept_rate": self.accept_rate,
        }


def accept_length(drafts: Sequence[int], greedy: Sequence[int]) -> int:
    """Number of leading drafts equal to the target's greedy token at the same position."""
    return common_prefix_len(drafts, greedy)


def extend_answer(
    answer: list[int], new: Sequence[int], eos_token_id: int | None, max_new_tokens: int
) -> tuple[list[int], bool]:
    """Appends `new` up to the first EOS (kept) and the length cap; returns (answer, finished)."""
    out = list(answer)
    for token in new:
        if len(out) == max_new_tokens:
            break
        out.append(token)
        if token == eos_token_id:
            break
    finished = len(out) == max_new_tokens or (bool(out) and out[-1] == eos_token_id)
    return out, finished


def verify(
    target: TargetDecoder, state: TargetState, drafts: Sequence[int]
) -> tuple[TargetState, int, list[int]]:
    """Verifies drafts for answer positions n..n+k-1 (n = len(state.answer)) in one forward.

    The forward reads [answer[-1], d_0, ..., d_(k-1)]; its output i is the target's greedy token
    for position n + i. The leading matching drafts are accepted and the target's token after
    them (a correction, or a bonus when all match) is added. The cache is cropped to
    prompt + answer[:-1] of the new answer.

    Returns:
        The new state, the number of accepted drafts, and the committed tokens (accepted drafts
        plus the target's token).
    """
    n = len(state.answer)
    ids = torch.tensor([[state.answer[-1], *drafts]], device=target.model.device)
    out = target.forward_tokens(ids, state.cache)  # logits (1, k + 1, V)
    greedy = out.logits[0].argmax(dim=-1).tolist()
    accepted = accept_length(drafts, greedy)
    committed = greedy[: accepted + 1]
    crop_cache(state.cache, state.prompt_len + n + accepted)
    return TargetState(state.cache, state.prompt_len, state.answer + committed), accepted, committed


# The span of work that never ran: it overlaps nothing and lasts 0 ms.
_NOT_RUN = Span(0.0, 0.0)


@dataclass
class _Round1:
    """What the two concurrent jobs of round 1 hand back (draft fields stay empty without one)."""

    target: TargetState | None = None
    target_span: Span = _NOT_RUN
    draft: DraftState | None = None
    proposal: Proposal = field(default_factory=lambda: Proposal([], []))
    draft_prefill_span: Span = _NOT_RUN
    draft_span: Span = _NOT_RUN


def _stream(device: torch.device):
    return torch.cuda.Stream(device) if device.type == "cuda" else None


def _on_stream(stream):
    return torch.cuda.stream(stream) if stream is not None else nullcontext()


def _round1(
    target: TargetDecoder,
    drafter: Drafter,
    target_inputs: TargetInputs,
    draft_inputs: Any,
    config: SDConfig,
    limit: int,
) -> _Round1:
    """Target prefill and draft prefill + drafting, concurrently in two threads."""
    device = target_inputs.device
    ready = threading.Event()
    result = _Round1()

    def target_job() -> None:
        stream = _stream(device)
        spans: list[Span] = []
        try:
            with _on_stream(stream), timed_span(device, spans, stream):
                out = target.prefill(target_inputs.input_ids, target_inputs.pixel_values_videos)
                t0 = int(out.logits[0, -1].argmax())
        finally:
            ready.set()  # also on error, so a drafter waiting for the target never hangs
        prompt_len = out.cache.get_seq_length()
        result.target = TargetState(out.cache, prompt_len, [t0])
        result.target_span = spans[0]

    def draft_job() -> None:
        stream = _stream(device)
        spans: list[Span] = []
        with _on_stream(stream):
            with timed_span(device, spans, stream):
                state = drafter.prefill(draft_inputs)
            with timed_span(device, spans, stream):
                state, proposal = propose(
                    drafter,
                    state,
                    config.policy,
                    limit,
                    first_round=True,
                    target_ready=ready.is_set,
                    eos_token_id=config.eos_token_id,
                )
        result.draft, result.proposal = state, proposal
        result.draft_prefill_span, result.draft_span = spans

    # Each job syncs its own stream before its span ends, and the device is synchronised before
    # and after round 1, so later work on the default stream never races round-1 tensors.
    jobs = [target_job] + ([draft_job] if limit > 0 else [])
    threads = (
        max(1, torch.get_num_threads() // 2) if config.split_threads and len(jobs) == 2 else None
    )
    with thread_budget(threads if device.type == "cpu" else None):
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            for future in [pool.submit(job) for job in jobs]:
                future.result()  # re-raises a job's exception here
    synchronize(device)
    return result


def speculative_generate(
    target: TargetDecoder,
    drafter: Drafter,
    target_inputs: TargetInputs,
    draft_inputs: Any,
    config: SDConfig,
) -> SDResult:
    """Greedy speculative decoding of one sample; the tokens equal the target's greedy output.

    Args:
        target: the target behind the decoding API (its logits mask ids >= the vocab limit).
        drafter: proposes tokens (e.g. `AdapterDrafter`); driven through explicit states.
        target_inputs: prompt and frames for the target.
        draft_inputs: whatever `drafter.prefill` reads (`DraftInputs` for `AdapterDrafter`).
        config: policy, decode phase, length cap and EOS.

    Returns:
        The per-sample record (answer tokens, acceptance counts, per-phase timing).
    """
    device = target_inputs.device
    eos, cap = config.eos_token_id, config.max_new_tokens
    synchronize(device)
    start = clock_ms()

    # Round 1. Drafts are capped so that all-accepted plus the bonus fills the cap exactly.
    r1 = _round1(target, drafter, target_inputs, draft_inputs, config, limit=cap - 1)
    state, draft_state, drafts = r1.target, r1.draft, r1.proposal.tokens
    answer, done = extend_answer([], state.answer, eos, cap)
    verify_spans: list[Span] = []
    forwards = 1
    # d0 is checked against the prefill's t0; only d1.. need a target forward (after t0). With no
    # d1 that forward would verify nothing, so it is left to the next round or step.
    accepted = int(bool(drafts) and drafts[0] == state.answer[0])
    if accepted and len(drafts) > 1 and not done:
        with timed_span(device, verify_spans):
            state, more, committed = verify(target, state, drafts[1:])
        accepted += more
        forwards += 1
        answer, done = extend_answer(answer, committed, eos, cap)
    drafted_per_round, accepted_per_round = [len(drafts)], [accepted]
    round1_end = clock_ms()

    draft_spans: list[Span] = []
    while not done:
        drafts = []
        if config.decode == "draft_model" and cap - len(answer) > 1:
            with timed_span(device, draft_spans):
                draft_state = sync(drafter, draft_state, answer)
                draft_state, proposal = propose(
                    drafter,
                    draft_state,
                    config.policy,
                    cap - len(answer) - 1,
                    first_round=False,
                    eos_token_id=eos,
                )
            drafts = proposal.tokens
        if config.decode == "draft_model":
            with timed_span(device, verify_spans):
                state, n_ok, committed = verify(target, state, drafts)
            drafted_per_round.append(len(drafts))
            accepted_per_round.append(n_ok)
        else:
            state, _, committed = verify(target, state, [])  # one plain greedy step
        forwards += 1
        answer, done = extend_answer(answer, committed, eos, cap)
    synchronize(device)
    end = clock_ms()

    t_span, d_pre, d_span = r1.target_span, r1.draft_prefill_span, r1.draft_span
    return SDResult(
        method=config.name,
        config=config.to_dict(),
        tokens=answer,
        rounds=len(drafted_per_round),
        drafted=drafted_per_round,
        accepted=accepted_per_round,
        target_forwards=forwards,
        stop="eos" if answer[-1] == eos else "max_new_tokens",
        prefill_ms=t_span.ms,
        draft_prefill_ms=d_pre.ms,
        draft_ms=d_span.ms + sum(s.ms for s in draft_spans),
        verify_ms=sum(s.ms for s in verify_spans),
        decode_ms=end - round1_end,
        total_ms=end - start,
        overlap_ms=t_span.overlap_ms(Span(d_pre.start, d_span.end)),
        wait_ms=max(0.0, d_span.end - t_span.end),
    )
