"""Training throughput: the Lightning loop of ``train.py`` vs a minimal plain-PyTorch loop.

    python benchmarks/bench_train_throughput.py                      # random 1024-wide cache
    python benchmarks/bench_train_throughput.py --cache <dir> --adapter L4 --device cuda

Both loops train the same adapter (same config and seed) with the same loss, AdamW groups,
warm-up/cosine schedule, gradient clipping, DataLoader (the DataModule's train loader) and batch
size, for ``--epochs`` epochs; the first epoch is warm-up and not timed. The Lightning side is an
:class:`AdapterModule` under a ``Trainer`` as ``train.py`` builds it (per-step ``train/*`` logging
into a CSV logger), minus validation and checkpointing, which the plain loop does not have either.
The two runs alternate ``--repeats`` times and the medians are compared, so background load on a
shared machine hits both alike. Throughput counts valid (unpadded) answer positions per second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf

from cross_modal_sd.data.datamodule import HiddenPairDataModule
from cross_modal_sd.data.synthetic import write_synthetic_cache
from cross_modal_sd.training import AdapterModule
from cross_modal_sd.training.module import parameter_groups
from cross_modal_sd.training.schedule import warmup_cosine_schedule

CONF = Path(__file__).resolve().parents[1] / "conf"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class EpochTimer(L.Callback):
    """Wall time of every train epoch after the first."""

    def __init__(self, device: str):
        self.device = device
        self.seconds = 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        sync(self.device)
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        sync(self.device)
        if trainer.current_epoch > 0:
            self.seconds += time.perf_counter() - self._start


def make_module(args, datamodule: HiddenPairDataModule) -> AdapterModule:
    """The module ``train.py`` builds for ``adapter=<args.adapter> loss=<args.loss>``."""
    L.seed_everything(args.seed, verbose=False)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        loss = [f"loss={args.loss}"] if args.loss else []
        cfg = compose("train", overrides=[f"adapter={args.adapter}", *loss])
    in_dim, out_dim = datamodule.dims
    manifest = datamodule.cache.manifest
    return AdapterModule(
        OmegaConf.to_container(cfg.adapter),
        in_dim,
        out_dim,
        lm_head_weight=datamodule.lm_head_weight(),
        vocab_limit=manifest.get("vocab_limit"),
        loss=OmegaConf.to_container(cfg.loss),
        optimizer=OmegaConf.to_container(cfg.optimizer),
        max_len=manifest["max_new_tokens"],
    )


def lightning_run(args, datamodule: HiddenPairDataModule, log_dir: Path) -> float:
    """Seconds of the timed epochs under a Trainer configured like conf/trainer/cpu.yaml."""
    module = make_module(args, datamodule)
    timer = EpochTimer(args.device)
    trainer = L.Trainer(
        accelerator="gpu" if args.device.startswith("cuda") else "cpu",
        devices=1,
        precision=args.precision,
        max_epochs=args.epochs,
        gradient_clip_val=1.0,
        log_every_n_steps=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=CSVLogger(log_dir, name="bench", version=""),
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=datamodule)
    return timer.seconds


def plain_run(args, datamodule: HiddenPairDataModule) -> float:
    """Seconds of the timed epochs of a hand-written loop doing the same work."""
    module = make_module(args, datamodule).to(args.device)
    adapter, loss_fn, lm_head = module.adapter, module.loss_fn, module.lm_head
    loader = datamodule.train_dataloader()
    opt = module.hparams.optimizer
    optimizer = torch.optim.AdamW(
        parameter_groups(adapter, opt["weight_decay"]), lr=opt["lr"], betas=tuple(opt["betas"])
    )
    scheduler = warmup_cosine_schedule(
        optimizer, args.epochs * len(loader), opt["warmup_steps"], opt["min_lr_ratio"]
    )
    autocast = torch.autocast(
        "cuda" if args.device.startswith("cuda") else "cpu",
        dtype=torch.bfloat16,
        enabled=args.precision == "bf16-mixed",
    )
    adapter.train()
    seconds = 0.0
    for epoch in range(args.epochs):
        loader.sampler.set_epoch(epoch)
        sync(args.device)
        start = time.perf_counter()
        for batch in loader:
            h = batch["h_draft"].to(args.device, torch.float32, non_blocking=True)
            target = batch["h_target"].to(args.device, non_blocking=True)
            tokens = batch["tokens"].to(args.device, non_blocking=True)
            mask = batch["mask"].to(args.device, non_blocking=True)
            with autocast:
                terms = loss_fn(adapter.forward_heads(h, mask), target, tokens, mask, lm_head)
            terms["loss"].backward()
            torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        sync(args.device)
        if epoch > 0:
            seconds += time.perf_counter() - start
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, help="cache directory (default: a random one)")
    parser.add_argument("--dim", type=int, default=1024, help="width of a random cache")
    parser.add_argument("--vocab", type=int, default=8192, help="lm_head rows of a random cache")
    parser.add_argument("--size-mb", type=float, default=60, help="row data of a random cache")
    parser.add_argument("--adapter", default="L1", help="adapter level (conf/adapter/<name>.yaml)")
    parser.add_argument("--loss", help="loss config conf/loss/<name>.yaml (default: train.yaml's)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per batch")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (first untimed)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each loop")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--precision", default="32-true", help="32-true | bf16-mixed")
    # One intra-op thread by default: on a shared CPU, waiting for busy threads to wake up adds
    # seconds of noise per run that has nothing to do with either loop.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch default)")
    parser.add_argument("--seed", type=int, default=0, help="adapter init seed")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache
        if cache is None:
            cache = write_synthetic_cache(
                Path(tmp) / "cache",
                args.size_mb / 1000,
                args.dim,
                args.dim,
                vocab_size=args.vocab,
                shard_samples=256,
                progress=False,
            )
        datamodule = HiddenPairDataModule(cache, batch_size=args.batch_size, val_fraction=0.1)
        datamodule.setup("fit")
        lengths = datamodule.cache.lengths[datamodule.splits["train"]]
        positions = int(lengths.sum()) * (args.epochs - 1)  # timed epochs only
        times: dict[str, list[float]] = {"lightning": [], "plain": []}
        for r in range(args.repeats):
            times["lightning"].append(lightning_run(args, datamodule, Path(tmp) / f"logs{r}"))
            times["plain"].append(plain_run(args, datamodule))
    rate = {name: positions / statistics.median(t) for name, t in times.items()}
    print(
        json.dumps(
            {
                "adapter": args.adapter,
                "loss": args.loss or "train.yaml default",
                "dims": list(datamodule.dims),
                "batch_size": args.batch_size,
                "device": args.device,
                "threads": torch.get_num_threads(),
                "train_samples": len(lengths),
                "timed_positions": positions,
                "seconds": times,
                "positions_per_s": {k: round(v, 1) for k, v in rate.items()},
                "ratio_lightning_over_plain": round(rate["lightning"] / rate["plain"], 3),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
