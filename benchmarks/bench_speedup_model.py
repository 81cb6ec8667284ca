"""Speedup model vs measurement on the mini world: every decoding configuration of evaluate.py.

Runs the e2e harness (`evaluation.run_e2e`: baseline and the four SD configurations,
interleaved per sample) on an exported adapter, measures the cost profile on the same loaded
models just before and just after (their mean is the run's profile), and compares predicted with
measured speedup through `speedup_model.validate`: once with the run's measured acceptance (the
cost model's error) and once with round 1's acceptance only (the assumption the model makes
when all it has is offline acceptance)::

    python benchmarks/bench_speedup_model.py                                  # newest L1 export
    python benchmarks/bench_speedup_model.py --ckpt checkpoints/demo-L1/best_model.pt --n-scenes 10
    python benchmarks/bench_speedup_model.py --fixture tests/fixtures/mini_e2e_run.json

Writes ``validation.md`` / ``validation.json`` (profile, rows) and ``samples.jsonl`` to
``--out``; ``--fixture`` also writes the recorded run the unit test re-checks.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cross_modal_sd.analysis.cost_profile import measure_profile, pair_models
from cross_modal_sd.analysis.speedup_model import (
    Acceptance,
    CostProfile,
    config_from_records,
    mean_profile,
    predicted_speedups,
    render_validation,
    save_profile,
    split_e2e_records,
    validate,
)
from cross_modal_sd.decoding import thread_budget
from cross_modal_sd.evaluation import load_export, resolve_checkpoint, run_e2e
from cross_modal_sd.extract import load_pair, mini_samples

CONF = Path(__file__).resolve().parents[1] / "conf"
STRATEGIES = [
    "sd_fixed_autoregressive",
    "sd_fixed_draft_model",
    "sd_confidence_autoregressive",
    "sd_confidence_draft_model",
]
# Record fields the validation reads; the fixture keeps only these.
RECORD_KEYS = ("method", "tokens", "drafted", "accepted", "rounds", "stop", "total_ms",
               "decode_ms", "target_forwards")  # fmt: skip


def _rounded(value, digits: int = 2):
    """Floats rounded (10 µs precision for ms), nested; keeps the fixture small."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    return value


