"""The speedup model: end-to-end time of speculative decoding predicted from costs and acceptance.

The prior system's offline projection said 5.77x and its measured result was 1.03x: it projected
from cosine similarity and ignored where the time goes. This model follows the SD loop
(`cross_modal_sd.decoding.speculative_generate`) step by step, so a prediction can be checked
against a measured run term by term.

**Costs** (`CostProfile`, ms): target prefill ``P_t``; one target decode step ``T_t``; a verify
forward over ``k`` drafts ``V(k) = a + b k`` (fitted to profiled points); draft prefill ``P_d``;
one draft forward ``T_d``; adapter + target ``lm_head`` + argmax per proposed draft ``A``; and
the concurrency of round 1: target and draft run at the same time, and while both run they slow
each other, so round 1 lasts ``max(J_t, J_d) + contention * min(J_t, J_d) + round1_overhead``
with ``J_t = P_t`` and ``J_d`` the draft's prefill plus drafting (0 = perfect overlap,
1 = serialised). The baseline (the target's own ``generate``) costs
``baseline_prefill + (N - 1) baseline_token`` for an N-token answer.

**Round 1.** The draft proposes ``G`` tokens: a fixed number, as many as fit in the target's
prefill (``gamma="prefill"``: the smallest ``G >= 1`` with ``P_d + G A + (G - 1) T_d >= P_t``),
or a confidence-stopped number. Drafting ``G`` tokens costs ``G A + (G - 1) T_d`` (the last
draft is not fed back); a round ended by a confidence drop paid one more proposal and feed. The
first draft is checked against the prefill's own token; if it is accepted and ``G >= 2``, one
verify ``V(G - 1)`` checks the rest. ``a`` accepted drafts commit ``a + 1`` tokens (the accepted
ones and the target's correction or bonus); a rejected first draft commits the prefill's token.

**Decode phase.** ``autoregressive``: ``T_t`` per remaining token. ``draft_model``: rounds of
(resync the draft: one forward ``T_d``; draft ``G``; verify ``V(G)``), each committing
accepted + 1. With 1 token left there is nothing to draft: one step ``T_t``.

**Acceptance** (`Acceptance`). Round 1 draws its accepted length from the accepted-length
histogram of offline evaluation (teacher-forced pairs: its leading run is exactly what round 1
accepts). Later rounds use the conditional curve ``q_i`` = P(draft ``i`` of a round accepted |
drafts ``0..i-1`` accepted). *Assumption:* a later round's i-th draft behaves like round 1's
i-th position (offline, ``q_i = pa[i] / pa[i-1]`` from the first-round acceptance-by-position
curve ``pa``). `validate` checks this against measured later rounds. Answers end at EOS: a round
whose drafts reach the answer's last token stops there (the drafter proposed EOS).

**Confidence-stopped drafting** is modelled by a stop-probability (hazard) curve: ``h_i`` =
P(the round keeps exactly ``i`` drafts | it kept ``i``), estimated from measured rounds with the
round cap as censoring; acceptance within the round is taken independent of where it stopped
(the drafts that exist are the confident ones, and ``q`` is measured on those). Without a
measured curve the model uses an *oracle* stop: the round keeps exactly the drafts that will be
accepted (at least one) — the upper bound of any length controller.

Expectations are exact under these assumptions (no sampling): a dynamic program over the
committed answer length, per answer length ``N``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from cross_modal_sd.decoding.drafters import DraftPolicy
from cross_modal_sd.decoding.speculative import SDConfig

PROFILE_KIND = "cost_profile"
PROFILE_FORMAT = 1
PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
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


class ProfileError(ValueError):
    """A cost profile file or dict that cannot be read; the message names the file and field."""


# ------------------------------------------------------------------------------------- costs


def fit_line(points: Sequence[Sequence[float]]) -> tuple[float, float]:
    """Least-squares ``(intercept, slope)`` of ``y = a + b x`` through ``(x, y)`` points.

    Raises:
        ValueError: fewer than two distinct x values.
    """
    xs = [float(p[0]) for p in points]
    ys = [float(p[1]) for p in points]
    if len(set(xs)) < 2:
        raise ValueError(f"fit_line needs points at two or more distinct x, got x = {xs}")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return my - slope * mx, slope


@dataclass(frozen=True)
class CostProfile:
    """What each step of speculative decoding costs on one device (ms; see the module docstring).

    Attributes:
        target_prefill_ms: target prefill ``P_t`` (frames + prompt, first token).
        target_token_ms: one target decode step ``T_t`` (one token in, one greedy token out).
        verify_points: measured ``(k drafts, ms)`` of verify forwards; ``V(k)`` is the line
            fitted to them (with a single point, the line through ``(0, T_t)`` and it).
        draft_prefill_ms: draft prefill ``P_d`` (event images + prompt).
        draft_token_ms: one draft forward ``T_d`` (feeding one token back, or a resync).
        adapter_ms: per proposed draft ``A``: adapter, target ``lm_head``, softmax, argmax.
        contention: slowdown while target and draft run concurrently in round 1, as the share
            of the shorter job added to the longer (0 = perfect overlap, 1 = serialised; above
            1, running both at once costs more than running them one after the other, as two
            GIL-bound threads on a busy CPU do).
        round1_overhead_ms: fixed cost of round 1's concurrency (threads, synchronisation).
        baseline_prefill_ms: the baseline ``generate``'s cost before its per-token steps
            (None: ``P_t``).
        baseline_token_ms: the baseline's cost per further token (None: ``T_t``).
        prefill_drafts_measured: mean drafts a ``gamma="prefill"`` round 1 proposed when run
            (None: from the solo costs; on a CPU where two GIL-bound threads slow each other
            unevenly, far fewer drafts fit in the prefill than the solo costs say).
        name: short label (the file stem for shipped profiles).
        source: where the numbers come from.
        meta: device, thread budget, model sizes, probe settings (free-form, JSON-ready).
    """

    target_prefill_ms: float
    target_token_ms: float
    verify_points: tuple[tuple[int, float], ...]
    draft_prefill_ms: float
    draft_token_ms: float
    adapter_ms: float = 0.0
    contention: float = 0.0
    round1_overhead_ms: float = 0.0
    baseline_prefill_ms: float | None = None
    baseline_token_ms: float | None = None
    prefill_drafts_measured: float | None = None
    name: str = ""
    source: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for key in (
            "target_prefill_ms",
            "target_token_ms",
            "draft_prefill_ms",
            "draft_token_ms",
            "adapter_ms",
            "round1_overhead_ms",
        ):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ProfileError(f"cost profile {self.name!r}: {key} must be >= 0, got {value!r}")
        if not self.contention >= 0.0:
            raise ProfileError(
                f"cost profile {self.name!r}: contention must be >= 0, got {self.contention!r}"
            )
        if not self.verify_points:
            raise ProfileError(f"cost profile {self.name!r}: verify_points is empty")
        points = tuple((int(k), float(ms)) for k, ms in self.verify_points)
        object.__setattr__(self, "verify_points", points)

    @cached_property
    def verify_line(self) -> tuple[float, float]:
        """``(a, b)`` of ``V(k) = a + b k`` (a flat line if noise makes the fitted slope < 0)."""
        points = list(self.verify_points)
        if len({k for k, _ in points}) < 2:
            points.append((0, self.target_token_ms))
        a, b = fit_line(points)
        if b < 0:  # timing noise over a flat range: more drafts never cost less
            return sum(ms for _, ms in points) / len(points), 0.0
        return a, b

    def verify_ms(self, k: int) -> float:
        """``V(k)``: one target forward verifying ``k`` drafts (``k + 1`` tokens in)."""
        a, b = self.verify_line
        return max(0.0, a + b * k)

    def drafting_ms(self, drafts: int, stopped: bool = False) -> float:
        """Drafting ``drafts`` tokens in one round (a confidence drop adds one proposal and feed)."""
        if drafts == 0:
            return 0.0
        extra = int(stopped)
        return (drafts + extra) * self.adapter_ms + (drafts - 1 + extra) * self.draft_token_ms

    def round1_ms(self, draft_job_ms: float) -> float:
        """Wall time of the concurrent target prefill and draft job (prefill + drafting)."""
        long, short = (
            max(self.target_prefill_ms, draft_job_ms),
            min(self.target_prefill_ms, draft_job_ms),
        )
        return long + self.contention * short + self.round1_overhead_ms

    def baseline_ms(self, n_tokens: int) -> float:
        """The target's own greedy ``generate`` of an ``n_tokens`` answer."""
        prefill = self.baseline_prefill_ms
        token = self.baseline_token_ms
        prefill = self.target_prefill_ms if prefill is None else prefill
        token = self.target_token_ms if token is None else token
        return prefill + (n_tokens - 1) * token

    def prefill_drafts(self) -> int:
        """Drafts of a ``gamma="prefill"`` round 1 from the solo costs: the first draft
        proposed after the target's prefill ends, i.e. the smallest ``G >= 1`` with
        ``P_d + G A + (G - 1) T_d >= P_t``."""
        step = self.adapter_ms + self.draft_token_ms
        need = self.target_prefill_ms - self.draft_prefill_ms + self.draft_token_ms
        if step <= 0:
            return 10**6  # drafting is free: the round cap decides
        return max(1, math.ceil(need / step - 1e-9))

    def prefill_draft_counts(self, cap: int) -> list[tuple[float, int]]:
        """``(prob, drafts)`` of a ``gamma="prefill"`` round 1 capped at ``cap``: the measured
        mean as a mix of its floor and ceiling, else `prefill_drafts`."""
        mean = self.prefill_drafts_measured
        if mean is None:
            return [(1.0, min(self.prefill_drafts(), cap))]
        mean = min(max(mean, 1.0), float(cap))
        low = math.floor(mean)
        if low == mean:
            return [(1.0, low)]
        return [(low + 1 - mean, low), (mean - low, low + 1)]

    def with_(self, **changes) -> CostProfile:
        """A copy with some costs changed (e.g. ``profile.with_(contention=0.0)``)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the profile file format)."""
        d = asdict(self)
        d["verify_points"] = [list(p) for p in self.verify_points]
        d["meta"] = dict(self.meta)
        a, b = self.verify_line
        return {"kind": PROFILE_KIND, "format": PROFILE_FORMAT, **d, "verify_fit": [a, b]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "<dict>") -> CostProfile:
        """A profile from its dict form; unknown keys are an error (they are usually typos).

        Raises:
            ProfileError: missing or unknown fields, or bad values; the message names `where`.
        """
        d = {k: v for k, v in d.items() if k not in ("kind", "format", "verify_fit")}
        known = {f.name for f in cls.__dataclass_fields__.values()}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ProfileError(
                f"{where}: unknown cost profile fields {unknown}; known {sorted(known)}"
            )
        required = {
            "target_prefill_ms",
            "target_token_ms",
            "verify_points",
            "draft_prefill_ms",
            "draft_token_ms",
        }
        missing = sorted(required - set(d))
        if missing:
            raise ProfileError(f"{where}: cost profile lacks {missing}")
        try:
            return cls(**d)
        except ProfileError as err:
            raise ProfileError(f"{where}: {err}") from err


