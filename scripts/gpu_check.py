"""GPU check: the pair's costs at the real shapes and lossless SD on the device, in one command
that prints one report and writes one JSON file (`cross_modal_sd.speedup.load_profile` reads its
``cost_profile`` entry directly).

    python scripts/gpu_check.py                                  # random 7B pair + mini world
    python scripts/gpu_check.py --adapter checkpoints/<run>/best_model.pt --mini-samples 100
    python scripts/gpu_check.py --shapes tiny --device cpu --dtype float32   # seconds on a CPU
    python scripts/gpu_check.py --target LanguageBind/Video-LLaVA-7B-hf \\
        --draft <EventGPT-7B dir> [--clip <CLIP ViT-L/14-336 dir>] [--dsec-root <DSEC root>] \\
        [--adapter <best_model.pt of a 4096-wide cache>] [--quantization 4bit]

Pair section. Without --target/--draft the two models are built with random weights directly on
the device in --dtype (costs do not depend on weight values): Video-LLaVA-7B (Llama-7B decoder,
CLIP ViT-L/14 at 224 over 8 frames = 2056 video tokens) and EventGPT-7B (Vicuna-7B decoder, CLIP
ViT-L/14-336 over --event-frames images pooled to T + 577 tokens), prompted with random ids at
the real prompts' lengths; `--shapes tiny` scales every dimension down. With --target/--draft the
released checkpoints are loaded and asked about one DSEC clip (--dsec-root) or a synthetic one.
First the baseline (`generate`, greedy) on the sample; then the pair's cost profile, measured by
the one harness evaluation uses (`cross_modal_sd.speedup.measure.measure_profile`: the mean of
--repeats rounds of shuffled probes after a warm-up round): target prefill, target ms per token,
one verification of k drafts for every k in --ks, draft prefill, draft ms per token, adapter ms
per draft, the target's prefill slowdown with the drafter working beside it, the round trip to
the drafter, and `generate`'s line over answer lengths; then one SD run (--gamma drafts per round,
draft_model phase) on the same sample, and whether SD reproduced the baseline token for token.
The drafter runs on a `LocalRunner` (a thread here, on its own CUDA stream on a GPU). Without a
fitting --adapter the drafter uses an untrained L1 adapter: acceptance is then meaningless, costs
and losslessness are not.

Mini-world section (by default with random weights; `--mini-samples N` turns it on with
checkpoints too): the built mini world (docs/design.md §5; --mini-root: a directory of builds,
where the default world is built on the CPU in a few minutes if missing, or one build directory)
moved to the device in --dtype; SD as `evaluate.py` runs it (`AdapterDrafter` over --adapter or
an untrained L1, `conf/decoding/draft_model.yaml`, target and draft concurrently on their own
CUDA streams) against the baseline on N test samples: the lossless rate, accepted drafts, tokens
per target forward and the wall-clock ratio. In bf16 an argmax can legitimately flip on a near-tie
between the baseline's one-token steps and a multi-token verification; the rate is reported as
measured.

Estimated time on one H100/H200 (not measured: no GPU here), from FLOPs and typical eager-mode
step costs: ~20 s to import and initialise both 7B models on the device; ~40 s of pair timing
(target prefill ~29 TFLOP ≈ 60-100 ms, per-token steps and verifications ≈ 15-30 ms each, six
rounds of probes including `generate` at 1, 15 and 30 tokens, SD with an untrained adapter ≈ 30
rounds of 5 draft steps); ~30 s for 50 mini samples; about 1.5-2 minutes in all with a built mini
world, plus ~4 minutes of CPU training when it must be built.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cross_modal_sd.config import group_option
from cross_modal_sd.data.dsec import SENSOR_SIZE
from cross_modal_sd.data.events import EventStream
from cross_modal_sd.decoding import (
    AdapterDrafter,
    DecodeSpec,
    DraftInputs,
    DraftPolicy,
    LocalRunner,
    SDConfig,
    TargetInputs,
    ThreadPlan,
    hf_greedy,
    speculative_generate,
    thread_budget,
)
from cross_modal_sd.models.architectures import PAIR_SHAPES, VIDEO_FRAMES, PairShapes, random_pair
from cross_modal_sd.models.prompts import EVENT_PLACEHOLDER_ID
from cross_modal_sd.models.real import TEXT_VOCAB, resolve_dtype
from cross_modal_sd.models.wrappers import DraftDecoder, TargetDecoder
from cross_modal_sd.speedup import CostProfile
from cross_modal_sd.speedup.measure import ProfileModels, measure_profile
from cross_modal_sd.world.config import MiniWorldConfig

QUESTION = "What is happening in this driving scene?"
EOS_ID = 2  # Vicuna's </s>
# Text ids around the visual block in the real prompts with a ~10-word question (Llama tokenizer,
# BOS included): `USER: <video>\n{q} ASSISTANT:` and EventGPT's Vicuna v1 system prompt +
# `USER: <event>\n{q} ASSISTANT:`. Estimates within a few ids; the visual blocks dominate.
TARGET_TEXT_IDS = (5, 16)
DRAFT_TEXT_IDS = (38, 16)
MINI_DECODING = ("decoding", "draft_model")  # conf/decoding/draft_model.yaml
MISMATCHES_KEPT = 10
BASELINE = "baseline"
BASELINE_LOOP = "generate"  # the baseline loop of the cost profile (HF greedy `generate`)


def _ks(text: str) -> list[int]:
    try:
        ks = sorted({int(k) for k in str(text).split(",") if k.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated integers, got {text!r}"
        ) from None
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError(f"needs at least one k >= 1, got {text!r}")
    return ks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see the module docstring); inconsistent ones exit with a message."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    real = p.add_argument_group("checkpoints (both or neither; without them: random weights)")
    real.add_argument("--target", default=None, help="Video-LLaVA directory or hub id")
    real.add_argument("--draft", default=None, help="EventGPT checkpoint directory")
    real.add_argument("--clip", default=None, help="CLIP ViT-L/14-336 dir (if not resolvable)")
    real.add_argument("--tokenizer", default=None, help="tokenizer directory (default: target's)")
    real.add_argument("--quantization", default=None, choices=["4bit"], help="bitsandbytes NF4")
    real.add_argument("--dsec-root", default=None, help="DSEC root; its first clip is the sample")
    real.add_argument("--clip-ms", type=float, default=1000, help="DSEC clip length (ms)")
    real.add_argument("--event-ms", type=float, default=None, help="events of the clip's last ms")
    real.add_argument("--question", default=QUESTION, help="question asked about the sample")
    p.add_argument(
        "--shapes",
        default=None,
        choices=sorted(PAIR_SHAPES),
        help="random-weight sizes: real (7B pair, default) | tiny (every dimension scaled down)",
    )
    p.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="parameter dtype of every model (auto: bf16 on CUDA, fp32 on CPU)",
    )
    p.add_argument("--seed", type=int, default=0, help="random weights, ids and pixels")
    p.add_argument("--event-frames", type=int, default=5, help="event images the draft reads")
    p.add_argument("--max-new-tokens", type=int, default=30, help="answer cap of the pair run")
    p.add_argument("--gamma", type=int, default=5, help="drafts per round of the pair's SD run")
    p.add_argument("--ks", type=_ks, default="1,2,4,8,16,32", help="verify draft counts k")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds of every cost probe (mean)")
    p.add_argument(
        "--adapter",
        default=None,
        help="exported best_model.pt: for the mini world with random weights, for the pair with "
        "checkpoints (default: an untrained L1)",
    )
    p.add_argument("--mini-root", default="checkpoints/mini", help="mini-world builds, or one")
    p.add_argument(
        "--mini-samples",
        type=int,
        default=None,
        help="mini-world test samples (default: 50 with random weights, 0 = skip with checkpoints)",
    )
    p.add_argument(
        "--mini-strategies", default="sd_fixed", help="evaluate.py strategy names, comma-separated"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: 1 on CPU, as evaluate.py, where more threads "
        "spin-wait on tiny ops; unchanged on CUDA)",
    )
    p.add_argument("--out", default="gpu_check.json", help="JSON report path")
    args = p.parse_args(argv)

    args.checkpoints = args.target is not None or args.draft is not None
    if args.checkpoints and (args.target is None or args.draft is None):
        p.error("--target and --draft go together (give both, or neither for random weights)")
    if args.checkpoints and args.shapes is not None:
        p.error("--shapes sizes random weights; it cannot apply to --target/--draft checkpoints")
    if not args.checkpoints:
        given = [
            f"--{name.replace('_', '-')}"
            for name in ("clip", "tokenizer", "quantization", "dsec_root")
            if getattr(args, name) is not None
        ]
        if given:
            p.error(f"{', '.join(given)} need --target/--draft (random weights read no files)")
    args.shapes = args.shapes or "real"
    if args.mini_samples is None:
        args.mini_samples = 0 if args.checkpoints else 50
    for name, low in (
        ("repeats", 1),
        ("max_new_tokens", 2),
        ("gamma", 1),
        ("event_frames", 1),
        ("mini_samples", 0),
    ):
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.threads is None and not str(args.device).startswith("cuda"):
        args.threads = 1
    if args.adapter is not None and not Path(args.adapter).is_file():
        p.error(f"--adapter {args.adapter}: no such file (pass an exported best_model.pt)")
    args.mini_strategies = [s.strip() for s in args.mini_strategies.split(",") if s.strip()]
    if args.mini_samples:
        from cross_modal_sd.evaluation.strategies import parse_strategies

        try:
            sd = parse_strategies(args.mini_strategies, group_option(*MINI_DECODING), 2, None)
        except ValueError as err:
            p.error(f"--mini-strategies: {err}")
        if not sd or any(s.kind != "sd" for s in sd):
            p.error(f"--mini-strategies takes SD strategies only, got {args.mini_strategies}")
    return args


def models_config(args: argparse.Namespace) -> dict[str, Any]:
    """The `conf/models/eventgpt_videollava.yaml` node these arguments describe."""
    return {
        "kind": "eventgpt_videollava",
        "target": args.target,
        "draft": args.draft,
        "clip": args.clip,
        "tokenizer": args.tokenizer,
        "device": args.device,
        "dtype": args.dtype,
        "quantization": args.quantization,
        "vocab_limit": TEXT_VOCAB,
        "n_frames": VIDEO_FRAMES,
        "event_frames": args.event_frames,
        "max_new_tokens": args.max_new_tokens,
    }


def baseline_lengths(max_new_tokens: int) -> list[int]:
    """Answer lengths the cost profile times the baseline at: the prefill alone, half the cap
    and the cap (at least two distinct lengths: `--max-new-tokens` is >= 2)."""
    return sorted({1, max(2, max_new_tokens // 2), max_new_tokens})


# ---------------------------------------------------------------------------------- progress


@dataclass
class Progress:
    """One printed line as each stage starts; the stages' seconds for the report."""

    start: float = field(default_factory=time.perf_counter)
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, key: str, text: str) -> Iterator[None]:
        """Prints `text` with the time so far and records the body's seconds under `key`."""
        t0 = time.perf_counter()
        print(f"[gpu_check {t0 - self.start:6.1f} s] {text}", flush=True)
        try:
            yield
        finally:
            self.seconds[key] = round(time.perf_counter() - t0, 2)

    @property
    def total_s(self) -> float:
        return round(time.perf_counter() - self.start, 1)


