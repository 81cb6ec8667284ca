"""Adapter training: LightningModule, losses, LR schedule, callbacks, export and ``train(cfg)``."""

from cross_modal_sd.training.export import (
    BEST_MODEL_NAME,
    METRICS_NAME,
    adapter_from_checkpoint,
    export_run,
    load_checkpoint,
)
from cross_modal_sd.training.losses import (
    AlignmentLoss,
    cosine_loss,
    mse_loss,
    position_weights,
    token_ce_loss,
)
from cross_modal_sd.training.module import AdapterModule
from cross_modal_sd.training.run import train
from cross_modal_sd.training.schedule import (
    resolve_warmup,
    warmup_cosine_factor,
    warmup_cosine_schedule,
)

__all__ = [
    "BEST_MODEL_NAME",
    "METRICS_NAME",
    "AdapterModule",
    "AlignmentLoss",
    "adapter_from_checkpoint",
    "cosine_loss",
    "export_run",
    "load_checkpoint",
    "mse_loss",
    "position_weights",
    "resolve_warmup",
    "token_ce_loss",
    "train",
    "warmup_cosine_factor",
    "warmup_cosine_schedule",
]
