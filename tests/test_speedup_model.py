"""The speedup model: hand-computed runs, the prior system's own arithmetic, the replay's counts
against the SD loop with stub drafters, acceptance sequences, profile files, and the stand-in
pair whose costs are known by construction: predicted from probes and scripted acceptance, it
must match the SD loop's measured wall time."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cross_modal_sd.decoding import (
    DecodeSpec,
    DraftInputs,
    DraftPolicy,
    LocalRunner,
    Sampling,
    ScriptedDrafter,
    ScriptedHead,
    SDConfig,
    TargetInputs,
    ThreadPlan,
    TreeShape,
    speculative_generate,
    thread_budget,
    wrapper_greedy,
)
from cross_modal_sd.models.wrappers import ForwardOut
from cross_modal_sd.speedup import (
    Acceptance,
    CostProfile,
    ProfileError,
    load_profile,
    mean_profile,
    predict,
    save_profile,
    simulate,
)
from cross_modal_sd.speedup.measure import ProbeError, ProfileModels, measure_profile
from cross_modal_sd.speedup.project import (
    PUBLISHED_HEADS,
    geometric,
    head_hist_for_tau,
    head_projection,
    levers,
    prior_acceptance,
    project,
    render_head_projection,
)
from cross_modal_sd.speedup.validation import render_validation, validation_rows


def _toy_profile(**changes) -> CostProfile:
    costs = dict(
        target_prefill_ms=10.0,
        target_token_ms=1.0,
        verify_points=((1, 1.5), (5, 3.5)),  # V(k) = 1 + 0.5 k
        draft_prefill_ms=2.0,
        draft_token_ms=0.5,
        adapter_ms=0.1,
    )
    return CostProfile(**(costs | changes))


def _config(decode: str, policy: DraftPolicy, cap: int = 16) -> SDConfig:
    return SDConfig(policy=policy, decode=decode, max_new_tokens=cap)


# ------------------------------------------------------------------------------ hand-computed


def test_draft_model_run_by_hand():
    """Answer of 8 (EOS at 7), 3 drafts per round; drafts miss at positions 2 and 6."""
    p = _toy_profile()
    match = [True, True, False, True, True, True, False, True]
    out = simulate(p, _config("draft_model", DraftPolicy(gamma=3)), match, [1.0] * 8)
    # Round 1: P_d + 3 A + 2 T_d = 3.3 < P_t: 10 ms; d0 right, one verify V(2) = 2 checks d1, d2:
    # d1 accepted, d2 wrong, the target's token commits: answer length 3.
    # Round 2 at 3: resync T_d + drafting (3 A + 2 T_d) = 1.8; drafts 3, 4, 5 all right;
    # V(3) = 2.5; commits 4 (length 7). Round 3 at 7: 1 draft (cap - 7 - 1 = 8 left, EOS at 7):
    # proposing EOS ends the round after 1 draft: resync 0.5 + 0.1; V(1) = 1.5; commits EOS.
    assert out["round1_ms"] == pytest.approx(10.0 + 2.0)
    assert out["decode_ms"] == pytest.approx(1.8 + 2.5 + 0.6 + 1.5)
    assert out["total_ms"] == pytest.approx(12.0 + 6.4)
    assert (out["rounds"], out["drafted"], out["accepted"], out["target_forwards"]) == (
        3,
        3 + 3 + 1,
        2 + 3 + 1,
        4,
    )


def test_a_late_drafter_left_unwaited_by_hand():
    """``wait_for_drafter=False``: a draft prefill (12 ms) outlasting the target's (10 ms)
    gives round 1 no drafts and no wait; an early one (2 ms) is used as before."""
    match = [True] * 6
    config = SDConfig(DraftPolicy(gamma=3), "autoregressive", 16, wait_for_drafter=False)
    late = simulate(_toy_profile(draft_prefill_ms=12.0), config, match, [1.0] * 6)
    assert late["first_drafted"] == 0 and late["round1_ms"] == pytest.approx(10.0)
    assert late["total_ms"] == pytest.approx(10.0 + 5 * 1.0)  # the target decodes alone
    waited = simulate(_toy_profile(draft_prefill_ms=12.0), _config("autoregressive",
                      DraftPolicy(gamma=3)), match, [1.0] * 6)  # fmt: skip
    assert waited["first_drafted"] == 3 and waited["round1_ms"] > 12.0
    early = simulate(_toy_profile(), config, match, [1.0] * 6)
    assert early["first_drafted"] == 3
    # A prefill-window round takes the drafts done when the target is: (10 − (2 − 0.5)) / 0.6
    # = 14.2, so 14 (capped by the 5 the answer needs), and round 1 costs the prefill alone
    # (no wait) plus verifying d1..d4: V(4) = 3.
    window = SDConfig(DraftPolicy(gamma="prefill"), "autoregressive", 6, wait_for_drafter=False)
    out = simulate(_toy_profile(), window, match, [1.0] * 6)
    assert out["first_drafted"] == 5 and out["round1_ms"] == pytest.approx(10.0 + 3.0)
    assert _toy_profile().drafts_by_prefill_end() == 14


def test_autoregressive_run_by_hand_and_contention():
    p = _toy_profile(target_contention=1.5, draft_contention=2.0, round_trip_ms=0.4)
    match = [True] * 5 + [False] * 5
    config = _config("autoregressive", DraftPolicy(gamma=8), cap=11)  # 10 tokens: EOS at 9
    out = simulate(p, config, match, [1.0] * 10)
    # The draft job: its prefill (2 ms, 4 ms slowed) and 8 proposals + 7 feeds (4.3 ms alone,
    # 8.6 ms slowed): 12.6 ms, answered 0.4 ms later. The target's 10 ms prefill is slowed by
    # half for the 10 ms it overlaps the job: 15 ms, the longer of the two.
    assert p.round1_ms(4.3) == pytest.approx(max(10 + 0.5 * 10, 4.0 + 8.6 + 0.4))
    assert out["round1_ms"] == pytest.approx(15.0 + (1 + 0.5 * 7))
    # 5 accepted (d0..d4) + the target's token: 6 committed, 4 autoregressive steps left.
    assert out["decode_ms"] == pytest.approx(4 * 1.0)
    assert out["target_forwards"] == 2 + 4
    cold = p.with_(draft_prefill_round1_ms=9.0)  # a measured cold prefill replaces P_d * c_d
    assert cold.round1_ms(4.3) == pytest.approx(9.0 + 8.6 + 0.4)


def test_rejected_first_draft_costs_no_verify_and_commits_one_token():
    out = simulate(
        _toy_profile(), _config("autoregressive", DraftPolicy(gamma=4)), [False] * 6, [1.0] * 6
    )
    assert out["verify_ms"] == 0 and out["accepted"] == 0
    assert out["decode_ms"] == pytest.approx(5 * 1.0) and out["target_forwards"] == 6


def test_confidence_policy_stops_where_confidence_drops():
    conf = [0.9, 0.9, 0.2, 0.9, 0.9, 0.9, 0.9, 0.9]
    out = simulate(
        _toy_profile(), _config("autoregressive", DraftPolicy(kind="confidence")), [True] * 8, conf
    )
    assert out["first_drafted"] == 2  # the third draft (0.2 < 0.5) is dropped, ending the round
    # A dropped draft cost one more proposal and feed: 3 A + 2 T_d.
    assert out["draft_ms"] == pytest.approx(3 * 0.1 + 2 * 0.5)


def test_prefill_policy_drafts_while_the_target_prefills():
    # P_d 2, then a proposal (0.1) and a feed (0.5) per draft: draft 14 is proposed at 9.9 ms,
    # draft 15 at 10.5 ms, the first after the 10 ms prefill ends.
    p = _toy_profile()
    assert p.prefill_drafts() == 15
    out = simulate(
        p, _config("autoregressive", DraftPolicy(gamma="prefill"), cap=40), [True] * 30, [1.0] * 30
    )
    assert out["first_drafted"] == 15
    slower = p.with_(target_contention=2.0)  # a slower prefill holds more drafts
    assert slower.prefill_drafts() == 31


def test_answer_longer_than_the_cap_is_rejected():
    with pytest.raises(ValueError, match="exceeds max_new_tokens=4"):
        simulate(
            _toy_profile(), _config("draft_model", DraftPolicy(), cap=4), [True] * 6, [1.0] * 6
        )


def test_prior_system_arithmetic_is_reproduced():
    """docs/design.md §12: 317 ms prefill, 14 ms/token, ~70 ms to verify ~21 drafts, 4.4 accepted
    of 30 tokens, decoding alone after round 1: measured 736 vs 721 ms, 1.03x."""
    prior = load_profile("prior_rtx4090")
    config = _config("autoregressive", DraftPolicy(gamma="prefill"), cap=32)
    out = predict(prior, prior_acceptance(30), config)
    assert out["first_drafted"] == pytest.approx(21, abs=1)
    assert out["first_accepted"] == pytest.approx(4.4, abs=0.15)
    assert out["speedup"]["ratio_of_means"] == pytest.approx(0.99, abs=0.03)


def test_prior_costs_make_decode_phase_drafting_a_loss_at_any_acceptance():
    prior = load_profile("prior_rtx4090")
    policy = DraftPolicy(gamma="prefill", decode_gamma=5)
    for q in (0.3, 0.95):
        s = project(prior, geometric(q))
        assert s["sd_fixed_draft_model"] < s["sd_fixed_autoregressive"]
    cheap = prior.with_(draft_token_ms=2.5, adapter_ms=0.4)
    s = project(cheap, geometric(0.95))
    assert s["sd_fixed_draft_model"] > s["sd_fixed_autoregressive"] + 0.15
    assert policy.decode_gamma == 5


def test_levers_move_the_prior_projection_the_expected_way():
    prior = load_profile("prior_rtx4090")
    rows = dict(levers(prior, prior_acceptance()))
    base = rows["as measured"]["sd_fixed_autoregressive"]
    assert rows["acceptance: near-perfect (q = 0.99)"]["sd_fixed_autoregressive"] > base
    assert (
        rows["concurrency: both models 2x slower side by side (GIL-bound threads)"][
            "sd_fixed_autoregressive"
        ]
        < base
    )


def test_published_head_acceptance_becomes_run_histograms():
    # gamma 2: E[min(R, 2)] = q + q^2 = tau - 1 = 0.75 at q = 0.5.
    hist = head_hist_for_tau(1.75, 2, k=4)
    assert hist == pytest.approx([0.5, 0.25, 0.125, 0.0625, 0.0625], abs=1e-9)
    with pytest.raises(ValueError, match=r"tau must lie in \(1, 9\)"):
        head_hist_for_tau(9.5, 8)
    acc = prior_acceptance(30).with_head_runs([0] * 8 + [1], 8)  # a head always right
    assert all(run == min(8, 30 - start) for start, run in enumerate(acc.head_runs[0], 1))


def test_real_pair_projection_of_head_and_hybrid():
    """On the prior system's costs, a head at 5% of a step: a better head beats a worse one; the
    hybrid beats the weaker head alone when round 1's drafts are good (q = 0.9), and does worse
    with the prior system's round 1 (21 drafts verified at 70 ms for 4.4 accepted)."""
    prior = load_profile("prior_rtx4090")
    prior = prior.with_(head_token_ms=0.05 * prior.target_token_ms)
    heads = {name: head_hist_for_tau(tau, 6) for name, tau in PUBLISHED_HEADS.items()}
    rows = head_projection(prior, geometric(0.9), heads, gammas=(2, 4, 6))
    weak, strong = rows
    assert 1.0 < weak["head"] < strong["head"]
    assert weak["head_gamma"] < strong["head_gamma"]  # a steep verify: fewer drafts pay
    assert weak["hybrid"] > weak["head"] + 0.03
    poor = head_projection(prior, prior_acceptance(), heads, gammas=(2, 4, 6))
    assert all(p["hybrid"] < r["hybrid"] for p, r in zip(poor, rows, strict=True))
    assert "hybrid" in render_head_projection(rows, prior, "the prior system")