def mean_profile(profiles: Sequence[CostProfile]) -> CostProfile:
    """Field-wise mean of profiles of the same models (e.g. measured before, between and after
    a run's chunks of samples); verify points are paired by position, text from the first.

    Raises:
        ValueError: no profiles, or profiles measured at different draft counts.
    """
    if not profiles:
        raise ValueError("mean_profile: no profiles")
    values: dict[str, Any] = {}
    for f in fields(CostProfile):
        column = [getattr(p, f.name) for p in profiles]
        if f.name == "verify_points":
            if len({tuple(k for k, _ in pts) for pts in column}) > 1:
                raise ValueError("mean_profile: profiles measured verify at different k")
            values[f.name] = tuple(
                (pts[0][0], sum(ms for _, ms in pts) / len(pts))
                for pts in zip(*column, strict=True)
            )
        elif f.type in ("float", "float | None"):
            numbers = [v for v in column if v is not None]  # a cost some runs did not measure
            values[f.name] = sum(numbers) / len(numbers) if numbers else None
        else:
            values[f.name] = column[0]
    values["meta"] = {**profiles[0].meta, "profiles_averaged": len(profiles)}
    return CostProfile(**values)


def shipped_profiles() -> list[str]:
    """Names of the profiles shipped in ``cross_modal_sd/analysis/profiles/``."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(source: str | os.PathLike | Mapping[str, Any]) -> CostProfile:
    """A cost profile from a shipped name (``"prior_rtx4090"``), a JSON file or a dict.

    A file may be a profile itself, any JSON holding one under ``"cost_profile"`` (an e2e
    ``report.json``), or the output of ``scripts/gpu_check.py`` (`profile_from_gpu_check`), so
    every measured run can be re-read as a profile.

    Raises:
        FileNotFoundError: neither a shipped name nor an existing file.
        ProfileError: the file holds no profile, or a bad one.
    """
    if isinstance(source, Mapping):
        data, where = source, "<dict>"
    else:
        path = Path(source)
        if not path.suffix and not path.exists() and (PROFILE_DIR / f"{path}.json").is_file():
            path = PROFILE_DIR / f"{path}.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"cost profile {str(source)!r}: no such file and not a shipped profile "
                f"(shipped: {', '.join(shipped_profiles())})"
            )
        where = str(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ProfileError(f"{where}: not JSON ({err})") from err
    if isinstance(data, Mapping) and data.get("kind") != PROFILE_KIND:
        if isinstance(data.get("cost_profile"), Mapping):
            data = data["cost_profile"]
        elif isinstance(data.get("costs"), Mapping) and "verify_ms" in data["costs"]:
            return profile_from_gpu_check(data, where)
        else:
            raise ProfileError(
                f"{where}: holds no cost profile (no kind={PROFILE_KIND!r}, no 'cost_profile' "
                f"object, no gpu_check 'costs'); write one with "
                f"`python -m cross_modal_sd.analysis.cost_profile`"
            )
    return CostProfile.from_dict(data, where)


def profile_from_gpu_check(report: Mapping[str, Any], where: str = "<gpu_check>") -> CostProfile:
    """A profile from the JSON of ``scripts/gpu_check.py`` (the real pair on a GPU).

    The check times prefills, per-token steps and verify forwards directly; what it does not
    time is read off its one SD run (fixed drafts, draft_model phase): the per-draft adapter
    cost from the run's drafting time once its feeds are paid at ``T_d``, and round 1's
    contention from the run's round-1 time against the solo costs. The baseline's per-token
    cost is taken as ``T_t`` and its prefill as the rest of its measured total.

    Raises:
        ProfileError: a cost the profile needs is missing.
    """
    costs = report["costs"]
    try:
        points = tuple((int(k), float(ms)) for k, ms in costs["verify_ms"].items())
        base = CostProfile(
            target_prefill_ms=float(costs["target_prefill_ms"]),
            target_token_ms=float(costs["target_token_ms"]),
            verify_points=points,
            draft_prefill_ms=float(costs["draft_prefill_ms"]),
            draft_token_ms=float(costs["draft_token_ms"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ProfileError(f"{where}: gpu_check costs incomplete or malformed ({err!r})") from err
    changes: dict[str, Any] = {}
    sd = report.get("sd") or {}
    if sd.get("drafted"):
        drafted, accepted, rounds = sd["drafted"], sd["accepted"], len(sd["drafted"])
        proposals = sum(drafted)
        feeds = sum(max(0, d - 1) for d in drafted) + (rounds - 1)  # + one resync per round
        if proposals:
            drafting = sd["draft_ms"] - feeds * base.draft_token_ms
            changes["adapter_ms"] = max(0.0, drafting / proposals)
        adapter = changes.get("adapter_ms", 0.0)
        g0 = drafted[0]
        round1 = sd["total_ms"] - sd["decode_ms"]
        if accepted[0] >= 1 and g0 >= 2:
            round1 -= base.verify_ms(g0 - 1)
        job = base.draft_prefill_ms + base.with_(adapter_ms=adapter).drafting_ms(g0)
        short = min(base.target_prefill_ms, job)
        if short > 0:
            longer = max(base.target_prefill_ms, job)
            changes["contention"] = max(0.0, (round1 - longer) / short)
    baseline = report.get("baseline") or {}
    if baseline.get("total_ms") and baseline.get("n_new"):
        changes["baseline_token_ms"] = base.target_token_ms
        changes["baseline_prefill_ms"] = max(
            0.0, baseline["total_ms"] - (baseline["n_new"] - 1) * base.target_token_ms
        )
    env, models = report.get("environment") or {}, report.get("models") or {}
    return base.with_(
        **changes,
        name="gpu_check",
        source=(
            f"scripts/gpu_check.py on {env.get('device', '?')}: {models.get('target')} / "
            f"{models.get('draft')}, {report.get('dtype')}, quantization "
            f"{report.get('quantization')}"
        ),
        meta={"from": where, "environment": dict(env), "models": dict(models)},
    )


def save_profile(profile: CostProfile, path: str | os.PathLike) -> Path:
    """Write `profile` as JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.to_dict(), indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------------- acceptance


