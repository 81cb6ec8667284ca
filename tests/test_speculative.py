"""The SD loop: lossless against the target's greedy `generate`, exact acceptance accounting with
stub drafters, crop-then-continue equal to recomputing, and real concurrency of round 1."""

from __future__ import annotations

import copy
import time
from collections import Counter

import pytest
import torch
from random_models import boost_eos, liven

from cross_modal_sd.adapters import build_adapter
from cross_modal_sd.config import group_option
from cross_modal_sd.decoding import (
    AdapterDrafter,
    DecodeSpec,
    DraftInputs,
    DraftPolicy,
    ScriptedDrafter,
    SDConfig,
    TargetInputs,
    TargetState,
    ThreadPlan,
    TokenChooser,
    TreeShape,
    extend_answer,
    hf_greedy,
    propose,
    speculative_generate,
    sync,
    thread_budget,
    verify,
)
from cross_modal_sd.models.architectures import DecoderSize, TowerSize, build_draft, build_target
from cross_modal_sd.models.preprocess import frames_to_pixels
from cross_modal_sd.models.prompts import encode_draft_prompt, encode_target_prompt
from cross_modal_sd.models.wrappers import DraftDecoder, TargetDecoder
from cross_modal_sd.world.tokenizer import build_tokenizer, text_vocab_limit

MAX_NEW = 12
N_SAMPLES = 20
QUESTIONS = (
    "what colour is the car ?",
    "which way is the truck moving ?",
    "is it day or night ?",
    "describe the scene .",
)
VIDEO_TOKENS = 8 * TowerSize().tokens(32)


class World:
    """Tiny target + draft pair, inputs and the target's greedy answers (HF `generate`)."""

    def __init__(self):
        torch.manual_seed(0)
        self.tok = build_tokenizer()
        self.limit = text_vocab_limit(self.tok)
        self.eos = self.tok.eos_token_id
        self.spec = DecodeSpec(MAX_NEW, self.limit, self.eos)
        self.target_model = build_target(self.tok, TowerSize(), DecoderSize(layers=3), 32, 8).eval()
        liven(self.target_model)
        self.samples = [self.inputs(i) for i in range(N_SAMPLES)]
        # EOS takes over a token seen mid-answer in about a quarter of the samples, so answers
        # end at EOS or at the cap.
        before = [self.greedy(s[0]) for s in self.samples]
        seen = Counter(t for ref in before for t in set(ref[2 : MAX_NEW - 2]))
        token = min(seen, key=lambda t: (abs(seen[t] - N_SAMPLES // 4), t))
        boost_eos(self.target_model, token, self.eos)
        self.target = TargetDecoder(self.target_model, self.limit)
        self.reference = [self.greedy(s[0]) for s in self.samples]
        # The draft decoder copies the target's text decoder (same depth) to get real acceptances.
        self.draft_model = build_draft(self.tok, TowerSize(), DecoderSize(layers=3), 32, 2).eval()
        self.draft_model.language_model.model.load_state_dict(
            self.target_model.model.language_model.state_dict()
        )
        self.draft = DraftDecoder(self.draft_model, self.limit)

    def inputs(self, i: int, question: str | None = None) -> tuple[TargetInputs, DraftInputs]:
        g = torch.Generator().manual_seed(1000 + i)
        q = question or QUESTIONS[i % len(QUESTIONS)]
        target = TargetInputs(
            torch.tensor([encode_target_prompt(self.tok, q, VIDEO_TOKENS)]),
            torch.randn(1, 8, 3, 32, 32, generator=g),
        )
        draft = DraftInputs(
            torch.tensor([encode_draft_prompt(self.tok, q)]),
            torch.randn(1, 2, 3, 32, 32, generator=g),
        )
        return target, draft

    def greedy(self, inputs: TargetInputs, max_new: int = MAX_NEW) -> list[int]:
        spec = DecodeSpec(max_new, self.limit, self.eos)
        return hf_greedy(self.target_model, inputs, spec, warmup=0).tokens

    def adapter_drafter(self, level: str = "L4", **overrides) -> AdapterDrafter:
        torch.manual_seed(1)
        cfg = {**group_option("adapter", level), **overrides}
        adapter = build_adapter(cfg, 128, 128).eval()
        return AdapterDrafter(self.draft, adapter, self.target.head)

    def config(self, policy=None, decode="draft_model", max_new=MAX_NEW, **kw) -> SDConfig:
        return SDConfig(policy or DraftPolicy(gamma=3), decode, max_new, self.eos, **kw)


@pytest.fixture(scope="module")
def world():
    # One intra-op thread: on a shared 2-core machine OpenMP spin-waiting makes tiny ops ~20x slower.
    with thread_budget(1):
        yield World()


def test_world_covers_eos_and_cap(world):
    # The equality tests below only mean something if answers differ and end both ways.
    assert any(1 < len(r) < MAX_NEW and r[-1] == world.eos for r in world.reference)
    assert any(len(r) == MAX_NEW and world.eos not in r for r in world.reference)
    assert len({tuple(r) for r in world.reference}) >= 5


# --- pure functions --------------------------------------------------------------------------


def _rows(*tokens: int, vocab: int = 10) -> torch.Tensor:
    """Logit rows whose argmaxes are `tokens`."""
    return torch.nn.functional.one_hot(torch.tensor(tokens), vocab).float()


def test_greedy_chooser_accepts_leading_matches_then_corrects_or_adds_a_bonus():
    choose = TokenChooser().choose
    assert choose(_rows(5, 6, 7, 8), [5, 6, 7]) == (3, [5, 6, 7, 8])  # bonus
    assert choose(_rows(5, 9, 7, 8), [5, 6, 7]) == (1, [5, 9])  # correction
    assert choose(_rows(5, 6, 7), [4, 6]) == (0, [5])
    assert choose(_rows(5), []) == (0, [5])
    assert choose(_rows(5), [5]) == (1, [5])  # as many drafts as rows: no bonus
    assert choose(_rows(5), [4]) == (0, [5])
    with pytest.raises(ValueError, match="2 drafts for 1 rows"):
        choose(_rows(5), [5, 6])


def test_extend_answer_stops_at_eos_and_cap():
    assert extend_answer([1], [3, 2, 4], eos_token_id=2, max_new_tokens=10) == ([1, 3, 2], True)
    assert extend_answer([1], [3, 4, 5], eos_token_id=2, max_new_tokens=3) == ([1, 3, 4], True)
    assert extend_answer([1], [3], eos_token_id=2, max_new_tokens=3) == ([1, 3], False)
    assert extend_answer([], [2], eos_token_id=2, max_new_tokens=3) == ([2], True)
    assert extend_answer([], [2], eos_token_id=None, max_new_tokens=3) == ([2], False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "greedy"}, "DraftPolicy.kind"),
        ({"gamma": 0}, "DraftPolicy.gamma"),
        ({"gamma": "all"}, "DraftPolicy.gamma"),
        ({"max_drafts": 0}, "DraftPolicy.max_drafts"),
        ({"threshold": 0.0}, "DraftPolicy.threshold"),
    ],
)
def test_policy_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DraftPolicy(**kwargs)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="SDConfig.decode"):
        SDConfig(decode="tree")
    with pytest.raises(ValueError, match="SDConfig.max_new_tokens"):
        SDConfig(max_new_tokens=0)


