"""Draft trees: their shape, their growth by path probability, and their verification in one
target forward (logits per node equal the chain forward's, the cache reduced to the accepted
path equals recomputing it, greedy decoding with trees equals `generate`)."""

from __future__ import annotations

import copy

import pytest
import torch
from random_models import TinyTarget

from cross_modal_sd.decoding import (
    DecodeSpec,
    DraftPolicy,
    DraftTree,
    ScriptedDrafter,
    ScriptedHead,
    SDConfig,
    TargetState,
    TreeShape,
    grow_tree,
    hf_greedy,
    speculative_generate,
    thread_budget,
    verify_tree,
)

ATOL = 1e-5  # fp32: a tree row and its chain forward differ by summation order only
MAX_NEW = 10

#        root
#        /  \
#       0    1
#      / \    \
#     2   3    4
#     |
#     5
TREE = DraftTree([10, 11, 12, 13, 14, 15], [-1, -1, 0, 0, 1, 2], [0.6, 0.3, 0.4, 0.1, 0.2, 0.3])


def test_tree_shape_paths_and_subtrees():
    assert TREE.depths() == [1, 1, 2, 2, 2, 3]
    assert TREE.path(5) == [0, 2, 5] and TREE.path(-1) == []
    assert TREE.children(-1) == [0, 1] and TREE.children(0) == [2, 3]
    sub = TREE.subtree(0)
    assert (sub.tokens, sub.parents) == ([12, 13, 15], [-1, -1, 0])
    chain = DraftTree.chain([7, 8, 9])
    assert chain.parents == [-1, 0, 1] and chain.depths() == [1, 2, 3]


def test_tree_attention_sees_cache_root_and_ancestors_only():
    mask = TREE.attention(past=2, dtype=torch.float32, device="cpu")[0, 0]
    seen = (mask == 0).int().tolist()
    # columns: 2 cached, root, nodes 0..5
    assert seen[0] == [1, 1, 1, 0, 0, 0, 0, 0, 0]  # the root
    assert seen[1 + 5] == [1, 1, 1, 1, 0, 1, 0, 0, 1]  # node 5: root, 0, 2, itself
    assert seen[1 + 4] == [1, 1, 1, 0, 1, 0, 0, 1, 0]  # node 4: root, 1, itself
    assert TREE.positions(2, "cpu").tolist() == [[2, 3, 3, 4, 4, 4, 5]]


@pytest.mark.parametrize(
    ("parents", "match"),
    [([0], "parent 0 must be -1 or an earlier node"), ([-1, 2, 0], "parent 2"), ([], "parents")],
)
def test_bad_trees_are_rejected(parents, match):
    with pytest.raises(ValueError, match=match):
        DraftTree([1, 2, 3][: max(1, len(parents))], parents)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nodes": 0}, "tree budget"),
        ({"top_k": 0}, "top_k"),
        ({"nodes": 2.5}, "tree budget"),
        ({"round1": "no"}, "round1 must be true or false"),
    ],
)
def test_bad_tree_shapes_fail_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TreeShape(**kwargs)


# --- growth --------------------------------------------------------------------------------

# Candidates by the path of the node expanded (tokens from the root): a drafter that is sure
# of token 1 after the root, unsure between 2 and 3 after it, then sure again.
SCRIPT = {
    (): [(1, 0.9), (5, 0.1)],
    (1,): [(2, 0.5), (3, 0.4)],
    (1, 2): [(4, 0.9), (6, 0.1)],
    (1, 3): [(7, 0.9), (8, 0.1)],
}


def _expand(calls):
    def expand(tree, node):
        path = tuple(tree.tokens[j] for j in tree.path(node))
        calls.append(path)
        return SCRIPT.get(path, [(9, 0.5), (0, 0.5)])

    return expand


def test_grow_tree_adds_the_most_probable_paths_first():
    calls = []
    tree = grow_tree(_expand(calls), TreeShape(nodes=5, top_k=2), max_depth=4)
    # path probabilities: 1: .9, 1-2: .45, 1-3: .36, 1-2-4: .405, 1-3-7: .324, 5: .1
    assert tree.tokens == [1, 2, 4, 3, 7]
    assert [tree.tokens[p] if p >= 0 else None for p in tree.parents] == [None, 1, 2, 1, 3]
    assert tree.scores == pytest.approx([0.9, 0.45, 0.405, 0.36, 0.324])
    assert calls[:3] == [(), (1,), (1, 2)]  # each node expanded once, best first