# -------------------------------------------------------------------------------- the pair


@dataclass
class CheckPair:
    """What the pair section times: both decoders, one sample's inputs and what to report.

    `loaded` is the `cross_modal_sd.pair.PairModels` of released checkpoints (None for random
    weights): an --adapter is checked against it before any timing.
    """

    target: TargetDecoder
    draft: DraftDecoder
    target_inputs: TargetInputs
    draft_inputs: DraftInputs
    eos_id: int | None
    models: dict[str, Any]
    sample: dict[str, Any]
    decode: Any = None  # token ids -> text (None: no tokenizer)
    shapes: dict[str, Any] | None = None
    loaded: Any = None


def synthetic_clip(seed: int = 0) -> tuple[np.ndarray, EventStream]:
    """Eight random 480x640 frames and 200k random events over 50 ms, at DSEC's sizes."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (8, *SENSOR_SIZE, 3), dtype=np.uint8)
    n = 200_000
    events = EventStream(
        x=rng.integers(0, SENSOR_SIZE[1], n),
        y=rng.integers(0, SENSOR_SIZE[0], n),
        t=np.sort(rng.integers(0, 50_000, n)),
        p=rng.integers(0, 2, n),
    )
    return frames, events


def sample_inputs(pair, args: argparse.Namespace) -> tuple[TargetInputs, DraftInputs, str]:
    """Both checkpoints' inputs for the check's one sample, on the models' device and dtype.

    Raises:
        ValueError: --dsec-root holds no clip.
    """
    spec = pair.inputs
    if args.dsec_root:
        from cross_modal_sd.pair import DsecSource

        source = DsecSource(
            root=args.dsec_root,
            split="train",
            start=0,
            count=1,
            clip_ms=args.clip_ms,
            event_ms=args.event_ms,
            n_frames=spec.n_frames,
            questions=[args.question],
            val_fraction=0,  # every sequence in one split: the root's first clip is the sample
            test_fraction=0,
        )
        first = next(source.samples(pair), None)
        if first is None:
            raise ValueError(f"--dsec-root {args.dsec_root}: no clip of {args.clip_ms} ms found")
        sample_id, sample = first
        ids_t, frames, ids_d, events = (
            sample.target_ids,
            sample.frames,
            sample.draft_ids,
            sample.event_pixels,
        )
        source_name = f"DSEC {sample_id}"
    else:
        images, stream = synthetic_clip()
        ids_t, frames = spec.target_ids(args.question), spec.frames(images)
        ids_d = spec.draft_ids(args.question)
        events = spec.event_pixels(stream, SENSOR_SIZE, "synthetic events")
        source_name = "synthetic (random frames and events)"
    t, d = pair.target.model, pair.draft.model
    return (
        TargetInputs(ids_t.to(t.device), frames.to(t.device, t.dtype)),
        DraftInputs(ids_d.to(d.device), events.to(d.device, d.dtype)),
        source_name,
    )


def checkpoint_pair(args: argparse.Namespace) -> CheckPair:
    """The released checkpoints (`cross_modal_sd.pair.load_pair`) and one real or synthetic
    sample."""
    from cross_modal_sd.pair import load_pair

    pair = load_pair(models_config(args))
    t_in, d_in, source = sample_inputs(pair, args)
    return CheckPair(
        target=pair.target,
        draft=pair.draft,
        target_inputs=t_in,
        draft_inputs=d_in,
        eos_id=pair.eos_id,
        models={"target": args.target, "draft": args.draft},
        sample={"source": source, "question": args.question},
        decode=pair.tokenizer.decode,
        loaded=pair,
    )


def _text_ids(n: int, gen: torch.Generator) -> list[int]:
    return torch.randint(3, TEXT_VOCAB, (n,), generator=gen).tolist()


def random_inputs(
    shapes: PairShapes, event_frames: int, device: str, dtype: torch.dtype, seed: int = 0
) -> tuple[TargetInputs, DraftInputs]:
    """Random prompt ids at the real prompts' lengths (BOS first, the visual block where the
    prompts hold it) and random pixels at the towers' input sizes."""
    gen = torch.Generator().manual_seed(seed)
    n_video = VIDEO_FRAMES * shapes.tokens_per_image(shapes.frame_size)
    video_id = shapes.target_config().video_token_index
    (tb, ta), (db, da) = TARGET_TEXT_IDS, DRAFT_TEXT_IDS
    target_ids = [1, *_text_ids(tb - 1, gen), *[video_id] * n_video, *_text_ids(ta, gen)]
    draft_ids = [1, *_text_ids(db - 1, gen), EVENT_PLACEHOLDER_ID, *_text_ids(da, gen)]
    f, e = shapes.frame_size, shapes.event_size
    frames = torch.randn(1, VIDEO_FRAMES, 3, f, f, generator=gen)  # (1, F, 3, H, W)
    events = torch.randn(1, event_frames, 3, e, e, generator=gen)  # (1, T, 3, H, W)
    return (
        TargetInputs(torch.tensor([target_ids], device=device), frames.to(device, dtype)),
        DraftInputs(torch.tensor([draft_ids], device=device), events.to(device, dtype)),
    )