# --- lossless: every configuration equals greedy generate ------------------------------------

POLICIES = {
    "fixed": DraftPolicy(gamma=3),
    "prefill": DraftPolicy(gamma="prefill", decode_gamma=3, max_drafts=8),
    "confidence": DraftPolicy(kind="confidence", threshold=0.3, max_drafts=6),
    # Draft trees: several branches per round, verified in one forward under a tree mask.
    "tree": DraftPolicy(gamma=4, tree=TreeShape(nodes=8, top_k=2)),
    "prefill_tree": DraftPolicy(gamma="prefill", decode_gamma=3, tree=TreeShape(6, 3)),
}


@pytest.mark.parametrize("decode", ["autoregressive", "draft_model"])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_sd_equals_greedy_generate(world, policy, decode):
    drafter = world.adapter_drafter("L4")
    accepted = 0
    for (t_in, d_in), reference in zip(world.samples, world.reference, strict=True):
        result = speculative_generate(
            world.target, drafter, t_in, d_in, world.config(POLICIES[policy], decode)
        )
        assert result.tokens == reference
        assert result.stop == ("eos" if reference[-1] == world.eos else "max_new_tokens")
        assert len(result.drafted) == len(result.accepted) == result.rounds
        assert all(0 <= a <= d for a, d in zip(result.accepted, result.drafted, strict=True))
        accepted += sum(result.accepted)
    assert accepted > 0  # the real drafter's acceptance path was exercised


@pytest.mark.parametrize("level", ["L1", "L5"])
def test_sd_equals_greedy_with_other_adapters(world, level):
    # L1 maps each state on its own; L5 with token fusion reads the previous tokens too.
    overrides = {"fuse_tokens": True, "vocab_size": len(world.tok)} if level == "L5" else {}
    drafter = world.adapter_drafter(level, **overrides)
    for (t_in, d_in), reference in list(zip(world.samples, world.reference, strict=True))[:6]:
        result = speculative_generate(world.target, drafter, t_in, d_in, world.config())
        assert result.tokens == reference


