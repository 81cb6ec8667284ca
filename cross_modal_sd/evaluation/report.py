"""Aggregation of per-sample evaluation records into `report.json`, and its Markdown rendering.

A per-sample record (one line of `samples.jsonl`) holds both baseline loops' runs and one run per
strategy, all on the same inputs::

    {"sample_id": ..., "baselines": {"generate": {"tokens": [...], "total_ms": ...}, "loop": ...},
     "strategies": {"sd_fixed_draft_model": {SDResult fields}, "prompt_lookup": {...}}}

`aggregate` reads them with ``baseline`` set to the chosen loop's run (`e2e.with_baseline`).

Conventions (docs/design.md §10): times and counts are means over samples; `accept_rate` is
accepted / drafted summed over all samples and rounds; `speedup.ratio_of_means` divides the mean
baseline time by the mean strategy time, `speedup.mean_of_ratios` averages the per-sample ratios,
and each has a 95% bootstrap interval over samples (`ci95`, `mean_of_ratios_ci95`); a strategy is
lossless on a sample when its tokens equal HF `generate`'s. Quantities a strategy does not
measure (HF `generate` gives no phase breakdown) are None, never 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from cross_modal_sd.metrics.intervals import bootstrap_speedup
from cross_modal_sd.utils import fmt, table

BASELINE = "baseline"
KINDS = ("baseline", "sd", "peer")
TIME_KEYS = (
    "prefill_ms",
    "draft_prefill_ms",
    "draft_ms",
    "verify_ms",
    "decode_ms",
    "total_ms",
    "overlap_ms",
    "wait_ms",
)
# The real pair's cost shape (docs/design.md §12), printed next to the measured one.
REFERENCE_COSTS = {
    "target_prefill_share": 0.43,
    "draft_prefill_ratio": 0.27,
    "draft_token_ratio": 0.7,
}
COST_LABELS = {
    "target_prefill_share": "target prefill / baseline answer time",
    "draft_prefill_ratio": "draft prefill / target prefill",
    "draft_token_ratio": "draft per-token / target per-token",
}


def mean(values: Sequence[float | None]) -> float | None:
    """Mean of the values that are not None; None when there are none."""
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def ratio(num: float | None, den: float | None) -> float | None:
    """`num / den`, None when either is missing or `den` is 0."""
    if num is None or den is None or den == 0:
        return None
    return num / den


def accepted_length_histogram(lengths: Sequence[int], max_len: int) -> list[int]:
    """Counts of samples by accepted length 0..max_len (longer runs in the last bin)."""
    counts = [0] * (max_len + 1)
    for n in lengths:
        counts[min(n, max_len)] += 1
    return counts


def position_acceptance(
    drafted: Sequence[int], accepted: Sequence[int], max_len: int
) -> list[float | None]:
    """Round-1 acceptance by position from per-sample (drafted, accepted) counts.

    At position k: among samples whose first round drafted more than k tokens, the share whose
    first `k + 1` drafts were all accepted. None where no sample drafted that far.
    """
    out: list[float | None] = []
    for k in range(max_len):
        reached = [a for d, a in zip(drafted, accepted, strict=True) if d > k]
        out.append(sum(a > k for a in reached) / len(reached) if reached else None)
    return out


ROUND_SPLIT_KEYS = ("round1_tokens", "later_tokens", "tau_round1", "tau_later")


def round_split(runs: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Tokens committed by round 1 and by later rounds (means per sample) and each one's τ
    (tokens per target forward, pooled over samples; None without such forwards).

    Round 1's forwards are the prefill and its verification, if any; after it each round is one
    forward (drafting decodes) or each token is (``autoregressive``).
    """
    if not all(r.get("committed") for r in runs):  # records older than the per-round counts
        return dict.fromkeys(ROUND_SPLIT_KEYS)
    first = [r["committed"][0] for r in runs]
    later = [len(r["tokens"]) - c for r, c in zip(runs, first, strict=True)]
    later_forwards = [
        len(r["drafted"]) - 1 if r["config"]["decode"] != "autoregressive" else n
        for r, n in zip(runs, later, strict=True)
    ]
    first_forwards = [r["target_forwards"] - f for r, f in zip(runs, later_forwards, strict=True)]
    return {
        "round1_tokens": mean(first),
        "later_tokens": mean(later),
        "tau_round1": ratio(sum(first), sum(first_forwards)),
        "tau_later": ratio(sum(later), sum(later_forwards)),
    }


