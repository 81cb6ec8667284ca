"""The feature-level draft head: its cache against recomputation, head-only and hybrid SD against
the target's greedy `generate` (scripted and trained heads), and chain acceptance by hand."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from test_speculative import MAX_NEW, N_SAMPLES, World

from cross_modal_sd.adapters import FeatureHead
from cross_modal_sd.decoding import (
    DraftPolicy,
    DraftRunnerError,
    HeadDrafter,
    LocalRunner,
    ProcessRunner,
    ScriptedDrafter,
    ScriptedHead,
    SDConfig,
    TreeShape,
    speculative_generate,
    thread_budget,
)
from cross_modal_sd.metrics.chains import chain_runs

DIM = 128  # the test world's decoder width


def small_head(**kw) -> FeatureHead:
    torch.manual_seed(3)
    return FeatureHead(DIM, DIM, "H1", vocab_size=kw.pop("vocab_size", 64), **kw).eval()


@pytest.mark.parametrize("layers", [1, 2])
def test_step_over_chunks_equals_forward(layers):
    head = small_head(layers=layers)
    h, tokens = torch.randn(1, 11, DIM), torch.randint(0, 64, (1, 11))
    with torch.no_grad():
        whole = head(h, None, tokens)
        cache = head.new_cache()
        parts = [head.step(cache, h[:, a:b], tokens[:, a:b]) for a, b in ((0, 4), (4, 5), (5, 11))]
    assert cache.length == 11
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, atol=1e-5, rtol=1e-5)


def test_rewind_then_step_equals_recompute():
    head = small_head(layers=2)
    h, tokens = torch.randn(1, 9, DIM), torch.randint(0, 64, (1, 9))
    other_h, other_t = torch.randn(1, 3, DIM), torch.randint(0, 64, (1, 3))
    with torch.no_grad():
        cache = head.new_cache()
        head.step(cache, h[:, :6], tokens[:, :6])
        head.step(cache, other_h, other_t)  # self-fed pairs a verification rejects
        cache.rewind(6)
        resumed = head.step(cache, h[:, 6:], tokens[:, 6:])
        fresh = head(h, None, tokens)[:, 6:]
    torch.testing.assert_close(resumed, fresh, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot rewind a head cache of 9 positions to 10"):
        cache.rewind(10)


def test_padding_does_not_leak_into_valid_positions():
    head = small_head()
    h, tokens = torch.randn(2, 7, DIM), torch.randint(0, 64, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    with torch.no_grad():
        out = head(h, mask, tokens)
        alone = head(h[1:, :4], None, tokens[1:, :4])
    torch.testing.assert_close(out[1, :4], alone[0], atol=1e-5, rtol=1e-5)
    assert out[1, 4:].abs().sum() == 0


def test_bad_head_settings_are_named():
    with pytest.raises(ValueError, match="needs vocab_size"):
        FeatureHead(DIM, DIM)
    with pytest.raises(ValueError, match="in_dim 64 != 128"):
        FeatureHead(64, DIM, vocab_size=10)
    with pytest.raises(ValueError, match="not a multiple of heads=3"):
        FeatureHead(DIM, DIM, vocab_size=10, heads=3)
    head = small_head(max_len=8)
    with pytest.raises(ValueError, match="position 9 past max_len=8"):
        head(torch.randn(1, 9, DIM), None, torch.zeros(1, 9, dtype=torch.long))


def test_chain_runs_by_hand():
    """A head that always outputs the state whose lm_head row is token ``c``: from every start
    its chain drafts c, c, c, ...; the runs are the leading c's of the answer after it."""

    class Constant(torch.nn.Module):
        def __init__(self, state):
            super().__init__()
            self.state = torch.nn.Parameter(state)

        def forward(self, h, mask, tokens):
            return self.state.expand(h.shape[0], h.shape[1], -1)

    weight = torch.eye(6, 4)  # token i reads state dim i (i < 4)
    c = 2
    tokens = torch.tensor([[5, 2, 2, 1, 2, 2], [2, 2, 2, 2, 0, 0]])
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    # The target's logits everywhere: token 1 first, then 0, 2, 3 (4 and 5 read nothing: 0).
    h = torch.tensor([0.5, 1.0, 0.25, 0.1]).expand(2, 6, 4)
    scored = chain_runs(Constant(weight[c]), h, tokens, mask, weight, k=3)
    runs, miss_rank = scored["runs"], scored["miss_rank"]
    # runs[b, L]: drafts for y_{L+1}.. (k = 3 at most); -1 where the answer ends at L.
    assert runs.tolist() == [[2, 1, 0, 2, 1, -1], [3, 2, 1, -1, -1, -1]]
    # The first wrong draft (always 2) stands third among the target's logits; chains without
    # a miss within k (or no token after L) have -1.
    assert miss_rank.tolist() == [[2, 2, 2, -1, -1, -1], [-1, -1, -1, -1, -1, -1]]
    limited = chain_runs(Constant(weight[c]), h, tokens, mask, weight, 2, 3)["runs"]
    assert limited.tolist() == [[0, 0, 0, 0, 0, -1], [0, 0, 0, -1, -1, -1]]  # c=2 never drafted
    # Trees: a head whose logits rank 2, 3, 1 first (1.0, 0.3, 0.2); the answer's token at each
    # depth of the chain from every start, fed the answer's tokens, stands at these ranks.
    state = torch.tensor([0.1, 0.2, 1.0, 0.3])
    trees = chain_runs(Constant(state), h, tokens, mask, weight, k=3, tree_k=3)
    assert torch.equal(trees["runs"], runs)  # drafts 2 as before
    none = [-1, -1, -1]
    assert trees["tree_rank"].tolist() == [
        [[0, 0, 2], [0, 2, 0], [2, 0, 0], [0, 0, -1], [0, -1, -1], none],
        [[0, 0, 0], [0, 0, -1], [0, -1, -1], none, none, none],
    ]
    best = (state @ weight.T).softmax(dim=-1).topk(3).values
    assert torch.allclose(trees["tree_top"][0, 0], best.expand(3, 3))


