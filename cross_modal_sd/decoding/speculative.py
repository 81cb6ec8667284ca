"""Lossless greedy cross-modal speculative decoding (docs/design.md §11), batch size 1.

Round 1 (``round1="cross_modal"``): the target prefill and the draft (prefill, then drafting) run
at the same time: the drafter on its `DraftRunner` (a thread of this process with its own CUDA
stream, or a process of its own pinned to its own cores), the target here. The target's prefill
logits give its own first token t0; the drafts d0, d1, ... propose answer positions 0, 1, ....
d0 is checked against t0 directly; if it matches, one target forward over [d0 .. d(k-1)] yields
the target's greedy tokens for positions 1..k, which check d1..d(k-1) and give one bonus token.
A policy with ``head_tail`` ends the chain in drafts of the drafter's copy of the feature head,
made from the adapter's estimates while the target still prefills (`runners`; the loop verifies
them as any round-1 drafts). With ``round1="none"`` the target prefills alone.

Later rounds (`decode`): ``"autoregressive"`` decodes with the target alone (the prior system);
``"draft_model"`` syncs the cross-modal drafter to the committed answer, drafts again and
verifies the drafts in one forward over [last committed token, drafts...]; ``"head"`` does the
same with a feature head (`heads.HeadDrafter`) that reads the target's own states from the
prefill and every verification forward.

Target invariant between rounds: its cache holds prompt + answer[:-1]; the last committed token
is the next forward's first input. Output equals the target's greedy decoding token for token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from transformers import DynamicCache

from cross_modal_sd.decoding.drafters import DraftPolicy, Proposal
from cross_modal_sd.decoding.heads import HeadDrafter, HeadState
from cross_modal_sd.decoding.inputs import TargetInputs
from cross_modal_sd.decoding.runners import NOT_RUN, DraftRunner, LocalRunner
from cross_modal_sd.decoding.sampling import GREEDY, GREEDY_CHOOSER, Sampling, TokenChooser
from cross_modal_sd.decoding.timing import Span, clock_ms, synchronize, thread_budget, timed_span
from cross_modal_sd.decoding.trees import DraftTree, verify_tree
from cross_modal_sd.models.wrappers import TargetDecoder, crop_cache

DECODE_PHASES = ("autoregressive", "draft_model", "head")
ROUND1_KINDS = ("cross_modal", "none")


@dataclass(frozen=True)
class SDConfig:
    """One speculative-decoding configuration.

    Attributes:
        policy: draft length per round.
        decode: what follows round 1: ``"autoregressive"`` (target alone), ``"draft_model"``
            (the cross-modal drafter keeps drafting) or ``"head"`` (a feature head on the
            target's own states drafts).
        round1: ``"cross_modal"`` (the drafter drafts while the target prefills) or ``"none"``
            (the target prefills alone: with ``decode="head"`` the VLM-only baseline of
            EAGLE-style drafting).
        max_new_tokens: answer length cap (EOS included).
        eos_token_id: the answer ends after this token (None: only the cap ends it).
        sampling: greedy (the default) or the target's sampling settings, kept exact.
        fuse_round1: ``round1="cross_modal", decode="head"`` only: the head drafts on from round
            1's drafts before they are verified, reading the adapter's estimates of the target's
            states at them, and one target forward verifies both (`_bridge`); round 1's own
            verification forward is saved.
        wait_for_drafter: False: the target, done prefilling, never waits for the drafter:
            round 1 takes the drafts made so far (a chain, read off the runner's board; none
            while the drafter is still in its prefill) and the drafter finishes its step on its
            own cores, unwaited (a fused round or a tree, which need the whole answer, wait for
            a drafter past its prefill and go without one still in it). Only where later rounds
            do not need the drafter (``decode`` not ``"draft_model"``).
    """

    policy: DraftPolicy = field(default_factory=DraftPolicy)
    decode: Literal["autoregressive", "draft_model", "head"] = "draft_model"
    max_new_tokens: int = 32
    eos_token_id: int | None = None
    round1: Literal["cross_modal", "none"] = "cross_modal"
    sampling: Sampling = GREEDY
    fuse_round1: bool = False
    wait_for_drafter: bool = True

    def __post_init__(self):
        if self.decode not in DECODE_PHASES:
            raise ValueError(f"SDConfig.decode must be one of {DECODE_PHASES}, got {self.decode!r}")
        if self.round1 not in ROUND1_KINDS:
            raise ValueError(f"SDConfig.round1 must be one of {ROUND1_KINDS}, got {self.round1!r}")
        if self.fuse_round1 and (
            self.round1 != "cross_modal" or self.decode != "head" or self.policy.tree
        ):
            raise ValueError(
                "SDConfig.fuse_round1 needs round1='cross_modal', decode='head' and a chain "
                f"policy, got round1={self.round1!r}, decode={self.decode!r}, "
                f"policy {self.policy.name}"
            )
        if self.policy.head_tail is not None and (self.round1 != "cross_modal" or self.fuse_round1):
            raise ValueError(
                "DraftPolicy.head_tail drafts on from round 1's cross-modal drafts: it needs "
                f"round1='cross_modal' and no fused round, got round1={self.round1!r}, "
                f"fuse_round1={self.fuse_round1}"
            )
        if not self.wait_for_drafter and (
            self.round1 != "cross_modal" or self.decode == "draft_model"
        ):
            raise ValueError(
                "SDConfig.wait_for_drafter=False needs round1='cross_modal' and a decode phase "
                f"without the drafter, got round1={self.round1!r}, decode={self.decode!r}"
            )
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(
                f"SDConfig.max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}"
            )

    @property
    def name(self) -> str:
        """Method label for reports, e.g. ``sd/fixed-5/draft_model`` or ``sd/none/fixed-5/head``
        (for people: code reads `to_dict`, never the label)."""
        first = "" if self.round1 == "cross_modal" else "none/"
        first += "fused/" if self.fuse_round1 else ""
        last = "" if self.sampling.greedy else f"/{self.sampling.name}"
        return f"sd/{first}{self.policy.name}/{self.decode}{last}"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict; `from_dict` rebuilds the configuration."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SDConfig:
        """The configuration of `to_dict` (``policy``/``sampling`` dicts or their classes)."""
        d = dict(d)
        policy = d.pop("policy", {})
        if not isinstance(policy, DraftPolicy):
            policy = DraftPolicy(**policy)
        sampling = d.pop("sampling", {})  # records written before sampling existed: greedy
        if not isinstance(sampling, Sampling):
            sampling = Sampling(**sampling)
        return cls(policy=policy, sampling=sampling, **d)


@dataclass(frozen=True)
class ThreadPlan:
    """Torch intra-op threads of the target's work in one run (None: leave the setting alone).

    Attributes:
        round1: while the drafter works beside the target's prefill (with an in-process drafter
            on a CPU the drafter shares this count: torch's setting is process-wide).
        decode: every target forward after round 1.
    """

    round1: int | None = None
    decode: int | None = None


@dataclass
class TargetState:
    """The target between rounds: cache = prompt + answer[:-1] (updated in place by calls).

    ``states`` (1, j, D): the final-layer states of the last forward at the positions whose
    tokens are now committed (a feature head reads them; None before any forward).
    """

    cache: DynamicCache
    prompt_len: int
    answer: list[int]
    states: torch.Tensor | None = None


@dataclass
class SDResult:
    """Per-sample record of one speculative decoding run (`to_dict` for reports).

    `config` is the `SDConfig.to_dict` the run used, so readers never parse `method` back.

    Counts: `rounds` drafting/verification rounds; `drafted[i]`/`accepted[i]`/`committed[i]`
    (tokens the round added to the answer) per round (round 0 is the one overlapped with the
    target prefill: its prefill's own token included); `target_forwards` counts the prefill, every
    verification forward and every autoregressive step.

    Times (ms): `prefill_ms` target prefill; `draft_prefill_ms` draft prefill; `draft_ms` all
    drafting after the draft prefill (round 1 and later rounds incl. resyncs); `verify_ms` all
    verification forwards (plain greedy steps of the autoregressive phase are not verification;
    they count in `decode_ms` only); `decode_ms` wall time after round 1; `total_ms` wall time of
    the call; `overlap_ms` measured intersection of the target prefill with the draft's round-1
    work (prefill + drafting); `wait_ms` time the target, done prefilling, waited for the drafts.

    `busy` lists ``[start_ms, end_ms, threads]`` of every piece of work and the intra-op threads
    it held (the target's forwards, the drafter's jobs), so a run can be checked against its core
    budget.
    """

    method: str
    config: dict[str, Any]
    tokens: list[int]
    rounds: int
    drafted: list[int]
    accepted: list[int]
    committed: list[int]
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
    busy: list[list[float]] = field(default_factory=list)

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
    target: TargetDecoder,
    state: TargetState,
    drafts: Sequence[int],
    chooser: TokenChooser = GREEDY_CHOOSER,
) -> tuple[TargetState, int, list[int]]:
    """Verifies drafts for answer positions n..n+k-1 (n = len(state.answer)) in one forward.

    The forward reads [answer[-1], d_0, ..., d_(k-1)]; its output i is the target's
    distribution for position n + i. The `chooser` accepts a prefix of the drafts (greedy: the
    drafts equal to the row's argmax) and adds the target's token after them (a correction, or
    a bonus when all are accepted). The cache is cropped to prompt + answer[:-1] of the new
    answer.

    Returns:
        The new state, the number of accepted drafts, and the committed tokens (accepted drafts
        plus the target's token).
    """
    n = len(state.answer)
    ids = torch.tensor([[state.answer[-1], *drafts]], device=target.model.device)
    out = target.forward_tokens(ids, state.cache)  # logits (1, k + 1, V)
    accepted, committed = chooser.choose(out.logits[0], drafts)
    crop_cache(state.cache, state.prompt_len + n + accepted)
    states = out.hidden[:, : accepted + 1]  # at answer[-1] and the accepted drafts
    new = TargetState(state.cache, state.prompt_len, state.answer + committed, states)
    return new, accepted, committed


def verify_round(
    target: TargetDecoder,
    state: TargetState,
    drafts: Sequence[int] | DraftTree,
    chooser: TokenChooser = GREEDY_CHOOSER,
) -> tuple[TargetState, int, list[int]]:
    """`verify` for a chain of drafts, `trees.verify_tree` for a tree: the new state, the
    number of accepted drafts and the committed tokens."""
    if isinstance(drafts, DraftTree):
        state, path, committed = verify_tree(target, state, drafts, chooser)
        return state, len(path), committed
    return verify(target, state, drafts, chooser)


def _bridge(
    head: HeadDrafter,
    policy: DraftPolicy,
    proposal: Proposal,
    first: list[int],
    sigma: torch.Tensor,
    eos: int | None,
    cap: int,
) -> tuple[HeadState, list[int]]:
    """The head's first drafts before round 1 is verified (``SDConfig.fuse_round1``).

    With d0 accepted, the head reads round 1's drafts as if committed, the adapter's estimates of
    the target's states standing in for the states no forward has computed yet (pair i is
    ``(a_i, d_i)``, a_i the adapter's output that drafted d_i; pair 0 reads the true σ₋₁), and
    drafts on from the last one. Only pair 0 counts as read from a true state, so the next sync
    rereads the rest from the verification forward's states.

    Returns:
        The head's state and its drafts (none when round 1's drafts end at EOS or fill the cap).
    """
    tentative = [*first, *proposal.tokens[1:]]
    state = head.start()
    if tentative[-1] == eos or cap - len(tentative) < 2:
        return state, []
    estimates = torch.as_tensor(proposal.states)[None, 1 : len(tentative)]
    states = torch.cat([sigma, estimates.to(sigma.device, sigma.dtype)], dim=1)
    state = head.sync(state, tentative, states)
    state = HeadState(state.cache, tentative[:1], state.last)
    state, drafts = head.propose(state, policy, cap - len(tentative) - 1, eos)
    return state, drafts.tokens


def speculative_generate(
    target: TargetDecoder,
    drafter: DraftRunner | Any,
    target_inputs: TargetInputs,
    draft_inputs: Any,
    config: SDConfig,
    threads: ThreadPlan = ThreadPlan(),
    head: HeadDrafter | None = None,
    chooser: TokenChooser | None = None,
) -> SDResult:
    """Speculative decoding of one sample: greedy, its tokens equal the target's greedy output;
    sampling (``config.sampling``), they are distributed exactly as the target's own sampling.

    Args:
        target: the target behind the decoding API (its logits mask ids >= the vocab limit).
        drafter: a `DraftRunner`, or a drafter (e.g. `AdapterDrafter`) to run in a thread here;
            None when nothing cross-modal drafts (``round1="none"`` and no ``draft_model``).
        target_inputs: prompt and frames for the target.
        draft_inputs: whatever the drafter's `prefill` reads (`DraftInputs` for `AdapterDrafter`).
        config: round 1, decode phase, policy, length cap and EOS.
        threads: the target's intra-op threads in round 1 and after (CPU).
        head: the feature-head drafter of ``decode="head"``.
        chooser: picks the committed tokens (default: from ``config.sampling``: greedy, or
            sampling seeded with its ``seed``); its settings must be the config's.

    Returns:
        The per-sample record (answer tokens, acceptance counts, per-phase timing).

    Raises:
        ValueError: a configuration without the drafter it needs; a chooser whose settings
            are not the config's.
    """
    device = target_inputs.device
    needs_drafter = config.round1 == "cross_modal" or config.decode == "draft_model"
    if needs_drafter and drafter is None:
        raise ValueError(f"{config.name}: needs a cross-modal drafter (got None)")
    if config.decode == "head" and head is None:
        raise ValueError(f"{config.name}: decode='head' needs a HeadDrafter")
    if drafter is not None and not isinstance(drafter, DraftRunner):
        with LocalRunner(drafter, device) as runner:  # a bare drafter: a thread here
            return speculative_generate(
                target, runner, target_inputs, draft_inputs, config, threads, head, chooser
            )
    if chooser is None:
        chooser = GREEDY_CHOOSER if config.sampling.greedy else TokenChooser(config.sampling)
    if chooser.sampling != config.sampling:
        raise ValueError(
            f"{config.name}: the chooser samples with {chooser.sampling}, the config with "
            f"{config.sampling}"
        )
    cpu = device.type == "cpu"
    runner = drafter
    eos, cap, policy = config.eos_token_id, config.max_new_tokens, config.policy
    busy: list[list[float]] = []
    synchronize(device)
    start = clock_ms()

    # Round 1. Drafts are capped so that all-accepted plus the bonus fills the cap exactly; the
    # drafter works while the target prefills here.
    drafting_round1 = cap > 1 and config.round1 == "cross_modal"
    t_spans: list[Span] = []
    with thread_budget(threads.round1 if cpu else None):
        if drafting_round1:
            runner.set_ready(False)
            runner.start_round1(draft_inputs, policy, cap - 1, eos, config.fuse_round1)
        try:
            with timed_span(device, t_spans):
                out = target.prefill(target_inputs.input_ids, target_inputs.pixel_values_videos)
        finally:
            if runner is not None:
                runner.set_ready(True)  # also on error, so a drafter waiting for it ends
            r1, took = None, False
            whole = config.fuse_round1 or policy.tree_in(True) is not None  # all of it
            if drafting_round1 and (config.wait_for_drafter or (whole and runner.prefilled())):
                r1 = runner.finish_round1()
            elif drafting_round1:  # no waiting: the drafts made so far, if any
                r1 = None if whole else runner.drafts_so_far()
                runner.abandon_round1()
                took = True
        target_threads = torch.get_num_threads()
    t_span = t_spans[0]
    busy.append([t_span.start, t_span.end, target_threads])
    if r1 is not None and r1.prefill.end:  # (an abandoned job works on, on its own cores)
        busy.append([r1.prefill.start, max(r1.prefill.end, r1.drafting.end), r1.threads])
    d_pre, d_span = (r1.prefill, r1.drafting) if r1 is not None else (NOT_RUN, NOT_RUN)
    proposal = r1.proposal if r1 is not None else Proposal([], [])
    # d0 is checked against the prefill's own row (accepted, or the target's token instead);
    # only d1.. need a target forward (after d0). With no d1 that forward would verify
    # nothing, so it is left to the next round. A tree: the root's child that the prefill's
    # row accepts (`TokenChooser.walk`), if any, and its subtree.
    drafts, rest = proposal.tokens, proposal.tokens[1:]
    if proposal.parents is None:
        accepted, first = chooser.choose(out.logits[0, -1:], drafts[:1])
    else:  # the root's children against the prefill's row (recursive rejection)
        tree = proposal.tree()
        path, first = chooser.walk(out.logits[0, -1:], tree.children, tree.tokens)
        accepted = len(path)
        rest = tree.subtree(path[0]) if path else []
    state = TargetState(out.cache, out.cache.get_seq_length(), first, out.hidden[:, -1:])
    sigma = state.states  # σ_{-1} .. σ_{len(answer) - 2}: what a head reads
    answer, done = extend_answer([], state.answer, eos, cap)
    verify_spans: list[Span] = []
    forwards = 1
    draft_spans: list[Span] = []
    extra: list[int] = []  # the head's drafts verified with round 1's (``fuse_round1``)
    with thread_budget(threads.decode if cpu else None):
        decode_threads = torch.get_num_threads()
        # Inside the budget: on a CPU, work at more threads than the target's cores leaves
        # spinning OpenMP workers behind that slow every later op.
        head_state = head.start() if config.decode == "head" else None
        committed_per_round = [1]
        if config.fuse_round1 and accepted and proposal.states is not None and not done:
            with timed_span(device, draft_spans):
                head_state, extra = _bridge(head, policy, proposal, first, sigma, eos, cap)
            busy.append([draft_spans[-1].start, draft_spans[-1].end, decode_threads])
            rest = [*rest, *extra]
        if accepted and len(rest) > 0 and not done:
            with timed_span(device, verify_spans):
                state, more, committed = verify_round(target, state, rest, chooser)
            accepted += more
            forwards += 1
            answer, done = extend_answer(answer, committed, eos, cap)
            sigma = torch.cat([sigma, state.states], dim=1)
            committed_per_round = [len(answer)]
        drafted_per_round, accepted_per_round = [len(drafts) + len(extra)], [accepted]
        round1_end = clock_ms()

        step_spans: list[Span] = []  # plain greedy steps (autoregressive): not verification
        drafting = config.decode in ("draft_model", "head")
        while not done:
            drafts = []
            if drafting and cap - len(answer) > 1:
                limit = cap - len(answer) - 1
                if config.decode == "head":
                    spans: list[Span] = []
                    with timed_span(device, spans):
                        head_state = head.sync(head_state, answer, sigma)
                        head_state, proposal = head.propose(head_state, policy, limit, eos)
                    r_span, r_threads = spans[0], decode_threads
                else:
                    r = runner.next_round(answer, policy, limit, eos)
                    r_span, r_threads, proposal = r.drafting, r.threads, r.proposal
                draft_spans.append(r_span)
                busy.append([r_span.start, r_span.end, r_threads])
                drafts = proposal.tokens if proposal.parents is None else proposal.tree()
            spans = verify_spans if drafting else step_spans
            with timed_span(device, spans):
                # Without drafts: one plain greedy step.
                state, n_ok, committed = verify_round(target, state, drafts, chooser)
            if drafting:
                drafted_per_round.append(len(drafts))
                accepted_per_round.append(n_ok)
            before = len(answer)
            answer, done = extend_answer(answer, committed, eos, cap)
            if drafting:
                committed_per_round.append(len(answer) - before)
            sigma = torch.cat([sigma, state.states], dim=1)
            forwards += 1
        busy += [[s.start, s.end, decode_threads] for s in verify_spans + step_spans]
    synchronize(device)
    end = clock_ms()

    return SDResult(
        method=config.name,
        config=config.to_dict(),
        tokens=answer,
        rounds=len(drafted_per_round),
        drafted=drafted_per_round,
        accepted=accepted_per_round,
        committed=committed_per_round,
        target_forwards=forwards,
        stop="eos" if answer[-1] == eos else "max_new_tokens",
        prefill_ms=t_span.ms,
        draft_prefill_ms=d_pre.ms,
        draft_ms=d_span.ms + sum(s.ms for s in draft_spans),
        verify_ms=sum(s.ms for s in verify_spans),
        decode_ms=end - round1_end,
        total_ms=end - start,
        overlap_ms=t_span.overlap_ms(Span(d_pre.start, d_span.end)),
        wait_ms=0.0 if took else max(0.0, d_span.end - t_span.end),
        busy=busy,
    )