# ------------------------------------------------------------- the replay against the loop


class _StubCache:
    """A KV cache of `n` positions (what `crop_cache` and the loop read)."""

    def __init__(self, n: int):
        self.n = n

    def get_seq_length(self) -> int:
        return self.n

    def crop(self, length: int) -> None:  # transformers' two conventions: keep n, or drop -n
        self.n = self.n + length if length < 0 else length


@dataclass
class StandInTarget:
    """A target whose greedy answer is `answer` and whose costs are sleeps: prefill `prefill_ms`,
    a forward over k tokens `a_ms + b_ms * k`."""

    answer: list[int]
    vocab: int = 50
    prefill_ms: float = 0.0
    a_ms: float = 0.0
    b_ms: float = 0.0
    prompt: int = 7
    vocab_limit: int | None = None

    def __post_init__(self):
        self.model = type("M", (), {"device": torch.device("cpu")})()
        self.lm_head_weight = torch.zeros(self.vocab, 4)

    def _logits(self, positions: list[int]) -> torch.Tensor:
        logits = torch.zeros(1, len(positions), self.vocab)
        for i, pos in enumerate(positions):
            logits[0, i, self.answer[min(pos, len(self.answer) - 1)]] = 1.0
        return logits

    def prefill(self, input_ids, pixels, keep_last=1):
        time.sleep(self.prefill_ms / 1e3)
        return ForwardOut(torch.zeros(1, 1, 4), self._logits([0]), _StubCache(self.prompt))

    def forward_tokens(self, tokens, cache):
        k = tokens.shape[1]
        time.sleep((self.a_ms + self.b_ms * k) / 1e3)
        first = cache.n - self.prompt + 1  # the answer position the first output predicts
        cache.n += k
        return ForwardOut(torch.zeros(1, k, 4), self._logits(list(range(first, first + k))), cache)