# --- in the SD loop -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world():
    with thread_budget(1):
        yield World()


def teacher_forced(world: World, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's states ``σ_{-1} .. σ_{n-2}`` (1, n, D) and its greedy answer (1, n)."""
    answer = world.reference[i]
    t_in, _ = world.inputs(i)
    with torch.inference_mode():
        out = world.target.prefill(t_in.input_ids, t_in.pixel_values_videos)
        rest = world.target.forward_tokens(torch.tensor([answer[:-1]]), out.cache).hidden
    return torch.cat([out.hidden, rest], dim=1).clone(), torch.tensor([answer])


@pytest.fixture(scope="module")
def trained_head(world):
    """An H1-sized head fitted to the target's own states on the first 16 samples: it accepts
    long runs there and fewer elsewhere (partial acceptance through the real head)."""
    data = [teacher_forced(world, i) for i in range(16)]
    weight = world.target.lm_head_weight.detach()
    torch.manual_seed(0)
    head = FeatureHead(DIM, DIM, "H1", vocab_size=weight.shape[0], max_len=MAX_NEW + 4)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    with thread_budget(1):
        for step in range(250):
            h, tokens = data[step % len(data)]
            pred = head(h, None, tokens)[:, :-1]
            logits = pred @ weight.T
            loss = F.mse_loss(pred, h[:, 1:]) + F.cross_entropy(logits[0], tokens[0, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head.eval()


def _check(world, result, i):
    assert result.tokens == world.reference[i]
    assert sum(result.committed) == len(result.tokens)
    assert len(result.committed) == result.rounds == len(result.drafted) == len(result.accepted)
    assert all(a <= d for a, d in zip(result.accepted, result.drafted, strict=True))


@pytest.mark.parametrize("round1", ["none", "cross_modal"])
@pytest.mark.parametrize(
    "script, expect",
    [({}, "all"), ({"correct_upto": 0}, "none"), ({"wrong_at": (3, 4, 9)}, "partial")],
)
def test_scripted_head_sd_equals_greedy(world, round1, script, expect):
    policy = DraftPolicy(gamma=4)
    config = world.config(policy, decode="head", round1=round1)
    drafter = None if round1 == "none" else ScriptedDrafter(world.reference[0], world.limit)
    for i, reference in enumerate(world.reference):
        head = ScriptedHead(reference, world.limit, **script)
        if drafter is not None:
            drafter = ScriptedDrafter(reference, world.limit, correct_upto=2)
        result = speculative_generate(world.target, drafter, *world.inputs(i), config, head=head)
        _check(world, result, i)
        later = list(zip(result.drafted[1:], result.accepted[1:], strict=True))
        if expect == "all":  # every later round accepts all it drafted, and drafts as capped
            assert all(a == d for d, a in later)
        elif expect == "none":
            assert all(a == 0 for _, a in later) and set(result.committed[1:]) <= {1}
        if round1 == "none":
            assert result.drafted[0] == result.accepted[0] == 0 and result.committed[0] == 1
        # the head syncs once per later round with room for a draft, at the answer's length
        lengths = [sum(result.committed[:r]) for r in range(1, len(later) + 1)]
        assert head.synced == [n for n in lengths if MAX_NEW - n > 1]


@pytest.mark.parametrize(
    "draft_script, head_script, saves",
    [
        ({}, {}, True),  # all right: round 1 and the head's first round in one forward
        ({"wrong_at": (2,)}, {}, False),  # round 1 misses: the head's drafts were built on it
        ({"correct_upto": 0}, {}, False),  # d0 rejected: nothing to build on, no head drafts
        ({}, {"correct_upto": 0}, False),  # the head always wrong
        ({}, {"wrong_at": (7,)}, True),
    ],
)
def test_fused_round1_is_lossless_and_saves_a_forward(world, draft_script, head_script, saves):
    """``fuse_round1``: the head drafts on from round 1's drafts (on the drafter's estimates of
    the target's states) and one forward verifies both."""
    policy = DraftPolicy(gamma="prefill", decode_gamma=4, max_drafts=4)
    fused = world.config(policy, decode="head", fuse_round1=True)
    plain = world.config(policy, decode="head")
    saved = []
    for i, reference in enumerate(world.reference):
        runs = {}
        for name, config in (("fused", fused), ("plain", plain)):
            drafter = ScriptedDrafter(reference, world.limit, dim=DIM, **draft_script)
            head = ScriptedHead(reference, world.limit, **head_script)
            runs[name] = speculative_generate(
                world.target, drafter, *world.inputs(i), config, head=head
            )
            _check(world, runs[name], i)
        f, p = runs["fused"], runs["plain"]
        saved.append(p.target_forwards - f.target_forwards)
        if draft_script.get("correct_upto") == 0:
            assert f.drafted == p.drafted  # the head drafted nothing in round 1
    assert min(saved) >= 0 and (max(saved) > 0) == saves


def test_fused_round1_with_real_drafters_is_lossless(world, trained_head):
    head = HeadDrafter(trained_head, world.target.head)
    config = world.config(DraftPolicy(gamma=3), decode="head", fuse_round1=True)
    accepted = 0
    for i in range(N_SAMPLES):
        result = speculative_generate(
            world.target, world.adapter_drafter("L1"), *world.inputs(i), config, head=head
        )
        _check(world, result, i)
        accepted += result.accepted[0]
    assert accepted > 0


@pytest.mark.parametrize("kwargs", [{"decode": "draft_model"}, {"round1": "none"}, {"tree": True}])
def test_fused_round1_needs_a_cross_modal_round1_a_head_and_a_chain(kwargs):
    policy = DraftPolicy(tree=TreeShape()) if kwargs.pop("tree", False) else DraftPolicy()
    with pytest.raises(ValueError, match="fuse_round1 needs round1='cross_modal', decode='head'"):
        SDConfig(policy=policy, **{"decode": "head", **kwargs}, fuse_round1=True)


def test_head_rounds_commit_accepted_plus_one(world):
    i = next(i for i, r in enumerate(world.reference) if len(r) == MAX_NEW)
    head = ScriptedHead(world.reference[i], world.limit, wrong_at=(6,))
    config = world.config(DraftPolicy(gamma=4), decode="head", round1="none")
    result = speculative_generate(world.target, None, *world.inputs(i), config, head=head)
    # round 1: t0 alone; drafts for 1..4 (right) + the target's 5; drafts 6.. (6 wrong)
    assert result.committed[:3] == [1, 5, 1]
    assert result.accepted[:3] == [0, 4, 0]
    assert result.tokens == world.reference[i]


def test_trained_head_is_lossless_with_partial_acceptance(world, trained_head):
    head = HeadDrafter(trained_head, world.target.head)
    accepted = []
    for round1 in ("none", "cross_modal"):
        config = world.config(DraftPolicy(gamma=5), decode="head", round1=round1)
        for i in range(N_SAMPLES):
            drafter = world.adapter_drafter("L1") if round1 == "cross_modal" else None
            result = speculative_generate(
                world.target, drafter, *world.inputs(i), config, head=head
            )
            _check(world, result, i)
            accepted += result.accepted[1:]
    # Real acceptance: long runs on the samples it was fitted to, misses elsewhere.
    assert max(accepted) == 5 and 0 in accepted and any(0 < a < 5 for a in accepted)


def test_trained_head_trees_are_lossless_and_accept_at_least_the_chain(world, trained_head):
    """With a budget well above its depth (12 nodes, 5 levels) the tree holds the chain's top-1
    path and side branches: per sample it accepts at least as much in its first head round as
    the chain of the same depth, and more where a second branch rescues a miss."""
    head = HeadDrafter(trained_head, world.target.head)
    chain = world.config(DraftPolicy(gamma=5), decode="head", round1="none")
    tree = world.config(
        DraftPolicy(gamma=5, tree=TreeShape(nodes=12, top_k=3)), decode="head", round1="none"
    )
    branched = 0
    for i in range(N_SAMPLES):
        a = speculative_generate(world.target, None, *world.inputs(i), chain, head=head)
        b = speculative_generate(world.target, None, *world.inputs(i), tree, head=head)
        _check(world, b, i)
        assert b.accepted[1] >= a.accepted[1]
        branched += b.accepted[1] > a.accepted[1]
    assert branched > 0  # some first round was rescued by a second branch


def test_chain_runs_predict_head_rounds(world, trained_head):
    """A head round at answer length L accepts min(runs[L - 1], drafts): the chain metric is
    what decoding does (teacher-forced pairs equal the loop's true pairs)."""
    weight = world.target.lm_head_weight.detach()
    gamma = 4
    config = world.config(DraftPolicy(gamma=gamma), decode="head", round1="none")
    head = HeadDrafter(trained_head, world.target.head)
    for i in range(6):
        h, tokens = teacher_forced(world, i)
        runs = chain_runs(
            trained_head,
            h,
            tokens,
            torch.ones_like(tokens, dtype=torch.bool),
            weight,
            world.limit,
            k=gamma,
        )["runs"][0]
        result = speculative_generate(world.target, None, *world.inputs(i), config, head=head)
        length = 1
        for drafted, accepted, committed in zip(
            result.drafted[1:], result.accepted[1:], result.committed[1:], strict=True
        ):
            assert accepted == min(int(runs[length - 1]), drafted)
            length += committed


def test_configurations_without_their_drafters_are_refused(world):
    t_in, d_in = world.inputs(0)
    with pytest.raises(ValueError, match="needs a HeadDrafter"):
        speculative_generate(
            world.target, None, t_in, d_in, world.config(decode="head", round1="none")
        )
    with pytest.raises(ValueError, match="needs a cross-modal drafter"):
        speculative_generate(world.target, None, t_in, d_in, world.config(decode="head"))
    with pytest.raises(ValueError, match="round1 must be one of"):
        SDConfig(round1="eagle")


class SlowPrefill:
    """The world's target with a prefill that first sleeps: round 1's window outlasts any
    drafting a test drafter does, so a head tail always runs to its length."""

    def __init__(self, target, seconds: float = 0.1):
        self.target, self.seconds = target, seconds

    def __getattr__(self, name):
        return getattr(self.target, name)

    def prefill(self, *args, **kwargs):
        time.sleep(self.seconds)
        return self.target.prefill(*args, **kwargs)


TAIL = 3  # cross-modal drafts before the head tail
TAIL_POLICY = DraftPolicy(gamma="prefill", decode_gamma=4, max_drafts=16, head_tail=TAIL)


def _tailed(reference, world, draft_script=None, tail_script=None, **kw):
    """A scripted cross-modal drafter whose round-1 tail comes from a scripted head."""
    tail = ScriptedHead(reference, world.limit, **(tail_script or {}))
    return ScriptedDrafter(reference, world.limit, dim=DIM, head=tail, **(draft_script or {}), **kw)


def test_head_tail_drafts_on_from_the_cross_modal_chain_until_the_target_is_ready(world):
    """The round-1 job: `head_tail` cross-modal drafts, then the head's (up to decode_gamma)
    from the synced chain, on the board as they come; none once the target is ready."""
    i = next(i for i, r in enumerate(world.reference) if len(r) == MAX_NEW)
    reference = world.reference[i]
    d_in = world.samples[i][1]
    drafter = _tailed(reference, world, {"wrong_at": (1,)}, {"wrong_at": (5,)})
    with LocalRunner(drafter) as runner:
        runner.set_ready(False)  # a target that never finishes: the tail runs to its length
        runner.start_round1(d_in, TAIL_POLICY, MAX_NEW - 1, world.eos)
        tokens = runner.finish_round1().proposal.tokens
        assert len(tokens) == TAIL + 4
        assert tokens[:TAIL] == [drafter.proposal(k)[0] for k in range(TAIL)]  # d1 wrong
        assert tokens[TAIL:] == [drafter.head.proposal(k)[0] for k in range(TAIL, TAIL + 4)]
        assert tokens[5] != reference[5] and tokens[4] == reference[4]
        assert drafter.head.synced == [TAIL]  # one sync: the thread used this very object
        assert runner.drafts_so_far().proposal.tokens == tokens  # all on the board, in order
        runner.set_ready(True)  # ready before the chain is done: d0 alone, no tail
        runner.start_round1(d_in, TAIL_POLICY, MAX_NEW - 1, world.eos)
        assert runner.finish_round1().proposal.tokens == reference[:1]
        # The target ready while the tail drafts: the tail stops after that draft.
        runner.set_ready(False)
        drafter.head.confidence = lambda k: runner.set_ready(k == TAIL + 1) or 1.0
        runner.start_round1(d_in, TAIL_POLICY, MAX_NEW - 1, world.eos)
        assert len(runner.finish_round1().proposal.tokens) == TAIL + 2


def test_head_tail_stops_at_eos_and_the_cap(world):
    i = next(i for i, r in enumerate(world.reference) if r[-1] == world.eos and len(r) > 4)
    reference = world.reference[i]
    d_in = world.samples[i][1]
    with LocalRunner(_tailed(reference, world)) as runner:
        for limit, want in ((MAX_NEW - 1, reference), (TAIL + 2, reference[: TAIL + 2])):
            runner.set_ready(False)
            runner.start_round1(d_in, replace(TAIL_POLICY, decode_gamma=MAX_NEW), limit, world.eos)
            assert runner.finish_round1().proposal.tokens == want
        # a chain that ends at EOS within its cross-modal drafts has no tail
        early = replace(TAIL_POLICY, head_tail=len(reference))
        runner.set_ready(False)
        runner.start_round1(d_in, early, MAX_NEW - 1, world.eos)
        assert runner.finish_round1().proposal.tokens == reference


@pytest.mark.parametrize(
    "draft_script, tail_script, round1_accepted",
    [
        ({}, {}, TAIL + 4),  # all right: the tail's drafts are accepted with the chain's
        ({}, {"correct_upto": 0}, TAIL),  # the tail always wrong: round 1 keeps the chain
        ({}, {"wrong_at": (TAIL + 2,)}, TAIL + 2),
        ({"wrong_at": (1,)}, {}, 1),  # the chain misses: the tail built on it goes too
    ],
)
def test_head_tail_sd_equals_greedy(world, draft_script, tail_script, round1_accepted):
    slow = SlowPrefill(world.target)
    config = world.config(TAIL_POLICY, decode="head")
    for i, reference in enumerate(world.reference):
        drafter = _tailed(reference, world, draft_script, tail_script)
        result = speculative_generate(
            slow, drafter, *world.samples[i], config, head=ScriptedHead(reference, world.limit)
        )
        _check(world, result, i)
        if len(reference) == MAX_NEW:  # no EOS inside round 1's answer
            chain = [drafter.proposal(k)[0] for k in range(TAIL)]
            chain += [drafter.head.proposal(k)[0] for k in range(TAIL, TAIL + 4)]
            # (a scripted wrong draft may be EOS, which ends the tail)
            assert result.drafted[0] == (chain.index(world.eos) + 1 if world.eos in chain else 7)
            assert result.accepted[0] == round1_accepted


def test_head_tail_with_real_drafters_is_lossless(world, trained_head):
    """The trained head drafts the tail from a real adapter's estimates, in the drafter's own
    process as in an evaluation, and the loop's head decodes on: the target's greedy answer."""
    config = world.config(TAIL_POLICY, decode="head")
    head = HeadDrafter(trained_head, world.target.head)
    drafter = world.adapter_drafter("L1")
    drafter.head = head
    drafted = 0
    with ProcessRunner(drafter) as runner:
        for i in range(N_SAMPLES):
            result = speculative_generate(
                SlowPrefill(world.target), runner, *world.samples[i], config, head=head
            )
            _check(world, result, i)
            drafted = max(drafted, result.drafted[0])
    assert drafted == TAIL + 4  # the head drafted its tail


def test_head_tail_settings_are_checked(world):
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match="head_tail must be an int >= 1 or None"):
            DraftPolicy(gamma="prefill", head_tail=bad)
    for policy in (
        {"gamma": 3},
        {"kind": "confidence"},
        {"gamma": "prefill", "tree": TreeShape()},
    ):
        with pytest.raises(ValueError, match="needs kind='fixed', gamma='prefill' and no round-1"):
            DraftPolicy(head_tail=2, **policy)
    later = DraftPolicy(gamma="prefill", head_tail=2, tree=TreeShape(round1=False))
    assert later.name == "fixed-prefill-tree12x2-later-tail2"
    for kwargs in ({"round1": "none"}, {"fuse_round1": True}):
        with pytest.raises(ValueError, match="head_tail drafts on from round 1's cross-modal"):
            SDConfig(TAIL_POLICY, "head", **kwargs)
    plain = ScriptedDrafter(world.reference[0], world.limit)  # no head to draft the tail
    with LocalRunner(plain) as runner:
        runner.start_round1(world.samples[0][1], TAIL_POLICY, 8, world.eos)
        with pytest.raises(DraftRunnerError, match="a head tail needs a drafter with a feature"):
            runner.finish_round1()
