"""Where the Hydra configs live and what they need: the repo's `conf/`, its resolvers, and
one group option read as a plain dict.

Entry points (`train.py`, `evaluate.py`, `python -m cross_modal_sd.extract`, ...) call
`register_resolvers` before Hydra composes; importing the package registers nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

# The package runs from a checkout (editable install): conf/ sits beside it.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def mini_cache_dir(root: str, world: Any) -> str:
    """`<root>/<world digest>/cache`: a mini-world cache lives beside the models it came from,
    so a rebuilt world never trains on states of the models it replaced."""
    from cross_modal_sd.world.build import MiniWorldConfig

    config = MiniWorldConfig.from_dict(OmegaConf.to_container(world, resolve=True))
    return str(Path(root) / config.digest() / "cache")


def multirun_suffix() -> str:
    """``-<job number>`` inside a Hydra multirun job, else ``""``.

    ``run_name`` ends with it: sweep jobs started in the same second (parallel launchers) would
    otherwise share a timestamped name, and with it an export directory.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return ""
    hydra_cfg = HydraConfig.get()
    return f"-{hydra_cfg.job.num}" if hydra_cfg.mode == RunMode.MULTIRUN else ""


RESOLVERS = {"mini_cache_dir": mini_cache_dir, "multirun_suffix": multirun_suffix}


def register_resolvers() -> None:
    """Registers the resolvers `conf/` uses (idempotent)."""
    for name, fn in RESOLVERS.items():
        OmegaConf.register_new_resolver(name, fn, replace=True)


def group_options(group: str) -> list[str]:
    """Option names of a config group, e.g. ``group_options("adapter")`` -> ``["L1", ..., "L5"]``."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def group_option(group: str, name: str) -> dict[str, Any]:
    """``conf/<group>/<name>.yaml`` as a plain dict, e.g. ``group_option("adapter", "L3")``.

    Raises:
        ValueError: no such option; the message lists the group's options.
    """
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(
            f"unknown {group} {name!r}: no {group}/{path.name} in {CONF_DIR}; known: "
            f"{', '.join(group_options(group)) or '(none)'}"
        )
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
