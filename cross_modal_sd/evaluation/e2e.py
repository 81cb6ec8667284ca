"""End-to-end timing: baseline, SD configurations and peers on the same samples (docs/design.md §14).

On each sample all methods run back to back (their order rotating from sample to sample, so
drift and cache effects hit every method alike) under one thread budget, after untimed warm-up
runs; every output is compared token for token with the baseline's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from cross_modal_sd.analysis.cost_profile import measure_profile, pair_models
from cross_modal_sd.analysis.speedup_model import (
    Acceptance,
    CostProfile,
    mean_profile,
    predicted_speedups,
)
from cross_modal_sd.decoding import (
    AdapterDrafter,
    DraftInputs,
    GreedySpec,
    TargetInputs,
    hf_assisted,
    hf_greedy,
    hf_prompt_lookup,
    speculative_generate,
    thread_budget,
    wrapper_greedy,
)
from cross_modal_sd.decoding.timing import Span, timed_span
from cross_modal_sd.evaluation.report import aggregate, mean
from cross_modal_sd.evaluation.strategies import BASELINE, Strategy, parse_strategies
from cross_modal_sd.exports import AdapterExport, check_export_fits
from cross_modal_sd.pair import PairModels, PairSample


def resolve_max_new_tokens(value: Any, default: int) -> int:
    """``max_new_tokens`` from the config (null = the models' cap).

    Raises:
        ValueError: not an int >= 1.
    """
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1 (or null), got {value!r}")
    return value


# -------------------------------------------------------------------------------------- running


def _ms(device: torch.device, fn) -> tuple[Any, float]:
    spans: list[Span] = []
    with timed_span(device, spans):
        result = fn()
    return result, spans[0].ms


@torch.inference_mode()
def measure_costs(
    pair: PairModels, target: TargetInputs, draft: DraftInputs, answer: Sequence[int]
) -> dict[str, float | None]:
    """Each model alone on one sample: prefill ms and mean ms per teacher-forced answer token.

    Per-token times feed ``answer[:-1]`` one token at a time (what greedy decoding feeds); they
    are None for a one-token answer.
    """
    device = target.device
    out, t_prefill = _ms(
        device, lambda: pair.target.prefill(target.input_ids, target.pixel_values_videos)
    )
    t_steps = [
        _ms(
            device,
            lambda t=t: pair.target.forward_tokens(torch.tensor([[t]], device=device), out.cache),
        )[1]
        for t in answer[:-1]
    ]
    d_out, d_prefill = _ms(device, lambda: pair.draft.prefill(draft.input_ids, draft.event_pixels))
    d_steps = [
        _ms(
            device,
            lambda t=t: pair.draft.forward_tokens(torch.tensor([[t]], device=device), d_out.cache),
        )[1]
        for t in answer[:-1]
    ]
    return {
        "target_prefill_ms": t_prefill,
        "target_token_ms": mean(t_steps),
        "draft_prefill_ms": d_prefill,
        "draft_token_ms": mean(d_steps),
    }


def blank_events(event_pixels: torch.Tensor) -> bool:
    """Whether every event image is a blank canvas (each channel constant: no events)."""
    flat = event_pixels.flatten(-2)  # (..., 3, H*W)
    return bool((flat.amax(dim=-1) == flat.amin(dim=-1)).all())


class _Runner:
    """Runs any method (baseline, SD configuration, peer) on one sample's inputs."""

    def __init__(self, pair: PairModels, drafter: AdapterDrafter, spec: GreedySpec, peers: Mapping):
        self.pair, self.drafter, self.spec, self.peers = pair, drafter, spec, peers

    def __call__(self, strategy: Strategy, t_in: TargetInputs, d_in: DraftInputs) -> dict:
        model = self.pair.target.model
        if strategy.kind == "sd":
            record = speculative_generate(self.pair.target, self.drafter, t_in, d_in, strategy.sd)
        elif strategy.name == BASELINE:
            record = hf_greedy(model, t_in, self.spec, warmup=0)
        elif strategy.name == "prompt_lookup":
            pl = self.peers.get("prompt_lookup", {})
            record = hf_prompt_lookup(
                model,
                t_in,
                self.spec,
                num_tokens=int(pl.get("num_tokens", 10)),
                max_ngram=int(pl.get("max_ngram", 2)),
                warmup=0,
            )
        elif strategy.name == "assisted":
            assistant = self.pair.draft.model.language_model
            record = hf_assisted(model, t_in, assistant, self.spec, warmup=0)
        else:
            record = wrapper_greedy(self.pair.target, t_in, self.spec, warmup=0)
        return record.to_dict()


def _inputs(
    sample: PairSample, pair: PairModels, device: torch.device
) -> tuple[TargetInputs, DraftInputs]:
    t_dtype = pair.target.model.dtype
    d_dtype = next(pair.draft.model.parameters()).dtype
    return (
        TargetInputs(sample.target_ids.to(device), sample.frames.to(device, t_dtype)),
        DraftInputs(sample.draft_ids.to(device), sample.event_pixels.to(device, d_dtype)),
    )


def _profile(models, warnings: list[str]):
    """The speedup model's cost profile of this run's models, or None (with a warning) when the
    sample cannot be profiled (e.g. an answer that ends at its first token)."""
    try:
        return measure_profile(models, repeats=5)
    except RuntimeError as err:
        warnings.append(f"cost profile not measured: {err}")
        return None


@dataclass
class E2ESetup:
    """Everything `time_samples` and `summarize_e2e` need besides the samples (see
    `prepare_e2e`): what runs, where, and the warnings known before any timing."""

    pair: PairModels
    export: AdapterExport
    checkpoint: dict[str, Any]
    max_new: int
    strategies: list[Strategy]
    device: torch.device
    adapter: torch.nn.Module
    runner: _Runner
    threads: int | None
    warmup: int
    probe: bool
    profile: bool
    warnings: list[str]

    @property
    def methods(self) -> list[Strategy]:
        """The baseline, then the strategies: every method timed on each sample."""
        return [Strategy(BASELINE, "baseline"), *self.strategies]


def prepare_e2e(
    pair: PairModels,
    export: AdapterExport,
    cfg: DictConfig | Mapping[str, Any],
    cache_dir: str | os.PathLike | None = None,
) -> E2ESetup:
    """Checks the export against the models, parses the strategies and places the models.

    Raises:
        ExportError: the export does not fit the models.
        ValueError: bad ``max_new_tokens`` or an unknown strategy.
    """
    checkpoint = check_export_fits(export, pair, cache_dir)
    max_new = resolve_max_new_tokens(cfg.get("max_new_tokens"), pair.max_new_tokens)
    strategies = parse_strategies(cfg["strategies"], cfg["decoding"], max_new, pair.eos_id)
    device = torch.device(cfg.get("device") or "cpu")
    pair.target.model.to(device).eval()
    pair.draft.model.to(device).eval()
    adapter = export.adapter.to(device).eval()
    spec = GreedySpec(max_new, pair.target.vocab_limit, pair.eos_id)
    drafter = AdapterDrafter(pair.draft, adapter, pair.target.logits)
    warnings = []
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
        device=device,
        adapter=adapter,
        runner=_Runner(pair, drafter, spec, cfg.get("peers") or {}),
        threads=cfg.get("threads"),
        warmup=int(cfg.get("warmup", 1)),
        probe=bool(cfg.get("cost_probe", True)),
        profile=bool(cfg.get("cost_profile", True)),
        warnings=warnings,
    )


