"""Draft trees: several continuations per round, verified in one target forward.

A chain stops at its first miss; a tree keeps a few alternatives where the drafter is unsure,
and the target checks every node at once under a tree attention mask (docs/design.md §11).

* `DraftTree`: tokens below the last committed token (the root), each with its parent; a
  chain is the tree whose every node has the previous one as parent.
* `grow_tree`: the dynamic tree of EAGLE-2's kind, written once over two callbacks: a node is
  worth its path probability (the product of the drafter's probabilities along it); the best
  candidate joins the tree, and a node is expanded (its drafter's top-k become candidates)
  when it is the best thing left to do, until the node budget is spent.
* `verify_tree`: one target forward over [root, nodes...] with positions by depth and a mask
  that lets each node see the cache, the root and its own ancestors; the path is accepted by
  the run's `sampling.TokenChooser` (greedy: the longest path whose tokens equal the target's
  greedy choices; sampling: recursive rejection), the target's token after it added, and the
  KV cache reduced to the accepted path by a gather (not only a crop).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from cross_modal_sd.decoding.sampling import GREEDY_CHOOSER, TokenChooser
from cross_modal_sd.models.wrappers import TargetDecoder, gather_cache


@dataclass(frozen=True)
class TreeShape:
    """Tree drafting settings of a `DraftPolicy` (per round).

    Attributes:
        nodes: most draft nodes per round (the budget; at least 1).
        top_k: candidates taken from each expanded node (at least 1; 1 gives a chain).
        round1: whether round 1 drafts a tree too (False: a chain there, trees after).
    """

    nodes: int = 12
    top_k: int = 2
    round1: bool = True

    def __post_init__(self):
        if not isinstance(self.nodes, int) or self.nodes < 1:
            raise ValueError(f"tree budget (nodes) must be an int >= 1, got {self.nodes!r}")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"tree top_k must be an int >= 1, got {self.top_k!r}")
        if not isinstance(self.round1, bool):
            raise ValueError(f"tree round1 must be true or false, got {self.round1!r}")


@dataclass
class DraftTree:
    """Draft tokens below the root (the last committed token, or the prefill for round 1).

    ``parents[i]`` is -1 (a child of the root) or an earlier node; ``scores[i]`` the drafter's
    path probability of node i (what `grow_tree` ranked it by).
    """

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    def __post_init__(self):
        if len(self.parents) != len(self.tokens):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.parents)} parents")
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise ValueError(f"node {i}: parent {p} must be -1 or an earlier node")

    @classmethod
    def chain(cls, tokens: Sequence[int]) -> DraftTree:
        return cls(list(tokens), list(range(-1, len(tokens) - 1)), [1.0] * len(tokens))

    def __len__(self) -> int:
        return len(self.tokens)

    def depths(self) -> list[int]:
        """Depth of every node (1 for the root's children)."""
        out: list[int] = []
        for p in self.parents:
            out.append(1 if p < 0 else out[p] + 1)
        return out

    def path(self, i: int) -> list[int]:
        """Nodes from the root's child down to node i (i included; [] for the root, -1)."""
        out = []
        while i >= 0:
            out.append(i)
            i = self.parents[i]
        return out[::-1]

    def children(self, i: int) -> list[int]:
        """Node i's children (-1: the root's), in order."""
        return [j for j, p in enumerate(self.parents) if p == i]

    def subtree(self, i: int) -> DraftTree:
        """The nodes below node i, as a tree whose root is node i."""
        index = {i: -1}
        out = DraftTree()
        for j, p in enumerate(self.parents):
            if p in index:
                index[j] = len(out.tokens)
                out.tokens.append(self.tokens[j])
                out.parents.append(index[p])
                out.scores.append(self.scores[j])
        return out

    def attention(self, past: int, dtype: torch.dtype, device) -> torch.Tensor:
        """(1, 1, n + 1, past + n + 1) additive mask of a forward over [root, nodes...] after
        `past` cached positions: each row sees the cache, the root, its ancestors and itself."""
        n = len(self)
        allowed = torch.zeros(n + 1, n + 1, dtype=torch.bool)
        allowed[:, 0] = True
        for i in range(n):
            allowed[i + 1, [j + 1 for j in self.path(i)]] = True
        mask = torch.zeros(n + 1, past + n + 1, dtype=dtype)
        mask[:, past:].masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[None, None].to(device)

    def positions(self, past: int, device) -> torch.Tensor:
        """(1, n + 1) position ids: the root at `past`, each node at `past` + its depth."""
        return torch.tensor([[past, *(past + d for d in self.depths())]], device=device)


def grow_tree(
    expand: Callable[[DraftTree, int], list[tuple[int, float]]],
    shape: TreeShape,
    max_depth: int,
    eos_token_id: int | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> DraftTree:
    """Grows a dynamic draft tree by path probability.

    Args:
        expand: ``expand(tree, i)`` -> the drafter's ``(token, probability)`` candidates for
            node i's children (i = -1: the root's), best first; called once per expanded node
            with the tree grown so far.
        shape: node budget and candidates per expansion.
        max_depth: deepest node allowed (the policy's round cap).
        eos_token_id: a node with this token is never expanded.
        stop: checked after every node; True ends the round (round 1 ends with the prefill).

    Returns:
        The tree (nodes in the order they joined: a parent before its children).
    """
    tree = DraftTree()
    depth: list[int] = []
    # Items: (-score, tie-break, kind, parent or node, token). A node's expansion is worth its
    # own score: its children can only score less.
    heap: list[tuple[float, int, str, int, int]] = [(-1.0, 0, "expand", -1, -1)]
    order = 1
    while heap and len(tree) < shape.nodes and max_depth > 0:
        neg, _, kind, node, token = heapq.heappop(heap)
        if kind == "expand":
            for candidate, p in expand(tree, node)[: shape.top_k]:
                heapq.heappush(heap, (neg * p, order, "node", node, candidate))
                order += 1
            continue
        tree.tokens.append(token)
        tree.parents.append(node)
        tree.scores.append(-neg)
        depth.append(1 if node < 0 else depth[node] + 1)
        i = len(tree) - 1
        if depth[i] < max_depth and token != eos_token_id:
            heapq.heappush(heap, (neg, order, "expand", i, -1))
            order += 1
        if stop():
            break
    return tree


def verify_tree(
    target: TargetDecoder, state, tree: DraftTree, chooser: TokenChooser = GREEDY_CHOOSER
) -> tuple[object, list[int], list[int]]:
    """Verifies a draft tree below ``state.answer[-1]`` in one target forward.

    The root's row picks one of its children (`TokenChooser.walk`; greedy: the child equal to
    its argmax), whose row picks the next, and so on; the first row that picks no child gives
    the correction (or, at a leaf, the bonus). The cache keeps prompt + answer[:-1] of the new
    answer: the root's and the accepted nodes' entries, gathered.

    Returns:
        The new `speculative.TargetState`, the accepted nodes (root to deepest) and the
        committed tokens (the accepted nodes' tokens, then the target's).
    """
    past = state.cache.get_seq_length()
    device = target.model.device
    ids = torch.tensor([[state.answer[-1], *tree.tokens]], device=device)
    dtype = target.model.dtype
    out = target.forward_tokens(
        ids,
        state.cache,
        attention_mask=tree.attention(past, dtype, device),
        position_ids=tree.positions(past, device),
    )
    # Row 0: the root; row i + 1: node i.
    path, committed = chooser.walk(out.logits[0], tree.children, tree.tokens)
    gather_cache(state.cache, past + 1, [past + 1 + i for i in path])
    states = out.hidden[:, [0, *(i + 1 for i in path)]]
    new = type(state)(state.cache, state.prompt_len, state.answer + committed, states)
    return new, path, committed