STAND_IN_INPUTS = (TargetInputs(torch.zeros(1, 7, dtype=torch.long), torch.zeros(1)), None)


@pytest.mark.parametrize("decode", ["autoregressive", "draft_model"])
@pytest.mark.parametrize(
    ("policy", "wrong_at"),
    [
        (DraftPolicy(gamma=3), ()),
        (DraftPolicy(gamma=3), (0,)),
        (DraftPolicy(gamma=4), (2, 5, 6)),
        (DraftPolicy(kind="confidence", threshold=0.5, max_drafts=5), (3,)),
    ],
)
def test_replayed_counts_equal_the_loop_with_scripted_drafters(decode, policy, wrong_at):
    """Accept all / none / scattered misses: the replay's rounds, drafts, accepted drafts and
    target forwards equal what `speculative_generate` does, answer ending at EOS. (How many
    drafts a ``gamma="prefill"`` round 1 holds depends on time: the stand-in timing test below
    covers it.)"""
    eos = 2
    answer = [5 + i for i in range(10)] + [eos]
    target = StandInTarget(answer, prefill_ms=0.0)
    drafter = ScriptedDrafter(answer, 50, wrong_at=wrong_at)
    config = SDConfig(policy=policy, decode=decode, max_new_tokens=16, eos_token_id=eos)
    record = speculative_generate(target, drafter, *STAND_IN_INPUTS, config).to_dict()
    assert record["tokens"] == answer
    match = [drafter.is_correct(i) for i in range(len(answer))]
    out = simulate(_toy_profile(), config, match, [1.0] * len(answer))
    assert out["rounds"] == record["rounds"]
    assert out["drafted"] == sum(record["drafted"])
    assert out["accepted"] == sum(record["accepted"])
    assert out["first_drafted"] == record["drafted"][0]
    assert out["target_forwards"] == record["target_forwards"]


def _head_runs(n: int, wrong_at) -> tuple[int, ...]:
    """A scripted head's chain runs: entry ``L`` (committed length ``L + 1``) counts its right
    drafts from position ``L + 1``."""
    runs = []
    for start in range(1, n):
        run = 0
        while start + run < n and start + run not in wrong_at:
            run += 1
        runs.append(run)
    return tuple(runs)