def write_fixture(path: Path, records, profile, chunk_profiles, chunk: int, source: str) -> None:
    """The recorded run `tests/test_speedup_model.py` re-checks: the fields validation reads,
    rounded, with the predictions recomputed from the rounded numbers."""
    samples = _rounded(
        [
            {
                "baseline": {k: r["baseline"][k] for k in ("tokens", "total_ms")},
                "strategies": {
                    n: {k: s[k] for k in RECORD_KEYS} for n, s in r["strategies"].items()
                },
            }
            for r in records
        ]
    )
    profiles = [_rounded(p.to_dict() | {"meta": {}}) for p in chunk_profiles]
    loaded = [CostProfile.from_dict(p) for p in profiles]
    by_name, baseline = split_e2e_records(samples)
    rows = validate(by_name, baseline, [loaded[i // chunk] for i in range(len(samples))])
    fixture = {
        "source": source,
        "cost_profile": _rounded(profile.to_dict() | {"meta": {}}),
        "chunk_profiles": profiles,
        "chunk": chunk,
        "expected": {
            r["method"]: {k: r[k] for k in ("measured_speedup", "predicted_speedup")} for r in rows
        },
        "samples": samples,
    }
    path.write_text(json.dumps(fixture, separators=(",", ":")) + "\n")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=None, help="best_model.pt (default: newest L1 export)")
    parser.add_argument("--n-scenes", type=int, default=10, help="test scenes (~6.5 samples each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every method")
    parser.add_argument("--out", default="outputs/bench_speedup_model", help="output folder")
    parser.add_argument("--chunk", type=int, default=8, help="samples between profile measurements")
    parser.add_argument("--fixture", default=None, help="also write the recorded run here")
    args = parser.parse_args(argv)

    overrides = [
        f"n_scenes={args.n_scenes}",
        f"threads={args.threads}",
        f"strategies=[{','.join(STRATEGIES)}]",
        "cost_probe=false",
        "logger=none",
        f"output_dir={args.out}",
    ]
    if args.ckpt:
        overrides.append(f"ckpt={args.ckpt}")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=overrides)
    export = load_export(resolve_checkpoint(cfg))
    pair = load_pair(cfg.models)
    samples = list(mini_samples(pair, cfg.split, cfg.start, cfg.n_scenes))
    # The load of a shared machine drifts within a run: profiles measured between chunks of
    # samples see the same load as the runs they sit between.
    profiles, records = [], []
    with thread_budget(args.threads):
        models = pair_models(pair, export.adapter.eval(), samples[0])
        for j, start in enumerate(range(0, len(samples), args.chunk)):
            profiles.append(measure_profile(models, repeats=5))
            # run_e2e rotates a fixed cyclic order, so each method would always follow the
            # same other one (and inherit its cache and thread state); a shuffled order per
            # chunk spreads that over every predecessor, as the profile's shuffled probes do.
            order = random.Random(j).sample(STRATEGIES, len(STRATEGIES))
            chunk_cfg = OmegaConf.merge(cfg, {"strategies": order})
            records += run_e2e(pair, export, samples[start : start + args.chunk], chunk_cfg)[1]
        profiles.append(measure_profile(models, repeats=5))
    profile = mean_profile(profiles).with_(
        name="mini_run", source=f"measured between chunks of the run on {export.path}"
    )
    # Each chunk's samples are predicted with the mean of the two profiles around it.
    around = [mean_profile(profiles[j : j + 2]) for j in range(len(profiles) - 1)]
    per_sample = [around[i // args.chunk] for i in range(len(records))]
    by_name, baseline = split_e2e_records(records)
    rows = validate(by_name, baseline, per_sample)
    # What evaluate.py reports as predicted_speedup: the checkpoint's offline val acceptance.
    offline = predicted_speedups(
        profile,
        Acceptance.from_export(export.path),
        {n: config_from_records(r) for n, r in by_name.items()},
        records,
    )
    for row in rows:
        row["predicted_speedup_offline"] = offline[row["strategy"]]["ratio_of_means"]
        row["error_offline"] = row["predicted_speedup_offline"] / row["measured_speedup"] - 1

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_profile(profile, out / "cost_profile.json")
    markdown = (
        render_validation(rows)
        + "\n\nFrom the checkpoint's offline val acceptance: "
        + (
            ", ".join(
                f"{r['method']} {r['predicted_speedup_offline']:.3f} ({100 * r['error_offline']:+.1f}%)"
                for r in rows
            )
        )
    )
    spread = {
        k: (min(getattr(p, k) for p in profiles), max(getattr(p, k) for p in profiles))
        for k in ("target_prefill_ms", "target_token_ms", "contention", "round1_overhead_ms")
    }
    header = (
        f"{len(records)} samples of {cfg.n_scenes} mini-world test scenes, adapter "
        f"{export.name} ({export.path}), {args.threads} thread(s); cost profile: mean of "
        f"{len(profiles)} measured between chunks of {args.chunk} samples (range: "
        + ", ".join(f"{k} {a:.3g}..{b:.3g}" for k, (a, b) in spread.items())
        + ")"
    )
    (out / "validation.md").write_text(header + "\n\n" + markdown + "\n")
    (out / "validation.json").write_text(
        json.dumps(
            {
                "profile": profile.to_dict(),
                "chunk_profiles": [p.to_dict() for p in profiles],
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    with open(out / "samples.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    if args.fixture:
        write_fixture(Path(args.fixture), records, profile, around, args.chunk, header)
    print(header + "\n\n" + markdown)
    errors = [abs(r["error"]) for r in rows]
    print(f"\nmax |error| {max(errors):.1%}, mean {statistics.mean(errors):.1%}")
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
