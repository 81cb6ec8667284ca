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
* **Round 1 ``none``.** The target prefills alone; with no cross-modal drafter resident, every
  target cost is the baseline's cores' (`CostProfile.solo`).

A draft is accepted while the drafts before it were and its ``match`` holds. Nothing is fitted:
costs come from probes (`cross_modal_sd.speedup.measure`), acceptance from a validation split.
The baseline costs ``baseline_prefill + (N - 1) baseline_token`` for an N-token answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cross_modal_sd.decoding.drafters import DraftPolicy
from cross_modal_sd.decoding.speculative import SDConfig
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
) -> dict[str, float]:
    """The predicted quantities (`QUANTITIES`) of one sample; see the module docstring.

    Raises:
        ValueError: an answer longer than the cap, or ``decode="head"`` without ``head_runs``.
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
    eos = n < cap
    out = dict.fromkeys(QUANTITIES, 0.0)
    fit = p.prefill_drafts()
    # Never waiting: a chain takes the drafts made by the end of the target's prefill; a fused
    # round or a tree waits for a drafter past its prefill and skips one still in it.
    takes = not config.wait_for_drafter and not config.fuse_round1 and policy.tree is None
    if takes:
        fit = p.drafts_by_prefill_end()
    skipped = config.round1 == "none" or (
        not config.wait_for_drafter and (p.drafter_late() or fit == 0)
    )
    g, stopped = (
        (0, False)
        if cap < 2 or skipped
        else _drafts(policy, True, 0, cap - 1, match, confidence, eos, fit)
    )
    drafting = p.drafting_ms(g, stopped)
    if g and takes:  # the target's prefill beside the job, then the board read: no wait
        round1 = p.round1_prefill_ms * p.target_contention
    elif g:
        round1 = p.round1_ms(drafting)
    elif config.round1 == "cross_modal" and cap > 1:  # a late drafter ran beside, unwaited
        round1 = p.round1_prefill_ms * p.target_contention
    else:
        round1 = p.target_prefill_ms
    accepted = int(g > 0 and match[0])
    length, forwards, verify = 1, 1, 0.0
    if accepted and g > 1 and n > 1:
        more = _run(match, 1, g - 1)
        verify = p.verify_ms(g - 1)
        accepted += more
        forwards += 1
        length = min(1 + more + 1, n)
    out.update(
        round1_ms=round1 + verify,
        draft_ms=drafting,
        verify_ms=verify,
        rounds=1.0,
        drafted=float(g),
        accepted=float(accepted),
        first_drafted=float(g),
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
            if config.decode == "head":
                g = _head_drafts(policy, head_runs[length - 1], length, cap - length - 1, n, eos)
                drafting = p.head_drafting_ms(g)
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
        if config.decode == "head":
            a = min(head_runs[length - 1], g)
        else:
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

    Raises:
        ValueError: a head configuration drafting more per round than its chains were scored to
            (or without them).

    Returns:
        ``method``; ``speedup`` (``ratio_of_means``: mean baseline over mean SD time;
        ``mean_of_ratios``); the means of ``n_tokens``, ``baseline_ms`` and every quantity of
        `QUANTITIES`; ``tau`` (tokens per target forward); ``accept_rate``; ``acceptance``
        (its summary).
    """
    if not isinstance(config, SDConfig):
        config = SDConfig.from_dict(config)
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
    runs = acceptance.head_runs or [None] * len(acceptance.match)
    rows = []
    for match, conf, head in zip(acceptance.match, acceptance.confidence, runs, strict=True):
        row = simulate(profile, config, match, conf, head)
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