def test_head_run_by_hand():
    """Head-only: answer of 10 (EOS at 9), 4 drafts a round, the head wrong at position 3."""
    p = _toy_profile(head_token_ms=0.2)
    config = SDConfig(DraftPolicy(gamma="prefill", decode_gamma=4), "head", 16, 2, "none")
    runs = _head_runs(10, {3})
    assert runs[:4] == (2, 1, 0, 6)
    out = simulate(p, config, [False] * 10, [1.0] * 10, runs)
    # Round 1: the prefill alone (10), t0. At 1: 4 drafts (0.8), 1 and 2 right, V(4) = 3:
    # commits 3 (length 4). At 4: drafts 4..7 right (0.8), V(4): commits 5 (length 9). At 9:
    # 1 draft (the EOS; the run reaches the end) 0.2, V(1) = 1.5: commits 1.
    assert out["round1_ms"] == pytest.approx(10.0)
    assert out["draft_ms"] == pytest.approx(0.8 + 0.8 + 0.2)
    assert out["decode_ms"] == pytest.approx(0.8 + 3 + 0.8 + 3 + 0.2 + 1.5)
    assert (out["rounds"], out["drafted"], out["accepted"], out["target_forwards"]) == (
        4,
        9,
        2 + 4 + 1,
        4,
    )
    with pytest.raises(ValueError, match="needs the head's runs"):
        simulate(p, config, [False] * 10, [1.0] * 10)
    with pytest.raises(ProfileError, match="no head_token_ms"):
        simulate(_toy_profile(), config, [False] * 10, [1.0] * 10, runs)


def test_head_only_runs_on_the_baselines_cores():
    """Round 1 ``none`` prices the target at its solo costs (no drafter resident); the hybrid
    keeps SD's."""
    p = _toy_profile(
        head_token_ms=0.2, solo_prefill_ms=6.0, solo_token_ms=0.5, solo_verify_points=((1, 0.6),)
    )
    assert p.solo().target_prefill_ms == 6.0 and p.solo().verify_ms(1) == pytest.approx(0.6)
    assert _toy_profile().solo() == _toy_profile()
    runs = _head_runs(4, {1, 2, 3})  # every head draft wrong: one token a round
    policy = DraftPolicy(gamma="prefill", decode_gamma=2)
    solo = simulate(p, SDConfig(policy, "head", 16, 2, "none"), [False] * 4, [1.0] * 4, runs)
    assert solo["total_ms"] == pytest.approx(6.0 + 3 * (2 * 0.2) + 3 * p.solo().verify_ms(2))
    hybrid = simulate(p, SDConfig(policy, "head", 16, 2), [False] * 4, [1.0] * 4, runs)
    assert hybrid["verify_ms"] == pytest.approx(3 * p.verify_ms(2))
    assert save_profile and CostProfile.from_dict(p.to_dict()) == p


@pytest.mark.parametrize("round1", ["none", "cross_modal"])
@pytest.mark.parametrize("wrong_at", [(), tuple(range(1, 11)), (3, 4, 8)])
def test_replayed_head_counts_equal_the_loop(round1, wrong_at):
    """All / none / scattered head misses: the replay's counts equal the loop's. (What a head
    proposes after a miss is not in its runs: a scripted EOS there would end a round early.)"""
    eos = 2
    answer = [5 + i for i in range(10)] + [eos]
    target = StandInTarget(answer)
    head = ScriptedHead(answer, 50, wrong_at=wrong_at)
    drafter = ScriptedDrafter(answer, 50, correct_upto=2) if round1 == "cross_modal" else None
    policy = DraftPolicy(gamma=3, decode_gamma=4)
    config = SDConfig(policy, "head", 16, eos, round1)
    record = speculative_generate(target, drafter, *STAND_IN_INPUTS, config, head=head)
    assert record.tokens == answer
    match = [drafter.is_correct(i) if drafter else False for i in range(len(answer))]
    runs = _head_runs(len(answer), set(wrong_at))
    out = simulate(_toy_profile(head_token_ms=0.1), config, match, [1.0] * len(answer), runs)
    assert out["rounds"] == record.rounds
    assert out["drafted"] == sum(record.drafted)
    assert out["accepted"] == sum(record.accepted)
    assert out["target_forwards"] == record.target_forwards


def test_head_tail_by_hand():
    """The hybrid's round-1 head tail: 3 cross-modal drafts (done at 1.5 + 3 x 0.6 = 3.3 ms of
    the 10 ms prefill), then head drafts at 0.5 ms each: 13 fit, ``decode_gamma`` = 4 taken."""
    p = _toy_profile(head_token_ms=0.5)
    assert p.tail_drafts(3, 4, waits=False) == 4 and p.tail_drafts(3, 99, waits=False) == 13
    assert p.tail_drafts(3, 99, waits=True) == 14  # the first made after the prefill's end
    assert p.tail_drafts(15, 4, waits=False) == 0  # the prefill ended during the chain
    eos = 99
    policy = DraftPolicy(gamma="prefill", decode_gamma=4, head_tail=3)
    config = SDConfig(policy, "head", 16, eos, wait_for_drafter=False)
    runs = _head_runs(12, {5})  # from length 3 the head's chain runs 2 (wrong at 5)
    out = simulate(p, config, [True] * 12, [1.0] * 12, runs)
    # Round 1: d0..d2 right and 2 of the tail's 4: accepted 5, verified by V(2 + 4) = 4; no
    # wait (10 ms). Drafting: 3 A + 2 T_d + 4 H = 3.3.
    assert (out["first_drafted"], out["first_accepted"]) == (7, 5)
    assert out["round1_ms"] == pytest.approx(10.0 + 4.0)
    later_drafting = out["decode_ms"] - (out["verify_ms"] - 4.0)
    assert out["draft_ms"] - later_drafting == pytest.approx(3.3)
    missed = simulate(p, config, [True, False] + [True] * 10, [1.0] * 12, runs)
    assert (missed["first_drafted"], missed["first_accepted"]) == (7, 1)  # the tail goes too


