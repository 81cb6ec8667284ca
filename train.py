"""Train an adapter: ``python train.py [overrides]`` (see conf/train.yaml)."""

import hydra
from omegaconf import DictConfig

from cross_modal_sd.config import register_resolvers
from cross_modal_sd.training import train

register_resolvers()


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Run :func:`cross_modal_sd.training.train`; return the best ``optimized_metric`` (sweeps)."""
    summary = train(cfg)
    metric = cfg.get("optimized_metric")
    return summary["best"]["metrics"].get(metric) if metric else None


if __name__ == "__main__":
    main()