def _probabilities(values: Sequence[float], what: str) -> tuple[float, ...]:
    total = float(sum(values))
    if not values or total <= 0 or any(v < 0 for v in values):
        raise ValueError(
            f"{what}: need non-negative counts with a positive sum, got {list(values)}"
        )
    return tuple(float(v) / total for v in values)


def _clean_curve(values: Iterable[float | None], what: str) -> tuple[float, ...]:
    """Probabilities clipped to [0, 1]; a missing point (None/NaN) repeats the previous one."""
    out: list[float] = []
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            if not out:
                raise ValueError(f"{what}: the first point is missing")
            out.append(out[-1])
        else:
            out.append(min(1.0, max(0.0, float(v))))
    if not out:
        raise ValueError(f"{what}: empty curve")
    return tuple(out)


def conditional_from_position_acceptance(curve: Sequence[float | None]) -> tuple[float, ...]:
    """``q_i`` from the first-round acceptance-by-position curve: ``pa[i] / pa[i - 1]``.

    ``pa[i]`` is the share of samples whose first ``i + 1`` drafts are all accepted, so the ratio
    is the chance of accepting draft ``i`` once all before it were. Where ``pa[i - 1]`` is 0 the
    previous ``q`` is kept (nothing reaches there; the value never matters much).
    """
    pa = _clean_curve(curve, "position_acceptance")
    q = [pa[0]]
    for i in range(1, len(pa)):
        q.append(pa[i] / pa[i - 1] if pa[i - 1] > 0 else q[-1])
    return _clean_curve(q, "conditional acceptance")