def _billions(model: torch.nn.Module) -> float:
    return round(sum(p.numel() for p in model.parameters()) / 1e9, 3)


def random_check_pair(args: argparse.Namespace, dtype: torch.dtype) -> CheckPair:
    """Video-LLaVA and EventGPT at `args.shapes` with random weights, on the device."""
    shapes = PAIR_SHAPES[args.shapes]
    target, draft = random_pair(shapes, args.device, dtype, args.event_frames, args.seed)
    t_in, d_in = random_inputs(shapes, args.event_frames, args.device, dtype, args.seed)
    per_frame = shapes.tokens_per_image(shapes.frame_size)
    per_event = shapes.tokens_per_image(shapes.event_size)
    label = "7B" if shapes.name == "real" else f"{shapes.name} shapes of 7B"
    return CheckPair(
        target=TargetDecoder(target, TEXT_VOCAB),
        draft=DraftDecoder(draft, TEXT_VOCAB),
        target_inputs=t_in,
        draft_inputs=d_in,
        eos_id=EOS_ID,
        models={
            "target": f"random Video-LLaVA-{label}",
            "draft": f"random EventGPT-{label}",
        },
        sample={"source": "random prompt ids at the real prompts' lengths, random pixels"},
        shapes={
            "name": shapes.name,
            "decoder": asdict(shapes.decoder),
            "tower": asdict(shapes.tower),
            "frame_size": shapes.frame_size,
            "event_size": shapes.event_size,
            "video_tokens": VIDEO_FRAMES * per_frame,
            "event_tokens": args.event_frames + per_event,
            "target_params_b": _billions(target),
            "draft_params_b": _billions(draft),
        },
    )


