"""Measure a cost profile (`speedup_model.CostProfile`) on the current device.

Every cost is timed through the calls the SD loop itself makes (`TargetDecoder.prefill`,
`speculative.verify`, `AdapterDrafter.prefill/next_token/feed/rewind`, `speculative_generate`,
the baseline's `hf_greedy`) with synchronised timers (`decoding.timing`), and in the context a
run gives them: probes interleaved in a shuffled order, decode steps back to back after a
concurrent round 1, the baseline right after an SD run. On tiny CPU models, where Python
overhead and cache state weigh as much as arithmetic, costs timed in isolation come out 10-20%
below what a run pays (see `measure_profile`).

Costs do not depend on weight values, so the default measures randomly initialised models of
the mini world's sizes (no build, no download)::

    python -m cross_modal_sd.analysis.cost_profile --out mini_cpu.json
    python -m cross_modal_sd.analysis.cost_profile --device cuda --adapter L4 --out gpu.json

`evaluate.py` calls `measure_profile` on its loaded models (`pair_models`), so its predictions
use costs of the same run.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from cross_modal_sd.adapters import build_adapter
from cross_modal_sd.analysis.speedup_model import CostProfile, fit_line, save_profile
from cross_modal_sd.decoding import (
    AdapterDrafter,
    DraftInputs,
    DraftPolicy,
    GreedySpec,
    SDConfig,
    TargetInputs,
    TargetState,
    hf_greedy,
    speculative_generate,
    thread_budget,
    time_call,
    verify,
)
from cross_modal_sd.models.wrappers import DraftDecoder, TargetDecoder, crop_cache

DEFAULT_QUESTION = "what colour is the car in the near lane ?"
VERIFY_DRAFTS = (1, 2, 4, 8, 16)
TAIL_STEPS = 8


@dataclass
class ProfileModels:
    """What `measure_profile` times: the target, the cross-modal drafter, one sample's inputs and
    the EOS id the runs stop at (the baseline's stopping check is part of its per-token cost)."""

    target: TargetDecoder
    drafter: AdapterDrafter
    target_inputs: TargetInputs
    draft_inputs: DraftInputs
    meta: dict[str, Any]
    eos_token_id: int | None = None


def mini_models(
    adapter: str = "L1", device: str = "cpu", question: str = DEFAULT_QUESTION, seed: int = 0
) -> ProfileModels:
    """Randomly initialised models of the default mini world's sizes, with one sample's inputs.

    The sizes come from `MiniWorldConfig()` (towers, decoders, frames, image size), so the
    profile follows the world's config; the adapter is built by level name at the decoder widths.
    """
    from cross_modal_sd.models.mini import build_draft, build_target
    from cross_modal_sd.models.prompts import encode_draft_prompt, encode_target_prompt
    from cross_modal_sd.world.build import MiniWorldConfig
    from cross_modal_sd.world.tokenizer import build_tokenizer, text_vocab_limit

    torch.manual_seed(seed)
    world = MiniWorldConfig()
    tok = build_tokenizer()
    size, frames, events = world.image_size, world.n_frames, world.event_frames
    target_model = build_target(tok, world.target_tower, world.target_decoder, size, frames)
    draft_model = build_draft(tok, world.draft_tower, world.draft_decoder, size, events)
    dev = torch.device(device)
    target_model.to(dev).eval()
    draft_model.to(dev).eval()
    limit = text_vocab_limit(tok)
    target = TargetDecoder(target_model, limit)
    draft = DraftDecoder(draft_model, limit)
    adapt = build_adapter(adapter, world.draft_decoder.hidden, world.target_decoder.hidden)
    n_video = frames * world.target_tower.tokens(size)
    t_in = TargetInputs(
        torch.tensor([encode_target_prompt(tok, question, n_video)], device=dev),
        torch.randn(1, frames, 3, size, size, device=dev),
    )
    d_in = DraftInputs(
        torch.tensor([encode_draft_prompt(tok, question)], device=dev),
        torch.randn(1, events, 3, size, size, device=dev),
    )
    meta = {
        "models": "mini world sizes, random weights",
        "target_decoder": asdict(world.target_decoder),
        "draft_decoder": asdict(world.draft_decoder),
        "video_tokens": n_video,
        "target_prompt_tokens": t_in.input_ids.shape[1],
        "draft_prompt_tokens": d_in.input_ids.shape[1],
        "adapter": adapter,
    }
    drafter = AdapterDrafter(draft, adapt.to(dev).eval(), target.logits)
    return ProfileModels(target, drafter, t_in, d_in, meta, tok.eos_token_id)


def pair_models(pair, adapter, sample) -> ProfileModels:
    """`ProfileModels` of a loaded pair (`extract.PairModels`), an adapter and one sample
    (`extract.PairSample`): what `evaluate.py` times, so its profile is of the same run."""
    t_model, d_model = pair.target.model, pair.draft.model
    d_dtype = next(d_model.parameters()).dtype
    dev = t_model.device
    return ProfileModels(
        target=pair.target,
        drafter=AdapterDrafter(pair.draft, adapter, pair.target.logits),
        target_inputs=TargetInputs(sample.target_ids.to(dev), sample.frames.to(dev, t_model.dtype)),
        draft_inputs=DraftInputs(sample.draft_ids.to(dev), sample.event_pixels.to(dev, d_dtype)),
        meta={
            "models": f"{pair.target_id} / {pair.draft_id}",
            "target_prompt_tokens": sample.target_ids.shape[1],
            "draft_prompt_tokens": sample.draft_ids.shape[1],
            "adapter": getattr(adapter, "name", None),
        },
        eos_token_id=pair.eos_id,
    )


def measure_profile(
    models: ProfileModels,
    repeats: int = 10,
    context: int = 16,
    verify_drafts: Sequence[int] = VERIFY_DRAFTS,
    baseline_lengths: Sequence[int] = (4, 8, 16),
    name: str = "",
    source: str = "",
) -> CostProfile:
    """Times every cost of the speedup model on `models` (under the caller's thread budget).

    Each round runs every probe once, in a fresh shuffled order (no probe always follows the
    same one); ``repeats`` rounds follow a warm-up round and each cost is the mean of its calls
    (the occasional stall of a busy machine is part of what runs pay). The probes:

    * ``P_t``, ``V(k)``, ``P_d``: single calls (a verify follows drafting in a run).
    * ``T_d``, ``A``: a drafting round — a resync feed, then proposals and feeds alternating.
    * round 1 and ``T_t``: `speculative_generate` with an autoregressive tail, round-1 drafts
      fixed at 1, about half and all of what the solo costs say fits in the target prefill,
      and ``gamma="prefill"``. Round 1 is ``total - decode - verify``;
      ``round1 - max(P_t, J_d) = contention * min(P_t, J_d) + overhead`` is fitted to these
      (both clipped to >= 0, ``J_d`` the draft's job for the drafts it proposed);
      ``prefill_drafts_measured`` is the ``gamma="prefill"`` runs' mean draft count; ``T_t``
      is the tails' time per step (decode steps run back to back after a concurrent round).
    * the baseline: `hf_greedy` at each cap, each right after an untimed SD run (as in a run,
      where it follows another method); a line through (tokens - 1, ms).

    No inference mode is set around the probes: the runs have none either (the model calls set
    their own), and tiny models run measurably faster inside one.

    Args:
        models: target, drafter and inputs (`mini_models`, or a run's loaded pair).
        repeats: rounds of timed calls.
        context: answer tokens already in the caches when decode and verify steps are timed
            (steps cost more as the context grows; the mid-answer context is representative).
        verify_drafts: draft counts ``k`` at which ``V(k)`` is measured.
        baseline_lengths: answer caps of the baseline's ``generate``; a line fitted to
            (tokens generated - 1, ms) gives its prefill and per-token cost (empty: none).
        name: profile label.
        source: where the numbers come from (default: the device and models).

    Raises:
        RuntimeError: the baseline generated the same length at every cap (no slope).
    """
    target, drafter = models.target, models.drafter
    t_in, d_in = models.target_inputs, models.draft_inputs
    device = t_in.device
    limit = target.vocab_limit
    gen = torch.Generator().manual_seed(0)
    answer = torch.randint(3, limit, (context + 1,), generator=gen).tolist()

    def prefill():
        out = target.prefill(t_in.input_ids, t_in.pixel_values_videos)
        return out, int(out.logits[0, -1].argmax())

    out, _ = prefill()
    prompt_len = out.cache.get_seq_length()
    target.forward_tokens(torch.tensor([answer[:-1]], device=device), out.cache)
    state = TargetState(out.cache, prompt_len, answer)
    base_len = out.cache.get_seq_length()  # prompt + answer[:-1]

    def step(drafts):
        def run():
            crop_cache(state.cache, base_len)
            return verify(target, state, drafts)

        return run

    d_state = drafter.feed(drafter.prefill(d_in), answer[:-1])
    n_fed = len(d_state.fed)

    def clock(fn) -> float:
        return time_call(fn, warmup=0, device=device)[1]

    # Each probe returns {cost: [ms, ...]}. Back-to-back steps are the fallback for T_t when the
    # SD probes' tails have no autoregressive step (answers ending at the first token).
    def decode_steps():
        return {"target_step": [clock(step([])) for _ in range(6)]}

    def draft_round():
        # The resync after a rejection (forget the last fed token, read one), then proposals
        # and feeds alternating as `propose` runs them.
        out = {"draft_feed": [], "adapter": []}
        state = drafter.rewind(d_state, n_fed - 1)
        for t in answer[-1:] + answer[:3]:
            state, ms = time_call(partial(drafter.feed, state, [t]), warmup=0, device=device)
            out["draft_feed"].append(ms)
            out["adapter"].append(clock(partial(drafter.next_token, state)))
        return out

    def single(key, fn):
        return lambda: {key: [clock(fn)]}

    probes = {
        "target_prefill": single("target_prefill", prefill),
        "target_step": decode_steps,
        **{
            f"verify_{k}": single(
                f"verify_{k}", step(torch.randint(3, limit, (k,), generator=gen).tolist())
            )
            for k in verify_drafts
        },
        "draft_prefill": single("draft_prefill", lambda: drafter.prefill(d_in)),
        "draft_round": draft_round,
    }
    # Probes that time themselves and whose records are needed.
    recorded = {}
    before_baseline = SDConfig(policy=DraftPolicy(gamma=2), max_new_tokens=6)
    for m in baseline_lengths:
        spec = GreedySpec(m, limit, models.eos_token_id)

        def baseline(spec=spec):
            # Untimed: in a run the baseline follows another method, mostly an SD run whose
            # two threads and two models leave caches and scheduling in another state.
            speculative_generate(target, drafter, t_in, d_in, before_baseline)
            return hf_greedy(target.model, t_in, spec, warmup=0)

        recorded[f"baseline_{m}"] = baseline
    solo = max(2, min(_solo_prefill_drafts(models), 32))
    policies = [DraftPolicy(gamma=g) for g in sorted({1, max(1, solo // 2), solo})]
    policies.append(DraftPolicy(gamma="prefill", max_drafts=32))
    for policy in policies:
        cap = 2 * solo if policy.gamma == "prefill" else policy.round_cap(first_round=True)
        # The autoregressive tail (up to TAIL_STEPS) times the decode steps as the loop runs
        # them: back to back, right after a concurrent round 1.
        config = SDConfig(
            policy=policy, decode="autoregressive", max_new_tokens=cap + 1 + TAIL_STEPS
        )
        recorded[f"round1_{policy.name}"] = partial(
            speculative_generate, target, drafter, t_in, d_in, config
        )

    times: dict[str, list[float]] = {}
    records: dict[str, list[Any]] = {k: [] for k in recorded}
    order = random.Random(0)
    for i in range(repeats + 1):  # round 0 warms up
        # A fresh order each round: no probe always follows the same one.
        keys = [*probes, *recorded]
        order.shuffle(keys)
        for key in keys:
            if key in probes:
                for cost, ms in probes[key]().items():
                    if i:
                        times.setdefault(cost, []).extend(ms)
            else:
                record = recorded[key]()
                if i:
                    records[key].append(record)
    mean = {k: statistics.mean(v) for k, v in times.items()}

    base_prefill = base_token = None
    if baseline_lengths:
        # Trained models end at EOS whatever the cap: fit to the lengths actually generated.
        lengths = [
            (len(runs[0].tokens) - 1, statistics.mean(r.total_ms for r in runs))
            for key, runs in records.items()
            if key.startswith("baseline_")
        ]
        if len({n for n, _ in lengths}) < 2:
            raise RuntimeError(
                f"baseline: generate gave {lengths[0][0] + 1} tokens at every cap "
                f"{list(baseline_lengths)}; pass shorter baseline_lengths"
            )
        base_prefill, base_token = fit_line(lengths)

    profile = CostProfile(
        target_prefill_ms=mean["target_prefill"],
        target_token_ms=mean["target_step"],
        verify_points=tuple((k, mean[f"verify_{k}"]) for k in verify_drafts),
        draft_prefill_ms=mean["draft_prefill"],
        draft_token_ms=mean["draft_feed"],
        adapter_ms=mean["adapter"],
        baseline_prefill_ms=base_prefill,
        baseline_token_ms=base_token,
        name=name,
        source=source or f"measured on {device} ({torch.get_num_threads()} threads)",
        meta={
            **models.meta,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "repeats": repeats,
            "context_tokens": context,
        },
    )
    sd_runs = [r for key, runs in records.items() if key.startswith("round1_") for r in runs]
    # Autoregressive steps: target forwards after the prefill and round 1's verify, if any.
    steps = sum(r.target_forwards - 1 - int(r.verify_ms > 0) for r in sd_runs)
    if steps:
        profile = profile.with_(target_token_ms=sum(r.decode_ms for r in sd_runs) / steps)
    probes = []  # [drafts, solo draft job ms, round-1 ms]
    for key, runs in records.items():
        if key.startswith("round1_"):
            drafts = statistics.mean(r.drafted[0] for r in runs)
            round1 = statistics.mean(r.total_ms - r.decode_ms - r.verify_ms for r in runs)
            probes.append([drafts, profile.draft_prefill_ms + profile.drafting_ms(drafts), round1])
    xs = [min(profile.target_prefill_ms, job) for _, job, _ in probes]
    ys = [r1 - max(profile.target_prefill_ms, job) for _, job, r1 in probes]
    if max(xs) - min(xs) > 1e-6 * max(xs):
        contention = max(0.0, fit_line(list(zip(xs, ys, strict=True)))[1])
    else:  # every probe overlapped the same span: all of it counts as fixed overhead
        contention = 0.0
    overhead = max(0.0, statistics.mean(y - contention * x for x, y in zip(xs, ys, strict=True)))
    return profile.with_(
        contention=contention,
        round1_overhead_ms=overhead,
        prefill_drafts_measured=probes[-1][0],
        meta={**profile.meta, "round1_probes": probes},
    )


def _solo_prefill_drafts(models: ProfileModels) -> int:
    """Drafts that fit in the target prefill by a quick solo timing (sizes the round-1 probes)."""
    t_in, d_in, drafter = models.target_inputs, models.draft_inputs, models.drafter
    device = t_in.device
    p_t = time_call(
        lambda: models.target.prefill(t_in.input_ids, t_in.pixel_values_videos), 1, 3, device
    )[1]
    state, p_d = time_call(lambda: drafter.prefill(d_in), 1, 3, device)
    step = time_call(lambda: drafter.feed(drafter.rewind(state, 0), [0]), 1, 3, device)[1]
    return max(1, math.ceil((p_t - p_d + step) / step))


def main(argv: Sequence[str] | None = None) -> Path:
    """Command line: measure a profile of the mini world's sizes and write it as JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m cross_modal_sd.analysis.cost_profile",
        description="Measure the speedup model's cost profile on this device (random weights).",
    )
    parser.add_argument("--out", default="cost_profile.json", help="JSON file to write")
    parser.add_argument("--name", default=None, help="profile label (default: mini_<device>)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (as evaluate.py's `threads`)"
    )
    parser.add_argument(
        "--adapter", default="L1", help="adapter level whose per-draft cost is timed"
    )
    parser.add_argument(
        "--repeats", type=int, default=10, help="timed rounds of all probes (means kept)"
    )
    args = parser.parse_args(argv)
    with thread_budget(args.threads):
        models = mini_models(args.adapter, args.device)
        name = args.name or f"mini_{torch.device(args.device).type}"
        profile = measure_profile(models, repeats=args.repeats, name=name)
    path = save_profile(profile, args.out)
    a, b = profile.verify_line
    print(
        f"{name}: P_t {profile.target_prefill_ms:.2f}  T_t {profile.target_token_ms:.3f}  "
        f"V(k) {a:.3f} + {b:.4f} k  P_d {profile.draft_prefill_ms:.2f}  "
        f"T_d {profile.draft_token_ms:.3f}  A {profile.adapter_ms:.3f}  "
        f"contention {profile.contention:.2f} (+{profile.round1_overhead_ms:.2f} ms)  "
        f"baseline {profile.baseline_prefill_ms:.2f} + {profile.baseline_token_ms:.3f}/token ms -> {path}"
    )
    return path


if __name__ == "__main__":
    main()