def _censored_conditional(runs: Iterable[tuple[int, int]]) -> list[float | None]:
    """``q_i`` from ``(accepted, drafted)`` rounds: accepted at ``i`` among rounds reaching ``i``."""
    runs = list(runs)
    length = max((d for _, d in runs), default=0)
    out: list[float | None] = []
    for i in range(length):
        reached = [a for a, d in runs if d > i and a >= i]
        out.append(sum(a > i for a in reached) / len(reached) if reached else None)
    return out


def _censored_hazard(lengths: Iterable[tuple[int, bool]]) -> list[float | None]:
    """``h_i`` (i = 1, 2, ...) from ``(kept drafts, ended below the cap)`` rounds."""
    lengths = [(g, stopped) for g, stopped in lengths if g >= 1]
    top = max((g for g, _ in lengths), default=0)
    out: list[float | None] = []
    for i in range(1, top + 1):
        at_risk = [stopped for g, stopped in lengths if g >= i]
        ended = sum(1 for g, stopped in lengths if g == i and stopped)
        out.append(ended / len(at_risk) if at_risk else None)
    return out


@dataclass(frozen=True)
class Acceptance:
    """How many drafts the target accepts (see the module docstring for the assumptions).

    Attributes:
        first_round: P(round 1's leading run of accepted drafts = r), r = 0..L (the last bin:
            r >= L); the drafts actually proposed cap it.
        conditional: ``q_i``, i = 0, 1, ...: P(draft i of a later round accepted | drafts
            0..i-1 accepted); past the end the last value repeats.
        first_round_stop: confidence policy: hazard ``h_i`` (i = 1, 2, ...) of round 1 keeping
            exactly i drafts; None: oracle stop.
        later_stop: the same for later rounds.
        source: where the numbers come from.
    """

    first_round: tuple[float, ...]
    conditional: tuple[float, ...]
    first_round_stop: tuple[float, ...] | None = None
    later_stop: tuple[float, ...] | None = None
    source: str = ""

    def __post_init__(self):
        object.__setattr__(self, "first_round", _probabilities(self.first_round, "first_round"))
        object.__setattr__(self, "conditional", _clean_curve(self.conditional, "conditional"))
        for name in ("first_round_stop", "later_stop"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _clean_curve(value, name))

    @property
    def first_round_mean(self) -> float:
        """Mean accepted drafts of round 1 when drafting is not capped (the last bin as ``L``)."""
        return sum(r * p for r, p in enumerate(self.first_round))

    def q(self, i: int) -> float:
        """``q_i`` (the last value past the end of the curve)."""
        return self.conditional[min(i, len(self.conditional) - 1)]

    @classmethod
    def from_curves(
        cls,
        position_acceptance: Sequence[float | None],
        accepted_length_hist: Sequence[float],
        source: str = "offline curves",
    ) -> Acceptance:
        """From offline evaluation's curves (`metrics.functional.position_acceptance` and
        `accepted_length_histogram`, as in an export's ``curves`` or an offline report)."""
        return cls(
            first_round=tuple(accepted_length_hist),
            conditional=conditional_from_position_acceptance(position_acceptance),
            source=source,
        )

    @classmethod
    def from_mean(cls, accepted: float, q: float | None = None, source: str = "") -> Acceptance:
        """Round 1 accepts ``accepted`` drafts on average (a two-point histogram at its floor
        and ceiling); later rounds accept each draft with probability ``q`` (default: the
        constant rate with the same mean run, ``accepted / (1 + accepted)``)."""
        if accepted < 0:
            raise ValueError(f"accepted must be >= 0, got {accepted}")
        low = math.floor(accepted)
        hist = [0.0] * (low + 2)
        hist[low] = low + 1 - accepted
        hist[low + 1] = accepted - low
        rate = accepted / (1 + accepted) if q is None else q
        return cls(first_round=tuple(hist), conditional=(rate,), source=source)

    @classmethod
    def from_export(cls, path: str | os.PathLike) -> Acceptance:
        """From the val curves of an exported ``best_model.pt`` (the best epoch's).

        Raises:
            FileNotFoundError: no such file.
            ValueError: the export holds no acceptance curves.
        """
        import torch

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"exported adapter not found: {path}")
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return cls.from_export_curves(payload.get("curves") or {}, str(path))

    @classmethod
    def from_export_curves(cls, curves: Mapping[str, Any], where: str) -> Acceptance:
        """From an export's ``curves`` dict (``val/position_acceptance``,
        ``val/accepted_length_hist``; unprefixed names are accepted too)."""
        found = {}
        for key in ("position_acceptance", "accepted_length_hist"):
            value = curves.get(f"val/{key}", curves.get(key))
            if value is None:
                raise ValueError(
                    f"{where}: no {key} curve (export curves hold {sorted(curves)}); "
                    f"re-export with a token-level lm_head metric"
                )
            found[key] = value
        return cls.from_curves(
            found["position_acceptance"], found["accepted_length_hist"], f"offline val of {where}"
        )

    @classmethod
    def from_records(
        cls,
        records: Sequence[Mapping[str, Any]],
        config: SDConfig | None = None,
        later: str = "measured",
    ) -> Acceptance:
        """Measured acceptance of SD runs (`SDResult.to_dict` records of one configuration).

        Round 1: the run distribution of the conditional curve of ``accepted[0]``, with the
        drafts proposed as censoring.
        Later rounds (``later="measured"``): ``q_i`` from the measured later rounds, with each
        round's draft count as censoring; ``later="first_round"``: ``q_i`` from round 1 only,
        which is what the model assumes when all it has is offline acceptance. Confidence
        policy: stop hazards from the drafted counts, a round that reached its cap censored.

        Args:
            records: per-sample SD records.
            config: the runs' configuration (None: `config_from_records`).
            later: ``"measured"`` or ``"first_round"``.
        """
        if not records:
            raise ValueError("Acceptance.from_records: no records")
        if later not in ("measured", "first_round"):
            raise ValueError(f"later must be 'measured' or 'first_round', got {later!r}")
        config = config or config_from_records(records)
        first = [(r["accepted"][0], r["drafted"][0]) for r in records]
        # Round 1's accepted counts are capped by the drafts proposed; where that count varies
        # (confidence stops, the prefill policy) the model caps again with its own draft count,
        # so round 1 is described by its censoring-corrected conditional curve, not the counts.
        first_q = _censored_conditional(first)
        if first_q and first_q[0] is not None:
            hist = _hist_from_conditional(_clean_curve(first_q, "round-1 acceptance"))
        else:  # nothing was drafted in round 1
            hist = (1.0,)
        rounds = [rnd for r in records for rnd in _later_rounds(r, config)]
        if later == "measured" and any(d > 0 for _, d, _ in rounds):
            conditional = _censored_conditional((a, d) for a, d, _ in rounds)
        else:
            conditional = first_q
        first_stop = later_stop = None
        if config.policy.kind == "confidence":
            first_cap = min(config.policy.round_cap(True), config.max_new_tokens - 1)
            first_stop = _fill_hazard(_censored_hazard((d, d < first_cap) for _, d in first))
            later_stop = _fill_hazard(_censored_hazard((d, d < c) for _, d, c in rounds if d > 0))
            later_stop = later_stop or first_stop
        return cls(
            first_round=tuple(hist),
            conditional=tuple(conditional)
            if conditional and conditional[0] is not None
            else (0.0,),
            first_round_stop=first_stop,
            later_stop=later_stop,
            source=f"measured ({len(records)} samples; later rounds: {later})",
        )