def test_blank_event_images_still_lossless(world):
    drafter = world.adapter_drafter("L4")
    blank = frames_to_pixels(torch.ones(1, 2, 3, 32, 32))  # white canvases: no events
    for (t_in, d_in), reference in list(zip(world.samples, world.reference, strict=True))[:4]:
        d_blank = DraftInputs(d_in.input_ids, blank)
        result = speculative_generate(world.target, drafter, t_in, d_blank, world.config())
        assert result.tokens == reference


def test_max_new_tokens_one(world):
    t_in, d_in = world.samples[0]
    for drafter in (world.adapter_drafter("L4"), ScriptedDrafter(world.reference[0], world.limit)):
        result = speculative_generate(world.target, drafter, t_in, d_in, world.config(max_new=1))
        assert result.tokens == world.greedy(t_in, max_new=1) == world.reference[0][:1]
        assert (result.drafted, result.target_forwards) == ([0], 1)


def test_answer_that_is_eos_at_once(world):
    t_in, d_in = world.samples[0]
    model = copy.deepcopy(world.target_model)
    boost_eos(model, world.reference[0][0], world.eos)
    target = TargetDecoder(model, world.limit)
    assert hf_greedy(model, t_in, world.spec, warmup=0).tokens == [world.eos]
    drafter = AdapterDrafter(world.draft, world.adapter_drafter("L4").adapter, target.head)
    oracle = ScriptedDrafter([world.eos], world.limit)
    for d in (drafter, oracle):
        result = speculative_generate(target, d, t_in, d_in, world.config())
        assert result.tokens == [world.eos]
        assert result.stop == "eos"
        assert result.target_forwards == 1
    assert result.accepted == [1]  # the oracle's EOS draft matched the prefill's token


# --- stub drafters: exact acceptance accounting ----------------------------------------------


def _full_length_sample(world) -> int:
    return next(i for i, r in enumerate(world.reference) if len(r) == MAX_NEW)


def test_always_correct_drafts_are_all_accepted(world):
    # A verifier one position late would reject these: d_i is the target's token at position i.
    i = _full_length_sample(world)
    t_in, d_in = world.samples[i]
    oracle = ScriptedDrafter(world.reference[i], world.limit)
    result = speculative_generate(world.target, oracle, t_in, d_in, world.config())
    assert result.tokens == world.reference[i]
    # 12 tokens: round 1 gives t0..t3 (prefill + 1 verify), rounds 2 and 3 give 4 each.
    assert result.drafted == result.accepted == [3, 3, 3]
    assert result.target_forwards == 4
    assert result.tau == pytest.approx(3.0)
    assert result.accept_rate == 1.0

    result = speculative_generate(
        world.target, oracle, t_in, d_in, world.config(decode="autoregressive")
    )
    assert result.tokens == world.reference[i]
    assert result.drafted == result.accepted == [3]
    assert result.target_forwards == 2 + (MAX_NEW - 4)


def test_always_correct_over_all_samples(world):
    for (t_in, d_in), reference in zip(world.samples, world.reference, strict=True):
        oracle = ScriptedDrafter(reference, world.limit)
        result = speculative_generate(world.target, oracle, t_in, d_in, world.config())
        assert result.tokens == reference
        assert result.accepted == result.drafted


@pytest.mark.parametrize("decode", ["autoregressive", "draft_model"])
def test_always_wrong_drafts_are_all_rejected(world, decode):
    for (t_in, d_in), reference in list(zip(world.samples, world.reference, strict=True))[:8]:
        wrong = ScriptedDrafter(reference, world.limit, correct_upto=0)
        result = speculative_generate(world.target, wrong, t_in, d_in, world.config(decode=decode))
        assert result.tokens == reference
        assert sum(result.accepted) == 0 and sum(result.drafted) > 0
        assert result.target_forwards == len(reference)  # one committed token per forward


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 5])
def test_correct_up_to_k_accepts_exactly_k(world, k):
    i = _full_length_sample(world)
    t_in, d_in = world.samples[i]
    stub = ScriptedDrafter(world.reference[i], world.limit, correct_upto=k)
    result = speculative_generate(
        world.target, stub, t_in, d_in, world.config(DraftPolicy(gamma=5))
    )
    assert result.tokens == world.reference[i]
    assert result.drafted[0] == 5
    assert result.accepted[0] == k
    assert sum(result.accepted[1:]) == 0  # later rounds draft positions > k: all wrong