def test_grow_tree_respects_depth_eos_and_stop():
    tree = grow_tree(_expand([]), TreeShape(nodes=10, top_k=2), max_depth=1)
    assert tree.tokens == [1, 5]  # depth 1 only
    tree = grow_tree(_expand([]), TreeShape(nodes=6, top_k=2), max_depth=4, eos_token_id=1)
    assert tree.tokens[:4] == [1, 5, 9, 0] and 0 not in tree.parents  # EOS (1) never expanded
    n = iter(range(100))
    tree = grow_tree(_expand([]), TreeShape(nodes=10, top_k=2), 4, stop=lambda: next(n) >= 2)
    assert len(tree) == 3
    assert len(grow_tree(_expand([]), TreeShape(nodes=1, top_k=1), max_depth=4)) == 1


# --- verification on a tiny target ---------------------------------------------------------


class Tiny(TinyTarget):
    def __init__(self):
        super().__init__("is it day or night ?", videos=6)
        self.inputs = self.videos
        spec = DecodeSpec(MAX_NEW, self.limit, self.eos)
        self.reference = [hf_greedy(self.model, t, spec, warmup=0).tokens for t in self.inputs]

    def state(self, i: int = 0) -> TargetState:
        out = self.target.prefill(self.inputs[i].input_ids, self.inputs[i].pixel_values_videos)
        t0 = int(out.logits[0, -1].argmax())
        return TargetState(out.cache, out.cache.get_seq_length(), [t0], out.hidden[:, -1:])


@pytest.fixture(scope="module")
def tiny():
    with thread_budget(1):
        yield Tiny()


def _tree_on(reference: list[int]) -> DraftTree:
    """TREE's shape, with the reference's tokens 1 and 2 on the path 0 -> 2 -> 5 and others
    elsewhere: verification must follow that branch."""
    r = reference
    return DraftTree([r[1], 3, r[2], 5, 6, r[3]], TREE.parents, TREE.scores)


def test_tree_rows_equal_chain_forwards(tiny):
    state = tiny.state()
    tree = _tree_on(tiny.reference[0])
    past = state.cache.get_seq_length()
    ids = torch.tensor([[state.answer[-1], *tree.tokens]])
    rows = tiny.target.forward_tokens(
        ids,
        copy.deepcopy(state.cache),
        attention_mask=tree.attention(past, torch.float32, "cpu"),
        position_ids=tree.positions(past, "cpu"),
    ).logits[0]
    for i in [-1, *range(len(tree))]:
        chain = [state.answer[-1], *(tree.tokens[j] for j in tree.path(i))]
        out = tiny.target.forward_tokens(torch.tensor([chain]), copy.deepcopy(state.cache))
        torch.testing.assert_close(rows[i + 1], out.logits[0, -1], atol=ATOL, rtol=0)


def test_verify_tree_follows_the_matching_branch_and_gathers_the_cache(tiny):
    state = tiny.state()
    ref = tiny.reference[0]
    new, path, committed = verify_tree(tiny.target, state, _tree_on(ref))
    assert path == [0, 2, 5] and committed == ref[1:5]  # 3 accepted + the bonus
    assert new.answer == ref[:5] and new.states.shape[1] == 4
    # The cache now holds prompt + answer[:-1], exactly as recomputing it gives.
    fresh = tiny.state()
    tiny.target.forward_tokens(torch.tensor([ref[:4]]), fresh.cache)
    assert new.cache.get_seq_length() == fresh.cache.get_seq_length()
    for a, b in zip(new.cache.layers, fresh.cache.layers, strict=True):
        torch.testing.assert_close(a.keys, b.keys, atol=ATOL, rtol=0)
        torch.testing.assert_close(a.values, b.values, atol=ATOL, rtol=0)
    # and the next forward from it equals the next forward from the recomputed cache
    nxt = tiny.target.forward_tokens(torch.tensor([[ref[4]]]), new.cache).logits
    torch.testing.assert_close(
        nxt,
        tiny.target.forward_tokens(torch.tensor([[ref[4]]]), fresh.cache).logits,
        atol=ATOL,
        rtol=0,
    )


def test_verify_tree_with_no_matching_child_commits_the_target_token(tiny):
    state = tiny.state()
    wrong = (tiny.reference[0][1] + 1) % tiny.limit
    new, path, committed = verify_tree(tiny.target, state, DraftTree([wrong], [-1]))
    assert path == [] and committed == tiny.reference[0][1:2]
    assert new.cache.get_seq_length() == state.prompt_len + 1


