"""GPU check of the real pair: load both models, run one SD sample against the baseline, time
the costs the speedup depends on, and write them as JSON.

    python scripts/gpu_check.py --target LanguageBind/Video-LLaVA-7B-hf \\
        --draft <EventGPT-7B dir> [--clip <CLIP ViT-L/14-336 dir>] [--dsec-root <DSEC root>] \\
        [--adapter checkpoints/<run>/best_model.pt] [--quantization 4bit] --out gpu_check.json

Measured (median of --repeats synchronised runs after one warm-up): target prefill ms, target
ms per token, one verification forward of k drafts for every k in --ks, draft prefill ms, draft
ms per token; the baseline (`generate`, greedy) and one speculative decoding run on the same
sample, and whether SD reproduced the baseline token for token. Without --adapter the drafter
uses an untrained L1 adapter: acceptance is then meaningless, costs and losslessness are not.
Without --dsec-root the sample is synthetic (random frames and events at DSEC's sizes).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Runnable as a script from the repository root without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cross_modal_sd.data.events import EventStream  # noqa: E402
from cross_modal_sd.decoding import (  # noqa: E402
    AdapterDrafter,
    DraftInputs,
    DraftPolicy,
    GreedySpec,
    SDConfig,
    TargetInputs,
    hf_greedy,
    speculative_generate,
)
from cross_modal_sd.decoding.timing import clock_ms, synchronize  # noqa: E402
from cross_modal_sd.models.wrappers import crop_cache  # noqa: E402

QUESTION = "What is happening in this driving scene?"
SENSOR_SIZE = (480, 640)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="Video-LLaVA directory or hub id")
    p.add_argument("--draft", required=True, help="EventGPT checkpoint directory")
    p.add_argument("--clip", default=None, help="CLIP ViT-L/14-336 directory (if not resolvable)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the target's)")
    p.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu")
    p.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32")
    p.add_argument("--quantization", default=None, choices=["4bit"], help="bitsandbytes NF4")
    p.add_argument("--adapter", default=None, help="exported best_model.pt (default: untrained L1)")
    p.add_argument("--dsec-root", default=None, help="DSEC root; the first clip is the sample")
    p.add_argument("--clip-ms", type=float, default=1000, help="DSEC clip length (ms)")
    p.add_argument("--event-ms", type=float, default=None, help="events of the clip's last ms")
    p.add_argument("--event-frames", type=int, default=5, help="event images the draft reads")
    p.add_argument("--question", default=QUESTION, help="question asked about the sample")
    p.add_argument("--max-new-tokens", type=int, default=30, help="answer cap")
    p.add_argument("--gamma", type=int, default=5, help="drafts per SD round")
    p.add_argument("--ks", default="1,2,4,8,16,32", help="draft counts k of the verify timing")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    p.add_argument("--out", default="gpu_check.json", help="JSON report path")
    args = p.parse_args(argv)
    try:
        args.ks = sorted({int(k) for k in str(args.ks).split(",") if k.strip()})
    except ValueError:
        p.error(f"--ks must be comma-separated integers, got {args.ks!r}")
    if not args.ks or args.ks[0] < 1:
        p.error("--ks needs at least one k >= 1")
    if args.repeats < 1 or args.max_new_tokens < 2:
        p.error("--repeats must be >= 1 and --max-new-tokens >= 2")
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
        "vocab_limit": 32000,
        "n_frames": 8,
        "event_frames": args.event_frames,
        "max_new_tokens": args.max_new_tokens,
    }


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
    """Both models' inputs for the check's one sample, on the models' device and dtype."""
    spec = pair.inputs
    if args.dsec_root:
        from cross_modal_sd.models.real import dsec_samples

        data = {
            "source": "dsec",
            "root": args.dsec_root,
            "clip_ms": args.clip_ms,
            "event_ms": args.event_ms,
            "n_frames": spec.n_frames,
            "questions": [args.question],
            "val_fraction": 0,
            "test_fraction": 0,
        }
        sample_id, sample = next(dsec_samples(pair, data, "train", n_clips=1))
        ids_t, frames, ids_d, events = (
            sample.target_ids,
            sample.frames,
            sample.draft_ids,
            sample.event_pixels,
        )
        source = f"DSEC {sample_id}"
    else:
        images, stream = synthetic_clip()
        ids_t, frames = spec.target_ids(args.question), spec.frames(images)
        ids_d = spec.draft_ids(args.question)
        events = spec.event_pixels(stream, SENSOR_SIZE, "synthetic events")
        source = "synthetic (random frames and events)"
    t, d = pair.target.model, pair.draft.model
    return (
        TargetInputs(ids_t.to(t.device), frames.to(t.device, t.dtype)),
        DraftInputs(ids_d.to(d.device), events.to(d.device, d.dtype)),
        source,
    )


def _median_ms(fn, device, repeats: int, reset=None) -> float:
    """Median synchronised wall time of `fn` after one untimed warm-up; `reset` runs untimed
    after every call (e.g. cropping a cache back)."""
    times = []
    for i in range(repeats + 1):
        synchronize(device)
        start = clock_ms()
        fn()
        synchronize(device)
        if i:
            times.append(clock_ms() - start)
        if reset is not None:
            reset()
    return float(np.median(times))


