"""LightningModule that trains one adapter (or feature head) on hidden-state pairs
(docs/design.md §9)."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from cross_modal_sd.adapters import build_adapter
from cross_modal_sd.metrics import DEFAULT_TAUS, AlignmentMetrics
from cross_modal_sd.metrics.chains import chain_runs
from cross_modal_sd.metrics.offline import previous_tokens
from cross_modal_sd.training.losses import AlignmentLoss, SplitLoss
from cross_modal_sd.training.schedule import resolve_warmup, warmup_cosine_schedule

CHAIN_K = 8  # longest self-fed chain a head's validation scores (drafts per decode round)
DEFAULT_OPTIMIZER = {
    "lr": 1e-3,
    "weight_decay": 0.01,
    "betas": (0.9, 0.999),
    "warmup_steps": 0,
    "warmup_ratio": 0.0,
    "min_lr_ratio": 0.0,
}


class AdapterModule(L.LightningModule):
    """An adapter, its loss, AdamW with a warm-up + cosine schedule, and validation metrics.

    Batches are :func:`cross_modal_sd.data.dataset.collate_pairs` dicts. Validation accumulates
    :class:`~cross_modal_sd.metrics.AlignmentMetrics` and ``val/loss`` (a
    :class:`~cross_modal_sd.training.losses.SplitLoss`: the loss over the whole split, whatever
    the batching) over the whole val split and logs ``val/<name>`` once per epoch; under DDP both
    sum their states across ranks, so the values are one process's. The epoch's results (scalars and per-position curves, plain
    Python) are kept in :attr:`val_results` and saved into every Lightning checkpoint, so the
    best checkpoint carries the numbers it was chosen by.

    Args:
        adapter: adapter config (``_target_`` + hyper-parameters, e.g. ``conf/adapter/L1.yaml``).
        in_dim: draft hidden width (from the cache).
        out_dim: target hidden width (from the cache).
        lm_head_weight: (V, out_dim) frozen target ``lm_head``; needed for the token metrics and
            the CE loss. Held once, as a non-persistent float32 buffer of the metrics (rows >=
            ``vocab_limit`` dropped): not trained, not written into checkpoints.
        vocab_limit: ids ``>= vocab_limit`` are never drafted (from the cache manifest).
        loss: :class:`~cross_modal_sd.training.losses.AlignmentLoss` arguments.
        optimizer: ``lr``, ``weight_decay``, ``betas``, ``warmup_steps``, ``warmup_ratio``,
            ``min_lr_ratio``; missing keys take :data:`DEFAULT_OPTIMIZER`'s values.
        taus: cosine thresholds of ``accept@τ`` / ``consecutive@τ``.
        max_len: positions of the acceptance curve and histogram.
        prompt_last_token: id of the last prompt token; the previous token of answer position 0
            when the adapter fuses token embeddings (L5 ``fuse_tokens``).
        cache_digest: manifest digest of the training cache, recorded in the hyper-parameters.

    Raises:
        ValueError: a CE loss or token fusion without what it needs.
    """

    def __init__(
        self,
        adapter: Mapping[str, Any],
        in_dim: int,
        out_dim: int,
        lm_head_weight: Tensor | None = None,
        vocab_limit: int | None = None,
        loss: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        taus: Sequence[float] = DEFAULT_TAUS,
        max_len: int = 32,
        prompt_last_token: int | None = None,
        cache_digest: str | None = None,
    ):
        super().__init__()
        adapter = copy.deepcopy(dict(adapter))
        is_head = str(adapter.get("_target_", "")).endswith("FeatureHead")
        if (adapter.get("fuse_tokens") or is_head) and adapter.get("vocab_size") is None:
            if lm_head_weight is None:
                raise ValueError("adapter.vocab_size is needed (or the cache's lm_head)")
            adapter["vocab_size"] = int(lm_head_weight.shape[0])
        if is_head:
            in_dim = out_dim  # a head reads the target's own states
        self.save_hyperparameters(
            {
                "adapter": adapter,
                "in_dim": in_dim,
                "out_dim": out_dim,
                "vocab_limit": vocab_limit,
                "loss": dict(loss or {}),
                "optimizer": {**DEFAULT_OPTIMIZER, **(optimizer or {})},
                "taus": list(taus),
                "max_len": max_len,
                "prompt_last_token": prompt_last_token,
                "cache_digest": cache_digest,
            },
            logger=False,  # train() logs the whole resolved config instead
        )
        self.adapter = build_adapter(adapter, in_dim, out_dim)
        self.loss_fn = AlignmentLoss(**self.hparams.loss)
        if self.loss_fn.needs_lm_head and lm_head_weight is None:
            raise ValueError("loss.ce_weight > 0 needs the cache's target lm_head")
        self.is_head = getattr(self.adapter, "kind", "adapter") == "head"
        if self.adapter.uses_tokens and not self.is_head and prompt_last_token is None:
            raise ValueError(
                "adapter.fuse_tokens needs the id of the last prompt token (the previous token of "
                "answer position 0); the cache manifest's extra['prompt_last_token'] is missing"
            )
        self.val_metrics = AlignmentMetrics(lm_head_weight, taus, max_len, vocab_limit)
        self.val_loss = SplitLoss(self.loss_fn)
        # Heads: the mean accepted run of self-fed chains (how decoding uses them).
        self.val_chain = MeanMetric() if self.is_head else None
        self.val_results: dict[str, Any] = {}
        self._step_terms: dict[str, Tensor] = {}
        self._step_batches = 0

    @property
    def lm_head(self) -> Tensor | None:
        """(V', out_dim) float32 ``lm_head`` rows that may be drafted, or None."""
        # One copy of the (V, D) weight (0.5 GB in float32 at 32k x 4096): the metrics own it.
        return self.val_metrics.lm_head_weight

    def views(self, batch: Mapping[str, Any]) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
        """``(outputs by name, target states, tokens, mask)`` the loss and metrics compare.

        An adapter maps the draft's states onto the target's at the same positions. A feature
        head reads the target's own pairs ``(σ_{i-1}, y_i)`` (the cache's ``h_target`` and
        ``tokens``) and its output i estimates ``σ_i``: compared with the rows shifted by one.
        """
        if not self.is_head:
            return self.forward_heads(batch), batch["h_target"], batch["tokens"], batch["mask"]
        h, tokens, mask = batch["h_target"], batch["tokens"], batch["mask"]
        pred = self.adapter(h.to(self.dtype), mask, tokens)  # (B, T, D)
        return {"align": pred[:, :-1]}, h[:, 1:], tokens[:, 1:], mask[:, 1:]

    def forward_heads(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """All adapter heads on a collated batch (``align`` always; ``next`` for L5)."""
        h = batch["h_draft"].to(self.dtype)  # (B, T, Dd); the cache stores 16-bit rows
        mask = batch["mask"]
        if not self.adapter.uses_tokens:
            return self.adapter.forward_heads(h, mask)
        previous = previous_tokens(batch["tokens"], self.hparams.prompt_last_token)  # (B, T)
        return self.adapter.forward_heads(h, mask, previous)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        terms = self.loss_fn(*self.views(batch), self.lm_head)
        # Summed over the micro-batches of one optimizer step; logged in on_before_optimizer_step.
        for name, value in terms.items():
            self._step_terms[name] = self._step_terms.get(name, 0.0) + value.detach()
        self._step_batches += 1
        return terms["loss"]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log ``train/lr`` (every optimizer step) and the step's mean loss terms.

        Runs once per optimizer step, after gradient accumulation and before the update, so the
        LR logged for step s is the one step s uses. The values go straight to the loggers, as
        Lightning's own ``LearningRateMonitor`` does: ``self.log``'s per-step bookkeeping was
        the whole gap to a plain loop (mini world, L1, 1 thread: 0.54 s vs 0.465 s for 58 steps;
        0.465 s without ``self.log``). Loss terms follow ``trainer.log_every_n_steps``, since
        reading them syncs a GPU; components only when there are several.
        """
        step = self.global_step
        metrics = {"train/lr": optimizer.param_groups[0]["lr"]}
        if step % self.trainer.log_every_n_steps == 0:
            terms = {k: (v / self._step_batches).item() for k, v in self._step_terms.items()}
            metrics["train/loss"] = terms.pop("loss")
            if len(terms) > 1:
                metrics |= {f"train/loss_{k}": v for k, v in terms.items()}
        self._step_terms, self._step_batches = {}, 0
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        heads, target, tokens, mask = self.views(batch)
        terms = self.loss_fn(heads, target, tokens, mask, self.lm_head)
        self.val_loss.update(terms, mask)
        self.val_metrics.update(heads["align"], target, tokens, mask)
        if self.val_chain is not None:
            runs = chain_runs(
                self.adapter,
                batch["h_target"],
                batch["tokens"],
                batch["mask"],
                self.lm_head,
                k=CHAIN_K,
            )["runs"]
            self.val_chain.update(runs[runs >= 0].float())

    def on_validation_epoch_end(self) -> None:
        # Both metrics sum their states over ranks in compute(), so every rank logs the same
        # whole-split value (one process's, to float rounding) and no further reduction is needed.
        loss = float(self.val_loss.compute())
        scalars = {f"val/{k}": float(v) for k, v in self.val_metrics.compute().items()}
        if self.val_chain is not None:
            scalars["val/chain_accept_len"] = float(self.val_chain.compute())
            self.val_chain.reset()
        curves = {f"val/{k}": v.tolist() for k, v in self.val_metrics.compute_curves().items()}
        self.val_metrics.reset()
        self.val_loss.reset()
        self.log_dict({"val/loss": loss, **scalars}, sync_dist=False)
        self.val_results = {
            "epoch": self.current_epoch,
            "global_step": self.global_step,
            "metrics": scalars,
            "curves": curves,
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["val_results"] = copy.deepcopy(self.val_results)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.val_results = copy.deepcopy(checkpoint.get("val_results", {}))

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (no weight decay on 1-D parameters) + warm-up/cosine stepped per optimizer step,
        its length the trainer's total optimizer steps."""
        opt = self.hparams.optimizer
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                "the cosine schedule needs a finite run: set trainer.max_epochs or trainer.max_steps"
            )
        warmup = resolve_warmup(int(total), opt["warmup_steps"], opt["warmup_ratio"])
        optimizer = torch.optim.AdamW(
            parameter_groups(self.adapter, opt["weight_decay"]),
            lr=opt["lr"],
            betas=tuple(opt["betas"]),
        )
        scheduler = warmup_cosine_schedule(optimizer, total, warmup, opt["min_lr_ratio"])
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices, none on vectors and scalars.

    LayerNorm gains, biases and the residual scales α are 1-D or 0-D; decaying them pulls the
    norms towards zero output and the residual branches shut, which is no sensible prior.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