def _hist_from_conditional(q: Sequence[float]) -> tuple[float, ...]:
    """P(run = r), r = 0..len(q) (the last bin: every position of the curve accepted)."""
    out, alive = [], 1.0
    for qi in q:
        out.append(alive * (1.0 - qi))
        alive *= qi
    return (*out, alive)


def _fill_hazard(hazard: list[float | None]) -> tuple[float, ...] | None:
    if not hazard:
        return None
    if hazard[0] is None:
        hazard = [1.0, *hazard[1:]]
    return _clean_curve(hazard, "stop hazard")


def _cap_from_records(records: Sequence[Mapping[str, Any]]) -> int:
    capped = [len(r["tokens"]) for r in records if r.get("stop") == "max_new_tokens"]
    # Without a capped answer the cap never bound anything: one past the longest will do.
    return max(capped) if capped else max(len(r["tokens"]) for r in records) + 1


def _later_rounds(record: Mapping[str, Any], config: SDConfig) -> list[tuple[int, int, int]]:
    """``(accepted, drafted, round cap)`` of each round after the first, replaying the answer
    length the loop had at each round (the cap is what bounded that round's drafts)."""
    drafted, accepted = record["drafted"], record["accepted"]
    n = len(record["tokens"])
    per_round = config.policy.round_cap(first_round=False)
    a0, g0 = accepted[0], drafted[0]
    length = min(a0 + 1, n) if a0 >= 1 and g0 >= 2 else 1
    out = []
    for a, d in zip(accepted[1:], drafted[1:], strict=True):
        out.append((a, d, min(per_round, config.max_new_tokens - length - 1)))
        length = min(length + a + 1, n)
    return out


_LABEL = re.compile(r"sd/(?P<policy>fixed-(?:\d+|prefill)|confidence-[0-9.e-]+)/(?P<decode>\w+)")


def _policy_from_label(label: str, decode_gamma: int = 5, max_drafts: int = 32):
    """The `DraftPolicy` named by an `SDConfig.name` label (None if it is not one)."""
    match = _LABEL.fullmatch(label or "")
    if not match:
        return None
    kind, _, value = match["policy"].partition("-")
    if kind == "confidence":
        return DraftPolicy(kind="confidence", threshold=float(value), max_drafts=max_drafts)
    gamma = value if value == "prefill" else int(value)
    return DraftPolicy(kind="fixed", gamma=gamma, decode_gamma=decode_gamma, max_drafts=max_drafts)


def config_from_records(
    records: Sequence[Mapping[str, Any]], max_new_tokens: int | None = None, max_drafts: int = 32
) -> SDConfig:
    """The `SDConfig` of measured records, from their ``method`` label.

    ``decode_gamma`` of a ``fixed-prefill`` policy is the largest later-round draft count seen.

    Raises:
        ValueError: the label is not an SD configuration's.
    """
    label = records[0].get("method", "")
    match = _LABEL.fullmatch(label)
    if not match:
        raise ValueError(f"record method {label!r} is not an SD configuration label")
    later = [d for r in records for d in r["drafted"][1:]]
    policy = _policy_from_label(
        label, decode_gamma=max(later, default=5) or 5, max_drafts=max_drafts
    )
    return SDConfig(
        policy=policy,
        decode=match["decode"],
        max_new_tokens=max_new_tokens or _cap_from_records(records),
    )


