"""The analysis notebooks: stored without outputs, and executed end to end (nbclient) on small
outputs generated here — adapter exports, an e2e evaluation's per-deployment reports, and a sweep
whose runs log to CSV or to W&B offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from cross_modal_sd.adapters import build_adapter
from cross_modal_sd.config import group_option
from cross_modal_sd.exports import export_run
from cross_modal_sd.metrics.offline import acceptance_arrays
from cross_modal_sd.speedup import CostProfile, load_profile
from cross_modal_sd.speedup.project import levers, read_export, render_levers

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def _execute(
    name: str, env: dict[str, str | None], monkeypatch, cwd: Path = ROOT
) -> nbformat.NotebookNode:
    """Runs every cell with `env` set (None: unset) and the kernel in `cwd`."""
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        book, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    ).execute()
    return book


def _texts(book) -> str:
    """Everything the executed cells displayed or printed, as one string."""
    out = []
    for cell in book.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", ""))
            out += [str(v) for k, v in o.get("data", {}).items() if k.startswith("text/")]
    return "\n".join(out)


def _images(book) -> int:
    return sum("image/png" in o.get("data", {}) for c in book.cells for o in c.get("outputs", []))


@pytest.mark.parametrize("name", ["accept_vs_speedup.ipynb", "compare_runs.ipynb"])
def test_notebooks_are_stored_without_outputs(name):
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])


def _export(root: Path, run: str, hist: list[int], accept_len: float, match: list[bool]) -> Path:
    """An export with offline curves and validation acceptance (two val samples)."""
    adapter = build_adapter(group_option("adapter", "L1"), 8, 8)
    best = {
        "epoch": 3,
        "global_step": 30,
        "metrics": {"val/token_accept_len": accept_len, "val/token_match": 0.5},
        "curves": {"val/accepted_length_hist": hist, "val/position_acceptance": [0.9, 0.5]},
    }
    rows = [
        {"match": match, "confidence": [0.9 if m else 0.2 for m in match]},
        {"match": match[:3], "confidence": [0.8] * 3},
    ]
    return export_run(
        root / run,
        adapter,
        best,
        "digest",
        {"run_name": run},
        val_acceptance=acceptance_arrays(rows),
    )[0]


# Measured speedup, its 95% interval, measured tau; predicted speedup and tau, per SD strategy.
NEWEST = {
    "own_device": {
        "sd_fixed_autoregressive": (1.25, [1.1, 1.4], 2.0, 1.3, 2.2),
        "sd_confidence_draft_model": (0.9, [0.85, 0.95], 1.5, 1.08, 1.75),
    },
    "shared": {
        "sd_fixed_autoregressive": (1.05, [0.98, 1.12], 2.0, 1.1, 2.2),
        "sd_confidence_draft_model": (0.7, [0.65, 0.75], 1.5, 0.77, 1.75),
    },
}


def _run(ms: float, tokens: int, **sd) -> dict:
    return {"tokens": list(range(tokens)), "total_ms": ms, **sd}


def _speedup(value: float, ci: list[float]) -> dict:
    return {"ratio_of_means": value, "ci95": ci, "mean_of_ratios": value, "mean_of_ratios_ci95": ci}


def _e2e_run(folder: Path, deployment: str, strategies: dict, mtime: float) -> Path:
    """One deployment folder of an e2e evaluation, written by hand: report.json (the fields the
    notebook reads) and two samples.jsonl records."""
    profile = CostProfile(
        target_prefill_ms=40.0,
        target_token_ms=4.0,
        verify_points=((2, 5.0), (8, 7.0)),
        draft_prefill_ms=10.0,
        draft_token_ms=1.0,
        target_contention=1.3,
        draft_contention=1.1,
        round_trip_ms=0.5 if deployment == "own_device" else 0.0,
        name=f"mini_{deployment}",
    )
    report = {
        "mode": "e2e",
        "deployment": deployment,
        "n_samples": 2,
        "budget": {"cores": 2, "deployment": deployment, "draft_cores": 1, "device": "cpu"},
        "baseline_loop": "loop",
        "cost_profile": profile.to_dict(),
        "cost_ratios": {"regime": "mini", "contention": profile.target_contention},
        "strategies": {
            "baseline": {
                "kind": "baseline",
                "method": "greedy_loop",
                "n_samples": 2,
                "tau": 1.0,
                "speedup": _speedup(1.0, [1.0, 1.0]),
                "speedup_vs_generate": _speedup(1.02, [0.99, 1.05]),
            }
        },
        "warnings": [],
    }
    for name, (measured, ci, tau, predicted, predicted_tau) in strategies.items():
        report["strategies"][name] = {
            "kind": "sd",
            "method": name,
            "n_samples": 2,
            "tau": tau,
            "speedup": _speedup(measured, ci),
            "speedup_vs_generate": _speedup(measured * 1.02, [v * 1.02 for v in ci]),
            "predicted_speedup": {
                "ratio_of_means": predicted,
                "mean_of_ratios": predicted,
                "tau": predicted_tau,
            },
        }
    folder /= deployment
    folder.mkdir(parents=True)
    with open(folder / "samples.jsonl", "w") as f:
        for i in range(2):
            loop = {"method": "greedy_loop", **_run(60.0, 6)}
            record = {
                "sample_id": f"scene{i}",
                "baselines": {"generate": {"method": "hf_generate", **_run(62.0, 6)}, "loop": loop},
                "baseline": loop,
                "strategies": {
                    name: _run(60.0 / s[0], 6, method=name, drafted=[4, 2], accepted=[2, 1])
                    for name, s in strategies.items()
                },
            }
            f.write(json.dumps(record) + "\n")
    path = folder / "report.json"
    path.write_text(json.dumps(report))
    os.utime(path, (mtime, mtime))
    return path


def _regime_row(regime, share, deployment, strategy, speedup, predicted) -> dict:
    return {
        "regime": regime,
        "deployment": deployment,
        "strategy": strategy,
        "baseline": "greedy_loop",
        "speedup": speedup,
        "ci95": [speedup - 0.05, speedup + 0.05],
        "repeats": [speedup - 0.01, speedup + 0.01],
        "predicted": predicted,
        "tau": 3.0,
        "tau_later": 4.0,
        "round1_tokens": 5.0,
        "lossless_rate": 1.0,
        "prefill_share": share,
        "draft_prefill_ratio": 0.3,
        "draft_token_ratio": 0.7,
        "head_token_ratio": 0.1,
        "contention": 1.0,
    }


def test_accept_vs_speedup_on_exports_and_an_e2e_evaluation(tmp_path, monkeypatch):
    good = _export(tmp_path / "checkpoints", "L1-good", [1, 2, 3, 4], 2.1, [True] * 3 + [False])
    _export(tmp_path / "checkpoints", "L1-poor", [6, 3, 1, 0], 0.5, [False, True, False, True])
    evaluations = tmp_path / "outputs" / "evaluate"
    # An older evaluation, and the newest one (its own_device report the newest file).
    _e2e_run(
        evaluations / "20260101-000000",
        "shared",
        {"sd_fixed_draft_model": (0.8, [0.7, 0.9], 1.2, 0.81, 1.3)},
        1e9,
    )
    for i, (deployment, strategies) in enumerate(NEWEST.items()):
        _e2e_run(evaluations / "20260102-000000", deployment, strategies, 1e9 + 200 - 100 * i)
    bench = tmp_path / "outputs" / "bench_regimes"
    bench.mkdir(parents=True)
    rows = [
        _regime_row(regime, share, deployment, strategy, 1.0 + share + k / 10, 1.05 + share)
        for regime, share in (("reference", 0.43), ("p15", 0.15))
        for deployment in ("shared", "own_device")
        for k, strategy in enumerate(("sd_fixed_autoregressive", "head", "hybrid"))
    ]
    (bench / "regimes.json").write_text(json.dumps({"command": "make bench", "rows": rows}))
    book = _execute(
        "accept_vs_speedup.ipynb",
        {
            "CMSD_PROFILE": "prior_rtx4090",
            "CMSD_EXPORTS": "checkpoints/*/best_model.pt",
            "CMSD_E2E_RUN": None,  # the newest outputs/evaluate/*/<deployment>/
            "CMSD_TOKENS": "30",
            "CMSD_REGIMES": None,  # outputs/bench_regimes/regimes.json
        },
        monkeypatch,
        cwd=tmp_path,
    )
    text = _texts(book)
    # The regime table: every (regime, deployment, strategy) with its interval and prediction.
    assert "| reference (0.43) | own_device | hybrid | 1.630 [1.580, 1.680] |" in text
    assert "| p15 (0.15) | shared | head | 1.250 [1.200, 1.300] |" in text
    assert "| L1 | L1-good |" in text and "| L1 | L1-poor |" in text  # the projection table
    # Levers from the first export's acceptance.
    expected = levers(load_profile("prior_rtx4090"), read_export(good, 30)["acceptance"], 30)
    assert render_levers(expected) in text
    # Predicted vs measured, each with its measured 95% interval: the newest own_device report,
    # then both deployments of its evaluation, never the older evaluation.
    assert "deployment `own_device`, regime `mini`, 2 samples, baseline `greedy_loop`" in text
    mine, both = text.split("All 2 deployments")
    for row in (
        "| mini | own_device | sd_fixed_autoregressive | 1.250 [1.100, 1.400] | 1.300 | +4.0% |",
        "| mini | own_device | sd_confidence_draft_model | 0.900 [0.850, 0.950] | 1.080 | +20.0% "
        "| 1.50 / 1.75 |",
    ):
        assert row in mine and row in both
    shared = "| mini | shared | sd_confidence_draft_model | 0.700 [0.650, 0.750] | 0.770 | +10.0% |"
    assert shared in both and shared not in mine
    assert "0.800 [0.700, 0.900]" not in text
    assert _images(book) == 3  # the curves, measured against predicted, and the regimes


def _sweep_run(sweep: Path, name: str, adapter: str, epochs: int) -> Path:
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(
        f"adapter:\n  name: {adapter}\ntrainer:\n  max_epochs: {epochs}\n"
        f"run_name: ${{adapter.name}}-${{now:%H%M%S}}\n"  # unresolvable offline, as in real runs
    )
    return run


def _csv_run(sweep, exports, name, adapter, epochs, values):
    run = _sweep_run(sweep, name, adapter, epochs)
    (run / "csv").mkdir()
    lines = ["epoch,step,train/loss,val/token_accept_len,val/token_match"]
    for e, v in enumerate(values):
        lines += [f"{e},{10 * e + 5},0.5,,", f"{e},{10 * e + 9},,{v},{v / 10}"]
    (run / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")
    best = max(range(len(values)), key=values.__getitem__)
    summary = {
        "run_name": name,
        "num_parameters": 1000,
        "best": {"epoch": best, "metrics": {"val/token_accept_len": values[best]}},
        "final": {"epoch": len(values) - 1, "metrics": {"val/token_accept_len": values[-1]}},
    }
    (exports / name).mkdir(parents=True)
    (exports / name / "metrics.json").write_text(json.dumps(summary))


def test_compare_runs_reads_csv_and_wandb_offline_runs(tmp_path, monkeypatch):
    import wandb

    sweep, exports = tmp_path / "multirun" / "2026-01-01", tmp_path / "checkpoints"
    _csv_run(sweep, exports, "L1-000000-0", "L1", 2, [1.0, 1.5])
    _csv_run(sweep, exports, "L1-000000-1", "L1", 4, [1.0, 1.5, 1.75, 1.7])
    _csv_run(sweep, exports, "L2-000000-3", "L2", 4, [1.25, 2.0, 2.5, 2.25])
    # An L2 run logged to W&B offline only (no CSV, no export): read from its run log.
    run = _sweep_run(sweep, "L2-000000-2", "L2", 2)
    monkeypatch.setenv("WANDB_SILENT", "true")
    wb = wandb.init(mode="offline", dir=str(run), project="t", name="L2-000000-2")
    for epoch, value in enumerate([1.125, 1.875]):
        wb.log({"val/token_accept_len": value, "val/token_match": value / 10, "epoch": epoch})
    wb.finish()

    book = _execute(
        "compare_runs.ipynb",
        {"CMSD_SWEEP": str(sweep), "CMSD_EXPORTS_DIR": str(exports)},
        monkeypatch,
    )
    text = _texts(book)
    assert "4 runs in" in text
    # Best val/token_accept_len per adapter and epoch budget (L2 at 2 epochs from W&B).
    assert "| L1 | 1.500 | 1.750 |" in text
    assert "| L2 | 1.875 | 2.500 |" in text
    assert "| L2 | 2 | L2-000000-2 | – | – | – | – | – | – | wandb |" in text
    assert _images(book) == 2
