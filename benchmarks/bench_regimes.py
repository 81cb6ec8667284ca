"""Speedups across cost regimes and deployments, measured and predicted, with intervals.

For each mini world named (`conf/models/<name>.yaml`, built on demand) it runs the pipeline's own
commands: `python train.py models=<name> run_name=bench-<name>` and `python train.py
experiment=head models=<name> run_name=bench-<name>-H1` (its experiment's 80 epochs) when the
exports are missing (the first
builds the world and extracts the cache), then `python evaluate.py` with both deployments and the
head, ``--repeats`` times (the same test scenes: the adapter, the head and the speedup model never
saw them; repeats show the run-to-run spread). It writes, into ``--out``:

* ``regimes.md`` / ``regimes.json``: per world, deployment and strategy the measured speedup
  (ratio of means, 95% bootstrap interval over samples; with repeats, the spread of the repeats'
  point estimates), the speedup model's prediction (probes + the export's validation split) and
  the measured cost shape (target prefill share, draft/target prefill and per-token ratios,
  contention);
* ``validation.md``: predicted against measured for every point (`speedup.validation`);
* ``regimes.png``: speedup against the target-prefill share, per strategy and deployment.

    python benchmarks/bench_regimes.py                                   # the default world
    python benchmarks/bench_regimes.py --models mini mini_p15 --repeats 3 --count 20
    python benchmarks/bench_regimes.py --strategies head head_tree hybrid hybrid_tree   # trees
    python benchmarks/bench_regimes.py --set sampling.temperature=1.0                   # T = 1

Time everything on an idle machine: every figure is a wall-clock measurement.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from cross_modal_sd.speedup.regimes import plot_regimes, render_regimes, summarise_regimes
from cross_modal_sd.speedup.validation import render_validation, validation_rows
from cross_modal_sd.utils import write_json

REPO = Path(__file__).resolve().parents[1]
# Cross-modal only (decode with the drafter, or the prior system's target alone), head only,
# the hybrid (and its fused round 1), and a peer; HF assisted generation (the slowest method by
# far) is left out.
STRATEGIES = (
    "sd_fixed_draft_model",
    "sd_fixed_autoregressive",
    "head",
    "hybrid",
    "hybrid_fused",
    "prompt_lookup",
)


def run(cmd: list[str]) -> None:
    """One pipeline command from the repo root; its output streams through."""
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def export_for(models: str, epochs: int, head: bool = False) -> Path:
    """The benchmark's adapter (or feature head) for a world, trained once (world and cache
    built on demand)."""
    run_name = f"bench-{models}" + ("-H1" if head else "")
    ckpt = REPO / "checkpoints" / run_name / "best_model.pt"
    if not ckpt.is_file():
        run(
            [
                sys.executable,
                "train.py",
                *(["experiment=head"] if head else [f"trainer.max_epochs={epochs}"]),
                f"models={models}",
                f"run_name={run_name}",
                "logger=none",
            ]
        )
    return ckpt


def evaluate(
    models: str, ckpt: Path, head: Path, out: Path, args: argparse.Namespace
) -> list[dict]:
    """One evaluate.py run (both deployments); its reports."""
    run(
        [
            sys.executable,
            "evaluate.py",
            f"models={models}",
            f"ckpt={ckpt}",
            f"head_ckpt={head}",
            f"strategies=[{','.join(args.strategies)}]",
            f"source.count={args.count}",
            f"source.start={args.start}",
            f"cores={args.cores}",
            *args.set,
            "logger=none",
            f"hydra.run.dir={out}",
        ]
    )
    return [json.loads((out / d / "report.json").read_text()) for d in ("shared", "own_device")]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mini"], help="conf/models/ options")
    parser.add_argument("--repeats", type=int, default=1, help="evaluate.py runs per world")
    parser.add_argument("--count", type=int, default=20, help="test scenes per run")
    parser.add_argument("--start", type=int, default=0, help="first test scene")
    parser.add_argument("--cores", type=int, default=2, help="core budget")
    parser.add_argument("--epochs", type=int, default=10, help="adapter training epochs")
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=list(STRATEGIES),
        help="evaluate.py strategies timed next to the baseline",
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="further evaluate.py overrides, e.g. sampling.temperature=1.0 decoding.tree.top_k=4",
    )
    parser.add_argument("--out", default="outputs/bench_regimes", help="output folder")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.count < 1:
        parser.error("--repeats and --count must be >= 1")
    out = Path(args.out)
    reports = []
    for models in args.models:
        ckpt = export_for(models, args.epochs)
        head = export_for(models, 0, head=True)  # the head experiment's own schedule
        for k in range(args.repeats):
            reports += evaluate(models, ckpt, head, (out / models / f"run{k}").resolve(), args)
    rows = summarise_regimes(reports)
    command = "python benchmarks/bench_regimes.py " + " ".join(argv or sys.argv[1:])
    (out / "regimes.md").write_text(render_regimes(rows, command) + "\n")
    write_json(out / "regimes.json", {"command": command, "rows": rows})
    (out / "validation.md").write_text(render_validation(validation_rows(reports)) + "\n")
    plot_regimes(rows, out / "regimes.png")
    print((out / "regimes.md").read_text())
    print((out / "validation.md").read_text())
    return rows


if __name__ == "__main__":
    main()
