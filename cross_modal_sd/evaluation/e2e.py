"""End-to-end timing of the baselines, SD configurations and peers on the same samples, under
one core budget and one deployment (docs/design.md §14).

Every method gets the budget's cores (`decoding.budget`). The two baseline loops, HF
``generate`` and the lean greedy ``loop`` over the same decoder calls SD makes, each run at the
thread count that makes it fastest (chosen on the first sample); the report's baseline is the
faster of the two over all samples, and every speedup is also given against ``generate``. On
each sample all methods run back to back in a fresh seeded shuffle (drift, cache effects and what
the previous run left idle or busy hit every method alike: a fixed rotation would always give a
method the same predecessor), after untimed warm-up runs; every output is compared token
for token with ``generate``'s. The speedup model's cost profile is measured by probes before and
after the timing loop, and its prediction, from those costs and the export's validation
acceptance, stands beside every measured speedup.
"""

from __future__ import annotations

import os
import random
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from cross_modal_sd.decoding import (
    AdapterDrafter,
    DecodeSpec,
    DraftInputs,
    DraftRunner,
    HeadDrafter,
    Sampling,
    TargetInputs,
    ThreadPlan,
    TokenChooser,
    hf_assisted,
    hf_greedy,
    hf_prompt_lookup,
    speculative_generate,
    thread_budget,
    wrapper_greedy,
)
from cross_modal_sd.decoding.budget import Budget
from cross_modal_sd.evaluation.report import aggregate, prefill_window
from cross_modal_sd.evaluation.strategies import Strategy, parse_strategies
from cross_modal_sd.exports import AdapterExport, ExportError, check_export_fits, load_export
from cross_modal_sd.pair import PairModels, PairSample
from cross_modal_sd.speedup import Acceptance, CostProfile, mean_profile, predict
from cross_modal_sd.speedup.measure import ProbeError, ProfileModels, measure_profile

# The two greedy loops a baseline can be: HF `generate`, and the lean loop over `TargetDecoder`.
BASELINE_LOOPS = ("generate", "loop")
LOOP_METHODS = {"generate": "hf_generate", "loop": "greedy_loop"}
# What a prediction reports beside its speedup, to compare with the measured means term by term.
PREDICTED_KEYS = (
    "total_ms",
    "baseline_ms",
    "round1_ms",
    "decode_ms",
    "draft_ms",
    "verify_ms",
    "rounds",
    "first_drafted",
    "tau",
)


def resolve_max_new_tokens(value: Any, default: int) -> int:
    """``max_new_tokens`` from the config (null = the models' cap).

    Raises:
        ValueError: not an int >= 1.
    """
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1 (or null), got {value!r}")
    return value


def blank_events(event_pixels: torch.Tensor) -> bool:
    """Whether every event image is a blank canvas (each channel constant: no events)."""
    flat = event_pixels.flatten(-2)  # (..., 3, H*W)
    return bool((flat.amax(dim=-1) == flat.amin(dim=-1)).all())


def _inputs(
    sample: PairSample, pair: PairModels, device: torch.device
) -> tuple[TargetInputs, DraftInputs]:
    t_dtype = pair.target.model.dtype
    d_dtype = next(pair.draft.model.parameters()).dtype
    return (
        TargetInputs(sample.target_ids.to(device), sample.frames.to(device, t_dtype)),
        DraftInputs(sample.draft_ids.to(device), sample.event_pixels.to(device, d_dtype)),
    )


@dataclass
class E2ESetup:
    """Everything `time_samples` and `summarize_e2e` need besides the samples (see
    `prepare_e2e`): what runs, where, and the warnings known before any timing."""

    pair: PairModels
    export: AdapterExport
    checkpoint: dict[str, Any]
    max_new: int
    strategies: list[Strategy]
    budget: Budget
    drafter: AdapterDrafter
    spec: DecodeSpec
    peers: Mapping[str, Any]
    warmup: int
    profile: bool
    warnings: list[str]
    head: HeadDrafter | None = None
    head_export: AdapterExport | None = None
    head_checkpoint: dict[str, Any] | None = None

    @property
    def device(self) -> torch.device:
        return torch.device(self.budget.device)


