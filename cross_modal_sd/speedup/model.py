"""The speedup model: the SD loop replayed over acceptance sequences, priced by component costs.

For one sample (its teacher-forced ``match``/``confidence`` sequences, `acceptance`) and one
`SDConfig`, `simulate` takes the decisions `speculative_generate` takes, in the same order:

* **Round 1.** The drafter proposes while the target prefills: a fixed number of drafts, as
  many as fit in the prefill (``gamma="prefill"``: `CostProfile.prefill_drafts`), or while its
  confidence stays at or above the threshold; it stops after proposing EOS and at the cap of
  ``max_new_tokens - 1``. The round lasts `CostProfile.round1_ms` of its drafting. The first draft is checked against the prefill's own token; if it is
  accepted and more were drafted, one verify ``V(G - 1)`` checks the rest.
* **Decode phase.** ``autoregressive``: one step ``T_t`` per remaining token.
  ``draft_model``: rounds of (a command to the drafter, a resync ``T_d``, drafting, a verify
  ``V(G)``), each committing the accepted drafts plus the target's token; with one token left
  to the cap, one plain step. ``head``: the same rounds drafted by a feature head beside the
  target (``G`` x `CostProfile.head_token_ms`, no round trip), accepting its self-fed chain's run
  from the committed length (`Acceptance.head_runs`).
* **Round-1 head tail** (`DraftPolicy.head_tail`): after that many cross-modal drafts, if the
  target is still prefilling, the drafter's head drafts on (`CostProfile.tail_drafts`: one
  head step each); when the whole chain is accepted the tail accepts the head's chain run from
  that length (`Acceptance.head_runs`, computed from the target's true states: the adapter's
  estimates the tail really reads stand in for them, an optimistic approximation).
* **Round 1 ``none``.** The target prefills alone; with no cross-modal drafter resident, every
  target cost is the baseline's cores' (`CostProfile.solo`).
* **Trees** (`_tree_round`): `trees.grow_tree` itself grows the round's tree over the
  drafter's recorded top-k probabilities (`Acceptance.top` by position; a head's
  `Acceptance.head_top` by depth from the committed length); the round accepts the deepest
  node on the target's path (`rank`), costs one drafter step per expanded node (a head step
  for a head) and a verify ``V(nodes)``. A branch off the target's path has no recorded
  distribution of its own: it is taken to be the path's at the same depth.
* **Sampling** (T > 0): the same replay over `Acceptance.sampled` sequences.

A draft is accepted while the drafts before it were and its ``match`` holds. Nothing is fitted:
costs come from probes (`cross_modal_sd.speedup.measure`), acceptance from a validation split.
The baseline costs ``baseline_prefill + (N - 1) baseline_token`` for an N-token answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cross_modal_sd.decoding.drafters import DraftPolicy
from cross_modal_sd.decoding.speculative import SDConfig
from cross_modal_sd.decoding.trees import grow_tree
from cross_modal_sd.speedup.acceptance import Acceptance, _run
from cross_modal_sd.speedup.costs import CostProfile

# Per-sample quantities the model predicts, named like `SDResult` fields where one exists.
QUANTITIES = (
    "total_ms",
    "round1_ms",
    "draft_ms",
    "verify_ms",
    "decode_ms",
    "rounds",
    "drafted",
    "accepted",
    "target_forwards",
    "first_drafted",
    "first_accepted",
)


def _drafts(
    policy: DraftPolicy,
    first_round: bool,
    start: int,
    limit: int,
    match: Sequence[bool],
    confidence: Sequence[float],
    ends_with_eos: bool,
    fit: int,
) -> tuple[int, bool]:
    """``(drafts kept, ended by a confidence drop)`` of one `propose` call from position
    ``start``, as `drafters.propose` decides them."""
    n = len(match)
    cap = min(limit, policy.round_cap(first_round))
    kept, alive = 0, True
    while kept < cap:
        pos = start + kept
        conf = confidence[pos] if pos < n else 0.0
        if policy.drops(kept, conf):
            return kept, True
        kept += 1
        alive = alive and pos < n and match[pos]
        proposed_eos = alive and ends_with_eos and pos == n - 1
        if kept == cap or proposed_eos or (policy.waits_for_target(first_round) and kept >= fit):
            break
    return kept, False


def _tree_round(
    policy: DraftPolicy,
    first_round: bool,
    start: int,
    limit: int,
    rank: Sequence[int],
    top: Sequence[Sequence[float]],
    ends_with_eos: bool,
    fit: int,
) -> tuple[int, int, int, int]:
    """One tree round from position ``start``, as `drafters.propose` grows it: ``(nodes,
    expanded nodes, accepted depth, nodes below the accepted first node)``.

    A node is labelled by its rank among its parent's candidates; it is on the target's path
    when its parent is and its label is the target token's rank there. The answer's EOS is not
    expanded; a branch past the answer's end takes its last position's distribution; a
    ``prefill`` round 1 stops once ``fit`` nodes have been expanded (the drafter's steps by
    the end of the target's prefill)."""
    n = len(rank)
    shape = policy.tree_in(first_round)
    waits = policy.waits_for_target(first_round)
    depth: list[int] = []
    on_path: list[bool] = []
    expanded = 0

    def label(tree) -> None:  # depth and path of the nodes added since the last call
        for i in range(len(depth), len(tree)):
            parent = tree.parents[i]
            depth.append(1 if parent < 0 else depth[parent] + 1)
            pos = start + depth[i] - 1
            ok = pos < n and (parent < 0 or on_path[parent])
            on_path.append(ok and tree.tokens[i] == rank[pos])

    def expand(tree, node: int) -> list[tuple[int, float]]:
        nonlocal expanded
        label(tree)
        d = 0 if node < 0 else depth[node]
        if node >= 0 and on_path[node] and ends_with_eos and start + d == n:
            return []  # the answer's EOS is never expanded
        expanded += 1
        return list(enumerate(top[min(start + d, n - 1)]))

    depth_cap = min(limit, policy.round_cap(first_round))
    stop = (lambda: expanded >= fit) if waits else (lambda: False)
    tree = grow_tree(expand, shape, depth_cap, stop=stop)
    label(tree)
    accepted = max((d for d, ok in zip(depth, on_path, strict=True) if ok), default=0)
    first = next((i for i in range(len(tree)) if depth[i] == 1 and on_path[i]), None)
    below = 0 if first is None else len(tree.subtree(first))
    return len(tree), expanded, accepted, below


def _cross_modal_trees(config: SDConfig) -> bool:
    """Whether the cross-modal drafter drafts trees (round 1, or later rounds)."""
    policy = config.policy
    first = config.round1 == "cross_modal" and policy.tree_in(first_round=True) is not None
    return first or (policy.tree is not None and config.decode == "draft_model")


def _head_drafts(policy: DraftPolicy, run: int, length: int, limit: int, n: int, eos: bool) -> int:
    """Drafts of one head round at committed ``length`` whose chain runs ``run`` (it stops
    after proposing the answer's EOS)."""
    cap = min(limit, policy.round_cap(first_round=False))
    if eos and run >= n - length:
        return min(cap, n - length)
    return cap


def simulate(
    profile: CostProfile,
    config: SDConfig,
    match: Sequence[bool],
    confidence: Sequence[float],
    head_runs: Sequence[int] | None = None,
    rank: Sequence[int] | None = None,
    top: Sequence[Sequence[float]] | None = None,
    head_rank: Sequence[Sequence[int]] | None = None,
    head_top: Sequence[Sequence[Sequence[float]]] | None = None,
) -> dict[str, float]:
    """The predicted quantities (`QUANTITIES`) of one sample; see the module docstring.

    Raises:
        ValueError: an answer longer than the cap, ``decode="head"`` without ``head_runs``, a
            tree policy without ``rank`` and ``top``, or a head drafting trees (not priced).
    """
    policy = config.policy
    p = profile.solo() if config.round1 == "none" and config.decode == "head" else profile
    n, cap = len(match), config.max_new_tokens
    if n > cap:
        raise ValueError(f"an answer of {n} tokens exceeds max_new_tokens={cap}")
    if config.decode == "head" and head_runs is None:
        raise ValueError(
            f"{config.name}: decode='head' needs the head's runs (Acceptance.with_head)"
        )
    tree = policy.tree is not None
    if _cross_modal_trees(config) and (rank is None or top is None):
        raise ValueError(f"{config.name}: a tree policy needs the drafter's top-k (rank, top)")
    if tree and config.decode == "head" and (head_rank is None or head_top is None):
        raise ValueError(f"{config.name}: a head's trees need its top-k (head_rank, head_top)")
    eos = n < cap
    out = dict.fromkeys(QUANTITIES, 0.0)
    fit = p.prefill_drafts()
    # Never waiting: a chain takes the drafts made by the end of the target's prefill; a fused
    # round or a tree waits for a drafter past its prefill and skips one still in it.
    first_tree = policy.tree_in(first_round=True) is not None
    takes = not config.wait_for_drafter and not config.fuse_round1 and not first_tree
    if takes:
        fit = p.drafts_by_prefill_end()
    skipped = config.round1 == "none" or (
        not config.wait_for_drafter and (p.drafter_late() or fit == 0)
    )
    g, stopped, expanded, depth, below = 0, False, 0, 0, 0
    tail, tail_run = 0, 0  # the drafter's head's drafts after the chain (`head_tail`)
    if cap >= 2 and not skipped and first_tree:
        g, expanded, depth, below = _tree_round(policy, True, 0, cap - 1, rank, top, eos, fit)
    elif cap >= 2 and not skipped:
        chain = cap - 1 if policy.head_tail is None else min(cap - 1, policy.head_tail)
        g, stopped = _drafts(policy, True, 0, chain, match, confidence, eos, fit)
        ends = eos and g == n and _run(match, 0, g) == g  # the chain proposed the answer's EOS
        if policy.head_tail is not None and g == chain < cap - 1 and not ends:
            tail_run = head_runs[g - 1]  # from the states of 0..g-1: true ones stand in
            most = _head_drafts(policy, tail_run, g, cap - 1 - g, n, eos)  # a head round's cap
            tail = p.tail_drafts(g, most, waits=not takes)
    drafting = p.drafting_ms(expanded, False) if first_tree else p.drafting_ms(g, stopped)
    drafting += p.head_drafting_ms(tail) if tail else 0.0
    if g and takes:  # the target's prefill beside the job, then the board read: no wait
        round1 = p.round1_prefill_ms * p.target_contention
    elif g:
        round1 = p.round1_ms(drafting)
    elif config.round1 == "cross_modal" and cap > 1:  # a late drafter ran beside, unwaited
        round1 = p.round1_prefill_ms * p.target_contention
    else:
        round1 = p.target_prefill_ms
    accepted = int(depth > 0) if first_tree else int(g > 0 and match[0])
    rest = below if first_tree else g - 1 + tail  # drafts the second forward verifies
    length, forwards, verify = 1, 1, 0.0
    if accepted and rest > 0 and n > 1:
        more = depth - 1 if first_tree else _run(match, 1, g - 1)
        if tail and more == g - 1:  # the whole chain accepted: the tail's run follows
            more += min(tail_run, tail)
        verify = p.verify_ms(rest)
        accepted += more
        forwards += 1
        length = min(1 + more + 1, n)
    out.update(
        round1_ms=round1 + verify,
        draft_ms=drafting,
        verify_ms=verify,
        rounds=1.0,
        drafted=float(g + tail),
        accepted=float(accepted),
        first_drafted=float(g + tail),
        first_accepted=float(accepted),
    )
    decode = 0.0
    while length < n:
        if config.decode == "autoregressive":
            decode += (n - length) * p.target_token_ms
            forwards += n - length
            break
        g, stopped = 0, False
        if cap - length > 1:
            if config.decode == "head" and tree:  # the chain's depths are the positions
                depths = head_rank[length - 1]
                g, expanded, a, _ = _tree_round(
                    policy,
                    False,
                    0,
                    cap - length - 1,
                    depths,
                    head_top[length - 1],
                    eos and len(depths) == n - length,
                    fit,
                )
                drafting = p.head_drafting_ms(expanded)
            elif config.decode == "head":
                g = _head_drafts(policy, head_runs[length - 1], length, cap - length - 1, n, eos)
                drafting = p.head_drafting_ms(g)
            elif tree:
                g, expanded, a, _ = _tree_round(
                    policy, False, length, cap - length - 1, rank, top, eos, fit
                )
                drafting = p.round_trip_ms + p.draft_token_ms + p.drafting_ms(expanded)
            else:
                g, stopped = _drafts(
                    policy, False, length, cap - length - 1, match, confidence, eos, fit
                )
                drafting = p.round_trip_ms + p.draft_token_ms + p.drafting_ms(g, stopped)
            decode += drafting
            out["draft_ms"] += drafting
        step = p.verify_ms(g)
        decode += step
        out["verify_ms"] += step
        if config.decode == "head" and not tree:
            a = min(head_runs[length - 1], g)
        elif not (tree and g):
            a = _run(match, length, g)
        out["rounds"] += 1
        out["drafted"] += g
        out["accepted"] += a
        forwards += 1
        length = min(length + a + 1, n)
    out["decode_ms"] = decode
    out["target_forwards"] = float(forwards)
    out["total_ms"] = out["round1_ms"] + decode
    return out


def predict(
    profile: CostProfile, acceptance: Acceptance, config: SDConfig | Mapping[str, Any]
) -> dict[str, Any]:
    """Predicted mean quantities and speedup of one SD configuration over `acceptance`'s samples.

    At T > 0 (``config.sampling``) the replay runs over `Acceptance.sampled` sequences.

    Raises:
        ValueError: a head configuration drafting more per round than its chains were scored to
            (or without them); a tree without the drafter's top-k, or sampled; a fused round 1;
            sampling without the target's distributions.

    Returns:
        ``method``; ``speedup`` (``ratio_of_means``: mean baseline over mean SD time;
        ``mean_of_ratios``); the means of ``n_tokens``, ``baseline_ms`` and every quantity of
        `QUANTITIES`; ``tau`` (tokens per target forward); ``accept_rate``; ``acceptance``
        (its summary).
    """
    if not isinstance(config, SDConfig):
        config = SDConfig.from_dict(config)
    if config.fuse_round1 or (config.policy.tree is not None and not config.sampling.greedy):
        raise ValueError(
            f"{config.name}: the speedup model prices chains and greedy trees, not sampled "
            f"trees or fused rounds"
        )
    tree = config.policy.tree is not None
    if _cross_modal_trees(config) and acceptance.top is None:
        raise ValueError(
            f"{acceptance.source}: no drafter top-k recorded (top, rank); re-export with "
            f"`python train.py` to price draft trees"
        )
    if tree and config.decode == "head" and acceptance.head_top is None:
        raise ValueError(
            f"{acceptance.source}: no head top-k recorded (tree_top, tree_rank); re-export "
            f"the head with `python train.py` to price its draft trees"
        )
    if not config.sampling.greedy:
        acceptance = acceptance.sampled(config.sampling)
    longest = max(acceptance.lengths)
    if longest > config.max_new_tokens:
        config = SDConfig.from_dict({**config.to_dict(), "max_new_tokens": longest})
    if config.decode == "head":
        drafts = config.policy.round_cap(first_round=False)
        if acceptance.head_runs is None:
            raise ValueError(f"{config.name}: no head runs in the acceptance (with_head)")
        if drafts > acceptance.head_k:
            raise ValueError(
                f"{config.name}: {drafts} drafts a round, but the head's chains were scored to "
                f"{acceptance.head_k}; lower head_gamma or re-export with longer chains"
            )
    none = [None] * len(acceptance.match)
    rows = []
    for match, conf, head, rank, top, head_rank, head_top in zip(
        acceptance.match,
        acceptance.confidence,
        acceptance.head_runs or none,
        acceptance.rank or none,
        acceptance.top or none,
        acceptance.head_rank or none,
        acceptance.head_top or none,
        strict=True,
    ):
        row = simulate(profile, config, match, conf, head, rank, top, head_rank, head_top)
        rows.append({"n_tokens": len(match), "baseline_ms": profile.baseline_ms(len(match)), **row})
    means = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    return {
        "method": config.name,
        "speedup": {
            "ratio_of_means": means["baseline_ms"] / means["total_ms"],
            "mean_of_ratios": sum(r["baseline_ms"] / r["total_ms"] for r in rows) / len(rows),
        },
        **means,
        "tau": means["n_tokens"] / means["target_forwards"],
        "accept_rate": means["accepted"] / means["drafted"] if means["drafted"] else 0.0,
        "acceptance": acceptance.to_dict(),
    }