@torch.inference_mode()
def prompt_positions(pair: CheckPair) -> tuple[int, int]:
    """Cache positions after each model's prefill of the sample: (target, draft). The target's
    prompt holds its video tokens already; the draft's placeholder becomes its event tokens."""
    t_in, d_in = pair.target_inputs, pair.draft_inputs
    target = pair.target.prefill(t_in.input_ids, t_in.pixel_values_videos).cache
    draft = pair.draft.prefill(d_in.input_ids, d_in.event_pixels).cache
    return target.get_seq_length(), draft.get_seq_length()


def _untrained_l1(draft: DraftDecoder, target: TargetDecoder) -> tuple[torch.nn.Module, str]:
    from cross_modal_sd.adapters import build_adapter

    d_in = int(draft.lm_head_weight.shape[1])
    d_out = int(target.lm_head_weight.shape[1])
    adapter = build_adapter(group_option("adapter", "L1"), d_in, d_out)
    return adapter, "untrained L1 (acceptance meaningless)"


def pair_adapter(pair: CheckPair, adapter_path: str | None) -> tuple[torch.nn.Module, str]:
    """The pair's drafter adapter: the export at `adapter_path` (checked against the loaded
    checkpoints) or an untrained L1.

    Raises:
        cross_modal_sd.exports.ExportError: the export is unreadable or was trained for other
            models.
    """
    if not adapter_path:
        return _untrained_l1(pair.draft, pair.target)
    from cross_modal_sd.exports import check_export_fits, load_export

    export = load_export(adapter_path)
    if pair.loaded is not None:
        check_export_fits(export, pair.loaded)
    return export.adapter, adapter_path