def speedup(base_ms: Sequence[float], own_ms: Sequence[float]) -> dict[str, Any]:
    """Ratio of means and mean of ratios, each with its 95% bootstrap interval."""
    ci = bootstrap_speedup(base_ms, own_ms)
    return {
        "ratio_of_means": ratio(mean(base_ms), mean(own_ms)),
        "ci95": ci["ratio_of_means"],
        "mean_of_ratios": mean([ratio(b, t) for b, t in zip(base_ms, own_ms, strict=True)]),
        "mean_of_ratios_ci95": ci["mean_of_ratios"],
    }


def prefill_window(
    records: Sequence[Mapping[str, Any]], deployment: str, hybrid: str = "hybrid"
) -> dict[str, Any] | None:
    """Whether cross-modal drafting inside the target's prefill window paid for itself: the
    hybrid's time against head only's on the same samples (None unless both ran).

    In `shared` the drafter's core is taken from the target's prefill (head only prefills on
    all the cores); in `own_device` the window is free. ``verdict``: ``"paid"`` when the
    hybrid's speedup over head only has its whole 95% interval above 1, ``"did not pay"`` when
    below, ``"undecided"`` otherwise.
    """
    if not records or any(n not in records[0]["strategies"] for n in ("head", hybrid)):
        return None
    head = [r["strategies"]["head"]["total_ms"] for r in records]
    mixed = [r["strategies"][hybrid]["total_ms"] for r in records]
    vs = speedup(head, mixed)
    lo, hi = vs["ci95"]
    verdict = "paid" if lo > 1 else "did not pay" if hi < 1 else "undecided"
    return {"deployment": deployment, "hybrid": hybrid, "vs_head": vs, "verdict": verdict}


def render_prefill_window(window: Mapping[str, Any]) -> str:
    """The report's sentence on `prefill_window`."""
    cost = (
        "the drafter's core is taken from the target's prefill, which head only runs on every core"
        if window["deployment"] == "shared"
        else "the drafter has cores of its own: the window is free"
    )
    return (
        f"**Prefill-window drafting {window['verdict'].upper()}** here ({cost}): "
        f"`{window['hybrid']}` is {_with_ci(window['vs_head'])} times as fast as head only on the "
        f"same samples (above 1 over the whole interval: paid; below: did not pay)."
    )


def summarize_strategy(
    name: str,
    kind: str,
    runs: Sequence[Mapping[str, Any]],
    baselines: Sequence[Mapping[str, Any]],
    max_len: int,
    reference: Sequence[Mapping[str, Any]] | None = None,
    exact: bool = True,
) -> dict[str, Any]:
    """Per-strategy means, speedups and losslessness over paired runs.

    Args:
        name: strategy key.
        kind: ``"baseline"``, ``"sd"`` or ``"peer"``.
        runs: one record per sample (`SDResult.to_dict` or `GenerationRecord.to_dict`).
        baselines: the baseline record of the same samples, in the same order.
        max_len: bins of the accepted-length histogram and positions of the acceptance curve.
        reference: HF `generate`'s records of the same samples: the tokens every output must
            equal, and the second speedup column (``speedup_vs_generate``); None: `baselines`.
        exact: whether outputs must equal the reference token for token (greedy); False when
            sampling, where losslessness is equality in distribution (``lossless*`` are None).

    Returns:
        A JSON-ready dict (see the module docstring for the conventions).
    """
    if kind not in KINDS:
        raise ValueError(f"strategy {name!r}: kind must be one of {KINDS}, got {kind!r}")
    if len(runs) != len(baselines) or not runs:
        raise ValueError(
            f"strategy {name!r}: need one run per baseline sample, got {len(runs)} runs for "
            f"{len(baselines)} baseline samples"
        )
    out: dict[str, Any] = {"kind": kind, "method": runs[0].get("method", name)}
    out["n_samples"] = len(runs)
    for key in TIME_KEYS:
        values = [r.get(key) for r in runs]
        out[key] = mean(values) if all(v is not None for v in values) else None
    out["tokens"] = mean([len(r["tokens"]) for r in runs])
    if kind == "sd":
        drafted = [sum(r["drafted"]) for r in runs]
        accepted = [sum(r["accepted"]) for r in runs]
        first_drafted = [r["drafted"][0] for r in runs]
        first_accepted = [r["accepted"][0] for r in runs]
        out["tau"] = mean([r["tau"] for r in runs])
        out["accept_rate"] = ratio(sum(accepted), sum(drafted))
        out["accepted_mean"] = mean(accepted)
        out["drafted_mean"] = mean(drafted)
        out["first_round_accepted_mean"] = mean(first_accepted)
        out["overlap_share"] = ratio(out["overlap_ms"], out["prefill_ms"])
        out["accepted_length_hist"] = accepted_length_histogram(first_accepted, max_len)
        out["position_acceptance"] = position_acceptance(first_drafted, first_accepted, max_len)
        out.update(round_split(runs))
    else:
        # Greedy `generate` runs one target forward per token by construction; the peers'
        # internals are not exposed by HF.
        out["tau"] = 1.0 if kind == "baseline" else None
        for key in ("accept_rate", "accepted_mean", "drafted_mean", "first_round_accepted_mean"):
            out[key] = None
        out.update(dict.fromkeys(ROUND_SPLIT_KEYS))
        out["overlap_share"] = None
        out["accepted_length_hist"] = None
        out["position_acceptance"] = None
    reference = baselines if reference is None else reference
    base_ms = [b["total_ms"] for b in baselines]
    own_ms = [r["total_ms"] for r in runs]
    out["speedup"] = speedup(base_ms, own_ms)
    out["speedup_vs_generate"] = speedup([b["total_ms"] for b in reference], own_ms)
    out["slower_share"] = mean([float(t > b) for b, t in zip(base_ms, own_ms, strict=True)])
    if not exact:
        out["lossless_rate"] = out["lossless"] = out["flag"] = None
        return out
    same = [r["tokens"] == b["tokens"] for r, b in zip(runs, reference, strict=True)]
    out["lossless_rate"] = mean([float(s) for s in same])
    out["lossless"] = all(same)
    out["flag"] = (
        None
        if all(same)
        else f"NOT LOSSLESS: {len(same) - sum(same)} of {len(same)} outputs differ from the "
        f"baseline; its speedup is not a valid comparison"
    )
    return out