def test_scattered_wrong_drafts_stay_lossless(world):
    gen = torch.Generator().manual_seed(7)
    for (t_in, d_in), reference in zip(world.samples, world.reference, strict=True):
        wrong = torch.nonzero(torch.rand(MAX_NEW, generator=gen) < 0.3).flatten().tolist()
        stub = ScriptedDrafter(reference, world.limit, wrong_at=wrong)
        for decode in ("autoregressive", "draft_model"):
            result = speculative_generate(
                world.target, stub, t_in, d_in, world.config(DraftPolicy(gamma=4), decode)
            )
            assert result.tokens == reference


def test_confidence_policy_stops_below_threshold(world):
    i = _full_length_sample(world)
    t_in, d_in = world.samples[i]
    policy = DraftPolicy(kind="confidence", threshold=0.5, max_drafts=6)
    dips = ScriptedDrafter(
        world.reference[i], world.limit, confidence=lambda k: 0.2 if k == 2 else 0.9
    )
    result = speculative_generate(world.target, dips, t_in, d_in, world.config(policy))
    assert result.drafted[0] == 2  # d2 is below the threshold: dropped, round ends
    assert result.tokens == world.reference[i]
    unsure = ScriptedDrafter(world.reference[i], world.limit, confidence=0.1)
    result = speculative_generate(world.target, unsure, t_in, d_in, world.config(policy))
    assert set(result.drafted[:-1]) == {1}  # at least one draft per round
    assert result.tokens == world.reference[i]


def test_propose_stops_after_eos(world):
    stub = ScriptedDrafter([5, world.eos, 7, 8], world.limit)
    _, proposal = propose(
        stub, stub.prefill(), DraftPolicy(gamma=4), 10, first_round=True, eos_token_id=world.eos
    )
    assert proposal.tokens == [5, world.eos]


# --- caches: crop-then-continue equals recomputing -------------------------------------------