# ------------------------------------------------------------------------------------ the model


@dataclass(frozen=True)
class _Outcome:
    """One way a round can go: its probability and what it drafts, accepts and commits."""

    prob: float
    drafted: int
    stopped: bool  # ended by a confidence drop (one more proposal and feed paid)
    accepted: int
    committed: int


def _run_distribution(acc: Acceptance, first: bool, limit: int) -> list[float]:
    """P(leading run = r), r = 0..limit (the last entry: r >= limit)."""
    if first:
        hist = list(acc.first_round)
        if len(hist) <= limit:
            return hist + [0.0] * (limit + 1 - len(hist))
        return hist[:limit] + [sum(hist[limit:])]
    out, alive = [], 1.0
    for r in range(limit):
        out.append(alive * (1.0 - acc.q(r)))
        alive *= acc.q(r)
    return out + [alive]


def _draft_counts(
    config: SDConfig, profile: CostProfile, acc: Acceptance, first: bool, cap: int
) -> list[tuple[float, int, bool]] | None:
    """``(prob, drafts kept, stopped early)`` of a round capped at ``cap`` drafts; None: oracle."""
    policy = config.policy
    if policy.kind == "fixed":
        if first and policy.gamma == "prefill":
            return [(p, g, False) for p, g in profile.prefill_draft_counts(cap)]
        return [(1.0, cap, False)]
    hazard = acc.first_round_stop if first else acc.later_stop
    if hazard is None:
        return None
    out, alive = [], 1.0
    for g in range(1, cap):
        h = hazard[min(g - 1, len(hazard) - 1)]
        out.append((alive * h, g, True))
        alive *= 1.0 - h
    return out + [(alive, cap, False)]


def _round_outcomes(
    config: SDConfig,
    profile: CostProfile,
    acc: Acceptance,
    first: bool,
    cap: int,
    remaining: int,
    ends_with_eos: bool,
) -> list[_Outcome]:
    """All outcomes of one drafting round (``cap >= 1`` drafts allowed, ``remaining`` tokens
    left in the answer); merged by (drafted, stopped, accepted)."""
    runs = _run_distribution(acc, first, cap)
    counts = _draft_counts(config, profile, acc, first, cap)
    merged: dict[tuple[int, bool, int], float] = {}

    def add(p: float, g: int, stopped: bool, r: int) -> None:
        if ends_with_eos and r >= remaining and g >= remaining:
            g, stopped, a = remaining, False, remaining  # drafted up to EOS, all accepted
        else:
            a = min(r, g, remaining)
        key = (g, stopped, a)
        merged[key] = merged.get(key, 0.0) + p

    for r, pr in enumerate(runs):
        if pr <= 0:
            continue
        if counts is None:  # oracle: keep exactly the drafts that will be accepted (>= 1)
            g = min(max(r, 1), cap)
            add(pr, g, g < cap, r)
            continue
        for pg, g, stopped in counts:
            if pg > 0:
                add(pr * pg, g, stopped, r)
    return [_Outcome(p, g, s, a, min(a + 1, remaining)) for (g, s, a), p in merged.items() if p > 0]


def _zero() -> dict[str, float]:
    return dict.fromkeys(QUANTITIES, 0.0)


def _add(out: dict[str, float], other: Mapping[str, float], weight: float = 1.0) -> None:
    for k, v in other.items():
        out[k] += weight * v


class _SampleModel:
    """Expected SD quantities for answers of one length under one configuration."""

    def __init__(self, profile: CostProfile, acc: Acceptance, config: SDConfig, n_tokens: int):
        self.profile, self.acc, self.config = profile, acc, config
        self.n, self.cap = n_tokens, config.max_new_tokens
        self.ends_with_eos = n_tokens < config.max_new_tokens
        self.later = lru_cache(maxsize=None)(self._later)

    def predict(self) -> dict[str, float]:
        p = self.profile
        limit = min(self.cap - 1, self.config.policy.round_cap(True))
        if limit < 1:  # nothing is drafted: the prefill's token is the whole answer
            out = _zero()
            out["total_ms"] = out["round1_ms"] = p.target_prefill_ms
            out["target_forwards"] = 1.0
            return out
        out = _zero()
        outcomes = _round_outcomes(
            self.config, p, self.acc, True, limit, self.n, self.ends_with_eos
        )
        for o in outcomes:
            row = _zero()
            drafting = p.drafting_ms(o.drafted, o.stopped)
            row["round1_ms"] = p.round1_ms(p.draft_prefill_ms + drafting)
            row["draft_ms"] = drafting
            row["drafted"] = row["first_drafted"] = o.drafted
            row["accepted"] = row["first_accepted"] = o.accepted
            row["rounds"] = row["target_forwards"] = 1.0  # the prefill
            length = 1
            if o.accepted >= 1 and o.drafted >= 2 and self.n > 1:
                verify = p.verify_ms(o.drafted - 1)
                row["round1_ms"] += verify
                row["verify_ms"] = verify
                row["target_forwards"] += 1.0
                length = o.committed
            _add(row, self.later(length))
            row["total_ms"] = row["round1_ms"] + row["decode_ms"]
            _add(out, row, o.prob)
        return out

    def _later(self, length: int) -> dict[str, float]:
        """Expected quantities of everything after an answer of ``length`` tokens."""
        p, remaining = self.profile, self.n - length
        out = _zero()
        if remaining <= 0:
            return out
        if self.config.decode == "autoregressive":
            out["decode_ms"] = remaining * p.target_token_ms
            out["target_forwards"] = float(remaining)
            return out
        cap = min(self.config.policy.round_cap(False), self.cap - length - 1)
        if cap < 1:  # one token left to the cap: a plain step, nothing to draft
            out["decode_ms"] = out["verify_ms"] = p.target_token_ms
            out["target_forwards"] = out["rounds"] = 1.0
            _add(out, self.later(length + 1))
            return out
        for o in _round_outcomes(
            self.config, p, self.acc, False, cap, remaining, self.ends_with_eos
        ):
            row = _zero()
            drafting = p.draft_token_ms + p.drafting_ms(o.drafted, o.stopped)  # resync + drafts
            verify = p.verify_ms(o.drafted)
            row["draft_ms"], row["verify_ms"] = drafting, verify
            row["decode_ms"] = drafting + verify
            row["rounds"] = row["target_forwards"] = 1.0
            row["drafted"], row["accepted"] = o.drafted, o.accepted
            _add(row, self.later(length + o.committed))
            _add(out, row, o.prob)
        return out