def aggregate(
    records: Sequence[Mapping[str, Any]],
    kinds: Mapping[str, str],
    max_len: int,
    reference: Sequence[Mapping[str, Any]] | None = None,
    exact: bool = True,
) -> dict[str, Any]:
    """The E2E report from per-sample records.

    Args:
        records: per-sample records (module docstring) with ``baseline`` set, all holding every
            strategy in `kinds`.
        kinds: strategy key -> ``"sd"`` or ``"peer"`` (the baseline is added), in report order.
        max_len: the answer cap; bins of the histograms and positions of the curves.
        reference: HF `generate`'s record per sample (see `summarize_strategy`).
        exact: token-for-token equality applies (greedy); False when sampling.

    Returns:
        ``n_samples``, ``lossless_rate`` (share of samples where every SD configuration equals
        the reference; None without SD configurations or when sampling), ``lossless`` (None
        when sampling), ``strategies`` (baseline first, see `summarize_strategy`) and
        ``warnings``.

    Raises:
        ValueError: no records, or a record lacking a strategy.
    """
    if not records:
        raise ValueError("no evaluation records to aggregate (the sample list was empty)")
    for r in records:
        missing = [name for name in kinds if name not in r["strategies"]]
        if missing:
            raise ValueError(f"record {r.get('sample_id')!r} lacks strategies {missing}")
    baselines = [r["baseline"] for r in records]
    reference = baselines if reference is None else reference
    strategies = {
        BASELINE: summarize_strategy(
            BASELINE, "baseline", baselines, baselines, max_len, reference, exact
        )
    }
    for name, kind in kinds.items():
        runs = [r["strategies"][name] for r in records]
        strategies[name] = summarize_strategy(
            name, kind, runs, baselines, max_len, reference, exact
        )
    sd_names = [n for n, k in kinds.items() if k == "sd"]
    if not exact:
        return {
            "n_samples": len(records),
            "lossless_rate": None,
            "lossless": None,
            "strategies": strategies,
            "warnings": [],
        }
    all_same = [
        all(r["strategies"][n]["tokens"] == ref["tokens"] for n in sd_names)
        for r, ref in zip(records, reference, strict=True)
    ]
    warnings = [f"{name}: {s['flag']}" for name, s in strategies.items() if s["flag"] is not None]
    return {
        "n_samples": len(records),
        "lossless_rate": mean([float(s) for s in all_same]) if sd_names else None,
        "lossless": all(all_same),
        "strategies": strategies,
        "warnings": warnings,
    }


# ---------------------------------------------------------------------------------- rendering


