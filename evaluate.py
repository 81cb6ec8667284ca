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
    result = evaluate(cfg)
    # The report's tables are what a person runs this for: print them, not just their path.
    if result["mode"] == "offline":
        print(Path(cfg.output_dir, "report.md").read_text())
        return result["metrics"].get("token_accept_len")
    rates = []
    for name, report in result["deployments"].items():
        if "sharding" in report:
            continue  # this rank did not merge
        print(Path(cfg.output_dir, name, "report.md").read_text().split("\n## Plots")[0])
        if report["lossless_rate"] is not None:  # None when sampling
            rates.append(report["lossless_rate"])
    return min(rates) if rates else None


if __name__ == "__main__":
    main()
