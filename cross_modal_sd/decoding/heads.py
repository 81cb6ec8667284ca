"""Drafting with a feature-level head (`adapters.FeatureHead`) on the target's own states.

The head runs beside the target, in its process (it reads the target's states); the drafter may
carry a copy that drafts the tail of a round-1 chain before any target state exists
(`head_tail`). A round:

1. *sync*: the head's cache keeps the pairs it read from true states and reads the pairs of the
   answer committed since, ``(σ_{i-1}, y_i)``, in one step (their states come from the target's
   prefill and verification forwards: `speculative.verify` returns them);
2. *draft*: its last output, read by the target's ``lm_head``, is the first draft; each draft
   and the output it came from are fed back for the next, as `drafters.propose` does for a draft
   model: a fixed number per round, or while the top-1 probability stays at the threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from cross_modal_sd.adapters.head import FeatureHead, HeadCache
from cross_modal_sd.decoding.drafters import (
    DraftPolicy,
    DraftState,
    Proposal,
    ScriptedDrafter,
    common_prefix_len,
)
from cross_modal_sd.decoding.trees import grow_tree
from cross_modal_sd.models.wrappers import MaskedHead


@dataclass
class HeadState:
    """The head between rounds: its cache, the answer tokens whose pairs it read from true
    states (``true``), and the output of its last pair (the next draft's source)."""

    cache: HeadCache
    true: list[int] = field(default_factory=list)
    last: torch.Tensor | None = None


class HeadDrafter:
    """Proposes drafts from a `FeatureHead` through the target's masked ``lm_head``.

    Args:
        head: the trained head (eval mode, on the target's device).
        target_head: the target's `MaskedHead`.
    """

    def __init__(self, head: FeatureHead, target_head: MaskedHead):
        self.head = head
        self.target_head = target_head
        # The lm_head rows of valid ids, transposed to (D, V'): one vector-matrix product and an
        # argmax a draft, where the masked head's cast, mask and copy would cost as much again.
        with torch.no_grad():
            weight = target_head.lm_head.weight[: target_head.vocab_limit]
            self.weight = weight.t().contiguous().to(head.out.weight.dtype)
        self._template: HeadCache | None = None

    def start(self) -> HeadState:
        """An empty state for one answer: a fresh KV buffer beside the weights' derived tables,
        which are computed once per drafter (the head's weights do not change while it
        drafts; deriving them per answer cost ≈ 0.25 ms, on the critical path)."""
        if self._template is None:
            self._template = self.head.new_cache()
        t = self._template
        return HeadState(HeadCache(torch.zeros_like(t.kv), t.tokens, t.pack))

    @torch.inference_mode()
    def sync(self, state: HeadState, answer: Sequence[int], sigma: torch.Tensor) -> HeadState:
        """Brings the head onto the committed ``answer``.

        Args:
            state: the head's state (its cache is updated in place).
            answer: the committed answer ``y_0 .. y_{m-1}``.
            sigma: (1, m, D) the target's true states ``σ_{-1} .. σ_{m-2}`` (pair i's state is
                ``sigma[:, i]``).
        """
        m = len(answer)
        keep = 0
        while keep < min(len(state.true), m) and state.true[keep] == answer[keep]:
            keep += 1
        state.cache.rewind(keep)  # also drops the pairs it read from its own outputs
        if keep < m:
            dtype = self.head.out.weight.dtype
            ids = torch.tensor([list(answer[keep:])], device=sigma.device)
            out = self.head.step(state.cache, sigma[:, keep:m].to(dtype), ids)  # (1, m - keep, D)
            state.last = out[:, -1:]
        return HeadState(state.cache, list(answer), state.last)

    @torch.inference_mode()
    def propose(
        self,
        state: HeadState,
        policy: DraftPolicy,
        limit: int,
        eos_token_id: int | None,
        stop: Callable[[], bool] | None = None,
        on_draft: Callable[[int, int], None] | None = None,
    ) -> tuple[HeadState, Proposal]:
        """One round of drafts from a synced state (at most ``limit`` deep); a chain's drafts
        are fed back but the last; a tree policy grows a tree (`propose_tree`).

        A chain also ends after a draft once ``stop()`` is true, and ``on_draft(i, token)`` is
        called as draft i is kept (the round-1 tail: `head_tail`)."""
        if policy.tree is not None:
            return self.propose_tree(state, policy, limit, eos_token_id)
        tokens: list[int] = []
        confidences: list[float] = []
        cap = min(limit, policy.round_cap(first_round=False))
        last = state.last
        while len(tokens) < cap:
            logits = last[0, -1] @ self.weight  # (V',)
            if policy.kind == "confidence":
                probability, best = logits.softmax(dim=-1).max(dim=-1)
                confidence = float(probability)
            else:  # a fixed policy never reads it: no softmax over the vocabulary
                best, confidence = logits.argmax(), float("nan")
            token = int(best)
            if policy.drops(len(tokens), confidence):
                break
            tokens.append(token)
            confidences.append(confidence)
            if on_draft is not None:
                on_draft(len(tokens) - 1, token)
            if len(tokens) == cap or token == eos_token_id or (stop is not None and stop()):
                break
            # its own estimate and its own draft (the argmax tensor itself: no new tensor)
            last = self.head.step(state.cache, last, best.view(1, 1))
        return HeadState(state.cache, state.true, last), Proposal(tokens, confidences)

    @torch.inference_mode()
    def propose_tree(
        self, state: HeadState, policy: DraftPolicy, limit: int, eos_token_id: int | None
    ) -> tuple[HeadState, Proposal]:
        """A dynamic draft tree (`trees.grow_tree`) from a synced state.

        Expanding node i needs the head's output at i: its cache holds the synced answer's
        pairs, then the pairs of one branch; switching branches rewinds to the common prefix
        and reads the new branch's pairs (each its parent's output and its token) in one step.
        """
        cache, base = state.cache, state.cache.length
        outputs: dict[int, torch.Tensor] = {-1: state.last}  # node -> the head's output there
        branch: list[int] = []  # the nodes whose pairs follow the synced answer in the cache
        dtype = self.head.out.weight.dtype

        def expand(tree, node: int) -> list[tuple[int, float]]:
            nonlocal branch
            if node not in outputs:
                path = tree.path(node)
                keep = common_prefix_len(branch, path)
                cache.rewind(base + keep)
                new = path[keep:]
                h = torch.cat([outputs[tree.parents[j]] for j in new], dim=1).to(dtype)
                ids = torch.tensor([[tree.tokens[j] for j in new]], device=h.device)
                out = self.head.step(cache, h, ids)  # (1, len(new), D)
                for k, j in enumerate(new):
                    outputs[j] = out[:, k : k + 1]
                branch = path
            probs = (outputs[node][0, -1] @ self.weight).softmax(dim=-1)
            top = probs.topk(policy.tree.top_k)
            return list(zip(top.indices.tolist(), top.values.tolist(), strict=True))

        depth = min(limit, policy.round_cap(first_round=False))
        tree = grow_tree(expand, policy.tree, depth, eos_token_id)
        return state, Proposal(tree.tokens, tree.scores, tree.parents)


class ScriptedHead(ScriptedDrafter):
    """Test head that proposes a known answer, right or wrong at chosen positions: the script of
    `drafters.ScriptedDrafter` (same arguments), drafted as a head drafts.

    Its `sync` checks the loop's bookkeeping: one target state per committed token.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.synced: list[int] = []  # answer length at every sync (what tests inspect)

    def start(self) -> HeadState:
        return HeadState(cache=None)

    def sync(self, state: HeadState, answer: Sequence[int], sigma: torch.Tensor) -> HeadState:
        if sigma.shape[1] < len(answer):
            raise ValueError(f"{sigma.shape[1]} target states for {len(answer)} answer tokens")
        self.synced.append(len(answer))
        return HeadState(len(answer), list(answer))  # its 'cache': the answer length read

    def propose(
        self,
        state: HeadState,
        policy: DraftPolicy,
        limit: int,
        eos_token_id: int | None,
        stop: Callable[[], bool] | None = None,
        on_draft: Callable[[int, int], None] | None = None,
    ) -> tuple[HeadState, Proposal]:
        cap = min(limit, policy.round_cap(first_round=False))
        if policy.tree is not None:  # the script's candidates at each node's answer position

            def expand(tree, node: int) -> list[tuple[int, float]]:
                fed = [0] * (state.cache + len(tree.path(node)))
                return self.candidates(DraftState(fed=fed), policy.tree.top_k)

            tree = grow_tree(expand, policy.tree, cap, eos_token_id)
            return state, Proposal(tree.tokens, tree.scores, tree.parents)
        tokens: list[int] = []
        confidences: list[float] = []
        while len(tokens) < cap:
            token, confidence = self.proposal(state.cache + len(tokens))
            if policy.drops(len(tokens), confidence):
                break
            tokens.append(token)
            confidences.append(confidence)
            if on_draft is not None:
                on_draft(len(tokens) - 1, token)
            if token == eos_token_id or (stop is not None and stop()):
                break
        return state, Proposal(tokens, confidences)


def head_tail(
    head: HeadDrafter | ScriptedHead,
    drafts: Sequence[int],
    estimates: torch.Tensor,
    n: int,
    eos_token_id: int | None,
    stop: Callable[[], bool],
    on_draft: Callable[[int, int], None] | None = None,
) -> Proposal:
    """Up to ``n`` drafts after a round-1 chain of cross-modal ``drafts``, made before any
    target state exists (`DraftPolicy.head_tail`).

    The head reads the pairs ``(a_{i-1}, d_i)`` (``estimates[:, i]`` = a_{i-1}, the adapter's
    estimate of the target's state that drafted d_i), then drafts on from its own outputs
    until ``stop()`` (at least one draft). ``on_draft(i, token)`` numbers the tail's drafts
    after the chain's.
    """
    state = head.sync(head.start(), drafts, estimates)
    offset = len(drafts)
    post = None if on_draft is None else (lambda i, token: on_draft(offset + i, token))
    policy = DraftPolicy(gamma=n, max_drafts=n)
    return head.propose(state, policy, n, eos_token_id, stop, post)[1]