def _cost_line(costs: Mapping[str, Any]) -> str:
    parts = [
        f"{COST_LABELS[k].split(' / ')[0]} {fmt(costs.get(k))} (real {fmt(REFERENCE_COSTS[k])})"
        for k in REFERENCE_COSTS
    ]
    return "Measured cost shape: " + "; ".join(parts) + "."


def _with_ci(speedup: Mapping[str, Any]) -> str:
    lo, hi = speedup["ci95"]
    return f"{fmt(speedup['ratio_of_means'])} [{fmt(lo)}, {fmt(hi)}]"


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _curve_table(
    strategies: Mapping[str, Mapping[str, Any]], key: str, label: str, counts: bool = False
) -> str:
    names = [n for n, s in strategies.items() if s.get(key) is not None]
    if not names:
        return "(no SD configuration)"
    curves = [strategies[n][key] for n in names]
    length = max(len(c) for c in curves)
    # Trailing rows without data (no sample reached; empty histogram bins) say nothing.
    while length > 1 and all(
        _is_empty(c[length - 1]) or (counts and c[length - 1] == 0) for c in curves
    ):
        length -= 1
    rows = [[k, *[c[k] for c in curves]] for k in range(length)]
    return table([label, *names], rows)


def render_e2e(report: Mapping[str, Any], plots: Sequence[str] = ()) -> str:
    """`report.md` of an E2E run: the report's numbers as tables, plots linked at the end."""
    s = report["strategies"]
    costs = report.get("cost_ratios") or {}
    budget = report.get("budget") or {}
    ckpt = report.get("checkpoint", {})
    cfg = report.get("config", {})
    out = [f"# End-to-end evaluation: deployment `{report.get('deployment')}`", ""]
    if ckpt:
        verified = (
            "its training cache names the same models"
            if ckpt.get("models_verified")
            else "only dims checked (its training cache was not found to compare model ids)"
        )
        out.append(
            f"Checkpoint `{ckpt.get('path')}` (adapter {ckpt.get('adapter')}, run "
            f"{ckpt.get('run_name')}); {verified}."
        )
    head = report.get("head_checkpoint")
    if head:
        verified = (
            "its lm_head digest matches the target's"
            if head.get("lm_head_verified")
            else "width and vocabulary checked"
        )
        out.append(
            f"Feature head `{head.get('path')}` ({head.get('adapter')}, run "
            f"{head.get('run_name')}); {verified}."
        )
    if cfg:
        source = f" ({cfg['source']})" if cfg.get("source") else ""
        out.append(
            f"{report['n_samples']} samples{source}, max_new_tokens {cfg.get('max_new_tokens')}, "
            f"warm-up {cfg.get('warmup')} untimed run(s) per method, order {cfg.get('order')}, "
            f"device {cfg.get('device')}."
        )
    if budget:
        base = s[BASELINE]
        out.append(
            f"Budget: {budget.get('cores')} core(s), deployment `{budget.get('deployment')}`: "
            f"the target and the baselines on cores {budget.get('target_cores')}, the drafter on "
            f"{budget.get('drafter_cores')}. Baseline: `{base.get('method')}` (the faster greedy "
            f"loop here; the other took {fmt(base.get('other_loop_ms'))} ms)."
        )
    lossless = report["lossless_rate"]
    sampling = report.get("sampling") or {}
    if report["lossless"] is None and sampling.get("temperature"):
        out += [
            "",
            f"**Sampling** (temperature {sampling['temperature']:g}, top-k {sampling['top_k']}, "
            f"top-p {sampling['top_p']:g}, seed {sampling['seed']} + sample index): every "
            "method samples the target's distribution, so outputs differ run to run by design; "
            "SD keeps that distribution exactly (the distribution tests of "
            "`tests/test_sampling.py`), not the tokens of one draw. Acceptance rates are "
            "per strategy below.",
        ]
    else:
        out += ["", f"**lossless_rate: {fmt(lossless, 3)}**"]
    if report["lossless"] is False:
        out += [
            "",
            "> **WARNING: NOT LOSSLESS.** Some SD output differs from the target's greedy "
            "output; the speedups of flagged strategies are not valid comparisons.",
        ]
    for w in report.get("warnings", []):
        out.append(f"> {w}")
    out += ["", "## Speedup over the baseline (95% bootstrap intervals over samples)", ""]
    rows = [
        [
            name,
            v["method"],
            v["total_ms"],
            v["tokens"],
            _with_ci(v["speedup"]),
            _with_ci(v["speedup_vs_generate"]),
            (v.get("predicted_speedup") or {}).get("ratio_of_means"),
            v["slower_share"],
            v["lossless_rate"],
            v["flag"] or "",
        ]
        for name, v in s.items()
    ]
    header = [
        "strategy",
        "method",
        "total ms",
        "tokens",
        "speedup (ratio of means)",
        "vs HF generate",
        "predicted (speedup model)",
        "slower than baseline",
        "lossless rate",
        "flag",
    ]
    out += [table(header, rows), ""]
    if report.get("prefill_window"):
        out += [render_prefill_window(report["prefill_window"]), ""]
    if costs:
        out += [_cost_line(costs), ""]
        out += [
            f"## Cost shape, regime `{costs.get('regime')}` (vs the real pair, docs/design.md §12)",
            "",
        ]
        rows = [[COST_LABELS[k], costs.get(k), REFERENCE_COSTS[k]] for k in REFERENCE_COSTS]
        rows += [["target prefill beside the drafter / alone", costs.get("contention"), None]]
        if costs.get("head_token_ratio") is not None:
            rows += [["feature head per-token / target per-token", costs["head_token_ratio"], None]]
        rows += [
            [k.removesuffix("_ms").replace("_", " ") + " (ms)", costs.get(k), None]
            for k in ("target_prefill_ms", "target_token_ms", "draft_prefill_ms", "draft_token_ms")
        ]
        out += [table(["quantity", "measured", "real pair"], rows, digits=3), ""]
    out += ["## Timing breakdown (mean ms per sample)", ""]
    rows = [[name, *[v[k] for k in TIME_KEYS], v["overlap_share"]] for name, v in s.items()]
    header = ["strategy", *[k.removesuffix("_ms") for k in TIME_KEYS], "overlap / prefill"]
    out += [
        table(header, rows),
        "",
        "`prefill` is the target prefill; `overlap` the measured intersection of the target "
        "prefill with the draft's round-1 work; `wait` the time the target, "
        "done prefilling, waited for the drafts. HF `generate` strategies report totals only.",
        "",
    ]
    out += ["## Acceptance", ""]
    keys = ("tokens", "tau", "accept_rate", "accepted_mean", "drafted_mean")
    split = ("round1_tokens", "tau_round1", "later_tokens", "tau_later")
    rows = [
        [name, *[v[k] for k in keys], v["first_round_accepted_mean"], *[v.get(k) for k in split]]
        for name, v in s.items()
    ]
    header = ["strategy", *keys, "round-1 accepted", "round-1 tokens", "τ round 1"]
    out += [table([*header, "later tokens", "τ later rounds"], rows), ""]
    out += [
        "τ: tokens per target forward (round 1: the prefill and its verification; later: one "
        "forward per round, or per token when the target decodes alone).",
        "",
    ]
    out += ["## Round-1 accepted-length histogram (samples)", ""]
    out += [_curve_table(s, "accepted_length_hist", "accepted", counts=True), ""]
    out += ["## Round-1 acceptance by position", ""]
    out += [_curve_table(s, "position_acceptance", "position"), ""]
    if plots:
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(out)


def render_offline(report: Mapping[str, Any], plots: Sequence[str] = ()) -> str:
    """`report.md` of an offline run: alignment metrics on a cache split."""
    ckpt = report.get("checkpoint", {})
    out = [
        "# Offline evaluation",
        "",
        f"Checkpoint `{ckpt.get('path')}` (adapter {ckpt.get('adapter')}) on cache "
        f"`{report['cache_dir']}`, split {report['split']}: {report['n_samples']} samples.",
    ]
    out += [f"> {w}" for w in report.get("warnings", [])]
    trained = report.get("trained_metrics") or {}
    rows = [[k, v, trained.get(f"val/{k}")] for k, v in report["metrics"].items()]
    out += ["", "## Alignment metrics", "", table(["metric", "value", "at export (val)"], rows, 4)]
    curves = report.get("curves", {})
    if curves:
        hist = curves["accepted_length_hist"]
        acc = curves["position_acceptance"]
        out += ["", "## First-round accepted length (samples)", ""]
        out += [_curve_table({"offline": {"h": hist}}, "h", "accepted", counts=True)]
        out += ["", "## First-round acceptance by position", ""]
        out += [_curve_table({"offline": {"p": acc}}, "p", "position")]
    if plots:
        out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(out) + "\n"