@pytest.mark.parametrize(
    ("chain_wrong", "tail_wrong"), [((), ()), ((), (4,)), ((), (3, 4, 5, 6)), ((1,), ())]
)
def test_replayed_head_tail_counts_equal_the_loop(chain_wrong, tail_wrong):
    """A target prefilling long enough for the whole tail: the replay's counts equal the
    loop's (the drafter's tail from a scripted head, the loop's head the same script)."""
    eos = 2
    answer = [5 + i for i in range(12)] + [eos]
    target = StandInTarget(answer, prefill_ms=60.0)
    tail_head = ScriptedHead(answer, 50, wrong_at=tail_wrong)
    drafter = ScriptedDrafter(answer, 50, wrong_at=chain_wrong, head=tail_head)
    policy = DraftPolicy(gamma="prefill", decode_gamma=4, head_tail=3)
    config = SDConfig(policy, "head", 16, eos, wait_for_drafter=False)
    head = ScriptedHead(answer, 50, wrong_at=tail_wrong)
    record = speculative_generate(target, drafter, *STAND_IN_INPUTS, config, head=head)
    assert record.tokens == answer
    match = [drafter.is_correct(i) for i in range(len(answer))]
    runs = _head_runs(len(answer), set(tail_wrong))
    out = simulate(_toy_profile(head_token_ms=0.1), config, match, [1.0] * len(answer), runs)
    assert record.drafted[0] == 7  # 3 cross-modal drafts and a tail of 4
    assert out["first_drafted"] == record.drafted[0]
    assert out["first_accepted"] == record.accepted[0]
    assert out["rounds"] == record.rounds
    assert out["drafted"] == sum(record.drafted)
    assert out["accepted"] == sum(record.accepted)
    assert out["target_forwards"] == record.target_forwards


def test_acceptance_takes_a_heads_runs_from_its_export():
    @dataclass
    class Export:
        val_acceptance: dict
        path: str = "head.pt"

    acc = Acceptance(((True, False, True), (True,)), ((1.0,) * 3, (1.0,)), "val")
    runs = torch.tensor([[2, 1, -1], [-1, -1, -1]], dtype=torch.int16)
    head = Export({"runs": runs, "lengths": torch.tensor([3, 1]), "k": torch.tensor(8)})
    both = acc.with_head(head)
    assert both.head_runs == ((2, 1), ()) and both.head_k == 8 and "head.pt" in both.source
    other = Export({"runs": runs, "lengths": torch.tensor([3, 2]), "k": torch.tensor(8)})
    with pytest.raises(ValueError, match="not the adapter's"):
        acc.with_head(other)
    with pytest.raises(ValueError, match="no head chain runs"):
        acc.with_head(Export({"match": runs}))
    with pytest.raises(ValueError, match="a feature head's export"):
        Acceptance.from_export(head)
    config = SDConfig(DraftPolicy(gamma="prefill", decode_gamma=9), "head", 8, None, "none")
    with pytest.raises(ValueError, match="scored to 8; lower head_gamma"):
        predict(_toy_profile(head_token_ms=0.1), both, config)
    # Tree scores: (S, T, k = 2, K = 2); depths never scored (zeros) are dropped, per start.
    top = torch.zeros(2, 3, 2, 2, dtype=torch.float16)
    top[0, 0] = torch.tensor([[0.5, 0.25], [0.75, 0.125]])
    top[0, 1, 0] = torch.tensor([0.5, 0.5])
    rank = torch.tensor([[[0, 1], [1, -1], [-1, -1]], [[-1, -1]] * 3], dtype=torch.int8)
    misses = torch.tensor([[-1, 3, -1], [-1, -1, -1]], dtype=torch.int8)
    trees = Export({**head.val_acceptance, "tree_top": top, "tree_rank": rank, "miss_rank": misses})
    with_trees = acc.with_head(trees)
    assert with_trees.head_top == ((((0.5, 0.25), (0.75, 0.125)), ((0.5, 0.5),)), ())
    assert with_trees.head_rank == (((0, 1), (1,)), ())
    assert with_trees.head_miss_rank == ((-1, 3), ())

    def tree(nodes: int) -> SDConfig:
        return SDConfig(DraftPolicy(gamma=2, tree=TreeShape(nodes, 2)), "head", 8, None, "none")

    with pytest.raises(ValueError, match="no head top-k recorded"):
        predict(_toy_profile(head_token_ms=0.1), both, tree(5))
    # Sample 0 (3 tokens, EOS), one head round from length 1. Path scores: depth 1 r0 0.5, r1
    # 0.25; under r0: r0 0.375, r1 0.0625; under r1: 0.1875, 0.03125. The answer's path is r0
    # then r1 (0.0625): a budget of 5 nodes reaches it (2 accepted), 4 do not (1 accepted).
    for nodes, accepted in ((5, 2), (4, 1)):
        out = predict(_toy_profile(head_token_ms=0.1), with_trees, tree(nodes))
        assert out["rounds"] == pytest.approx((2 + 1) / 2)  # round 1, then one head round
        assert out["drafted"] == pytest.approx(nodes / 2)  # sample 1 (1 token) drafts nothing
        assert out["accepted"] == pytest.approx(accepted / 2)


@pytest.fixture(scope="module")
def stand_in():
    """Costs known by construction: prefill 60 ms, a forward over k tokens 8 + 1.5 k ms; the
    drafter's prefill 20 ms, 5 ms per fed token, proposals free."""
    answer = [5 + i % 20 for i in range(18)] + [2]
    target = StandInTarget(answer, prefill_ms=60.0, a_ms=8.0, b_ms=1.5)
    wrong = (3, 9, 10, 15)
    drafter = ScriptedDrafter(answer, 50, wrong_at=wrong, prefill_s=0.020, token_s=0.005)
    return target, drafter, answer, wrong


