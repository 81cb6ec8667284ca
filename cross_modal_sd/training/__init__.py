"""Adapter training: LightningModule, losses, LR schedule, callbacks and ``train(cfg)``."""

from cross_modal_sd.training.checkpoints import adapter_from_checkpoint, load_checkpoint
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
    "AdapterModule",
    "AlignmentLoss",
    "adapter_from_checkpoint",
    "cosine_loss",
    "load_checkpoint",
    "mse_loss",
    "position_weights",
    "resolve_warmup",
    "token_ce_loss",
    "train",
    "warmup_cosine_factor",
    "warmup_cosine_schedule",
]
