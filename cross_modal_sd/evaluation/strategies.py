"""The methods an evaluation times, by config name: the baseline, SD configurations and peers.

Every name maps to a structured entry of `SD_STRATEGIES` or `PEERS`; nothing is parsed out of a
name, and every SD record stores the configuration it ran with (`SDResult.config`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from cross_modal_sd.decoding import GREEDY, DraftPolicy, Sampling, SDConfig, TreeShape
from cross_modal_sd.evaluation.report import BASELINE

__all__ = [
    "BASELINE",
    "HEAD_STRATEGIES",
    "PEERS",
    "SD_STRATEGIES",
    "Strategy",
    "draft_policy",
    "parse_strategies",
]
POLICY_KINDS = ("fixed", "confidence")
CROSS_MODAL_PHASES = ("autoregressive", "draft_model")
PEERS = ("prompt_lookup", "assisted", "wrapper_greedy")
# name -> (round 1, draft-length policy, decode phase; None = the `decoding` config's phase)
_CHAINS: dict[str, tuple[str, str, str | None]] = {
    **{f"sd_{kind}": ("cross_modal", kind, None) for kind in POLICY_KINDS},
    **{
        f"sd_{kind}_{phase}": ("cross_modal", kind, phase)
        for kind in POLICY_KINDS
        for phase in CROSS_MODAL_PHASES
    },
    # A feature head on the target's own states after round 1: alone (the VLM-only baseline of
    # EAGLE-style drafting), or after cross-modal drafts inside the prefill window (the hybrid).
    "head": ("none", "fixed", "head"),
    "hybrid": ("cross_modal", "fixed", "head"),
}
# Every configuration also drafts trees (`<name>_tree`: `decoding.tree`).
TREE_SUFFIX = "_tree"
# The hybrid whose head drafts on from round 1's drafts before their verification, reading the
# adapter's estimates of the target's states (one forward verifies both: `SDConfig.fuse_round1`).
FUSED = {"hybrid_fused": ("cross_modal", "fixed", "head")}
SD_STRATEGIES = {
    **_CHAINS,
    **{f"{name}{TREE_SUFFIX}": v for name, v in _CHAINS.items()},
    **FUSED,
}
HEAD_STRATEGIES = ("head", "hybrid", "hybrid_fused")


@dataclass(frozen=True)
class Strategy:
    """One timed method: the baseline, an SD configuration or a peer."""

    name: str
    kind: str  # "baseline" | "sd" | "peer"
    sd: SDConfig | None = None


def draft_policy(kind: str, decoding: Mapping[str, Any]) -> DraftPolicy:
    """The `DraftPolicy` of a policy kind with the settings of a `conf/decoding/*` node."""
    if kind == "fixed":
        gamma = decoding["fixed"]["gamma"]
        return DraftPolicy(
            kind="fixed",
            gamma=gamma if gamma == "prefill" else int(gamma),
            decode_gamma=int(decoding["fixed"]["decode_gamma"]),
            max_drafts=int(decoding["max_drafts"]),
        )
    return DraftPolicy(
        kind="confidence",
        threshold=float(decoding["confidence"]["threshold"]),
        max_drafts=int(decoding["max_drafts"]),
    )


def parse_strategies(
    names: Iterable[str],
    decoding: Mapping[str, Any],
    max_new_tokens: int,
    eos_token_id: int | None,
    sampling: Sampling = GREEDY,
) -> list[Strategy]:
    """Strategies from their config names, canonicalised and de-duplicated (order kept).

    ``sd_<policy>`` takes the decode phase of `decoding`; ``sd_<policy>_<phase>`` names it;
    ``head`` and ``hybrid`` draft later rounds with a feature head, ``head_gamma`` drafts a round
    (round 1: none, or cross-modal drafts while the target prefills); ``<name>_tree`` drafts
    trees of ``decoding.tree`` instead of chains; ``hybrid_fused`` verifies round
    1's drafts and the head's first ones in one forward. A ``hybrid`` whose round 1 is a
    chain ends it with the head's drafts after ``decoding.head_tail`` cross-modal ones (null:
    cross-modal drafts only). The other policies'
    settings come from `decoding` (``fixed.gamma``, ``fixed.decode_gamma``,
    ``confidence.threshold``, ``max_drafts``); every SD configuration decodes with `sampling`.

    Raises:
        ValueError: an unknown name; the message lists the known ones.
    """
    out: dict[str, Strategy] = {}
    for raw in names:
        name = str(raw)
        if name in PEERS:
            out.setdefault(name, Strategy(name, "peer"))
            continue
        if name not in SD_STRATEGIES:
            raise ValueError(
                f"unknown strategy {name!r}; known: {', '.join([*SD_STRATEGIES, *PEERS])}"
            )
        round1, kind, phase = SD_STRATEGIES[name]
        phase = phase or decoding["phase"]
        policy = draft_policy(kind, decoding)
        tree = name.endswith(TREE_SUFFIX)
        base = name.removesuffix(TREE_SUFFIX)
        if base in HEAD_STRATEGIES:  # round 1 drafts inside the prefill window; the head after
            policy = DraftPolicy(
                gamma="prefill",
                decode_gamma=int(decoding.get("head_gamma", 8)),
                max_drafts=policy.max_drafts,
            )
        if tree:
            node = decoding.get("tree") or {}
            shape = TreeShape(
                int(node.get("nodes", 12)),
                int(node.get("top_k", 2)),
                bool(node.get("round1", True)),
            )
            policy = replace(policy, tree=shape)
        tail = decoding.get("head_tail")
        if base == "hybrid" and tail is not None and policy.tree_in(first_round=True) is None:
            # its round-1 chain ends in the drafter's head's drafts (`DraftPolicy.head_tail`)
            policy = replace(policy, head_tail=int(tail))
        config = SDConfig(
            policy=policy,
            decode=phase,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            round1=round1,
            sampling=sampling,
            fuse_round1=name in FUSED,
            # The hybrids need not wait for the drafter when the target is done: the head
            # decodes whether round 1 brought drafts or not (`decoding.hybrid_waits`).
            wait_for_drafter=not (base in HEAD_STRATEGIES and round1 == "cross_modal")
            or bool(decoding.get("hybrid_waits", False)),
        )
        canonical = base if base in HEAD_STRATEGIES else f"sd_{kind}_{phase}"
        canonical += TREE_SUFFIX if tree else ""
        out.setdefault(canonical, Strategy(canonical, "sd", config))
    return list(out.values())