def test_stand_in_probes_recover_the_constructed_costs(stand_in):
    """Sleeps overshoot a little, more on a busy machine: within 20% of the construction."""
    REL = 0.2  # noqa: N806
    target, drafter, answer, _ = stand_in
    with LocalRunner(drafter) as runner:
        models = ProfileModels(
            target,
            runner,
            *STAND_IN_INPUTS,
            baselines={
                "loop": lambda spec: wrapper_greedy(target, STAND_IN_INPUTS[0], spec, warmup=0)
            },
        )
        p = measure_profile(models, repeats=2, context=4, verify_drafts=(1, 4), baseline="loop")
    assert p.target_prefill_ms == pytest.approx(60, rel=REL)
    assert p.target_token_ms == pytest.approx(9.5, rel=REL)
    assert p.verify_ms(4) == pytest.approx(8 + 1.5 * 5, rel=REL)
    assert p.draft_prefill_ms == pytest.approx(20, rel=REL)
    assert p.draft_token_ms == pytest.approx(5, rel=REL)
    assert p.adapter_ms < 0.5
    assert p.target_contention == pytest.approx(1.0, abs=0.1)  # sleeps release the lock
    assert p.baseline_ms(10) == pytest.approx(60 + 9 * 9.5, rel=REL)


@pytest.mark.parametrize(
    ("policy", "decode"),
    [
        (DraftPolicy(gamma=4), "draft_model"),
        (DraftPolicy(gamma="prefill", decode_gamma=3), "autoregressive"),
        (DraftPolicy(gamma="prefill", decode_gamma=3), "draft_model"),
    ],
)
def test_prediction_matches_the_stand_in_pairs_wall_time(stand_in, policy, decode):
    """Probes (not SD runs) give the costs, the script gives acceptance: the predicted SD time
    must match the measured one within 10% (it lands within ~4% here). The check has teeth: a
    drafter always wrong, or always right, predicts a run more than 10% off."""
    target, drafter, answer, wrong = stand_in
    config = SDConfig(policy=policy, decode=decode, max_new_tokens=24, eos_token_id=2)
    with LocalRunner(drafter) as runner:
        models = ProfileModels(target, runner, *STAND_IN_INPUTS)
        profile = measure_profile(models, repeats=2, context=4, verify_drafts=(1, 3, 6))
        walls = []
        for _ in range(3):
            record = speculative_generate(target, runner, *STAND_IN_INPUTS, config)
            assert record.tokens == answer
            walls.append(record.total_ms)
    measured = sorted(walls)[1]
    match = [i not in wrong for i in range(len(answer))]
    acceptance = Acceptance((tuple(match),), ((1.0,) * len(answer),), "scripted")
    predicted = predict(profile, acceptance, config)["total_ms"]
    assert predicted == pytest.approx(measured, rel=0.10)
    errors = [
        abs(
            predict(profile, Acceptance(((ok,) * len(answer),), ((1.0,) * len(answer),)), config)[
                "total_ms"
            ]
            / measured
            - 1
        )
        for ok in (False, True)
    ]
    assert max(errors) > 0.10


def test_probe_settings_are_checked():
    target = StandInTarget([5, 2])
    with LocalRunner(ScriptedDrafter([5, 2], 50)) as runner:
        models = ProfileModels(target, runner, *STAND_IN_INPUTS, baselines={"loop": print})
        with pytest.raises(ProbeError, match="repeats must be >= 1"):
            measure_profile(models, repeats=0)
        with pytest.raises(ProbeError, match=r"verify_drafts must be ks >= 1"):
            measure_profile(models, verify_drafts=(0, 2))
        with pytest.raises(ProbeError, match="baseline_lengths needs two or more"):
            measure_profile(models, baseline_lengths=(4,))
        with pytest.raises(ProbeError, match="cost probe failed"):
            measure_profile(models, repeats=1, context=2)  # `print` is no baseline loop


# ------------------------------------------------------------------------------- acceptance


def test_synthetic_runs_follow_their_histogram():
    acc = Acceptance.from_runs([0.25, 0.25, 0.5], [40] * 5, repeats=200)
    # Run r: 0 or 1 with P 0.25 each, the open last bin: the whole answer.
    runs = [next((i for i, m in enumerate(seq) if not m), len(seq)) for seq in acc.match]
    assert sum(r == 40 for r in runs) / len(runs) == pytest.approx(0.5, abs=0.05)
    assert sum(r == 0 for r in runs) / len(runs) == pytest.approx(0.25, abs=0.05)
    assert all(
        c == (1.0 if m else 0.0)
        for seq, cs in zip(acc.match, acc.confidence, strict=False)
        for m, c in zip(seq, cs, strict=False)
    )


def test_geometric_and_mean_acceptance():
    assert geometric(0.5, 400).first_run_mean == pytest.approx(1.0, abs=0.3)
    assert Acceptance.from_mean(4.4, [30], repeats=400).first_run_mean == pytest.approx(
        4.4, abs=0.1
    )
    with pytest.raises(ValueError, match="q must lie in"):
        Acceptance.geometric(1.5, [10])


