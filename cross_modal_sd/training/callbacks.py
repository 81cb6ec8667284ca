"""The W&B plots of the per-position validation curves (a Lightning callback)."""

from __future__ import annotations

import math

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger


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