def _as_config(config: SDConfig | Mapping[str, Any]) -> SDConfig:
    if isinstance(config, SDConfig):
        return config
    cfg = dict(config)
    policy = cfg.pop("policy", {})
    if not isinstance(policy, DraftPolicy):
        policy = DraftPolicy(**policy)
    return SDConfig(policy=policy, **cfg)


def predict_speedup(
    profile: CostProfile,
    acceptance: Acceptance,
    decoding_config: SDConfig | Mapping[str, Any],
    lengths: Sequence[int] = (30,),
) -> dict[str, Any]:
    """Predicted per-sample and mean E2E time and speedup of one SD configuration.

    Args:
        profile: the costs.
        acceptance: the acceptance description (offline curves or measured).
        decoding_config: an `SDConfig` (or its fields as a dict, ``policy`` a `DraftPolicy` or
            its fields): policy, decode phase, ``max_new_tokens``.
        lengths: answer lengths of the samples (EOS included), e.g. the baseline's per sample.

    Returns:
        ``method``; ``speedup`` (``ratio_of_means``: mean baseline / mean SD time;
        ``mean_of_ratios``: mean of per-sample ratios); means over samples of ``baseline_ms``
        and every predicted quantity (`QUANTITIES`), ``tau`` (tokens per target forward) and
        ``accept_rate``; ``per_sample`` (``n_tokens``, ``baseline_ms`` and the quantities).
    """
    config = _as_config(decoding_config)
    if not lengths or any(int(n) < 1 for n in lengths):
        raise ValueError(f"lengths must be non-empty answer lengths >= 1, got {list(lengths)}")
    if max(lengths) > config.max_new_tokens:
        raise ValueError(
            f"answer length {max(lengths)} exceeds max_new_tokens={config.max_new_tokens}"
        )
    cache: dict[int, dict[str, float]] = {}
    per_sample = []
    for n in lengths:
        n = int(n)
        if n not in cache:
            cache[n] = _SampleModel(profile, acceptance, config, n).predict()
        per_sample.append({"n_tokens": n, "baseline_ms": profile.baseline_ms(n), **cache[n]})
    means = {
        k: sum(s[k] for s in per_sample) / len(per_sample)
        for k in ("n_tokens", "baseline_ms", *QUANTITIES)
    }
    return {
        "method": config.name,
        "speedup": {
            "ratio_of_means": means["baseline_ms"] / means["total_ms"],
            "mean_of_ratios": sum(s["baseline_ms"] / s["total_ms"] for s in per_sample)
            / len(per_sample),
        },
        **means,
        "tau": means["n_tokens"] / means["target_forwards"],
        "accept_rate": means["accepted"] / means["drafted"] if means["drafted"] else 0.0,
        "per_sample": per_sample,
    }


# ------------------------------------------------------------------------------------ validation


def split_e2e_records(
    samples: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, list[Mapping[str, Any]]], list[Mapping[str, Any]]]:
    """Per-strategy SD records and the baseline records from e2e ``samples.jsonl`` rows.

    Peers (records without per-round counts) are left out.
    """
    by_name: dict[str, list[Mapping[str, Any]]] = {}
    for sample in samples:
        for name, run in sample["strategies"].items():
            if "drafted" in run:
                by_name.setdefault(name, []).append(run)
    return by_name, [s["baseline"] for s in samples]


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


def predict_samples(
    profiles: CostProfile | Sequence[CostProfile],
    acceptance: Acceptance,
    decoding_config: SDConfig | Mapping[str, Any],
    lengths: Sequence[int],
) -> dict[str, Any]:
    """`predict_speedup` with one profile per sample (costs measured next to each sample, as a
    run on a machine whose load drifts needs); a single profile applies to all."""
    if isinstance(profiles, CostProfile):
        return predict_speedup(profiles, acceptance, decoding_config, lengths)
    if len(profiles) != len(lengths):
        raise ValueError(f"{len(profiles)} profiles for {len(lengths)} samples")
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(profiles):
        groups.setdefault(id(p), []).append(i)
    per_sample: list[dict[str, float]] = [{} for _ in lengths]
    for indices in groups.values():
        out = predict_speedup(
            profiles[indices[0]], acceptance, decoding_config, [lengths[i] for i in indices]
        )
        for i, row in zip(indices, out["per_sample"], strict=True):
            per_sample[i] = row
    keys = ("n_tokens", "baseline_ms", *QUANTITIES)
    means = {k: _mean(s[k] for s in per_sample) for k in keys}
    return {
        "method": _as_config(decoding_config).name,
        "speedup": {
            "ratio_of_means": means["baseline_ms"] / means["total_ms"],
            "mean_of_ratios": _mean(s["baseline_ms"] / s["total_ms"] for s in per_sample),
        },
        **means,
        "tau": means["n_tokens"] / means["target_forwards"],
        "accept_rate": means["accepted"] / means["drafted"] if means["drafted"] else 0.0,
        "per_sample": per_sample,
    }