def test_acceptance_round_trips_through_padded_arrays():
    from cross_modal_sd.metrics.offline import acceptance_arrays

    top = [[0.5, 0.25, 0.125, 0.0625]] * 3
    rows = [
        {
            "match": [True, False, True],
            "confidence": [0.9, 0.25, 0.5],
            "top_probs": top,
            "rank": [0, 1, -1],
            "target_logits": [[2.0, 1.0], [3.0, 0.5], [1.0, 1.0]],
            "draft_rank": [0, -1, 1],
        },
        {
            "match": [True],
            "confidence": [1.0],
            "top_probs": top[:1],
            "rank": [0],
            "target_logits": [[4.0, 0.0]],
            "draft_rank": [0],
        },
    ]
    arrays = acceptance_arrays(rows)
    assert arrays["match"].shape == (2, 3) and arrays["lengths"].tolist() == [3, 1]
    assert arrays["top_probs"].shape == (2, 3, 4) and arrays["target_logits"].shape == (2, 3, 2)
    assert arrays["rank"][1].tolist() == [0, -1, -1]  # padded with -1
    acc = Acceptance.from_arrays(**arrays)
    assert acc.match == ((True, False, True), (True,))
    stored = torch.tensor(0.9, dtype=torch.float16).item()  # float16 storage
    assert acc.confidence == ((stored, 0.25, 0.5), (1.0,))
    assert acc.top == (tuple(map(tuple, top)), (tuple(top[0]),))
    assert acc.rank == ((0, 1, -1), (0,)) and acc.draft_rank == ((0, -1, 1), (0,))
    assert [t.tolist() for t in acc.target_logits] == [rows[0]["target_logits"], [[4.0, 0.0]]]


def _sampling_acceptance() -> Acceptance:
    """Four positions whose target logits give p = (3/4, 1/4) three times, then (7/8, 1/8), at
    T = 1. The cross-modal drafts stand at ranks 0, 0, 1 and outside; the head's
    chain from start 0 has one right draft, then a wrong one at the target's rank 1; from
    start 1 its first draft is that wrong one; from start 2 one right draft (the answer ends)."""
    row = [[math.log(3), 0.0]] * 3 + [[math.log(7), 0.0]]
    return Acceptance(
        ((True, True, False, False),),
        ((0.9,) * 4,),
        head_runs=((1, 0, 1),),
        head_k=4,
        target_logits=(torch.tensor(row),),
        draft_rank=((0, 0, 1, -1),),
        head_miss_rank=((1, 1, -1),),
    )


def test_sampled_acceptance_accepts_a_draft_with_its_target_probability():
    draws = 4000
    acc = _sampling_acceptance().sampled(Sampling(temperature=1.0), repeats=draws, seed=1)
    assert len(acc.match) == draws and acc.confidence[0] == (0.9,) * 4
    rates = [sum(m[i] for m in acc.match) / draws for i in range(4)]
    assert rates == pytest.approx([0.75, 0.75, 0.25, 0.0], abs=0.03)  # sd <= 0.008
    # Head runs: from start 0, 0 w.p. 1/4, 1 w.p. 3/4 * 3/4, 2 (its wrong draft accepted) w.p.
    # 3/4 * 1/4: mean 15/16; from start 1, 1/4; from start 2, 7/8.
    means = [sum(r[i] for r in acc.head_runs) / draws for i in range(3)]
    assert means == pytest.approx([15 / 16, 0.25, 7 / 8], abs=0.04)
    # top-k 1 keeps the target's first choice alone: certain acceptance or none.
    top1 = _sampling_acceptance().sampled(Sampling(temperature=1.0, top_k=1), repeats=50)
    assert set(top1.match) == {(True, True, False, False)} and set(top1.head_runs) == {(1, 0, 1)}
    # T = 0.5 squares the odds: 3/4 becomes 9/10.
    cold = _sampling_acceptance().sampled(Sampling(temperature=0.5), repeats=draws, seed=2)
    assert sum(m[1] for m in cold.match) / draws == pytest.approx(0.9, abs=0.03)


def test_sampled_predictions_need_the_target_distributions():
    acc = _sampling_acceptance()
    with pytest.raises(ValueError, match="temperature 0 is greedy"):
        acc.sampled(Sampling())
    with pytest.raises(ValueError, match="no target distributions"):
        Acceptance(acc.match, acc.confidence, "old export").sampled(Sampling(temperature=1.0))
    config = SDConfig(DraftPolicy(gamma=2), "draft_model", 8, sampling=Sampling(temperature=1.0))
    low = predict(_toy_profile(), acc, config)
    assert "sampled T1" in low["acceptance"]["source"]
    greedy = predict(_toy_profile(), acc, SDConfig(DraftPolicy(gamma=2), "draft_model", 8))
    # The greedy replay accepts positions 0 and 1 for sure; sampling accepts them less often.
    assert low["accept_rate"] < greedy["accept_rate"]
    tree = SDConfig(DraftPolicy(gamma=2, tree=TreeShape(4, 2)), "draft_model", 8)
    with pytest.raises(ValueError, match="no drafter top-k recorded"):
        predict(_toy_profile(), acc, tree)
    sampled_tree = SDConfig(tree.policy, "draft_model", 8, sampling=Sampling(temperature=1.0))
    with pytest.raises(ValueError, match="not sampled trees"):
        predict(_toy_profile(), acc, sampled_tree)


def test_acceptance_from_an_export():
    @dataclass
    class Export:
        path: str = "x.pt"
        val_acceptance: dict | None = None
        curves: dict | None = None

    with pytest.raises(ValueError, match="no validation acceptance"):
        Acceptance.from_export(Export())
    curves = {"val/accepted_length_hist": [1, 1]}
    with pytest.raises(ValueError, match="answer lengths are needed"):
        Acceptance.from_export(Export(curves=curves))
    assert "synthetic" in Acceptance.from_export(Export(curves=curves), [5]).source
    val = {
        "match": torch.tensor([[True, True]]),
        "confidence": torch.tensor([[0.5, 0.5]]),
        "lengths": torch.tensor([2]),
    }
    acc = Acceptance.from_export(Export(val_acceptance=val, curves=curves), [5])
    assert acc.match == ((True, True),) and acc.source.startswith("val split")