@torch.inference_mode()
def decoder_costs(
    dec, prefill_args: tuple, answer: list[int], device, repeats: int, ks: list[int] = ()
) -> dict[str, Any]:
    """Prefill ms, ms per token and (for each k) ms of one forward over k + 1 tokens, which is
    what verifying k drafts costs: [last committed token, d_1 .. d_k]."""
    out: dict[str, Any] = {
        "prefill_ms": _median_ms(lambda: dec.prefill(*prefill_args), device, repeats)
    }
    cache = dec.prefill(*prefill_args).cache
    length = cache.get_seq_length()

    def rewind() -> None:
        crop_cache(cache, length)

    step = torch.tensor([answer[:1]], device=device)
    out["token_ms"] = _median_ms(lambda: dec.forward_tokens(step, cache), device, repeats, rewind)
    out["verify_ms"] = {}
    for k in ks:
        ids = torch.tensor([(answer * (k // len(answer) + 2))[: k + 1]], device=device)
        out["verify_ms"][str(k)] = _median_ms(
            lambda ids=ids: dec.forward_tokens(ids, cache), device, repeats, rewind
        )
    out["prompt_positions"] = length
    return out


def measure_costs(
    pair, t_in: TargetInputs, d_in: DraftInputs, answer: list[int], ks: list[int], repeats: int
) -> dict[str, Any]:
    """Both models' costs on the sample (medians); verify timings for the target only."""
    t = decoder_costs(
        pair.target, (t_in.input_ids, t_in.pixel_values_videos), answer, t_in.device, repeats, ks
    )
    d = decoder_costs(pair.draft, (d_in.input_ids, d_in.event_pixels), answer, t_in.device, repeats)
    return {
        "target_prefill_ms": t["prefill_ms"],
        "target_token_ms": t["token_ms"],
        "verify_ms": t["verify_ms"],
        "draft_prefill_ms": d["prefill_ms"],
        "draft_token_ms": d["token_ms"],
        "target_prompt_positions": t["prompt_positions"],
        "draft_prompt_positions": d["prompt_positions"],
    }


def _adapter(pair, path: str | None):
    from cross_modal_sd.adapters import build_adapter
    from cross_modal_sd.evaluation.checkpoint import load_export

    if path:
        return load_export(path).adapter, path
    d_in = int(pair.draft.lm_head_weight.shape[1])
    d_out = int(pair.target.lm_head_weight.shape[1])
    return build_adapter("L1", d_in, d_out), "untrained L1 (acceptance meaningless)"


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    """Loads the pair and measures everything; returns the report."""
    import transformers

    from cross_modal_sd.models.real import load_real_pair

    cuda = str(args.device).startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise RuntimeError(
            "--device cuda but torch sees no CUDA device (use --device cpu to dry-run)"
        )
    t0 = time.perf_counter()
    pair = load_real_pair(models_config(args))
    load_s = time.perf_counter() - t0
    t_in, d_in, source = sample_inputs(pair, args)
    spec = GreedySpec(args.max_new_tokens, pair.target.vocab_limit, pair.eos_id)
    baseline = hf_greedy(pair.target.model, t_in, spec, warmup=1)
    answer = baseline.tokens
    costs = measure_costs(pair, t_in, d_in, answer, args.ks, args.repeats)

    adapter, adapter_name = _adapter(pair, args.adapter)
    adapter = adapter.to(t_in.device).eval()
    drafter = AdapterDrafter(pair.draft, adapter, pair.target.logits)
    sd_cfg = SDConfig(
        policy=DraftPolicy(kind="fixed", gamma=args.gamma),
        decode="draft_model",
        max_new_tokens=args.max_new_tokens,
        eos_token_id=pair.eos_id,
    )
    speculative_generate(pair.target, drafter, t_in, d_in, sd_cfg)  # warm-up
    sd = speculative_generate(pair.target, drafter, t_in, d_in, sd_cfg).to_dict()
    sd["lossless"] = sd["tokens"] == answer

    t_tok, d_tok = costs["target_token_ms"], costs["draft_token_ms"]
    report = {
        "environment": {
            "device": torch.cuda.get_device_name(t_in.device)
            if cuda
            else platform.processor() or "cpu",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "models": {"target": args.target, "draft": args.draft, "adapter": adapter_name},
        "dtype": str(pair.target.model.dtype).removeprefix("torch."),
        "quantization": args.quantization,
        "load_s": round(load_s, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(t_in.device) / 2**30, 2)
        if cuda
        else None,
        "sample": {
            "source": source,
            "question": args.question,
            "answer": pair.tokenizer.decode(answer),
        },
        "costs": costs,
        "baseline": {"total_ms": baseline.total_ms, "n_new": baseline.n_new, "tokens": answer},
        "sd": sd,
        "ratios": {
            # DESIGN §5: the prior pair had ~0.43, ~0.27 and ~0.7 here.
            "target_prefill_over_baseline": costs["target_prefill_ms"] / baseline.total_ms,
            "draft_prefill_over_target_prefill": costs["draft_prefill_ms"]
            / costs["target_prefill_ms"],
            "draft_token_over_target_token": d_tok / t_tok,
            "speedup": baseline.total_ms / sd["total_ms"],
        },
    }
    return report


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """Writes the report as indented JSON (parents created) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report = run_check(args)
    out = write_report(report, args.out)
    c, r = report["costs"], report["ratios"]
    print(
        f"target prefill {c['target_prefill_ms']:.1f} ms, {c['target_token_ms']:.1f} ms/token; "
        f"draft prefill {c['draft_prefill_ms']:.1f} ms, {c['draft_token_ms']:.1f} ms/token; "
        f"verify {c['verify_ms']} ms; baseline {report['baseline']['total_ms']:.1f} ms, "
        f"SD {report['sd']['total_ms']:.1f} ms ({r['speedup']:.2f}x), "
        f"lossless={report['sd']['lossless']} -> {out}"
    )
    return report


if __name__ == "__main__":
    main()