def prepare_e2e(
    pair: PairModels,
    export: AdapterExport,
    cfg: DictConfig | Mapping[str, Any],
    deployment: str,
    cache_dir: str | os.PathLike | None = None,
) -> E2ESetup:
    """Checks the export against the models, parses the strategies and the budget, and places
    the models on the device.

    The feature-head strategies (``head``, ``hybrid``) need the head export of
    ``cfg["head_ckpt"]``; without one they are dropped with a warning.

    Raises:
        ExportError: an export does not fit the models (or is of the wrong kind).
        ValueError: bad ``max_new_tokens``, ``cores`` or ``deployment``, or an unknown strategy.
    """
    checkpoint = check_export_fits(export, pair, cache_dir)
    max_new = resolve_max_new_tokens(cfg.get("max_new_tokens"), pair.max_new_tokens)
    sampling = Sampling.from_node(cfg.get("sampling"))
    strategies = parse_strategies(
        cfg["strategies"], cfg["decoding"], max_new, pair.eos_id, sampling
    )
    device = str(cfg.get("device") or "cpu")
    budget = Budget(int(cfg["cores"]), deployment, int(cfg.get("draft_cores", 1)), device)
    pair.target.model.to(device).eval()
    pair.draft.model.to(device).eval()
    adapter = export.adapter.to(device).eval()
    warnings = []
    head_export, head_checkpoint, head = load_head(cfg.get("head_ckpt")), None, None
    if head_export is not None:
        head_checkpoint = check_export_fits(head_export, pair)
        if head_export.adapter.max_len < max_new:
            raise ExportError(
                f"head_ckpt={head_export.path}: the head reads answers of at most "
                f"{head_export.adapter.max_len} tokens (adapter.max_len), max_new_tokens is "
                f"{max_new}; lower max_new_tokens or train a head with a larger max_len"
            )
        head = HeadDrafter(head_export.adapter.to(device).eval(), pair.target.head)
    else:
        dropped = [s.name for s in strategies if s.sd is not None and s.sd.decode == "head"]
        if dropped:
            strategies = [s for s in strategies if s.name not in dropped]
            warnings.append(
                f"strategies {dropped} not run: they need a feature head export "
                f"(head_ckpt=checkpoints/<run>/best_model.pt; train one with "
                f"`python train.py experiment=head`)"
            )
    if max_new == 1:
        warnings.append(
            "max_new_tokens=1: the answer is the prefill's own token, so nothing is drafted; "
            "speedups compare prefill-only runs"
        )
    return E2ESetup(
        pair=pair,
        export=export,
        checkpoint=checkpoint,
        max_new=max_new,
        strategies=strategies,
        budget=budget,
        drafter=AdapterDrafter(pair.draft, adapter, pair.target.head, head=head),
        spec=DecodeSpec(max_new, pair.target.vocab_limit, pair.eos_id, sampling),
        peers=cfg.get("peers") or {},
        warmup=int(cfg.get("warmup", 1)),
        profile=bool(cfg.get("cost_profile", True)),
        warnings=warnings,
        head=head,
        head_export=head_export,
        head_checkpoint=head_checkpoint,
    )


def load_head(path: str | os.PathLike | None) -> AdapterExport | None:
    """The feature-head export at ``path`` (None: no head).

    Raises:
        ExportError: missing or unreadable, or an adapter export (not a head).
    """
    if not path:
        return None
    export = load_export(path)
    if export.kind != "head":
        raise ExportError(
            f"head_ckpt={path} is an adapter export ({export.name}), not a feature head; "
            f"train a head with `python train.py experiment=head` and pass its best_model.pt"
        )
    return export