def time_samples(
    setup: E2ESetup,
    samples: Sequence[PairSample],
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[list[dict[str, Any]], list[CostProfile], list[str]]:
    """Times every method on every sample, after warm-up on the first.

    On each sample all methods run back to back, their order rotating from sample to sample;
    the speedup model's cost profile is measured before and after the loop (unless
    ``cost_profile`` is false).

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
    pair, run, methods, device = setup.pair, setup.runner, setup.methods, setup.device
    warnings: list[str] = []
    records = []
    profile_models = pair_models(pair, setup.adapter, samples[0])
    with thread_budget(setup.threads):
        t_in, d_in = _inputs(samples[0], pair, device)
        for _ in range(setup.warmup):
            runs = {m.name: run(m, t_in, d_in) for m in methods}
            if setup.probe:
                measure_costs(pair, t_in, d_in, runs[BASELINE]["tokens"])
        # The speedup model's cost profile, measured in this run before and after the timing loop.
        profiles = [_profile(profile_models, warnings)] if setup.profile else []
        for i, sample in enumerate(tqdm(samples, desc="evaluate", unit="sample")):
            t_in, d_in = _inputs(sample, pair, device)
            order = methods[i % len(methods) :] + methods[: i % len(methods)]
            runs = {m.name: run(m, t_in, d_in) for m in order}
            base = runs.pop(BASELINE)
            for record in runs.values():
                record["lossless"] = record["tokens"] == base["tokens"]
            records.append(
                {
                    "sample_id": sample.sample_id,
                    "group": sample.group,
                    "question_id": sample.question_id,
                    "reference": sample.reference,
                    "answer": pair.tokenizer.decode(base["tokens"], skip_special_tokens=True),
                    "events_blank": blank_events(sample.event_pixels),
                    "baseline": base,
                    "strategies": {s.name: runs[s.name] for s in setup.strategies},
                    "costs": measure_costs(pair, t_in, d_in, base["tokens"])
                    if setup.probe
                    else None,
                }
            )
            if on_record is not None:
                on_record(records[-1])
        if setup.profile:
            profiles.append(_profile(profile_models, warnings))
    return records, [p for p in profiles if p is not None], warnings


def summarize_e2e(
    setup: E2ESetup,
    records: Sequence[Mapping[str, Any]],
    profiles: Sequence[CostProfile],
    warnings: Sequence[str] = (),
) -> dict[str, Any]:
    """The report of timed records: aggregates, cost profile, predicted speedups, config.

    Args:
        setup: from `prepare_e2e`.
        records: per-sample records (of one process, or of all ranks in sample order).
        profiles: cost profiles measured around the timing (averaged into the report's).
        warnings: warnings of the timing beyond the setup's own.
    """
    strategies = setup.strategies
    report = aggregate(records, {s.name: s.kind for s in strategies}, max_len=setup.max_new)
    warnings = [*setup.warnings, *warnings]
    blank = sum(r["events_blank"] for r in records)
    if blank:
        warnings.append(
            f"{blank} of {len(records)} samples have no events (blank event images): the draft "
            f"reads an empty scene there; outputs are still checked against the baseline"
        )
    try:
        if not setup.profile:
            raise ValueError("cost_profile=false")
        if not profiles:
            raise ValueError("no cost profile could be measured")
        profile = mean_profile(profiles)
        report["cost_profile"] = profile.to_dict()
        acceptance = Acceptance.from_export_curves(setup.export.curves, str(setup.export.path))
    except ValueError as err:  # e.g. an export without token-level curves
        warnings.append(f"no predicted_speedup: {err}")
    else:
        sd_configs = {s.name: s.sd for s in strategies if s.kind == "sd"}
        for name, pred in predicted_speedups(profile, acceptance, sd_configs, records).items():
            report["strategies"][name]["predicted_speedup"] = pred
    report["warnings"] = warnings + report["warnings"]
    report["mode"] = "e2e"
    report["checkpoint"] = setup.checkpoint
    report["config"] = {
        "max_new_tokens": setup.max_new,
        "threads": setup.threads,
        "warmup": setup.warmup,
        "device": str(setup.device),
        "order": "interleaved per sample, rotating",
        "strategies": {s.name: (s.sd.name if s.sd else s.name) for s in strategies},
        "events_blank_samples": blank,
    }
    return report


def run_e2e(
    pair: PairModels,
    export: AdapterExport,
    samples: Iterable[PairSample],
    cfg: DictConfig | Mapping[str, Any],
    cache_dir: str | os.PathLike | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Times the baseline, each SD configuration and each peer on every sample.

    On each sample all methods run back to back (their order rotating from sample to sample,
    so drift and cache effects hit every method alike), under the thread budget
    ``cfg.threads``; ``cfg.warmup`` untimed runs of every method on the first sample come
    first. The SD drafter is `AdapterDrafter` over ``export.adapter``.

    Args:
        pair: the models (checked against the export before anything runs).
        export: the adapter export.
        samples: the samples (batch size 1 each).
        cfg: keys ``strategies``, ``decoding``, ``peers``, ``max_new_tokens``, ``threads``,
            ``warmup``, ``device``, ``cost_probe``, ``cost_profile`` (see ``conf/evaluate.yaml``).
        cache_dir: hidden-pair cache whose manifest may identify the export's models.

    Returns:
        The report (`cross_modal_sd.evaluation.report.aggregate` plus ``checkpoint`` and
        ``config``) and the per-sample records.

    Raises:
        ExportError: the export does not fit the models.
        ValueError: bad ``max_new_tokens``, an unknown strategy, or no samples.
    """
    setup = prepare_e2e(pair, export, cfg, cache_dir)
    samples = list(samples)
    if not samples:
        raise ValueError("no samples to evaluate: check source.split / start / count")
    records, profiles, warnings = time_samples(setup, samples)
    return summarize_e2e(setup, records, profiles, warnings), records
