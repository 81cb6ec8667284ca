"""Drafters propose answer tokens for the target to verify; the draft-length policy says how many.

A drafter is four primitives over an explicit `DraftState` (nothing is stored on a model):

* `prefill(inputs)`: read the prompt; the state then predicts answer position 0;
* `next_token(state)`: the proposal for answer position `len(state.fed)` and its confidence;
* `feed(state, tokens)`: read answer tokens, so the state predicts the position after them;
* `rewind(state, n)`: forget all but the first `n` fed tokens.

`propose` (a round of drafting under a `DraftPolicy`) and `sync` (bring a drafter onto the
committed answer) are written once over these primitives, for every drafter.

`AdapterDrafter` is the cross-modal drafter: each draft token is
`argmax(target lm_head(adapter(draft hidden)))`, and the token is fed back into the draft model,
so an accepted prefix is exactly the teacher-forced context the adapter was trained on.
`ScriptedDrafter` proposes tokens from a known answer for tests (accept all / none / up to k).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import torch
from transformers import DynamicCache

from cross_modal_sd.adapters.base import Adapter
from cross_modal_sd.decoding.inputs import DraftInputs
from cross_modal_sd.decoding.trees import DraftTree, TreeShape, grow_tree
from cross_modal_sd.models.wrappers import DraftDecoder, crop_cache


@dataclass(frozen=True)
class DraftPolicy:
    """How many tokens a drafting round proposes.

    Every round is capped by `max_drafts` and by the tokens left before `max_new_tokens`, and
    stops after proposing EOS.

    Attributes:
        kind: ``"fixed"``: a set number of drafts per round; ``"confidence"``: draft while the
            top-1 probability of the adapted distribution stays at or above `threshold` (the
            first draft of a round is always kept; a later draft below it is dropped and ends
            the round).
        gamma: ``"fixed"`` only: drafts per round, or ``"prefill"``: in the first round draft
            for as long as the target is still prefilling (at least one), later rounds
            `decode_gamma`.
        decode_gamma: drafts per round after the first when ``gamma="prefill"``.
        threshold: ``"confidence"`` only: minimum top-1 probability of a kept draft.
        max_drafts: hard cap on drafts in any round.
        tree: draft a tree per round instead of a chain (`trees.TreeShape`: node budget,
            top-k, and whether round 1 drafts one; its depth is capped as a chain's length is).
            A ``gamma="prefill"`` first round grows its tree until the target has prefilled (up
            to `max_drafts` nodes).
        head_tail: a ``gamma="prefill"`` chain round 1 only: after this many cross-modal drafts
            the drafter's feature head drafts the chain on (as many as a later round), reading
            the adapter's estimates of the target's states at the cross-modal drafts and then its
            own outputs, until the target has prefilled (None: cross-modal drafts only; the
            drafter needs a head: `AdapterDrafter(head=...)`).
    """

    kind: Literal["fixed", "confidence"] = "fixed"
    gamma: int | Literal["prefill"] = 5
    decode_gamma: int = 5
    threshold: float = 0.5
    max_drafts: int = 32
    tree: TreeShape | None = None
    head_tail: int | None = None

    def __post_init__(self):
        if self.kind not in ("fixed", "confidence"):
            raise ValueError(f"DraftPolicy.kind must be 'fixed' or 'confidence', got {self.kind!r}")
        if self.gamma != "prefill" and not (isinstance(self.gamma, int) and self.gamma >= 1):
            raise ValueError(
                f"DraftPolicy.gamma must be an int >= 1 or 'prefill', got {self.gamma!r}"
            )
        for name in ("decode_gamma", "max_drafts"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DraftPolicy.{name} must be an int >= 1, got {value!r}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"DraftPolicy.threshold must lie in (0, 1], got {self.threshold!r}")
        if isinstance(self.tree, dict):  # from a record's to_dict
            object.__setattr__(self, "tree", TreeShape(**self.tree))
        if self.head_tail is not None:
            if not isinstance(self.head_tail, int) or self.head_tail < 1:
                raise ValueError(
                    f"DraftPolicy.head_tail must be an int >= 1 or None, got {self.head_tail!r}"
                )
            if not self.waits_for_target(True) or self.tree_in(True) is not None:
                raise ValueError(
                    "DraftPolicy.head_tail drafts on from a round-1 chain that lasts the target's "
                    f"prefill: it needs kind='fixed', gamma='prefill' and no round-1 tree, got "
                    f"kind={self.kind!r}, gamma={self.gamma!r}, tree={self.tree}"
                )

    @property
    def name(self) -> str:
        """Short label for reports, e.g. ``fixed-5``, ``fixed-prefill``, ``confidence-0.5``."""
        tree = f"-tree{self.tree.nodes}x{self.tree.top_k}" if self.tree else ""
        tree += "-later" if self.tree and not self.tree.round1 else ""
        tree += f"-tail{self.head_tail}" if self.head_tail else ""
        if self.kind == "confidence":
            return f"confidence-{self.threshold:g}{tree}"
        return f"fixed-{self.gamma}{tree}"

    def tree_in(self, first_round: bool) -> TreeShape | None:
        """The tree shape a round drafts (None: a chain); a ``prefill`` round 1 may grow up to
        `max_drafts` nodes."""
        if self.tree is None or (first_round and not self.tree.round1):
            return None
        if self.waits_for_target(first_round):
            return replace(self.tree, nodes=max(self.tree.nodes, self.max_drafts))
        return self.tree

    def round_cap(self, first_round: bool) -> int:
        """Most drafts this round may propose."""
        if self.kind == "confidence":
            return self.max_drafts
        if self.gamma == "prefill":
            return self.max_drafts if first_round else min(self.decode_gamma, self.max_drafts)
        return min(self.gamma, self.max_drafts)

    def drops(self, n_kept: int, confidence: float) -> bool:
        """Whether a new draft (after `n_kept` kept ones) is dropped, ending the round."""
        return self.kind == "confidence" and n_kept > 0 and confidence < self.threshold

    def waits_for_target(self, first_round: bool) -> bool:
        """Whether this round ends as soon as the target has finished its prefill."""
        return self.kind == "fixed" and self.gamma == "prefill" and first_round


@dataclass
class DraftState:
    """Where a drafter stands; returned anew by every primitive.

    Attributes:
        fed: answer tokens the drafter has read after its prompt.
        cache: the draft model's KV cache, holding prompt + `fed` (None for stub drafters). It
            is updated in place by the primitives, so only the latest state is valid.
        hidden: (1, len(fed) + 1, D) draft states of answer positions 0..len(fed), the state at
            position k being the one that predicts answer token k (None for stub drafters).
        prompt_len: cache positions taken by the prompt.
        prompt_last_token: id of the prompt's last token (precedes answer position 0).
    """

    fed: list[int] = field(default_factory=list)
    cache: DynamicCache | None = None
    hidden: torch.Tensor | None = None
    prompt_len: int = 0
    prompt_last_token: int | None = None


@dataclass
class Proposal:
    """Draft tokens of one round and the drafter's probability for each (a chain: its top-1;
    a tree: the node's path probability, with ``parents`` as in `trees.DraftTree`)."""

    tokens: list[int]
    confidences: list[float]
    parents: list[int] | None = None
    states: Any = None  # (k, D) array: the drafter's estimates of the target's states (round 1)

    def tree(self) -> DraftTree:
        """The drafts as a tree (a chain's parents are the previous drafts)."""
        if self.parents is None:
            return DraftTree.chain(self.tokens)
        return DraftTree(self.tokens, self.parents, self.confidences)


class Drafter(Protocol):
    """The primitives `propose` and `sync` drive (see the module docstring)."""

    def prefill(self, inputs: Any) -> DraftState: ...

    def next_token(self, state: DraftState) -> tuple[int, float]: ...

    def candidates(self, state: DraftState, k: int) -> list[tuple[int, float]]: ...

    def feed(self, state: DraftState, tokens: Sequence[int]) -> DraftState: ...

    def rewind(self, state: DraftState, n_keep: int) -> DraftState: ...

    def estimates(self, state: DraftState) -> torch.Tensor: ...


def propose(
    drafter: Drafter,
    state: DraftState,
    policy: DraftPolicy,
    limit: int,
    *,
    first_round: bool,
    target_ready: Callable[[], bool] = lambda: True,
    eos_token_id: int | None = None,
    on_draft: Callable[[int, int], None] | None = None,
) -> tuple[DraftState, Proposal]:
    """Drafts one round from `state`, which must predict the next answer position.

    Each draft except the last is fed back, so the returned state has read all drafts but the
    last; `sync` later keeps what the target accepted.

    Args:
        drafter: the drafter.
        state: drafter state whose `fed` equals the committed answer.
        policy: the draft-length policy.
        limit: most drafts wanted by the caller (tokens left before max_new_tokens).
        first_round: whether the target is prefilling concurrently (policy ``gamma="prefill"``).
        target_ready: returns True once the target prefill has finished.
        eos_token_id: drafting stops after proposing this token.
        on_draft: called with (index, token) as each chain draft is kept (a runner publishes
            them as they come, for a loop that takes what is there without waiting).

    Returns:
        The drafter state after the round and the proposal.
    """
    shape = policy.tree_in(first_round)
    if shape is not None:
        depth = min(limit, policy.round_cap(first_round))
        ready = target_ready if policy.waits_for_target(first_round) else None
        return _propose_tree(drafter, state, shape, depth, ready, eos_token_id)
    tokens: list[int] = []
    confidences: list[float] = []
    cap = min(limit, policy.round_cap(first_round))
    while len(tokens) < cap:
        token, confidence = drafter.next_token(state)
        if policy.drops(len(tokens), confidence):
            break
        tokens.append(token)
        confidences.append(confidence)
        if on_draft is not None:
            on_draft(len(tokens) - 1, token)
        if (
            len(tokens) == cap
            or token == eos_token_id
            or (policy.waits_for_target(first_round) and target_ready())
        ):
            break
        state = drafter.feed(state, [token])
    return state, Proposal(tokens, confidences)


def _propose_tree(
    drafter: Drafter,
    state: DraftState,
    shape: TreeShape,
    depth: int,
    target_ready: Callable[[], bool] | None,
    eos_token_id: int | None,
) -> tuple[DraftState, Proposal]:
    """`propose` for a tree round of ``shape`` (`DraftPolicy.tree_in`): `trees.grow_tree` over
    the drafter's top-k, moving the drafter between branches with `sync` (its state ends on
    whichever branch it read last). With `target_ready` (a ``prefill`` round 1) the tree grows
    until it returns True."""
    base = list(state.fed)

    def expand(tree: DraftTree, node: int) -> list[tuple[int, float]]:
        nonlocal state
        state = sync(drafter, state, base + [tree.tokens[j] for j in tree.path(node)])
        return drafter.candidates(state, shape.top_k)

    tree = grow_tree(expand, shape, depth, eos_token_id, stop=target_ready or (lambda: False))
    return state, Proposal(tree.tokens, tree.scores, tree.parents)


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def sync(drafter: Drafter, state: DraftState, answer: Sequence[int]) -> DraftState:
    """Brings the drafter onto the committed `answer`: keep the agreeing fed prefix, read the rest.

    After this the state predicts answer position `len(answer)`; one draft forward reads all
    missing tokens at once.
    """
    keep = common_prefix_len(state.fed, answer)
    if keep < len(state.fed):
        state = drafter.rewind(state, keep)
    if keep < len(answer):
        state = drafter.feed(state, answer[keep:])
    return state


class AdapterDrafter:
    """The cross-modal drafter: draft model -> adapter -> target `lm_head` -> argmax.

    Args:
        draft: the draft model behind the decoding API.
        adapter: maps draft hidden states to the target's hidden space. Per-position adapters
            read the newest state only; sequence adapters (`adapter.is_sequence`) are re-run over
            all answer states so far and the last position is taken, which equals their output
            on the full answer because they are causal.
        target_head: the target's masked `lm_head` (`TargetDecoder.head`: its own module, so
            the drafter can move to another process without the target).
        head: a feature head (`heads.HeadDrafter`) that drafts a round-1 chain's tail on the
            adapter's estimates (`DraftPolicy.head_tail`); it moves with the drafter.
    """

    def __init__(
        self,
        draft: DraftDecoder,
        adapter: Adapter,
        target_head: Callable[[torch.Tensor], torch.Tensor],
        head: Any = None,
    ):
        self.draft = draft
        self.adapter = adapter
        self.target_head = target_head
        self.head = head

    def prefill(self, inputs: DraftInputs) -> DraftState:
        out = self.draft.prefill(inputs.input_ids, inputs.event_pixels, keep_last=1)
        return DraftState(
            fed=[],
            cache=out.cache,
            hidden=out.hidden,
            prompt_len=out.cache.get_seq_length(),
            prompt_last_token=int(inputs.input_ids[0, -1]),
        )

    @torch.inference_mode()
    def estimates(self, state: DraftState) -> torch.Tensor:
        """(1, len(fed) + 1, D_target): the adapter's estimate of the target's state at every
        answer position the draft has read (the one whose `lm_head` row drafted that position)."""
        dtype = next(self.adapter.parameters()).dtype
        kwargs = {}
        if self.adapter.uses_tokens:
            previous = [state.prompt_last_token, *state.fed]
            kwargs["tokens"] = torch.tensor([previous], device=state.hidden.device)
        return self.adapter(state.hidden.to(dtype), **kwargs)

    @torch.inference_mode()
    def _probs(self, state: DraftState) -> torch.Tensor:
        if self.adapter.is_sequence:  # re-run over answer positions 0..n: causal, take the last
            adapted = self.estimates(state)[:, -1]  # (1, D_target)
        else:
            dtype = next(self.adapter.parameters()).dtype
            adapted = self.adapter(state.hidden[:, -1:].to(dtype))[:, -1]  # (1, D_target)
        return self.target_head(adapted)[0].softmax(dim=-1)  # (V,)

    def next_token(self, state: DraftState) -> tuple[int, float]:
        return self.candidates(state, 1)[0]

    def candidates(self, state: DraftState, k: int) -> list[tuple[int, float]]:
        """The k most probable next tokens with their probabilities, best first."""
        top = self._probs(state).topk(k)
        return list(zip(top.indices.tolist(), top.values.tolist(), strict=True))

    def feed(self, state: DraftState, tokens: Sequence[int]) -> DraftState:
        ids = torch.tensor([list(tokens)], device=state.hidden.device)  # (1, k)
        out = self.draft.forward_tokens(ids, state.cache)
        hidden = torch.cat([state.hidden, out.hidden], dim=1)  # (1, n + 1 + k, D)
        return replace(state, fed=[*state.fed, *tokens], hidden=hidden)

    def rewind(self, state: DraftState, n_keep: int) -> DraftState:
        crop_cache(state.cache, state.prompt_len + n_keep)
        return replace(state, fed=state.fed[:n_keep], hidden=state.hidden[:, : n_keep + 1])


class ScriptedDrafter:
    """Test drafter that proposes a known answer, right or wrong at chosen positions.

    At answer position k it proposes `reference[k]` if k < `correct_upto` and k is not in
    `wrong_at`, otherwise a token that differs from it. Positions past the reference get token 0.

    Args:
        reference: the answer to copy (e.g. the target's greedy output).
        vocab_limit: wrong tokens are drawn below this id.
        correct_upto: first position proposed wrong for good (None: never).
        wrong_at: further positions proposed wrong.
        confidence: top-1 probability reported at position k (a constant or a function of k).
        prefill_s / token_s: sleep in `prefill` / per `feed` call (one forward, however many
            tokens it reads), to give the stub a cost.
        dim: width of its (zero) estimates of the target's states.
        head: the head that drafts a round-1 chain's tail (`DraftPolicy.head_tail`), e.g. a
            `heads.ScriptedHead`.
    """

    def __init__(
        self,
        reference: Sequence[int],
        vocab_limit: int,
        correct_upto: int | None = None,
        wrong_at: Sequence[int] = (),
        confidence: float | Callable[[int], float] = 1.0,
        prefill_s: float = 0.0,
        token_s: float = 0.0,
        dim: int = 1,
        head: Any = None,
    ):
        self.reference = list(reference)
        self.vocab_limit = vocab_limit
        self.correct_upto = correct_upto
        self.wrong_at = set(wrong_at)
        self.confidence = confidence  # a constant or a function of k (a constant pickles)
        self.prefill_s = prefill_s
        self.token_s = token_s
        self.dim = dim
        self.head = head

    def is_correct(self, position: int) -> bool:
        """Whether the proposal at answer `position` copies the reference."""
        upto_ok = self.correct_upto is None or position < self.correct_upto
        return upto_ok and position not in self.wrong_at

    def prefill(self, inputs: Any = None) -> DraftState:
        time.sleep(self.prefill_s)
        return DraftState()

    def proposal(self, position: int) -> tuple[int, float]:
        """The scripted token at answer ``position`` and its reported confidence."""
        right = self.reference[position] if position < len(self.reference) else 0
        token = right if self.is_correct(position) else (right + 1) % self.vocab_limit
        confidence = self.confidence
        return token, float(confidence(position) if callable(confidence) else confidence)

    def next_token(self, state: DraftState) -> tuple[int, float]:
        return self.proposal(len(state.fed))

    def candidates(self, state: DraftState, k: int) -> list[tuple[int, float]]:
        """The scripted token first; then the reference token where the script is wrong (a
        second branch that rescues the miss) or a wrong one where it is right, sharing the
        rest of the probability."""
        position = len(state.fed)
        first, confidence = self.proposal(position)
        right = self.reference[position] if position < len(self.reference) else 0
        others = [right if first != right else (right + 2) % self.vocab_limit]
        others += [(right + 3 + j) % self.vocab_limit for j in range(k - 2)]
        share = (1.0 - confidence) / max(1, k - 1)
        return [(first, confidence), *((t, share) for t in others)][:k]

    def feed(self, state: DraftState, tokens: Sequence[int]) -> DraftState:
        time.sleep(
            self.token_s
        )  # one forward, whatever its length (overhead-bound, as tiny models are)
        return replace(state, fed=[*state.fed, *tokens])

    def rewind(self, state: DraftState, n_keep: int) -> DraftState:
        return replace(state, fed=state.fed[:n_keep])

    def estimates(self, state: DraftState) -> torch.Tensor:
        return torch.zeros(1, len(state.fed) + 1, self.dim)