def run_pair(
    pair: CheckPair, args: argparse.Namespace, progress: Progress, adapter_path: str | None
) -> dict[str, Any]:
    """Baseline, cost profile and one SD run of the pair; the report's pair entries."""
    t_in, d_in = pair.target_inputs, pair.draft_inputs
    device = t_in.device
    adapter, adapter_name = pair_adapter(pair, adapter_path)  # fails before any timing
    spec = DecodeSpec(args.max_new_tokens, pair.target.vocab_limit, pair.eos_id)
    with progress.stage("baseline", "pair: baseline (target generate, greedy)"):
        baseline = hf_greedy(pair.target.model, t_in, spec, warmup=1)
    answer = baseline.tokens

    drafter = AdapterDrafter(pair.draft, adapter.to(device).eval(), pair.target.head)
    plan = ThreadPlan()  # the target's threads as they are (--threads on a CPU)
    lengths = baseline_lengths(args.max_new_tokens)
    with LocalRunner(drafter, device) as runner:
        label = f"pair: cost profile (prefills, steps, verify k = {args.ks}, generate at {lengths})"
        with progress.stage("costs", label):
            target_positions, draft_positions = prompt_positions(pair)
            models = ProfileModels(
                target=pair.target,
                runner=runner,
                target_inputs=t_in,
                draft_inputs=d_in,
                baselines={
                    BASELINE_LOOP: lambda s: hf_greedy(pair.target.model, t_in, s, warmup=0)
                },
                meta={
                    "models": f"{pair.models['target']} / {pair.models['draft']}",
                    "adapter": adapter_name,
                    "dtype": str(pair.target.model.dtype).removeprefix("torch."),
                    "shapes": pair.shapes["name"] if pair.shapes else None,
                    "sample": pair.sample["source"],
                    "runner": "LocalRunner",
                    "target_prompt_positions": target_positions,
                    "draft_prompt_positions": draft_positions,
                    "baseline_lengths": lengths,
                },
            )
            profile = measure_profile(
                models,
                plan,
                repeats=args.repeats,
                verify_drafts=args.ks,
                baseline_lengths=lengths,
                baseline=BASELINE_LOOP,
                name="gpu_check",
                source=f"scripts/gpu_check.py probes on {device}",
            )
        sd_cfg = SDConfig(
            policy=DraftPolicy(kind="fixed", gamma=args.gamma),
            decode="draft_model",
            max_new_tokens=args.max_new_tokens,
            eos_token_id=pair.eos_id,
        )
        with progress.stage("sd", f"pair: speculative decoding (gamma {args.gamma}, draft_model)"):
            speculative_generate(pair.target, runner, t_in, d_in, sd_cfg, threads=plan)  # warm-up
            sd = speculative_generate(pair.target, runner, t_in, d_in, sd_cfg, threads=plan)
    sd = sd.to_dict()
    sd["lossless"] = sd["tokens"] == answer

    sample = dict(pair.sample)
    if pair.decode is not None:
        sample["answer"] = pair.decode(answer)
    return {
        "models": {**pair.models, "adapter": adapter_name},
        "dtype": str(pair.target.model.dtype).removeprefix("torch."),
        "shapes": pair.shapes,
        "sample": sample,
        "cost_profile": profile.to_dict(),
        "baseline": {"total_ms": baseline.total_ms, "n_new": baseline.n_new, "tokens": answer},
        "sd": sd,
        "ratios": cost_ratios(profile, baseline.total_ms, sd["total_ms"]),
        "concurrency": {
            "runner": "LocalRunner: "
            + ("its own CUDA stream" if device.type == "cuda" else "a thread"),
            "target_contention": profile.target_contention,
            "draft_contention": profile.draft_contention,
            "round_trip_ms": profile.round_trip_ms,
        },
    }