class _Methods:
    """Runs any method on one sample's inputs, each at its own threads."""

    def __init__(self, setup: E2ESetup, runner: DraftRunner, threads: Mapping[str, int]):
        self.setup, self.runner, self.threads = setup, runner, threads
        self.plan = setup.budget.plan(threads["loop"]) if threads else None
        # Without a cross-modal drafter (the head-only baseline) the target has what the
        # baseline loop has: its cores, at its threads.
        self.solo_plan = ThreadPlan(threads["loop"], threads["loop"]) if threads else None

    def loop(
        self,
        name: str,
        t_in: TargetInputs,
        spec: DecodeSpec,
        threads: int | None = None,
        seed: int | None = None,
    ):
        """One baseline loop's record (at its chosen threads unless `threads` is given; when
        sampling, drawn from `seed`, default the spec's)."""
        model = self.setup.pair.target
        budget = self.setup.budget
        with budget.pinned(budget.target_cores), thread_budget(threads or self.threads[name]):
            if name == "generate":
                return hf_greedy(model.model, t_in, spec, warmup=0, seed=seed)
            return wrapper_greedy(model, t_in, spec, warmup=0, seed=seed)

    def __call__(
        self, strategy: Strategy, t_in: TargetInputs, d_in: DraftInputs, seed: int | None = None
    ) -> dict:
        """One method's record on one sample (when sampling, drawn from `seed`, default the
        settings' own)."""
        s = self.setup
        model = s.pair.target.model
        sampling = s.spec.sampling
        seed = sampling.seed if seed is None else seed
        if strategy.kind == "baseline":
            return self.loop(strategy.name, t_in, s.spec, seed=seed).to_dict()
        if strategy.kind == "sd":
            sd = strategy.sd
            if uses_drafter(sd):
                cores, runner, plan = s.budget.sd_cores, self.runner, self.plan
            else:
                cores, runner, plan = s.budget.target_cores, None, self.solo_plan
            chooser = None  # greedy: the loop's shared greedy chooser
            if not sampling.greedy:
                chooser = TokenChooser(sampling, torch.Generator().manual_seed(seed))
            with s.budget.pinned(cores):
                return speculative_generate(
                    s.pair.target, runner, t_in, d_in, sd, plan, s.head, chooser
                ).to_dict()
        if not sampling.greedy:
            torch.manual_seed(seed)  # the peers' generate samples from torch's global stream
        with s.budget.pinned(s.budget.target_cores), thread_budget(self.threads["generate"]):
            if strategy.name == "prompt_lookup":
                pl = s.peers.get("prompt_lookup", {})
                record = hf_prompt_lookup(
                    model,
                    t_in,
                    s.spec,
                    num_tokens=int(pl.get("num_tokens", 10)),
                    max_ngram=int(pl.get("max_ngram", 2)),
                    warmup=0,
                )
            elif strategy.name == "assisted":
                record = hf_assisted(
                    model, t_in, s.pair.draft.model.language_model, s.spec, warmup=0
                )
            else:
                record = self.loop("loop", t_in, s.spec)
        return record.to_dict()


def uses_drafter(config) -> bool:
    """Whether an SD configuration runs the cross-modal drafter (round 1 or later rounds)."""
    return config.round1 == "cross_modal" or config.decode == "draft_model"


def choose_threads(
    run: Callable[[int], float], choices: Sequence[int], repeats: int = 3
) -> tuple[int, dict[int, float]]:
    """The thread count with the lowest median time of ``run(threads)`` (and all medians)."""
    medians = {t: statistics.median(run(t) for _ in range(repeats)) for t in choices}
    return min(medians, key=medians.get), medians


def _profile(models: ProfileModels, plan, warnings: list[str]) -> CostProfile | None:
    """The speedup model's cost profile of this run's models, or None (with a warning)."""
    try:
        return measure_profile(models, plan, repeats=8)
    except ProbeError as err:
        warnings.append(f"cost profile not measured: {err}")
        return None


