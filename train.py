"""Train an adapter: ``python train.py [overrides]`` (see conf/train.yaml)."""

import sys

import hydra
from omegaconf import DictConfig

from cross_modal_sd.training import train


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Run :func:`cross_modal_sd.training.train`; return the best ``optimized_metric`` (sweeps)."""
    summary = train(cfg)
    metric = cfg.get("optimized_metric")
    return summary["best"]["metrics"].get(metric) if metric else None


if __name__ == "__main__":
    # Hydra 1.3 rejects `group=null` on the command line; `logger=null` means the `none` option.
    sys.argv = ["logger=none" if arg == "logger=null" else arg for arg in sys.argv]
    main()