def validate(
    records: Mapping[str, Sequence[Mapping[str, Any]]],
    baseline_records: Sequence[Mapping[str, Any]],
    profile: CostProfile | Sequence[CostProfile],
    configs: Mapping[str, SDConfig] | None = None,
) -> list[dict[str, Any]]:
    """Predicted vs measured time and speedup of each measured SD configuration.

    Each configuration is predicted twice from its own run: with the measured acceptance
    (round 1 and later rounds as measured: this checks the cost model) and with round 1's
    acceptance only (later rounds assumed to behave like round 1's positions, which is all
    offline evaluation provides: this checks that assumption). Answer lengths are the
    baseline's per sample.

    Args:
        records: strategy name -> `SDResult.to_dict` records, one per sample.
        baseline_records: the baseline's records of the same samples, in the same order.
        profile: costs measured in the same run: one profile, or one per sample.
        configs: strategy name -> `SDConfig` (missing: `config_from_records`).

    Returns:
        One row per strategy: measured and predicted ``speedup`` (ratio of means), their
        relative ``error``, the round-1-only prediction and its error, and measured/predicted
        means of ``total_ms``, ``baseline_ms``, ``round1_ms``, ``decode_ms``, ``first_drafted``,
        ``rounds`` and ``tau``.

    Raises:
        ValueError: a strategy's record count differs from the baseline's.
    """
    configs = configs or {}
    lengths = [len(b["tokens"]) for b in baseline_records]
    measured_base = _mean(b["total_ms"] for b in baseline_records)
    rows = []
    for name, runs in records.items():
        if len(runs) != len(baseline_records):
            raise ValueError(
                f"validate: strategy {name!r} has {len(runs)} records for "
                f"{len(baseline_records)} baseline records"
            )
        config = configs.get(name) or config_from_records(runs)
        config = replace(config, max_new_tokens=max(config.max_new_tokens, max(lengths)))
        full = predict_samples(profile, Acceptance.from_records(runs, config), config, lengths)
        first = predict_samples(
            profile, Acceptance.from_records(runs, config, later="first_round"), config, lengths
        )
        measured = {
            "total_ms": _mean(r["total_ms"] for r in runs),
            "round1_ms": _mean(r["total_ms"] - r["decode_ms"] for r in runs),
            "decode_ms": _mean(r["decode_ms"] for r in runs),
            "first_drafted": _mean(r["drafted"][0] for r in runs),
            "rounds": _mean(r["rounds"] for r in runs),
            "tau": _mean(len(r["tokens"]) for r in runs)
            / _mean(r["target_forwards"] for r in runs),
        }
        speedup = measured_base / measured["total_ms"]
        row: dict[str, Any] = {
            "strategy": name,
            "method": config.name,
            "n_samples": len(runs),
            "measured_speedup": speedup,
            "predicted_speedup": full["speedup"]["ratio_of_means"],
            "error": full["speedup"]["ratio_of_means"] / speedup - 1.0,
            "predicted_speedup_first_round": first["speedup"]["ratio_of_means"],
            "error_first_round": first["speedup"]["ratio_of_means"] / speedup - 1.0,
            "measured_baseline_ms": measured_base,
            "predicted_baseline_ms": full["baseline_ms"],
        }
        for key, value in measured.items():
            row[f"measured_{key}"] = value
            row[f"predicted_{key}"] = full[key]
        rows.append(row)
    return rows


def render_validation(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of `validate` rows."""
    from cross_modal_sd.utils import table

    header = [
        "configuration",
        "measured speedup",
        "predicted",
        "error",
        "predicted (later rounds = round 1)",
        "error",
        "SD ms meas / pred",
        "baseline ms meas / pred",
        "round-1 ms meas / pred",
        "round-1 drafts meas / pred",
        "tau meas / pred",
    ]

    def pair(row, key, digits=1):
        return f"{row[f'measured_{key}']:.{digits}f} / {row[f'predicted_{key}']:.{digits}f}"

    body = [
        [
            r["method"],
            r["measured_speedup"],
            r["predicted_speedup"],
            f"{100 * r['error']:+.1f}%",
            r["predicted_speedup_first_round"],
            f"{100 * r['error_first_round']:+.1f}%",
            pair(r, "total_ms"),
            pair(r, "baseline_ms"),
            pair(r, "round1_ms"),
            pair(r, "first_drafted"),
            pair(r, "tau", 2),
        ]
        for r in rows
    ]
    return table(header, body, digits=3)


def predicted_speedups(
    profile: CostProfile,
    acceptance: Acceptance,
    configs: Mapping[str, SDConfig],
    samples: Sequence[Mapping[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Predicted speedup of every SD strategy of an e2e run, for ``report.json``.

    Answer lengths are the baseline's per sample. Offline evaluation does not record where a
    confidence policy would stop drafting, so confidence strategies take their stop curves from
    their own measured records (acceptance stays the offline one).

    Args:
        profile: costs measured in the same run.
        acceptance: offline acceptance of the checkpoint (`Acceptance.from_export`).
        configs: strategy name -> its `SDConfig`.
        samples: the run's per-sample records (``baseline`` and ``strategies`` per sample).

    Returns:
        Strategy name -> ``ratio_of_means``, ``mean_of_ratios``, predicted mean ``total_ms``
        and ``baseline_ms``, and ``acceptance`` (what the prediction used).
    """
    lengths = [len(s["baseline"]["tokens"]) for s in samples]
    out = {}
    for name, config in configs.items():
        config = replace(config, max_new_tokens=max(config.max_new_tokens, max(lengths)))
        acc, used = acceptance, "offline"
        if config.policy.kind == "confidence":
            measured = Acceptance.from_records([s["strategies"][name] for s in samples], config)
            acc = replace(
                acceptance,
                first_round_stop=measured.first_round_stop,
                later_stop=measured.later_stop,
            )
            used = "offline, stops as measured"
        pred = predict_speedup(profile, acc, config, lengths)
        out[name] = {
            **pred["speedup"],
            "total_ms": pred["total_ms"],
            "baseline_ms": pred["baseline_ms"],
            "acceptance": used,
        }
    return out
