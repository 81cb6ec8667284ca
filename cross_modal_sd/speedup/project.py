"""Projection: each exported adapter's predicted speedup under a chosen cost profile.

The prior system projected 5.77x from cosine similarity and measured 1.03x. This projects from
token-level acceptance (the accepted-length curve stored in every ``best_model.pt``) through the
speedup model, per decoding configuration of ``evaluate.py``, to answers of another length and
another cost profile (the real pair's), and draws the acceptance -> speedup curve each
configuration follows, with the adapters on it::

    python -m cross_modal_sd.speedup.project                      # checkpoints/*/best_model.pt, prior_rtx4090
    python -m cross_modal_sd.speedup.project --profile mini_cpu.json --tokens 20 --out outputs/projection
    python -m cross_modal_sd.speedup.project --levers             # what moves real-scale speedup
    python -m cross_modal_sd.speedup.project --head-cost 0.05     # head-only and hybrid, a head at 5% of a step

At another answer length the per-sample sequences of the export do not apply, so acceptance is
synthesised from its accepted-length curve (`Acceptance.from_runs`), with an *oracle* stop for
the confidence policy: every round keeps exactly the drafts the target will accept.

Feature heads (`adapters.FeatureHead`) are projected as the VLM-only baseline (``head``) and the
hybrid (cross-modal round 1, head afterwards) with head acceptance from our head exports' chain
runs and from published figures (`PUBLISHED_HEADS`), at a head cost given as a fraction of a target
step (the shipped real-pair profile has none measured).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cross_modal_sd.decoding import DraftPolicy, SDConfig
from cross_modal_sd.exports import load_export
from cross_modal_sd.speedup.acceptance import Acceptance
from cross_modal_sd.speedup.costs import CostProfile, load_profile
from cross_modal_sd.speedup.model import predict
from cross_modal_sd.utils import table

DEFAULT_EXPORTS = "checkpoints/*/best_model.pt"


@dataclass(frozen=True)
class Configuration:
    """A decoding configuration of ``evaluate.py`` as projected here."""

    name: str
    label: str
    policy: DraftPolicy
    decode: str
    round1: str = "cross_modal"


# Published acceptance of EAGLE-style heads on 7B models at T = 0, as τ: tokens committed per
# verification round (accepted drafts + the target's own token). Both used tree drafting of depth
# 6 (EAGLE-2's default); read as chains of 6 drafts (`PUBLISHED_DEPTH`) they are optimistic for a
# chain-drafting head.
PUBLISHED_HEADS = {
    "EAGLE-2 on LLaVA-1.6-7B, untuned (τ 2.3; as reported in ViSpec, arXiv:2509.15235)": 2.3,
    "EAGLE-2 on Vicuna-7B, text (τ 4.34; Spec-Bench, A100)": 4.34,
}
PUBLISHED_DEPTH = 6
HEAD_K = 8  # the longest chain a head's runs are scored to (as at export)


def head_configurations(head_gamma: int = 8, max_drafts: int = 32) -> list[Configuration]:
    """``head`` (round 1: none) and ``hybrid`` (round 1: cross-modal drafts in the prefill window),
    ``head_gamma`` head drafts a later round."""
    policy = DraftPolicy(gamma="prefill", decode_gamma=head_gamma, max_drafts=max_drafts)
    return [
        Configuration("head", "head only", policy, "head", "none"),
        Configuration("hybrid", "hybrid", policy, "head", "cross_modal"),
    ]


def head_hist_for_tau(tau: float, gamma: int, k: int = HEAD_K) -> list[float]:
    """The run histogram (0..k) of a head whose runs are geometric and whose rounds of
    ``gamma`` drafts commit ``tau`` tokens on average: ``E[min(R, gamma)] = tau - 1``.

    Raises:
        ValueError: ``tau`` outside ``(1, gamma + 1)``.
    """
    if not 1 < tau < gamma + 1:
        raise ValueError(f"tau must lie in (1, {gamma + 1}) for {gamma} drafts a round, got {tau}")

    def accepted(q: float) -> float:
        return sum(q**r for r in range(1, gamma + 1))  # E[min(R, gamma)] = sum P(R >= r)

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if accepted(mid) < tau - 1 else (lo, mid)
    q = (lo + hi) / 2
    return [q**r * (1 - q) for r in range(k)] + [q**k]


def head_hist_from_export(path: str | Path, k: int = HEAD_K) -> list[float]:
    """The histogram (0..k) of a head export's validation chain runs, over every start.

    Raises:
        ValueError: not a head export, or one without chain runs.
    """
    export = load_export(path)
    runs = (export.val_acceptance or {}).get("runs")
    if export.kind != "head" or runs is None:
        raise ValueError(f"{path}: not a feature-head export with chain runs")
    counts = [0] * (k + 1)
    for r in runs.flatten().tolist():
        if r >= 0:
            counts[min(int(r), k)] += 1
    return counts


def head_projection(
    profile: CostProfile,
    round1: Acceptance,
    heads: Mapping[str, Sequence[float]],
    tokens: int = 30,
    gammas: Sequence[int] = tuple(range(1, HEAD_K + 1)),
) -> list[dict[str, Any]]:
    """Predicted speedup of the head-only baseline and the hybrid per head run histogram (the
    hybrid's round 1 from ``round1``), each at its best head drafts per round among ``gammas``
    (how many pay depends on the verify cost's slope: ``<name>_gamma``).

    Raises:
        ProfileError: ``profile`` has no ``head_token_ms``.
    """
    rows = []
    for name, hist in heads.items():
        acc = round1.with_head_runs(hist, HEAD_K)
        row: dict[str, Any] = {
            "source": name,
            "mean_run": sum(r * h for r, h in enumerate(hist)) / sum(hist),
        }
        for gamma in gammas:
            for c in head_configurations(gamma):
                config = SDConfig(c.policy, c.decode, tokens + 2, None, c.round1)
                speedup = predict(profile, acc, config)["speedup"]["ratio_of_means"]
                if speedup > row.get(c.name, 0.0):
                    row[c.name], row[f"{c.name}_gamma"] = speedup, gamma
        rows.append(row)
    return rows


def render_head_projection(
    rows: Sequence[Mapping[str, Any]], profile: CostProfile, round1: str
) -> str:
    """Markdown of `head_projection`."""
    body = [
        [
            r["source"],
            r["mean_run"],
            f"{r['head']:.2f} (γ {r['head_gamma']})",
            f"{r['hybrid']:.2f} (γ {r['hybrid_gamma']})",
        ]
        for r in rows
    ]
    ratio = profile.head_token_ms / profile.target_token_ms
    return "\n".join(
        [
            f"Head only and hybrid, a head draft at {ratio:.2f} of a target step, each at its "
            f"best head drafts per round γ; the hybrid's round 1 from {round1}.",
            "",
            table(["head acceptance", "mean chain run (≤ 8)", "head only", "hybrid"], body),
        ]
    )


def configurations(decode_gamma: int = 5, max_drafts: int = 32) -> list[Configuration]:
    """The four SD strategies of ``evaluate.py`` (``gamma=prefill`` for the fixed policy)."""
    fixed = DraftPolicy(
        kind="fixed", gamma="prefill", decode_gamma=decode_gamma, max_drafts=max_drafts
    )
    confidence = DraftPolicy(kind="confidence", max_drafts=max_drafts)
    return [
        Configuration("sd_fixed_autoregressive", "fixed, autoregressive", fixed, "autoregressive"),
        Configuration("sd_fixed_draft_model", "fixed, draft_model", fixed, "draft_model"),
        Configuration(
            "sd_confidence_autoregressive",
            "oracle stop, autoregressive",
            confidence,
            "autoregressive",
        ),
        Configuration(
            "sd_confidence_draft_model", "oracle stop, draft_model", confidence, "draft_model"
        ),
    ]


SYNTHETIC_REPEATS = 200  # sequences per projection: the mean speedup moves < 1% between seeds


def geometric(q: float, tokens: int = 30) -> Acceptance:
    """Every draft accepted with probability ``q`` independently of position (a reference
    family for curves: its mean round-1 run is ``q / (1 - q)`` below the cap)."""
    hist = [q**r * (1 - q) for r in range(tokens)] + [q**tokens]
    return Acceptance.from_runs(
        hist, [tokens], repeats=SYNTHETIC_REPEATS, source=f"geometric q={q:g}"
    )


def project(
    profile: CostProfile,
    acceptance: Acceptance,
    tokens: int = 30,
    configs: Sequence[Configuration] | None = None,
) -> dict[str, float]:
    """Predicted speedup (ratio of means) of each configuration for ``tokens``-token answers."""
    out = {}
    for c in configs or configurations():
        config = SDConfig(c.policy, c.decode, tokens + 2, None, c.round1)
        out[c.name] = predict(profile, acceptance, config)["speedup"]["ratio_of_means"]
    return out


def read_export(path: str | Path, tokens: int = 30) -> dict[str, Any]:
    """Name, run, val metrics and acceptance (synthesised for ``tokens``-token answers) of one
    export."""
    export = load_export(path)
    hist = export.curves.get("val/accepted_length_hist")
    if hist is None:
        raise ValueError(f"{path}: no accepted-length curve; re-export it with `python train.py`")
    return {
        "path": str(path),
        "adapter": export.name,
        "run_name": export.run_name,
        "epoch": None,
        "token_match": export.metrics.get("val/token_match"),
        "token_accept_len": export.metrics.get("val/token_accept_len"),
        "cos_sim": export.metrics.get("val/cos_sim"),
        "acceptance": Acceptance.from_runs(
            hist, [tokens], repeats=SYNTHETIC_REPEATS, source=f"curves of {path}"
        ),
    }


def projection_table(
    exports: Sequence[Mapping[str, Any]],
    profile: CostProfile,
    tokens: int = 30,
    references: Mapping[str, Acceptance] | None = None,
) -> list[dict[str, Any]]:
    """One row per export (and per reference acceptance): val metrics and projected speedups."""
    rows = []
    for e in exports:
        rows.append(
            {
                "adapter": e["adapter"],
                "run": e["run_name"],
                "epoch": e["epoch"],
                "token_match": e["token_match"],
                "token_accept_len": e["token_accept_len"],
                **project(profile, e["acceptance"], tokens),
            }
        )
    for name, acc in (references or {}).items():
        rows.append(
            {
                "adapter": name,
                "run": "reference",
                "epoch": None,
                "token_match": None,
                "token_accept_len": acc.first_run_mean,
                **project(profile, acc, tokens),
            }
        )
    return rows


def prior_acceptance(tokens: int = 30) -> Acceptance:
    """The prior system's 4.4 accepted drafts per run."""
    return Acceptance.from_runs(
        [0, 0, 0, 0, 0.6, 0.4, 0], [tokens], repeats=SYNTHETIC_REPEATS, source="prior system"
    )


def default_references(tokens: int = 30) -> dict[str, Acceptance]:
    """Context rows: the prior system's 4.4 accepted drafts, and a drafter twice as good."""
    return {
        "prior system (4.4 accepted)": prior_acceptance(tokens),
        "geometric q=0.9": geometric(0.9, tokens),
    }


def render_projection(rows: Sequence[Mapping[str, Any]], profile: CostProfile, tokens: int) -> str:
    """Markdown of a projection table."""
    configs = configurations()
    header = ["adapter", "run", "epoch", "val token_match", "val accepted run"]
    header += [c.label for c in configs]
    body = [
        [
            r["adapter"],
            r["run"],
            r["epoch"],
            r["token_match"],
            r["token_accept_len"],
            *[r[c.name] for c in configs],
        ]
        for r in rows
    ]
    return "\n".join(
        [
            f"Projected speedup for {tokens}-token answers under cost profile "
            f"`{profile.name}` ({profile.source}).",
            "",
            table(header, body, digits=2),
            "",
            "Fixed policy: draft while the target prefills, then 5 per round in the draft_model "
            "phase. Oracle stop: every round keeps exactly the drafts that will be accepted "
            "(the bound for confidence-stopped drafting, which offline evaluation cannot "
            "describe).",
        ]
    )


def curves(
    profile: CostProfile, tokens: int = 30, rates: Sequence[float] | None = None
) -> dict[str, list[tuple[float, float]]]:
    """Speedup against the mean round-1 accepted run, per configuration, along `geometric`."""
    rates = rates or [i / 40 for i in range(40)] + [0.985, 0.995]
    out: dict[str, list[tuple[float, float]]] = {c.name: [] for c in configurations()}
    for q in rates:
        acc = geometric(q, tokens)
        for name, speedup in project(profile, acc, tokens).items():
            out[name].append((acc.first_run_mean, speedup))
    return out


def plot_projection(
    rows: Sequence[Mapping[str, Any]],
    profile: CostProfile,
    tokens: int,
    path: Path,
    measured: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Acceptance -> speedup curves per configuration, adapters (and measured runs) on them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = configurations()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {}
    for c, (name, points) in zip(configs, curves(profile, tokens).items(), strict=True):
        xs, ys = zip(*[(x, y) for x, y in points if x <= tokens], strict=True)
        (line,) = ax.plot(xs, ys, label=c.label)
        colours[name] = line.get_color()
    for r in rows:
        x = r["token_accept_len"]
        if x is None or (isinstance(x, float) and math.isnan(x)):
            continue
        for c in configs:
            ax.plot(x, r[c.name], "o", color=colours[c.name], markersize=4)
        ax.annotate(str(r["adapter"]), (x, r[configs[0].name]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")  # fmt: skip
    for m in measured:
        ax.plot(m["x"], m["speedup"], "x", color=colours.get(m["strategy"], "black"), markersize=7)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("mean accepted drafts in round 1 (offline val/token_accept_len)")
    ax.set_ylabel(f"predicted speedup, {tokens}-token answers")
    ax.set_title(f"acceptance -> speedup under {profile.name}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def levers(
    profile: CostProfile, acceptance: Acceptance, tokens: int = 30
) -> list[tuple[str, dict[str, float]]]:
    """Projected speedups when one lever moves at a time from `profile` and `acceptance`.

    Levers: acceptance (twice the mean run, near-perfect), draft-length control (fixed counts
    vs. prefill-filling vs. the oracle stop, via the configurations), decode-phase drafting
    (the draft_model columns; a 4x cheaper drafter), and concurrency (both models slowed 2x
    side by side, or no contention at all).
    """
    double = geometric(
        min(0.99, 2 * acceptance.first_run_mean / (1 + 2 * acceptance.first_run_mean)), tokens
    )
    variants: list[tuple[str, CostProfile, Acceptance]] = [
        ("as measured", profile, acceptance),
        ("acceptance: twice the accepted run", profile, double),
        ("acceptance: near-perfect (q = 0.99)", profile, geometric(0.99, tokens)),
        (
            "drafter 4x cheaper per token",
            profile.with_(
                draft_token_ms=profile.draft_token_ms / 4, adapter_ms=profile.adapter_ms / 4
            ),
            acceptance,
        ),
        (
            "concurrency: both models 2x slower side by side (GIL-bound threads)",
            profile.with_(target_contention=2.0, draft_contention=2.0),
            acceptance,
        ),
        (
            "concurrency: perfect overlap (no contention)",
            profile.with_(target_contention=1.0, draft_contention=1.0),
            acceptance,
        ),
    ]
    return [(name, project(p, a, tokens)) for name, p, a in variants]


def render_levers(rows: Sequence[tuple[str, Mapping[str, float]]]) -> str:
    """Markdown of `levers`."""
    configs = configurations()
    header = ["lever", *[c.label for c in configs]]
    return table(header, [[name, *[s[c.name] for c in configs]] for name, s in rows], digits=2)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Command line: the projection table (markdown + JSON) and plot of the given exports."""
    parser = argparse.ArgumentParser(
        prog="python -m cross_modal_sd.speedup.project",
        description="Predicted speedup of exported adapters under a cost profile.",
    )
    parser.add_argument(
        "exports", nargs="*", help=f"best_model.pt files (default: {DEFAULT_EXPORTS})"
    )
    parser.add_argument(
        "--profile", default="prior_rtx4090", help="shipped profile name or JSON file"
    )
    parser.add_argument("--tokens", type=int, default=30, help="answer length in tokens")
    parser.add_argument(
        "--out", default="outputs/projection", help="folder for projection.{md,json,png}"
    )
    parser.add_argument(
        "--levers", action="store_true", help="also tabulate what each lever changes"
    )
    parser.add_argument(
        "--head-cost",
        type=float,
        default=None,
        help="a head draft's cost as a fraction of a target step (default: the profile's "
        "head_token_ms, else 0.05: one of 32 decoder layers plus the lm_head, memory-bound)",
    )
    args = parser.parse_args(argv)
    profile = load_profile(args.profile)
    if args.head_cost is not None or profile.head_token_ms is None:
        cost = 0.05 if args.head_cost is None else args.head_cost
        profile = profile.with_(head_token_ms=cost * profile.target_token_ms)
    paths = args.exports or sorted(glob.glob(DEFAULT_EXPORTS))
    head_paths = [p for p in paths if load_export(p).kind == "head"]
    exports = [read_export(p, args.tokens) for p in paths if p not in head_paths]
    rows = projection_table(exports, profile, args.tokens, default_references(args.tokens))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    markdown = render_projection(rows, profile, args.tokens)
    if args.levers:
        base = exports[0]["acceptance"] if exports else prior_acceptance(args.tokens)
        what = exports[0]["path"] if exports else "the prior system's 4.4 accepted drafts"
        markdown += f"\n\n## Levers (from {what})\n\n" + render_levers(
            levers(profile, base, args.tokens)
        )
    heads = {f"ours: {p}": head_hist_from_export(p) for p in head_paths}
    heads |= {
        name: head_hist_for_tau(tau, PUBLISHED_DEPTH) for name, tau in PUBLISHED_HEADS.items()
    }
    round1 = exports[0]["acceptance"] if exports else prior_acceptance(args.tokens)
    round1_name = exports[0]["path"] if exports else "the prior system's 4.4 accepted drafts"
    head_rows = head_projection(profile, round1, heads, args.tokens)
    markdown += "\n\n## Feature heads and the hybrid\n\n" + render_head_projection(
        head_rows, profile, round1_name
    )
    (out / "projection.md").write_text(markdown + "\n")
    serialisable = [{k: v for k, v in r.items()} for r in rows]
    (out / "projection.json").write_text(
        json.dumps(
            {
                "profile": profile.to_dict(),
                "tokens": args.tokens,
                "rows": serialisable,
                "head_rows": head_rows,
            },
            indent=2,
        )
        + "\n"
    )
    plot_projection(rows, profile, args.tokens, out / "projection.png")
    print(markdown)
    print(
        f"\nwritten: {out / 'projection.md'}, {out / 'projection.json'}, {out / 'projection.png'}"
    )
    return rows


if __name__ == "__main__":
    main()
