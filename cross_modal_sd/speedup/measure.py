"""The one cost-measurement harness: a `CostProfile` from probes that are not SD runs.

Evaluation (`python evaluate.py`), this module's command line and `scripts/gpu_check.py` all call
`measure_profile`. Every cost is timed through the calls the SD loop makes (`TargetDecoder.prefill`,
`speculative.verify`, the drafter's `prefill`/`next_token`/`feed`/`rewind` on its runner) with
synchronised timers (`decoding.timing`), probes in a fresh shuffled order each round (no probe
always follows the same one), and the mean of the timed rounds reported (the occasional stall of a
busy machine is part of what runs pay):

* ``P_t`` at the target's decode threads, and at the threads round 1 leaves it (shared budget);
* ``T_t`` and ``V(k)``: one forward over 1 and ``k + 1`` tokens after ``context`` answer tokens;
* ``P_d``, ``T_d``, ``A``: on the drafter's runner (its process, its cores);
* contention: a stand-in for round 1 (the drafter, idle until then, prefills and then drafts,
  a proposal and a feed at a time, while the target prefills back to back beside it) against each
  alone, and the drafter's prefill as round 1 pays it;
* the round trip of one command to the drafter;
* with a feature head: one draft of it (a head step and the target's ``lm_head``) after
  ``context`` pairs, beside the target at its decode threads;
* with a solo context (``shared`` on a CPU): ``P_t``, ``T_t`` and ``V(k)`` again on the
  baseline's cores at its threads, where the head-only baseline runs (no drafter resident);
* each baseline loop at ``baseline_lengths`` tokens (no EOS stop), a line through
  (tokens - 1, ms).

Costs do not depend on weight values, so the command line measures randomly initialised models of
a mini world's sizes (no build, no download)::

    python -m cross_modal_sd.speedup.measure out=profile.json
    python -m cross_modal_sd.speedup.measure models=mini_p15 deployment=own_device out=p15.json
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from cross_modal_sd.decoding import (
    AdapterDrafter,
    DecodeSpec,
    DraftInputs,
    DraftRunner,
    HeadDrafter,
    TargetInputs,
    TargetState,
    ThreadPlan,
    thread_budget,
    time_call,
    verify,
)
from cross_modal_sd.decoding.baselines import GenerationRecord
from cross_modal_sd.models.wrappers import TargetDecoder, crop_cache
from cross_modal_sd.speedup.costs import CostProfile, fit_line, save_profile

VERIFY_DRAFTS = (1, 2, 4, 8, 16)
BASELINE_LENGTHS = (2, 8, 16, 24)  # around the answer lengths a run sees, for a steady line


class ProbeError(RuntimeError):
    """A cost probe that could not measure what it needs; the message names the setting."""


@dataclass
class ProfileModels:
    """What `measure_profile` times.

    Attributes:
        target: the target behind the decoding API.
        runner: the drafter where it runs (its process, or a thread here).
        target_inputs / draft_inputs: one sample's inputs (batch size 1).
        baselines: the baseline loops by name (HF ``generate``, the lean greedy ``loop``), each
            run for a `DecodeSpec` at its own threads (and cores).
        sd_context: entered around every other probe: where SD's target runs (evaluation pins
            it off the drafter's cores there).
        meta: what the models are (recorded in the profile).
        head: a feature-head drafter (None: no head probe).
        solo_context / solo_threads: where and at how many threads a run without the drafter
            has the target (None: where SD's target runs; no solo probes).
    """

    target: TargetDecoder
    runner: DraftRunner
    target_inputs: TargetInputs
    draft_inputs: DraftInputs
    baselines: dict[str, Callable[[DecodeSpec], GenerationRecord]] = field(default_factory=dict)
    meta: dict[str, Any] | None = None
    sd_context: Callable[[], AbstractContextManager] = nullcontext
    head: HeadDrafter | None = None
    solo_context: Callable[[], AbstractContextManager] | None = None
    solo_threads: int | None = None


def _mean(values: Sequence[float]) -> float:
    return statistics.mean(values)


def measure_profile(
    models: ProfileModels,
    plan: ThreadPlan | None = None,
    repeats: int = 10,
    context: int = 16,
    verify_drafts: Sequence[int] = VERIFY_DRAFTS,
    baseline_lengths: Sequence[int] = BASELINE_LENGTHS,
    baseline: str | None = None,
    name: str = "",
    source: str = "",
) -> CostProfile:
    """Times every component cost of the speedup model (see the module docstring).

    Args:
        models: target, drafter runner, inputs and the baseline loop.
        plan: the target's threads: ``round1`` beside the drafter, ``decode`` otherwise (None:
            the current setting for both).
        repeats: timed rounds (after one warm-up round).
        context: answer tokens already in the caches when steps and verifies are timed.
        verify_drafts: the ``k`` of the ``V(k)`` points.
        baseline_lengths: answer lengths the baselines are timed at (at least two).
        baseline: the loop whose line becomes the profile's baseline cost (None: none); every
            loop's ``[prefill, per token]`` line is kept in ``meta["baselines"]``.
        name / source: labels.

    Raises:
        ProbeError: bad probe settings (each named), or a probe that failed.
    """
    plan = plan or ThreadPlan()
    if repeats < 1:
        raise ProbeError(f"cost probe: repeats must be >= 1, got {repeats}")
    if context < 1:
        raise ProbeError(f"cost probe: context must be >= 1, got {context}")
    if not verify_drafts or min(verify_drafts) < 1:
        raise ProbeError(f"cost probe: verify_drafts must be ks >= 1, got {list(verify_drafts)}")
    if models.baselines and len(set(baseline_lengths)) < 2:
        raise ProbeError(
            f"cost probe: baseline_lengths needs two or more lengths, got {list(baseline_lengths)}"
        )
    target, runner = models.target, models.runner
    t_in, d_in = models.target_inputs, models.draft_inputs
    device = t_in.device
    cpu = device.type == "cpu"
    limit = target.vocab_limit or target.lm_head_weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    answer = torch.randint(3, limit, (context + 1,), generator=gen).tolist()

    def threads(n: int | None):
        return thread_budget(n if cpu else None)

    def prefill():
        return target.prefill(t_in.input_ids, t_in.pixel_values_videos)

    with torch.inference_mode(), threads(plan.decode):
        out = prefill()
        prompt_len = out.cache.get_seq_length()
        target.forward_tokens(torch.tensor([answer[:-1]], device=device), out.cache)
    state = TargetState(out.cache, prompt_len, answer)
    base_len = out.cache.get_seq_length()  # prompt + answer[:-1]

    def step(drafts):
        def run():
            return verify(target, state, drafts)

        return run

    def clock(fn, n=None) -> float:
        # Forwards append to the shared state's cache: it is cropped back before each timed
        # call, untimed (a decode step crops nothing; a verify crops its rejected drafts).
        crop_cache(state.cache, base_len)
        with threads(n if n is not None else plan.decode):
            return time_call(fn, warmup=0, device=device)[1]

    def contention() -> dict[str, list[float]]:
        # A stand-in for round 1, started as round 1 starts (the drafter idle until then): the
        # drafter prefills, then feeds tokens back to back, while the target prefills back to
        # back beside it, at round 1's threads. The slowdown compares like with like: prefills
        # back to back beside it against prefills back to back alone just before (a single
        # prefill after other probes is slower than one after another prefill; that cold cost
        # is P_t' itself, which the slowdown then scales).
        alone = [clock(prefill, plan.round1) for _ in range(3)][1:]
        span = 4 * alone[-1] + 20.0
        runner.start_busy(d_in, span)
        beside, end = [], time.perf_counter() + span / 2000
        while time.perf_counter() < end or not beside:
            beside.append(clock(prefill, plan.round1))
        cold, *steps = runner.finish_busy()
        return {
            "prefill_beside": beside,
            "prefill_alone": alone,
            "draft_prefill_round1": [cold],
            "draft_step_beside": steps[1:-1] or steps,
        }

    probes: dict[str, Callable[[], dict[str, list[float]]]] = {
        "target_prefill": lambda: {"target_prefill": [clock(prefill)]},
        "target_prefill_shared": lambda: {"target_prefill_shared": [clock(prefill, plan.round1)]},
        "target_step": lambda: {"target_step": [clock(step([])) for _ in range(4)]},
        **{
            f"verify_{k}": (
                lambda k=k: {
                    f"verify_{k}": [
                        clock(step(torch.randint(3, limit, (k,), generator=gen).tolist()))
                    ]
                }
            )
            for k in verify_drafts
        },
        "drafter": lambda: runner.probe(d_in, answer, 1),
        "round_trip": lambda: {"round_trip": [time_call(runner.ping, warmup=0)[1]]},
        "contention": contention,
    }
    if models.head is not None:
        probes["head_token"] = _head_probe(models.head, out.hidden, answer, clock)
    if models.solo_context is not None:

        def solo(fn):
            # One untimed call first: in a run the target switches to these cores and threads
            # once, at its prefill (probed cold below), not before every later forward.
            clock(fn, models.solo_threads)
            return clock(fn, models.solo_threads)

        probes["solo_prefill"] = lambda: {"solo_prefill": [clock(prefill, models.solo_threads)]}
        probes["solo_step"] = lambda: {"solo_step": [solo(step([])) for _ in range(4)]}
        for k in verify_drafts:
            probes[f"solo_verify_{k}"] = lambda k=k: {
                f"solo_verify_{k}": [
                    solo(step(torch.randint(3, limit, (k,), generator=gen).tolist()))
                ]
            }

    def timed_loop(run, spec) -> float:
        # No warm-up: in an evaluation a baseline run follows a random other method (the order
        # is shuffled per sample), as a probe follows a random other probe here.
        return run(spec).total_ms

    for loop, run in models.baselines.items():
        for n in baseline_lengths:
            spec = DecodeSpec(n, limit, None)  # no EOS: exactly n tokens
            probes[f"{loop}_{n}"] = lambda spec=spec, n=n, loop=loop, run=run: {
                f"{loop}_{n}": [timed_loop(run, spec)]
            }
    times: dict[str, list[float]] = {}
    order = random.Random(0)
    try:
        for i in range(repeats + 1):  # round 0 warms up
            keys = list(probes)
            order.shuffle(keys)
            for key in keys:
                if key.startswith("solo_"):
                    where = models.solo_context()
                elif key.split("_")[0] in models.baselines:
                    where = nullcontext()  # each loop pins itself to the baseline's cores
                else:
                    where = models.sd_context()
                with where:
                    measured = probes[key]()
                for cost, ms in measured.items():
                    if i:
                        times.setdefault(cost, []).extend(ms)
    except ProbeError:
        raise
    except Exception as err:
        raise ProbeError(f"cost probe failed: {type(err).__name__}: {err}") from err

    mean = {k: _mean(v) for k, v in times.items()}
    lines = {
        loop: list(fit_line([(n - 1, mean[f"{loop}_{n}"]) for n in baseline_lengths]))
        for loop in models.baselines
    }
    base_prefill, base_token = lines[baseline] if baseline else (None, None)
    shared = mean["target_prefill_shared"]
    return CostProfile(
        target_prefill_ms=mean["target_prefill"],
        target_token_ms=mean["target_step"],
        verify_points=tuple((k, mean[f"verify_{k}"]) for k in verify_drafts),
        draft_prefill_ms=mean["draft_prefill"],
        draft_token_ms=mean["draft_feed"],
        adapter_ms=mean["adapter"],
        target_contention=mean["prefill_beside"] / mean["prefill_alone"],
        draft_contention=mean["draft_step_beside"] / (mean["draft_feed"] + mean["adapter"]),
        round_trip_ms=mean["round_trip"],
        draft_prefill_round1_ms=mean["draft_prefill_round1"],
        target_prefill_shared_ms=shared if plan.round1 != plan.decode else None,
        baseline_prefill_ms=base_prefill,
        baseline_token_ms=base_token,
        head_token_ms=mean.get("head_token"),
        solo_prefill_ms=mean.get("solo_prefill"),
        solo_token_ms=mean.get("solo_step"),
        solo_verify_points=(
            tuple((k, mean[f"solo_verify_{k}"]) for k in verify_drafts)
            if "solo_step" in mean
            else None
        ),
        name=name,
        source=source or f"probes on {device}",
        meta={
            **(models.meta or {}),
            "device": str(device),
            "threads": asdict(plan),
            "drafter_threads": runner.threads,
            "torch": str(torch.__version__),
            "repeats": repeats,
            "context_tokens": context,
            "baselines": lines,
        },
    )


def _head_probe(head: HeadDrafter, sigma: torch.Tensor, answer: Sequence[int], clock, burst=6):
    """The probe of a head draft: ``burst`` drafts back to back after ``len(answer)`` pairs
    read (a round's drafting, each a head step and the target's ``lm_head`` read), per draft;
    the cache rewound, untimed, before each burst."""
    answer = list(answer)[: head.head.max_len - burst]  # room for the timed pairs
    cache = head.head.new_cache()
    dtype = head.head.out.weight.dtype
    states = sigma[:, -1:].to(dtype).expand(1, len(answer), -1)  # (1, n, D): any states do
    with torch.inference_mode():
        head.head.step(cache, states, torch.tensor([list(answer)], device=sigma.device))
    context = cache.length
    first = (states[:, :1], torch.tensor([[answer[-1]]], device=sigma.device))

    @torch.inference_mode()
    def drafts():
        pair, token = first
        for _ in range(burst):
            pair = head.head.step(cache, pair, token)
            token = (pair[0, -1] @ head.weight).argmax().view(1, 1)  # as a fixed policy drafts
        return int(token)

    def probe() -> dict[str, list[float]]:
        cache.rewind(context)
        return {"head_token": [clock(drafts) / burst]}

    return probe


# ------------------------------------------------------------------------------ command line


def random_models(
    world_cfg: dict,
    adapter_cfg: dict,
    device: str,
    question: str,
    seed: int = 0,
    head_cfg: dict | None = None,
):
    """Randomly initialised models of a mini world's sizes with one question's inputs:
    ``(target, AdapterDrafter, TargetInputs, DraftInputs, meta, HeadDrafter or None)``."""
    from cross_modal_sd.adapters import build_adapter
    from cross_modal_sd.models.architectures import build_draft, build_target
    from cross_modal_sd.models.prompts import encode_draft_prompt, encode_target_prompt
    from cross_modal_sd.models.wrappers import DraftDecoder
    from cross_modal_sd.world.config import MiniWorldConfig
    from cross_modal_sd.world.tokenizer import build_tokenizer, text_vocab_limit

    torch.manual_seed(seed)
    world = MiniWorldConfig.from_dict(world_cfg)
    tok = build_tokenizer()
    size, frames, events = world.image_size, world.n_frames, world.event_frames
    dev = torch.device(device)
    target_model = build_target(tok, world.target_tower, world.target_decoder, size, frames)
    draft_model = build_draft(
        tok, world.draft_tower, world.draft_decoder, world.draft_image_size, events
    )
    limit = text_vocab_limit(tok)
    target = TargetDecoder(target_model.to(dev).eval(), limit)
    draft = DraftDecoder(draft_model.to(dev).eval(), limit)
    adapter = build_adapter(adapter_cfg, world.draft_decoder.hidden, world.target_decoder.hidden)
    n_video = frames * world.target_tower.tokens(size)
    t_in = TargetInputs(
        torch.tensor([encode_target_prompt(tok, question, n_video)], device=dev),
        torch.randn(1, frames, 3, size, size, device=dev),
    )
    side = world.draft_image_size
    d_in = DraftInputs(
        torch.tensor([encode_draft_prompt(tok, question)], device=dev),
        torch.randn(1, events, 3, side, side, device=dev),
    )
    meta = {
        "models": f"mini world sizes ({world.regime}), random weights",
        "target_decoder": asdict(world.target_decoder),
        "draft_decoder": asdict(world.draft_decoder),
        "video_tokens": n_video,
        "adapter": adapter_cfg.get("name"),
    }
    drafter = AdapterDrafter(draft, adapter.to(dev).eval(), target.head)
    head = None
    if head_cfg:
        hidden = world.target_decoder.hidden
        cfg = {**head_cfg, "vocab_size": int(target.lm_head_weight.shape[0])}
        head = HeadDrafter(build_adapter(cfg, hidden, hidden).to(dev).eval(), target.head)
        meta["head"] = head_cfg.get("name")
    return target, drafter, t_in, d_in, meta, head


@hydra.main(config_path="../../conf", config_name="measure", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from cross_modal_sd.decoding import wrapper_greedy
    from cross_modal_sd.decoding.budget import Budget

    budget = Budget(int(cfg.cores), cfg.deployment, int(cfg.draft_cores), cfg.device)
    head_cfg = cfg.get("head")
    target, drafter, t_in, d_in, meta, head = random_models(
        OmegaConf.to_container(cfg.models.world, resolve=True),
        OmegaConf.to_container(cfg.adapter, resolve=True),
        cfg.device,
        cfg.question,
        head_cfg=OmegaConf.to_container(head_cfg, resolve=True) if head_cfg else None,
    )
    decode = int(cfg.threads or len(budget.target_cores))
    with budget.pinned(), budget.runner(drafter) as runner:
        models = ProfileModels(
            target,
            runner,
            t_in,
            d_in,
            baselines={"loop": lambda spec: wrapper_greedy(target, t_in, spec, warmup=0)},
            meta={**meta, "budget": budget.to_dict()},
            sd_context=lambda: budget.pinned(budget.sd_cores),
            head=head,
            solo_context=(
                (lambda: budget.pinned(budget.target_cores))
                if head is not None and budget.target_cores != budget.sd_cores
                else None
            ),
            solo_threads=decode,
        )
        with thread_budget(decode):
            profile = measure_profile(
                models, budget.plan(decode), repeats=int(cfg.repeats), baseline="loop"
            )
    path = save_profile(profile, Path(cfg.out))
    print(f"wrote {path}")
    print(OmegaConf.to_yaml(OmegaConf.create(profile.to_dict())))


def main() -> None:
    """``python -m cross_modal_sd.speedup.measure [overrides]`` (see conf/measure.yaml)."""
    from cross_modal_sd.config import register_resolvers

    register_resolvers()
    _main()


if __name__ == "__main__":
    main()
