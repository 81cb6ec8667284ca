"""Callbacks and loggers from the Hydra config, and the W&B plots of the per-position curves."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, WandbLogger


def instantiate_group(node: Mapping[str, Any] | None) -> dict[str, Any]:
    """Instantiate each ``_target_`` entry of a ``callbacks``/``logger`` node by name.

    Entries set to null (``callbacks.early_stopping=null``) are skipped, so any default can be
    switched off from the command line.

    Raises:
        ValueError: an entry without ``_target_``.
    """
    out = {}
    for name, entry in (node or {}).items():
        if entry is None:
            continue
        if not isinstance(entry, Mapping) or "_target_" not in entry:
            raise ValueError(f"config entry {name!r} has no _target_ (got {entry!r})")
        out[name] = instantiate(entry)
    return out


class WandbValCurves(Callback):
    """Log each epoch's acceptance-by-position curve and accepted-length histogram to W&B.

    Reads ``pl_module.val_results["curves"]`` (set in ``on_validation_epoch_end``) at
    ``on_validation_end``, which runs after the module's epoch-end hook. Positions no val sample
    reaches (NaN) are left out of the table.
    """

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        curves = getattr(pl_module, "val_results", {}).get("curves", {})
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not curves or not loggers:
            return
        import wandb

        acceptance = wandb.Table(
            columns=["position", "acceptance"],
            data=[
                [k, rate]
                for k, rate in enumerate(curves["val/position_acceptance"])
                if not math.isnan(rate)
            ],
        )
        lengths = wandb.Table(
            columns=["accepted_length", "samples"],
            data=[[n, c] for n, c in enumerate(curves["val/accepted_length_hist"])],
        )
        plots = {
            "val/position_acceptance": wandb.plot.line(
                acceptance, "position", "acceptance", title="first-round acceptance by position"
            ),
            "val/accepted_length_hist": wandb.plot.bar(
                lengths, "accepted_length", "samples", title="accepted length (last bin: >=)"
            ),
        }
        for logger in loggers:
            logger.log_metrics(plots, step=trainer.global_step)


def finish_wandb(loggers: list[Logger], failed: bool) -> None:
    """Close the W&B run of this job, so the next job of a multirun starts its own.

    ``WandbLogger`` reuses a live ``wandb.run`` instead of starting a new one; without this the
    second sweep point would log into the first one's run.
    """
    if not any(isinstance(lg, WandbLogger) for lg in loggers):
        return
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)