@pytest.mark.parametrize("round1", ["cross_modal", "none"])
@pytest.mark.parametrize("wrong_at", [(), (2,), (1, 4, 6), tuple(range(MAX_NEW))])
def test_tree_sd_equals_greedy_with_scripted_drafters(tiny, round1, wrong_at):
    policy = DraftPolicy(gamma=3, tree=TreeShape(nodes=6, top_k=2))
    config = SDConfig(policy, "head", MAX_NEW, tiny.eos, round1)
    for inputs, ref in zip(tiny.inputs, tiny.reference, strict=True):
        drafter = ScriptedDrafter(ref, tiny.limit, wrong_at=wrong_at, confidence=0.8)
        head = ScriptedHead(ref, tiny.limit, wrong_at=wrong_at, confidence=0.8)
        result = speculative_generate(
            tiny.target, drafter if round1 == "cross_modal" else None, inputs, None, config,
            head=head,
        )  # fmt: skip
        assert result.tokens == ref
        if len(ref) > 4:  # the second branch carries the right token where the first is wrong:
            assert sum(result.accepted) > 0  # misses are rescued, so drafts are accepted


# --- the speedup model's replay of tree rounds ----------------------------------------------


@pytest.mark.parametrize(
    ("decode", "round1"), [("draft_model", True), ("head", True), ("draft_model", False)]
)
@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("wrong_at", [(), (2,), (1, 4, 6), tuple(range(MAX_NEW))])
def test_the_speedup_model_replays_tree_rounds_as_the_loop_runs_them(
    tiny, wrong_at, top_k, decode, round1
):
    """The model grows each round's tree from the drafter's recorded top-k on the answer's
    path (the cross-modal drafter's by position, a head's by depth from the committed length).
    Scripted drafters' candidates depend on the position only, so their branches off the path
    are what the model assumes: rounds, nodes, accepted nodes and target forwards must equal
    the loop's exactly. The model does not know which branch off the path is EOS (never
    expanded), so answers whose scripted branches hold EOS are left out. ``round1=False``: a
    chain in round 1, trees after."""
    from cross_modal_sd.decoding import DraftState
    from cross_modal_sd.speedup import CostProfile, simulate

    profile = CostProfile(10.0, 1.0, ((1, 1.5), (5, 3.5)), 2.0, 0.5, 0.1, head_token_ms=0.1)
    policy = DraftPolicy(gamma=3, tree=TreeShape(nodes=5, top_k=top_k, round1=round1))
    config = SDConfig(policy, decode, MAX_NEW, tiny.eos)
    checked = 0
    for inputs, ref in zip(tiny.inputs, tiny.reference, strict=True):
        drafter = ScriptedDrafter(ref, tiny.limit, wrong_at=wrong_at, confidence=0.7)
        head = ScriptedHead(ref, tiny.limit, wrong_at=wrong_at, confidence=0.7)
        rows = [drafter.candidates(DraftState(fed=list(ref[:i])), 4) for i in range(len(ref))]
        if any(
            t == tiny.eos for c, y in zip(rows, ref, strict=True) for t, _ in c[:top_k] if t != y
        ):
            continue
        checked += 1
        result = speculative_generate(tiny.target, drafter, inputs, None, config, head=head)
        assert result.tokens == ref
        rank = [
            next((r for r, (t, _) in enumerate(c) if t == y), -1)
            for c, y in zip(rows, ref, strict=True)
        ]
        top = [[p for _, p in c] for c in rows]
        n = len(ref)
        runs = [
            next((j for j in range(n - s - 1) if rank[s + 1 + j] != 0), n - s - 1)
            for s in range(n - 1)
        ]
        by_depth = [rank[s + 1 :] for s in range(n - 1)], [top[s + 1 :] for s in range(n - 1)]
        match = [r == 0 for r in rank]
        out = simulate(profile, config, match, [0.7] * n, runs, rank, top, *by_depth)
        assert out["rounds"] == result.rounds
        assert out["drafted"] == sum(result.drafted)
        assert out["accepted"] == sum(result.accepted)
        assert out["first_drafted"] == result.drafted[0]
        assert out["target_forwards"] == result.target_forwards
        if not round1:  # a chain of gamma drafts in round 1
            assert result.drafted[0] == min(3, len(ref) - 1)
    assert checked >= 3