def cost_ratios(profile: CostProfile, baseline_ms: float, sd_ms: float) -> dict[str, float]:
    """The cost shape (docs/design.md §12: the prior pair had ~0.43, ~0.27 and ~0.7 here) from
    the profile and the measured baseline, and SD's wall-clock speedup."""
    return {
        "target_prefill_over_baseline": profile.target_prefill_ms / baseline_ms,
        "draft_prefill_over_target_prefill": profile.draft_prefill_ms / profile.target_prefill_ms,
        "draft_token_over_target_token": profile.draft_token_ms / profile.target_token_ms,
        "speedup": baseline_ms / sd_ms,
    }


# ---------------------------------------------------------------------------- the mini world


def mini_world_source(mini_root: str | Path) -> tuple[Path, MiniWorldConfig]:
    """(directory of builds, `MiniWorldConfig`) that `--mini-root` names.

    A directory holding ``BUILD.json`` is one build: its recorded config is used. Anything else
    is a directory of builds, where the default world is (built and) opened.

    Raises:
        ValueError: `mini_root` is a file, or a build whose name is not its config's digest.
    """
    root = Path(mini_root)
    if root.is_file():
        raise ValueError(f"--mini-root {root}: is a file; pass a directory of builds or one build")
    stamp = root / "BUILD.json"
    if not stamp.is_file():
        return root, MiniWorldConfig()
    try:
        config = MiniWorldConfig.from_dict(json.loads(stamp.read_text())["config"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{stamp}: no readable world config ({err!r})") from err
    if config.digest() != root.name:
        raise ValueError(
            f"--mini-root {root}: its BUILD.json config has digest {config.digest()}, not the "
            f"directory's name; pass the directory of builds that holds it"
        )
    return root.parent, config


@dataclass
class MiniCheck:
    """The mini world's pair on the CPU, its SD strategies, drafter adapter and test samples."""

    pair: Any  # cross_modal_sd.pair.PairModels
    strategies: list  # cross_modal_sd.evaluation.strategies.Strategy
    adapter: torch.nn.Module
    adapter_name: str
    samples: list  # cross_modal_sd.pair.PairSample


def prepare_mini(args: argparse.Namespace) -> MiniCheck:
    """Opens (or builds) the mini world and checks the adapter fits it, before any timing.

    Raises:
        ValueError: a bad --mini-root; `cross_modal_sd.exports.ExportError` (a ValueError) when
            --adapter was trained for other hidden sizes.
    """
    from cross_modal_sd.evaluation.strategies import parse_strategies
    from cross_modal_sd.pair import MiniSource, load_pair

    root, config = mini_world_source(args.mini_root)
    pair = load_pair({"kind": "mini", "root": str(root), "world": asdict(config)})
    decoding = group_option(*MINI_DECODING)
    strategies = parse_strategies(args.mini_strategies, decoding, pair.max_new_tokens, pair.eos_id)
    if args.adapter:
        from cross_modal_sd.exports import check_export_fits, load_export

        export = load_export(args.adapter)
        check_export_fits(export, pair)
        adapter, adapter_name = export.adapter, args.adapter
    else:
        adapter, adapter_name = _untrained_l1(pair.draft, pair.target)
    source = MiniSource(split="test", start=0, count=pair.world.config.test_scenes)
    samples = [s for _, s in islice(source.samples(pair), args.mini_samples)]
    if not samples:
        raise ValueError(f"mini world {pair.world.root}: its test split has no samples")
    return MiniCheck(pair, strategies, adapter, adapter_name, samples)


def _first_difference(a: list[int], b: list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def run_mini(
    mini: MiniCheck, args: argparse.Namespace, dtype: torch.dtype, progress: Progress
) -> dict[str, Any]:
    """SD against the baseline on the mini world's test samples, on the device in `dtype`.

    As `evaluate.py` times them: every method on every sample, the order rotating from sample
    to sample, after one untimed run of each on the first sample.
    """
    from cross_modal_sd.evaluation.report import summarize_strategy

    pair, strategies, samples = mini.pair, mini.strategies, mini.samples
    device = torch.device(args.device)
    pair.target.model.to(device, dtype).eval()
    pair.draft.model.to(device, dtype).eval()
    # As evaluation runs it: the adapter keeps its own dtype and reads casted draft states.
    drafter = AdapterDrafter(pair.draft, mini.adapter.to(device).eval(), pair.target.head)
    max_new = pair.max_new_tokens
    spec = DecodeSpec(max_new, pair.target.vocab_limit, pair.eos_id)
    configs = {s.name: s.sd for s in strategies}
    plan = ThreadPlan()

    def inputs(sample) -> tuple[TargetInputs, DraftInputs]:
        return (
            TargetInputs(sample.target_ids.to(device), sample.frames.to(device, dtype)),
            DraftInputs(sample.draft_ids.to(device), sample.event_pixels.to(device, dtype)),
        )

    methods = [BASELINE, *configs]
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    label = f"mini world: {len(samples)} test samples x {methods} on {device} {dtype}"
    with (
        progress.stage("mini_runs", label),
        thread_budget(args.threads),
        LocalRunner(drafter, device) as runner,
    ):

        def run(name: str, t_in: TargetInputs, d_in: DraftInputs) -> dict[str, Any]:
            if name == BASELINE:
                return hf_greedy(pair.target.model, t_in, spec, warmup=0).to_dict()
            return speculative_generate(
                pair.target, runner, t_in, d_in, configs[name], threads=plan
            ).to_dict()

        for m in methods:
            run(m, *inputs(samples[0]))
        for i, sample in enumerate(samples):
            t_in, d_in = inputs(sample)
            for m in methods[i % len(methods) :] + methods[: i % len(methods)]:
                runs[m].append(run(m, t_in, d_in))

    base = runs[BASELINE]
    summaries, mismatches = {}, []
    for name in configs:
        summary = summarize_strategy(name, "sd", runs[name], base, max_new)
        kept = ("method", "lossless_rate", "tau", "accept_rate", "first_round_accepted_mean")
        summaries[name] = {key: summary[key] for key in kept}
        rounds = sum(r["rounds"] for r in runs[name])
        summaries[name]["accepted_per_round"] = sum(sum(r["accepted"]) for r in runs[name]) / rounds
        summaries[name]["total_ms"] = summary["total_ms"]
        summaries[name]["overlap_share"] = summary["overlap_share"]
        summaries[name]["speedup"] = summary["speedup"]
        for sample, r, b in zip(samples, runs[name], base, strict=True):
            if r["tokens"] != b["tokens"]:
                mismatches.append(
                    {
                        "sample_id": sample.sample_id,
                        "strategy": name,
                        "first_difference": _first_difference(r["tokens"], b["tokens"]),
                        "baseline_tokens": len(b["tokens"]),
                        "sd_tokens": len(r["tokens"]),
                    }
                )
    lossless = [
        all(runs[name][i]["tokens"] == b["tokens"] for name in configs) for i, b in enumerate(base)
    ]
    return {
        "world": str(pair.world.root),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "concurrency": "CUDA streams" if device.type == "cuda" else "threads",
        "adapter": mini.adapter_name,
        "n_samples": len(samples),
        "requested_samples": args.mini_samples,
        "max_new_tokens": max_new,
        "lossless_rate": sum(lossless) / len(lossless),
        "lossless_samples": sum(lossless),
        "n_mismatches": len(mismatches),
        "mismatches": mismatches[:MISMATCHES_KEPT],
        "baseline_ms": sum(b["total_ms"] for b in base) / len(base),
        "strategies": summaries,
    }


# ------------------------------------------------------------------------------------ report


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    """Builds or loads the models and measures everything; returns the report.

    Raises:
        RuntimeError: a CUDA device asked for where torch sees none (before anything loads).
    """
    import transformers

    cuda = str(args.device).startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise RuntimeError(
            "--device cuda but torch sees no CUDA device (use --device cpu to dry-run)"
        )
    dtype = resolve_dtype(args.dtype, args.device)
    progress = Progress()
    mini = None
    if args.mini_samples:
        # Everything that can fail on a bad world or adapter fails before the long part.
        with progress.stage("mini_load", f"mini world: open (or build) under {args.mini_root}"):
            mini = prepare_mini(args)
    pair_adapter_path = args.adapter if args.checkpoints else None
    if pair_adapter_path:
        from cross_modal_sd.exports import load_export

        load_export(pair_adapter_path)  # an unreadable export fails before the 7B models load
    what = (
        f"checkpoints {args.target} / {args.draft}"
        if args.checkpoints
        else f"random weights at the {args.shapes} shapes"
    )
    with progress.stage("load", f"pair: {what} on {args.device} {dtype}"):
        pair = checkpoint_pair(args) if args.checkpoints else random_check_pair(args, dtype)
    report: dict[str, Any] = {
        "environment": {
            "device": torch.cuda.get_device_name(args.device)
            if cuda
            else platform.processor() or "cpu",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "weights": "checkpoints" if args.checkpoints else "random",
        "quantization": args.quantization,
        "load_s": round(progress.seconds["load"], 1),
    }
    with thread_budget(args.threads):
        report |= run_pair(pair, args, progress, pair_adapter_path)
    del pair  # frees the 7B pair before the mini world moves to the device
    gc.collect()
    if cuda:
        report["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(args.device) / 2**30, 2)
        torch.cuda.empty_cache()
    else:
        report["peak_memory_gib"] = None
    report["mini"] = run_mini(mini, args, dtype, progress) if mini else None
    report["stages_s"] = progress.seconds
    report["total_s"] = progress.total_s
    return report


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """Writes the report as indented JSON (parents created) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def print_report(report: dict[str, Any], out: Path) -> None:
    """The report as tables on stdout."""
    from rich.console import Console
    from rich.table import Column, Table

    from cross_modal_sd.evaluation.report import REFERENCE_COSTS

    console = Console(width=120)
    env, r = report["environment"], report["ratios"]
    profile = CostProfile.from_dict(report["cost_profile"], str(out))
    meta = profile.meta
    title = (
        f"gpu_check: {report['models']['target']} / {report['models']['draft']}, "
        f"{report['dtype']} on {env['device']}"
    )
    costs = Table("cost", "ms", "note", title=title, title_justify="left")
    costs.add_row(
        "target prefill",
        f"{profile.target_prefill_ms:.2f}",
        f"{meta.get('target_prompt_positions')} pos.",
    )
    costs.add_row("target per token", f"{profile.target_token_ms:.2f}", "")
    for k, ms in profile.verify_points:
        costs.add_row(f"verify k={k}", f"{ms:.2f}", f"one forward over {k + 1} tokens")
    costs.add_row(
        "draft prefill",
        f"{profile.draft_prefill_ms:.2f}",
        f"{meta.get('draft_prompt_positions')} pos.",
    )
    costs.add_row("draft per token", f"{profile.draft_token_ms:.2f}", "")
    costs.add_row("adapter per draft", f"{profile.adapter_ms:.3f}", "adapter + target lm_head")
    costs.add_row("round trip", f"{profile.round_trip_ms:.3f}", "one command to the drafter")
    if profile.baseline_prefill_ms is not None:
        costs.add_row(
            f"{BASELINE_LOOP} line",
            f"{profile.baseline_prefill_ms:.2f} + {profile.baseline_token_ms:.2f} (n - 1)",
            f"n answer tokens (timed at n = {meta.get('baseline_lengths')})",
        )
    console.print(costs)

    a, b = profile.verify_line
    base, sd = report["baseline"], report["sd"]
    ref = REFERENCE_COSTS
    console.print(
        f"baseline {base['total_ms']:.1f} ms for {base['n_new']} tokens; SD {sd['total_ms']:.1f} "
        f"ms ({r['speedup']:.2f}x, {report['models']['adapter']}), lossless {sd['lossless']}\n"
        f"cost shape (prior pair ~{ref['target_prefill_share']} / ~{ref['draft_prefill_ratio']} "
        f"/ ~{ref['draft_token_ratio']}): target prefill / baseline "
        f"{r['target_prefill_over_baseline']:.2f}, draft / target prefill "
        f"{r['draft_prefill_over_target_prefill']:.2f}, draft / target per token "
        f"{r['draft_token_over_target_token']:.2f}\n"
        f"as a cost profile: V(k) = {a:.2f} + {b:.3f} k ms, round-1 target contention "
        f"{profile.target_contention:.2f} (draft {profile.draft_contention:.2f}), round trip "
        f"{profile.round_trip_ms:.3f} ms ({report['concurrency']['runner']})"
    )
    mini = report.get("mini")
    if mini:
        table = Table(
            Column("strategy", no_wrap=True),
            "lossless",
            "tau",
            "accept rate",
            "accepted/round",
            "round 1 accepted",
            "SD ms",
            "baseline/SD",
            title=(
                f"mini world on {mini['device']} {mini['dtype']} ({mini['concurrency']}), "
                f"{mini['n_samples']} test samples, baseline {mini['baseline_ms']:.1f} ms, "
                f"adapter {mini['adapter']}"
            ),
            title_justify="left",
        )
        for name, s in mini["strategies"].items():
            speedup = s["speedup"]
            ci = speedup.get("ci95")
            ci_text = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
            table.add_row(
                name,
                f"{s['lossless_rate']:.1%}",
                f"{s['tau']:.2f}",
                f"{s['accept_rate']:.1%}",
                f"{s['accepted_per_round']:.2f}",
                f"{s['first_round_accepted_mean']:.2f}",
                f"{s['total_ms']:.1f}",
                f"{speedup['ratio_of_means']:.2f}{ci_text}",
            )
        console.print(table)
        line = f"mini lossless rate {mini['lossless_rate']:.1%} ({mini['lossless_samples']}/"
        line += f"{mini['n_samples']} samples token for token)"
        for m in mini["mismatches"]:
            line += (
                f"\n  differs: {m['sample_id']} ({m['strategy']}) from token "
                f"{m['first_difference']}"
            )
        console.print(line)
    stages = ", ".join(f"{k} {v:.1f}" for k, v in report["stages_s"].items())
    console.print(f"total {report['total_s']:.1f} s ({stages}) -> {out}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line (see the module docstring); returns the report it wrote."""
    args = parse_args(argv)
    report = run_check(args)
    out = write_report(report, args.out)
    print_report(report, out)
    return report


if __name__ == "__main__":
    main()