def _cache_tensors(cache) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def test_target_crop_then_continue_equals_recompute(world):
    i = _full_length_sample(world)
    t_in, _ = world.samples[i]
    ref = world.reference[i]
    out = world.target.prefill(t_in.input_ids, t_in.pixel_values_videos)
    state = TargetState(out.cache, out.cache.get_seq_length(), [ref[0]])
    drafts = [ref[1], ref[2], (ref[3] + 1) % world.limit, ref[4]]  # wrong at position 3
    state, accepted, committed = verify(world.target, state, drafts)
    assert (accepted, committed, state.answer) == (2, ref[1:4], ref[:4])
    assert state.cache.get_seq_length() == state.prompt_len + 3
    continued = world.target.forward_tokens(torch.tensor([[ref[3]]]), state.cache)

    fresh = world.target.prefill(t_in.input_ids, t_in.pixel_values_videos)
    recomputed = world.target.forward_tokens(torch.tensor([ref[:4]]), fresh.cache)
    torch.testing.assert_close(
        continued.logits[:, -1], recomputed.logits[:, -1], atol=1e-5, rtol=1e-5
    )
    for a, b in zip(_cache_tensors(state.cache), _cache_tensors(fresh.cache), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_draft_rewind_and_sync_equal_recompute(world):
    drafter = world.adapter_drafter("L4")
    _, d_in = world.samples[0]
    answer = world.reference[0][:5]
    state = drafter.prefill(d_in)
    state = drafter.feed(state, [answer[0], answer[1], 9, 9, 9])  # diverges after two tokens
    state = sync(drafter, state, answer)
    assert state.fed == answer
    assert state.cache.get_seq_length() == state.prompt_len + len(answer)

    fresh = drafter.feed(drafter.prefill(d_in), answer)
    torch.testing.assert_close(state.hidden, fresh.hidden, atol=1e-5, rtol=1e-5)
    for a, b in zip(_cache_tensors(state.cache), _cache_tensors(fresh.cache), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_drafts_equal_teacher_forced_adapter_tokens(world):
    # The accepted prefix must be exactly the teacher-forced context the adapter is trained on:
    # drafting k tokens equals one draft forward over prompt + drafts, adapted, argmax.
    drafter = world.adapter_drafter("L4")
    with torch.no_grad():  # make the sequence adapter mix positions for real
        for p in drafter.adapter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    _, d_in = world.samples[3]
    state, proposal = propose(
        drafter, drafter.prefill(d_in), DraftPolicy(gamma=6), 6, first_round=False
    )
    full = drafter.feed(drafter.prefill(d_in), proposal.tokens[:-1])
    adapted = drafter.adapter(full.hidden)  # (1, 6, D): all answer positions at once
    teacher_forced = world.target.logits(adapted)[0].argmax(-1).tolist()
    assert proposal.tokens == teacher_forced
    assert state.fed == proposal.tokens[:-1]


# --- concurrency and timing ------------------------------------------------------------------

SLEEP_S = 0.3


class _SlowTarget(TargetDecoder):
    def prefill(self, *args, **kwargs):
        time.sleep(SLEEP_S)
        return super().prefill(*args, **kwargs)


def test_target_and_draft_prefill_run_concurrently(world):
    i = _full_length_sample(world)
    t_in, d_in = world.samples[i]
    target = _SlowTarget(world.target_model, world.limit)
    stub = ScriptedDrafter(world.reference[i], world.limit, prefill_s=SLEEP_S)
    start = time.perf_counter()
    result = speculative_generate(target, stub, t_in, d_in, world.config(max_new=4))
    wall_ms = (time.perf_counter() - start) * 1e3
    assert result.tokens == world.reference[i][:4]
    assert result.prefill_ms >= SLEEP_S * 1e3 and result.draft_prefill_ms >= SLEEP_S * 1e3
    assert max(result.prefill_ms, result.draft_prefill_ms) <= result.total_ms <= wall_ms
    assert wall_ms < result.prefill_ms + result.draft_prefill_ms  # the two prefills overlapped
    assert result.overlap_ms > 0.8 * SLEEP_S * 1e3


def test_prefill_policy_drafts_while_target_prefills(world):
    i = _full_length_sample(world)
    t_in, d_in = world.samples[i]
    target = _SlowTarget(world.target_model, world.limit)
    stub = ScriptedDrafter(world.reference[i], world.limit, token_s=0.05)
    policy = DraftPolicy(gamma="prefill", decode_gamma=2, max_drafts=30)
    result = speculative_generate(target, stub, t_in, d_in, world.config(policy))
    assert result.tokens == world.reference[i]
    # ~0.3 s of target prefill fits ~6 drafts at 0.05 s each; the cap (11) is not what stopped it.
    assert 3 <= result.drafted[0] <= 9
    assert result.wait_ms < 100  # the drafter stopped once the target was ready
    assert result.accepted[0] == result.drafted[0]
    assert set(result.drafted[1:-1]) <= {2}


class _ThreadProbe(ScriptedDrafter):
    """Records torch's thread count in round 1 and in later rounds."""

    def prefill(self, inputs=None):
        self.round1_threads = torch.get_num_threads()
        return super().prefill(inputs)

    def feed(self, state, tokens):
        if state.fed or not tokens:
            self.later_threads = torch.get_num_threads()
        return super().feed(state, tokens)


@pytest.mark.parametrize(
    ("plan", "round1", "later"), [(ThreadPlan(1, 2), 1, 2), (ThreadPlan(), 2, 2)]
)
def test_thread_plan_sets_round1_and_decode_threads(world, plan, round1, later):
    """An in-process drafter shares torch's (process-wide) setting: round 1's count while the
    target prefills, the decode count afterwards; the caller's setting is restored."""
    i = _full_length_sample(world)
    t_in, d_in = world.samples[i]
    probe = _ThreadProbe(world.reference[i], world.limit, correct_upto=2)
    with thread_budget(2):
        result = speculative_generate(world.target, probe, t_in, d_in, world.config(), plan)
        assert torch.get_num_threads() == 2
    assert (probe.round1_threads, probe.later_threads) == (round1, later)
    assert result.tokens == world.reference[i]
    threads = {span[2] for span in result.busy}
    assert threads == {round1, later}


def test_result_record_is_plain_and_consistent(world):
    t_in, d_in = world.samples[1]
    result = speculative_generate(
        world.target, world.adapter_drafter("L4"), t_in, d_in, world.config()
    )
    record = result.to_dict()
    assert record["method"] == "sd/fixed-3/draft_model"
    assert record["n_new"] == len(record["tokens"]) == len(world.reference[1])
    assert record["tau"] == pytest.approx(record["n_new"] / record["target_forwards"])
    assert record["accept_rate"] == pytest.approx(sum(record["accepted"]) / sum(record["drafted"]))
    for key in (
        "prefill_ms",
        "draft_prefill_ms",
        "draft_ms",
        "verify_ms",
        "decode_ms",
        "overlap_ms",
    ):
        assert 0.0 <= record[key] <= record["total_ms"]
    assert record["overlap_ms"] <= min(
        record["prefill_ms"], record["draft_prefill_ms"] + record["draft_ms"]
    )