def time_samples(
    setup: E2ESetup,
    samples: Sequence[PairSample],
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[list[dict[str, Any]], list[CostProfile], list[str]]:
    """Times every method on every sample under the setup's budget.

    The process is pinned to the target's cores and the drafter started where the deployment
    puts it (its own process on a CPU) for the duration of the call. On the first sample each
    baseline loop's thread count is chosen and every method warms up; the cost profile is
    measured before and after the loop (unless ``cost_profile`` is false).

    Args:
        setup: from `prepare_e2e`.
        samples: the samples (batch size 1 each); none gives empty results.
        on_record: called with each per-sample record as soon as it is complete (a sharded
            run appends it to its part file there, so a killed rank keeps what it timed).

    Returns:
        The per-sample records, the cost profiles measured, and warnings about them.
    """
    if not samples:
        return [], [], []
    pair, budget, device = setup.pair, setup.budget, setup.device
    warnings: list[str] = []
    records = []
    with budget.pinned(), budget.runner(setup.drafter) as runner:
        t_in, d_in = _inputs(samples[0], pair, device)
        methods = _Methods(setup, runner, {})
        threads = {}
        choices = {}
        for name in BASELINE_LOOPS:
            methods.loop(name, t_in, setup.spec, budget.thread_choices[-1])  # warm-up
            threads[name], choices[name] = choose_threads(
                lambda t, n=name: methods.loop(n, t_in, setup.spec, t).total_ms,
                budget.thread_choices,
            )
        methods = _Methods(setup, runner, threads)
        order = [*(Strategy(n, "baseline") for n in BASELINE_LOOPS), *setup.strategies]
        for _ in range(setup.warmup):
            for m in order:
                methods(m, t_in, d_in)
        profile_models = ProfileModels(
            pair.target,
            runner,
            t_in,
            d_in,
            baselines={n: lambda spec, n=n: methods.loop(n, t_in, spec) for n in BASELINE_LOOPS},
            sd_context=lambda: budget.pinned(budget.sd_cores),
            head=setup.head,
            solo_context=(
                (lambda: budget.pinned(budget.target_cores))
                if setup.head is not None and budget.target_cores != budget.sd_cores
                else None
            ),
            solo_threads=threads["loop"],
            meta={
                "models": f"{pair.target_id} / {pair.draft_id}",
                "adapter": setup.export.name,
                "budget": budget.to_dict(),
                "baseline_threads": threads,
                "thread_choice_ms": choices,
            },
        )
        with thread_budget(threads["loop"]):
            profiles = [_profile(profile_models, methods.plan, warnings)] if setup.profile else []
        shuffle = random.Random(0)
        exact = setup.spec.sampling.greedy
        bar = tqdm(samples, desc=f"evaluate ({budget.deployment})", unit="sample")
        for i, sample in enumerate(bar):
            t_in, d_in = _inputs(sample, pair, device)
            shuffled = order[:]
            shuffle.shuffle(shuffled)
            seed = setup.spec.sampling.seed + i
            runs = {m.name: methods(m, t_in, d_in, seed) for m in shuffled}
            reference = runs["generate"]
            for record in runs.values():  # sampling: equal in distribution, not token for token
                record["lossless"] = record["tokens"] == reference["tokens"] if exact else None
            records.append(
                {
                    "sample_id": sample.sample_id,
                    "group": sample.group,
                    "question_id": sample.question_id,
                    "reference": sample.reference,
                    "answer": pair.tokenizer.decode(reference["tokens"], skip_special_tokens=True),
                    "events_blank": blank_events(sample.event_pixels),
                    "baselines": {n: runs[n] for n in BASELINE_LOOPS},
                    "strategies": {s.name: runs[s.name] for s in setup.strategies},
                }
            )
            if on_record is not None:
                on_record(records[-1])
        if setup.profile:
            with thread_budget(threads["loop"]):
                profiles.append(_profile(profile_models, methods.plan, warnings))
    return records, [p for p in profiles if p is not None], warnings


def choose_baseline(records: Sequence[Mapping[str, Any]]) -> str:
    """The faster baseline loop by mean time over the samples."""
    means = {
        n: statistics.mean(r["baselines"][n]["total_ms"] for r in records) for n in BASELINE_LOOPS
    }
    return min(means, key=means.get)


def with_baseline(records: Sequence[Mapping[str, Any]], loop: str) -> list[dict[str, Any]]:
    """Records whose ``baseline`` is the named loop's run."""
    return [{**r, "baseline": r["baselines"][loop]} for r in records]


def summarize_e2e(
    setup: E2ESetup,
    records: Sequence[Mapping[str, Any]],
    profiles: Sequence[CostProfile],
    warnings: Sequence[str] = (),
) -> dict[str, Any]:
    """The report of timed records: aggregates with intervals, cost profile, predicted speedups.

    Args:
        setup: from `prepare_e2e`.
        records: per-sample records (of one process, or of all ranks in sample order).
        profiles: cost profiles measured around the timing (averaged into the report's).
        warnings: warnings of the timing beyond the setup's own.
    """
    strategies = setup.strategies
    chosen = choose_baseline(records)
    report = aggregate(
        with_baseline(records, chosen),
        {s.name: s.kind for s in strategies},
        max_len=setup.max_new,
        reference=[r["baselines"]["generate"] for r in records],
        exact=setup.spec.sampling.greedy,
    )
    report["baseline_loop"] = chosen
    base = report["strategies"]["baseline"]
    base["method"] = LOOP_METHODS[chosen]
    base["other_loop_ms"] = statistics.mean(
        r["baselines"][n]["total_ms"] for r in records for n in BASELINE_LOOPS if n != chosen
    )
    warnings = [*setup.warnings, *warnings]
    blank = sum(r["events_blank"] for r in records)
    if blank:
        warnings.append(
            f"{blank} of {len(records)} samples have no events (blank event images): the draft "
            f"reads an empty scene there; outputs are still checked against the baseline"
        )
    profile = None
    if setup.profile and profiles:
        profile = mean_profile(profiles)
        line = profile.meta["baselines"][chosen]
        profile = profile.with_(baseline_prefill_ms=line[0], baseline_token_ms=line[1])
        report["cost_profile"] = profile.to_dict()
        report["cost_ratios"] = cost_ratios(profile, base["total_ms"], setup.pair)
        lengths = [len(r["baselines"]["generate"]["tokens"]) for r in records]
        try:
            acceptance = Acceptance.from_export(setup.export, lengths)
        except ValueError as err:
            warnings.append(f"no predicted_speedup: {err}")
        else:
            head_acceptance = None
            if setup.head_export is not None:
                try:
                    head_acceptance = acceptance.with_head(setup.head_export)
                except ValueError as err:
                    warnings.append(f"no predicted_speedup for the head strategies: {err}")
            for s in strategies:
                if s.kind != "sd":
                    continue
                acc = head_acceptance if s.sd.decode == "head" else acceptance
                if acc is None:
                    continue
                try:
                    pred = predict(profile, acc, s.sd)
                except ValueError as err:  # not modelled, or an export without what it needs
                    warnings.append(f"no predicted_speedup for {s.name}: {err}")
                    continue
                report["strategies"][s.name]["predicted_speedup"] = {
                    **pred["speedup"],
                    **{k: pred[k] for k in PREDICTED_KEYS},
                    "acceptance": pred["acceptance"],
                }
    else:
        warnings.append("no cost profile (cost_profile=false, or no probe succeeded)")
    report["warnings"] = warnings + report["warnings"]
    report["mode"] = "e2e"
    report["deployment"] = setup.budget.deployment
    report["budget"] = setup.budget.to_dict()
    report["sampling"] = asdict(setup.spec.sampling)
    report["prefill_window"] = prefill_window(records, setup.budget.deployment)
    report["checkpoint"] = setup.checkpoint
    report["head_checkpoint"] = setup.head_checkpoint
    report["config"] = {
        "max_new_tokens": setup.max_new,
        "warmup": setup.warmup,
        "device": str(setup.device),
        "order": "interleaved per sample, shuffled (seeded)",
        "strategies": {s.name: (s.sd.name if s.sd else s.name) for s in strategies},
        "events_blank_samples": blank,
    }
    return report


def cost_ratios(profile: CostProfile, baseline_ms: float, pair: PairModels) -> dict[str, Any]:
    """The measured cost shape (docs/design.md §12) from the run's probes and baseline."""
    from cross_modal_sd.evaluation.report import REFERENCE_COSTS

    world = pair.world
    return {
        "target_prefill_ms": profile.target_prefill_ms,
        "target_token_ms": profile.target_token_ms,
        "draft_prefill_ms": profile.draft_prefill_ms,
        "draft_token_ms": profile.draft_token_ms,
        "target_prefill_share": profile.target_prefill_ms / baseline_ms,
        "draft_prefill_ratio": profile.draft_prefill_ms / profile.target_prefill_ms,
        "draft_token_ratio": profile.draft_token_ms / profile.target_token_ms,
        "head_token_ms": profile.head_token_ms,
        "head_token_ratio": (
            profile.head_token_ms / profile.target_token_ms
            if profile.head_token_ms is not None
            else None
        ),
        "contention": profile.target_contention,
        "regime": world.config.regime if world is not None else "real",
        "reference": dict(REFERENCE_COSTS),
    }


def run_e2e(
    pair: PairModels,
    export: AdapterExport,
    samples: Iterable[PairSample],
    cfg: DictConfig | Mapping[str, Any],
    deployment: str = "shared",
    cache_dir: str | os.PathLike | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Times the baselines, each SD configuration and each peer on every sample.

    Args:
        pair: the models (checked against the export before anything runs).
        export: the adapter export.
        samples: the samples (batch size 1 each).
        cfg: keys ``strategies``, ``decoding``, ``peers``, ``max_new_tokens``, ``cores``,
            ``draft_cores``, ``warmup``, ``device``, ``cost_profile`` (``conf/evaluate.yaml``).
        deployment: ``shared`` | ``own_device`` (`decoding.budget`).
        cache_dir: hidden-pair cache whose manifest may identify the export's models.

    Returns:
        The report (`cross_modal_sd.evaluation.report.aggregate` plus ``deployment``,
        ``budget``, ``baseline_loop``, ``cost_profile``, ``cost_ratios``, ``checkpoint`` and
        ``config``) and the per-sample records (``baseline`` set to the chosen loop's run).

    Raises:
        ExportError: the export does not fit the models.
        ValueError: bad settings, an unknown strategy, or no samples.
    """
    setup = prepare_e2e(pair, export, cfg, deployment, cache_dir)
    samples = list(samples)
    if not samples:
        raise ValueError("no samples to evaluate: check source.split / start / count")
    records, profiles, warnings = time_samples(setup, samples)
    report = summarize_e2e(setup, records, profiles, warnings)
    return report, with_baseline(records, report["baseline_loop"])
