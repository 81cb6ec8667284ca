"""Evaluation of an exported adapter: end to end (live SD vs baseline and peers) or offline.

* ``mode=e2e`` (`run_e2e`): on every sample the target's greedy `generate` (the baseline), each
  configured SD strategy and each peer run on the same inputs under one thread budget, after
  untimed warm-up; every SD output is checked token for token against the baseline.
* ``mode=offline`` (`run_offline`): alignment metrics of the adapter on a cache split, computed
  as training's validation does.

Both write ``report.json``, ``report.md``, ``samples.jsonl`` and PNG plots and send the same to
the configured loggers (W&B: metrics, tables, images).
"""

from cross_modal_sd.evaluation.e2e import (
    blank_events,
    resolve_max_new_tokens,
    run_e2e,
)
from cross_modal_sd.evaluation.offline import offline_metrics, run_offline
from cross_modal_sd.evaluation.outputs import (
    log_report,
    make_loggers,
    report_tables,
    scalar_metrics,
    write_outputs,
)
from cross_modal_sd.evaluation.run import evaluate
from cross_modal_sd.evaluation.strategies import Strategy, parse_strategies

__all__ = [
    "Strategy",
    "blank_events",
    "evaluate",
    "log_report",
    "make_loggers",
    "offline_metrics",
    "parse_strategies",
    "report_tables",
    "resolve_max_new_tokens",
    "run_e2e",
    "run_offline",
    "scalar_metrics",
    "write_outputs",
]
