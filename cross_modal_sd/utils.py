"""Helpers shared by training, evaluation and the speedup model: strict JSON files, Markdown
tables and the configured loggers."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def json_safe(value: Any) -> Any:
    """Replace NaN/inf floats (nested) by None: strict JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str | os.PathLike, value: Any) -> Path:
    """``value`` as strict, indented JSON (NaN/inf written as null), replaced atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_safe(value), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def instantiate_group(node: Mapping[str, Any] | None) -> dict[str, Any]:
    """Instantiate each ``_target_`` entry of a ``callbacks``/``logger`` node by name.

    Entries set to null (``callbacks.early_stopping=null``) are skipped, so any default can be
    switched off from the command line; a missing node (``~logger``) gives nothing.

    Raises:
        ValueError: an entry without ``_target_``.
    """
    from hydra.utils import instantiate

    out = {}
    for name, entry in (node or {}).items():
        if entry is None:
            continue
        if not isinstance(entry, Mapping) or "_target_" not in entry:
            raise ValueError(f"config entry {name!r} has no _target_ (got {entry!r})")
        out[name] = instantiate(entry)
    return out


def finish_wandb(loggers: list[Any], failed: bool) -> None:
    """Close the W&B run of this job, so the next job of a multirun starts its own.

    ``WandbLogger`` reuses a live ``wandb.run`` instead of starting a new one; without this the
    second sweep point would log into the first one's run.
    """
    from lightning.pytorch.loggers import WandbLogger

    if not any(isinstance(lg, WandbLogger) for lg in loggers):
        return
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: None/NaN as an en dash, floats with `digits` decimals."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**NO**"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 2) -> str:
    """A Markdown table (first column left-aligned, the rest right-aligned)."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(fmt(v, digits) for v in row) + " |" for row in rows]
    return "\n".join(lines)
