"""What each step of speculative decoding costs: `CostProfile`, and profile files.

Every number is a component cost measured by a probe that is not an SD run
(`cross_modal_sd.speedup.measure`): a forward of one model, one drafting step, a command to
the drafter's process and back, a prefill with the drafter busy beside it. Nothing here is
fitted to SD wall times, so a prediction made from a profile can be checked against SD runs it
has never seen (docs/design.md §13).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any

PROFILE_KIND = "cost_profile"
PROFILE_FORMAT = 2
PROFILE_DIR = Path(__file__).resolve().parent / "profiles"


class ProfileError(ValueError):
    """A cost profile file or dict that cannot be read; the message names the file and field."""


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


_NON_NEGATIVE = (
    "target_prefill_ms",
    "target_token_ms",
    "draft_prefill_ms",
    "draft_token_ms",
    "adapter_ms",
    "round_trip_ms",
)


@dataclass(frozen=True)
class CostProfile:
    """Component costs (ms) of one deployment of the pair.

    Attributes:
        target_prefill_ms: target prefill ``P_t`` with nothing beside it, at the target's
            decode threads (frames + prompt, first token).
        target_token_ms: one target decode step ``T_t`` (one token in, one greedy token out).
        verify_points: measured ``(k drafts, ms)`` of verify forwards; ``V(k)`` is the line
            fitted to them (with a single point, the line through ``(0, T_t)`` and it).
        draft_prefill_ms: draft prefill ``P_d`` (event images + prompt), where the drafter runs.
        draft_token_ms: one draft forward ``T_d`` (feeding one token back, or a resync).
        adapter_ms: per proposed draft ``A``: adapter, target ``lm_head``, softmax, argmax.
        target_contention: the target's prefill with the drafter working beside it, over the
            same prefill alone (1 = no slowdown), at the threads round 1 leaves the target.
        draft_contention: the drafter's forwards beside the target's prefill over alone.
        round_trip_ms: one command to the drafter and its answer back (0 in-process).
        draft_prefill_round1_ms: the drafter's prefill as round 1 pays it: started after the
            drafter sat idle, beside the target's prefill (None: ``P_d`` times
            `draft_contention`).
        target_prefill_shared_ms: ``P_t`` alone at the threads round 1 leaves the target when
            the drafter takes cores of the same budget (None: ``target_prefill_ms``).
        baseline_prefill_ms / baseline_token_ms: the baseline loop's cost before and per
            further token (None: ``P_t`` / ``T_t``).
        head_token_ms: one draft of a feature-level head where it runs (beside the target, at
            its decode threads): one head step and the target's ``lm_head`` (None: no head).
        solo_prefill_ms / solo_token_ms / solo_verify_points: the target's prefill, step and
            verify points with no cross-modal drafter resident, on the baseline's cores at its
            threads (what the head-only baseline runs on); None where they equal the SD
            target's (``own_device``, CUDA).
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
    target_contention: float = 1.0
    draft_contention: float = 1.0
    round_trip_ms: float = 0.0
    draft_prefill_round1_ms: float | None = None
    target_prefill_shared_ms: float | None = None
    baseline_prefill_ms: float | None = None
    baseline_token_ms: float | None = None
    head_token_ms: float | None = None
    solo_prefill_ms: float | None = None
    solo_token_ms: float | None = None
    solo_verify_points: tuple[tuple[int, float], ...] | None = None
    name: str = ""
    source: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for key in _NON_NEGATIVE:
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ProfileError(f"cost profile {self.name!r}: {key} must be >= 0, got {value!r}")
        for key in ("target_contention", "draft_contention"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ProfileError(f"cost profile {self.name!r}: {key} must be > 0, got {value!r}")
        if not self.verify_points:
            raise ProfileError(f"cost profile {self.name!r}: verify_points is empty")
        points = tuple((int(k), float(ms)) for k, ms in self.verify_points)
        object.__setattr__(self, "verify_points", points)
        if self.solo_verify_points is not None:
            solo = tuple((int(k), float(ms)) for k, ms in self.solo_verify_points)
            object.__setattr__(self, "solo_verify_points", solo)

    def solo(self) -> CostProfile:
        """The profile of a run without the cross-modal drafter (round 1 ``none``, head
        decoding): the target's costs on the baseline's cores where those were measured."""
        if self.solo_token_ms is None or self.solo_prefill_ms is None:
            return self
        return replace(
            self,
            target_prefill_ms=self.solo_prefill_ms,
            target_token_ms=self.solo_token_ms,
            verify_points=self.solo_verify_points or self.verify_points,
            target_prefill_shared_ms=None,
            solo_prefill_ms=None,
            solo_token_ms=None,
            solo_verify_points=None,
        )

    def head_drafting_ms(self, drafts: int) -> float:
        """A head round's drafting: its sync and each draft but the last fed back are one head
        step each, every draft one ``lm_head`` read: ``drafts`` x `head_token_ms`."""
        if self.head_token_ms is None:
            raise ProfileError(f"cost profile {self.name!r}: no head_token_ms (no head probed)")
        return drafts * self.head_token_ms

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
        """One target forward over the last token and ``k`` drafts (``T_t`` without drafts)."""
        if k == 0:
            return self.target_token_ms
        a, b = self.verify_line
        return max(0.0, a + b * k)

    def drafting_ms(self, drafts: int, stopped: bool = False) -> float:
        """Proposing ``drafts`` tokens in one round, each but the last fed back (a confidence
        drop paid one more proposal and feed)."""
        if drafts == 0:
            return 0.0
        extra = int(stopped)
        return (drafts + extra) * self.adapter_ms + (drafts - 1 + extra) * self.draft_token_ms

    @property
    def round1_prefill_ms(self) -> float:
        """The target's prefill alone at the threads round 1 leaves it."""
        shared = self.target_prefill_shared_ms
        return self.target_prefill_ms if shared is None else shared

    @property
    def round1_draft_prefill_ms(self) -> float:
        """The drafter's prefill in round 1 (see ``draft_prefill_round1_ms``)."""
        cold = self.draft_prefill_round1_ms
        return self.draft_prefill_ms * self.draft_contention if cold is None else cold

    def round1_ms(self, drafting_ms: float) -> float:
        """Round 1's wall time: the target's prefill beside a draft job (its prefill, then
        ``drafting_ms`` of drafting at solo costs, slowed by contention), whose answer comes back
        after a round trip; the target's prefill is slowed while the job runs."""
        prefill = self.round1_prefill_ms
        job = self.round1_draft_prefill_ms + self.draft_contention * drafting_ms
        target = prefill + (self.target_contention - 1.0) * min(prefill, job)
        return max(target, job + self.round_trip_ms)

    def drafter_late(self) -> bool:
        """Whether the draft job (started half a round trip after the command) is still in its
        prefill when the target's slowed prefill ends: a loop that does not wait for it then
        goes without round-1 drafts (`SDConfig.wait_for_drafter`)."""
        ready = self.round1_prefill_ms * self.target_contention
        return self.round_trip_ms / 2 + self.round1_draft_prefill_ms > ready

    def _round1_clock(self) -> tuple[float, float, float]:
        """``(start, step, ready)`` ms of a round-1 job: draft k is done at ``start + k *
        step`` (the job starts half a round trip after the command; the first draft comes with
        the prefill's state); the target's slowed prefill ends at ``ready``."""
        step = (self.adapter_ms + self.draft_token_ms) * self.draft_contention
        start = (
            self.round_trip_ms / 2
            + self.round1_draft_prefill_ms
            - self.draft_token_ms * self.draft_contention
        )
        return start, step, self.round1_prefill_ms * self.target_contention

    def _window(self) -> float:
        """Drafts the job can make by the end of the target's slowed prefill, as a real number
        (∞ when drafting is free)."""
        start, step, ready = self._round1_clock()
        return math.inf if step <= 0 else (ready - start) / step

    def drafts_by_prefill_end(self) -> int:
        """Drafts a draft job has completed when the target's slowed prefill ends (what a loop
        that never waits takes: `SDConfig.wait_for_drafter` false)."""
        if self.drafter_late():
            return 0
        fit = self._window()
        return 10**6 if math.isinf(fit) else max(0, math.floor(fit + 1e-9))

    def tail_drafts(self, after: int, most: int, waits: bool) -> int:
        """Drafts of a round-1 head tail (`DraftPolicy.head_tail`) started once the job's
        ``after``-th cross-modal draft is done: none if the target's slowed prefill has ended
        by then; else one per head step (``H``, slowed like the drafter's forwards) until it
        ends, at most ``most``: those done by then (``waits`` false: what a loop that never
        waits takes) or the first made after it (``waits``)."""
        if self.head_token_ms is None:
            raise ProfileError(f"cost profile {self.name!r}: no head_token_ms (no head probed)")
        start, step, ready = self._round1_clock()
        left = ready - (start + after * max(step, 0.0))  # ms of prefill after the chain
        if left <= 0:
            return 0
        steps = left / (self.head_token_ms * self.draft_contention)
        n = math.ceil(steps - 1e-9) if waits else math.floor(steps + 1e-9)
        return min(most, max(int(waits), n))

    def prefill_drafts(self) -> int:
        """Drafts of a ``gamma="prefill"`` round 1: the first draft proposed once the target
        has prefilled, i.e. the smallest ``G >= 1`` whose job reaches the end of the target's
        slowed prefill (drafting free: the round cap decides)."""
        fit = self._window()
        return 10**6 if math.isinf(fit) else max(1, math.ceil(fit - 1e-9))

    def baseline_ms(self, n_tokens: int) -> float:
        """The baseline's greedy decoding of an ``n_tokens`` answer."""
        prefill = self.baseline_prefill_ms
        token = self.baseline_token_ms
        prefill = self.target_prefill_ms if prefill is None else prefill
        token = self.target_token_ms if token is None else token
        return prefill + (n_tokens - 1) * token

    def with_(self, **changes) -> CostProfile:
        """A copy with some costs changed (e.g. ``profile.with_(target_contention=1.0)``)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the profile file format)."""
        d = asdict(self)
        d["verify_points"] = [list(p) for p in self.verify_points]
        if self.solo_verify_points is not None:
            d["solo_verify_points"] = [list(p) for p in self.solo_verify_points]
        d["meta"] = dict(self.meta)
        a, b = self.verify_line
        return {"kind": PROFILE_KIND, "format": PROFILE_FORMAT, **d, "verify_fit": [a, b]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "<dict>") -> CostProfile:
        """A profile from its dict form; unknown keys are an error (they are usually typos).

        Raises:
            ProfileError: an older format, missing or unknown fields, or bad values; the message
                names `where`.
        """
        if d.get("format", PROFILE_FORMAT) != PROFILE_FORMAT:
            raise ProfileError(
                f"{where}: cost profile format {d.get('format')} (this code reads format "
                f"{PROFILE_FORMAT}: costs from probes only, contention as slowdown factors); "
                f"measure it again with `python -m cross_modal_sd.speedup.measure`"
            )
        d = {k: v for k, v in d.items() if k not in ("kind", "format", "verify_fit")}
        known = {f.name for f in fields(cls)}
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
    """Field-wise mean of profiles of the same models (e.g. measured before and after a run);
    verify points are paired by position, text from the first.

    Raises:
        ValueError: no profiles, or profiles measured at different draft counts.
    """
    if not profiles:
        raise ValueError("mean_profile: no profiles")
    values: dict[str, Any] = {}
    for f in fields(CostProfile):
        column = [getattr(p, f.name) for p in profiles]
        if f.name in ("verify_points", "solo_verify_points"):
            column = [pts for pts in column if pts is not None]
            if len({tuple(k for k, _ in pts) for pts in column}) > 1:
                raise ValueError("mean_profile: profiles measured verify at different k")
            values[f.name] = (
                tuple(
                    (pts[0][0], sum(ms for _, ms in pts) / len(pts))
                    for pts in zip(*column, strict=True)
                )
                if column
                else None
            )
        elif f.type in ("float", "float | None"):
            numbers = [v for v in column if v is not None]  # a cost some runs did not measure
            values[f.name] = sum(numbers) / len(numbers) if numbers else None
        else:
            values[f.name] = column[0]
    values["meta"] = {**profiles[0].meta, "profiles_averaged": len(profiles)}
    return CostProfile(**values)


def shipped_profiles() -> list[str]:
    """Names of the profiles shipped in ``cross_modal_sd/speedup/profiles/``."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(source: str | os.PathLike | Mapping[str, Any]) -> CostProfile:
    """A cost profile from a shipped name (``"prior_rtx4090"``), a JSON file or a dict.

    A file may be a profile itself or any JSON holding one under ``"cost_profile"`` (an e2e
    ``report.json``, the output of ``scripts/gpu_check.py``).

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
        if not isinstance(data.get("cost_profile"), Mapping):
            raise ProfileError(
                f"{where}: holds no cost profile (no kind={PROFILE_KIND!r}, no 'cost_profile' "
                f"object); write one with `python -m cross_modal_sd.speedup.measure`"
            )
        data = data["cost_profile"]
    return CostProfile.from_dict(data, where)


def save_profile(profile: CostProfile, path: str | os.PathLike) -> Path:
    """Write `profile` as JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.to_dict(), indent=2) + "\n")
    return path
