"""The analysis notebooks: stored without outputs, and executed end to end (nbclient) on small
outputs generated here — a recorded mini-world e2e run, an adapter export, and a sweep whose runs
log to CSV or to W&B offline."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from cross_modal_sd.adapters import build_adapter
from cross_modal_sd.training.export import export_run

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
FIXTURES = Path(__file__).parent / "fixtures"


def _execute(name: str, env: dict[str, str], monkeypatch) -> nbformat.NotebookNode:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        book, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
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


def _export(root: Path, run: str, hist: list[int], curve: list[float], accept_len: float) -> Path:
    adapter = build_adapter("L1", 8, 8)
    best = {
        "epoch": 3,
        "global_step": 30,
        "metrics": {"val/token_accept_len": accept_len, "val/token_match": 0.5},
        "curves": {"val/accepted_length_hist": hist, "val/position_acceptance": curve},
    }
    return export_run(root / run, adapter, best, "digest", {"run_name": run})[0]


def test_accept_vs_speedup_on_a_recorded_mini_run(tmp_path, monkeypatch):
    run = json.loads((FIXTURES / "mini_e2e_run.json").read_text())
    run_dir = tmp_path / "eval"
    run_dir.mkdir()
    with open(run_dir / "samples.jsonl", "w") as f:
        for sample in run["samples"]:
            f.write(json.dumps(sample) + "\n")
    (run_dir / "report.json").write_text(
        json.dumps({"mode": "e2e", "cost_profile": run["cost_profile"]})
    )
    _export(tmp_path / "ckpt", "L1-good", [1, 2, 3, 4], [0.9, 0.7, 0.4], 2.1)
    _export(tmp_path / "ckpt", "L1-poor", [6, 3, 1, 0], [0.4, 0.1, 0.0], 0.5)
    book = _execute(
        "accept_vs_speedup.ipynb",
        {
            "CMSD_PROFILE": "prior_rtx4090",
            "CMSD_EXPORTS": str(tmp_path / "ckpt" / "*" / "best_model.pt"),
            "CMSD_E2E_RUN": str(run_dir),
            "CMSD_TOKENS": "30",
        },
        monkeypatch,
    )
    text = _texts(book)
    assert "| L1 | L1-good |" in text and "| L1 | L1-poor |" in text
    for method, expected in run["expected"].items():  # the validation table of the run
        assert f"| {method} | {expected['measured_speedup']:.3f} |" in text
    assert _images(book) == 2  # the curves, and the run on its own curves


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
