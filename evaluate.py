"""Evaluate an exported adapter: `python evaluate.py ckpt=... [mode=e2e|offline] [key=value ...]`.

All work happens in `cross_modal_sd.evaluation.evaluate`; see `conf/evaluate.yaml` for the keys.
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from cross_modal_sd.config import register_resolvers
from cross_modal_sd.evaluation import evaluate

register_resolvers()


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    report = evaluate(cfg)
    # The report's tables are what a person runs this for: print them, not just their path.
    print(Path(cfg.output_dir, "report.md").read_text().split("\n## Plots")[0])
    if report["mode"] == "offline":
        return report["metrics"].get("token_accept_len")
    return report["lossless_rate"]


if __name__ == "__main__":
    main()