def test_acceptance_rejects_malformed_sequences():
    with pytest.raises(ValueError, match="no samples"):
        Acceptance((), ())
    with pytest.raises(ValueError, match="sample 0 has 2 matches, 1 confidences"):
        Acceptance(((True, True),), ((1.0,),))


# ------------------------------------------------------------------------- profiles, reports


def test_profile_round_trip_and_embedded_profiles(tmp_path):
    p = _toy_profile(name="toy", meta={"threads": 1})
    path = save_profile(p, tmp_path / "p.json")
    assert load_profile(path) == p
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"mode": "e2e", "cost_profile": p.to_dict()}))
    assert load_profile(report) == p
    assert load_profile("prior_rtx4090").target_prefill_ms == 317.0


def test_profile_errors_name_the_file_and_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a shipped profile"):
        load_profile(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**_toy_profile().to_dict(), "draft_token_ms": -1}))
    with pytest.raises(ProfileError, match=r"bad\.json.*draft_token_ms must be >= 0"):
        load_profile(bad)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({**_toy_profile().to_dict(), "format": 1}))
    with pytest.raises(ProfileError, match=r"format 1 .*measure it again"):
        load_profile(old)
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({**_toy_profile().to_dict(), "adaptr_ms": 1}))
    with pytest.raises(ProfileError, match=r"unknown cost profile fields \['adaptr_ms'\]"):
        load_profile(typo)
    with pytest.raises(ProfileError, match="target_contention must be > 0"):
        _toy_profile(target_contention=0)


def test_verify_line_is_fitted_to_the_points():
    p = _toy_profile()
    assert p.verify_line == pytest.approx((1.0, 0.5))
    assert p.verify_ms(0) == p.target_token_ms  # no drafts: a plain step
    noisy = _toy_profile(verify_points=((1, 3.0), (4, 2.0)))
    assert noisy.verify_line == pytest.approx((2.5, 0.0))  # never cheaper with more drafts


def test_mean_profile_averages_costs_and_keeps_text():
    a, b = _toy_profile(name="a"), _toy_profile(name="b", target_prefill_ms=20.0, head_token_ms=1.0)
    m = mean_profile([a, b])
    assert m.target_prefill_ms == 15.0 and m.head_token_ms == 1.0 and m.name == "a"
    assert m.meta["profiles_averaged"] == 2


def test_validation_rows_compare_predictions_with_measured_intervals():
    report = {
        "deployment": "own_device",
        "cost_ratios": {"regime": "reference"},
        "strategies": {
            "baseline": {"kind": "baseline", "speedup": {"ratio_of_means": 1.0, "ci95": [1, 1]}},
            "sd_fixed_draft_model": {
                "kind": "sd",
                "n_samples": 40,
                "tau": 3.0,
                "speedup": {"ratio_of_means": 1.2, "ci95": [1.1, 1.3]},
                "predicted_speedup": {"ratio_of_means": 1.32, "tau": 3.1},
            },
        },
    }
    (row,) = validation_rows([report])
    assert row["error"] == pytest.approx(0.1) and not row["within_ci"]
    assert row["regime"] == "reference" and row["deployment"] == "own_device"
    assert "| reference | own_device | sd_fixed_draft_model | 1.200 [1.100, 1.300] |" in (
        render_validation([row])
    )


def test_measure_command_writes_a_loadable_profile(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "p.json"
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cross_modal_sd.speedup.measure",
            f"out={out}",
            "repeats=1",
            "cores=2",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    p = load_profile(out)
    assert p.target_prefill_ms > 0 and p.draft_token_ms > 0 and p.round_trip_ms > 0
    assert p.meta["budget"]["deployment"] == "shared" and p.baseline_token_ms > 0
    # The default H1 head is probed beside the target, and (shared) the solo target costs.
    assert p.head_token_ms > 0 and p.meta["head"] == "H1"
    assert p.solo_token_ms > 0 and len(p.solo_verify_points) == len(p.verify_points)


def test_greedy_spec_without_eos_runs_to_the_cap():
    target = StandInTarget([5, 6, 2, 7, 8, 9])
    spec = DecodeSpec(5, None, None)
    assert wrapper_greedy(target, STAND_IN_INPUTS[0], spec, warmup=0).tokens == [5, 6, 2, 7, 8]
    with thread_budget(1):
        assert ThreadPlan().round1 is None and DraftInputs is not None


def test_regime_plot_takes_a_point_outside_its_first_repeats_interval(tmp_path):
    """The plotted point is the repeats' mean, the interval the first repeat's: the mean may
    fall outside it, which must not break the plot."""
    from cross_modal_sd.speedup.regimes import plot_regimes

    row = {"regime": "reference", "deployment": "shared", "strategy": "hybrid", "predicted": 1.3}
    rows = [
        {**row, "speedup": 1.30, "ci95": [1.31, 1.40], "prefill_share": 0.5},
        {**row, "regime": "p15", "speedup": 1.5, "ci95": [1.4, 1.6], "prefill_share": 0.2},
    ]
    plot_regimes(rows, tmp_path / "regimes.png")
    assert (tmp_path / "regimes.png").stat().st_size > 1000
