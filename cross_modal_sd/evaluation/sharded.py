"""E2E evaluation split across processes: each rank times its block of scenes/clips into a part
file, and the last rank to finish merges all parts into one report (see ``data/sharding.py``).

A part ``<dir>/parts/rank-r-of-W.jsonl`` starts with a header line naming the request, then
holds one ``{"record": ...}`` line per sample (written and fsynced as soon as the sample is
timed), ``{"profile": ...}`` lines for the cost profiles and ``{"warning": ...}`` lines. A rank
killed mid-run keeps every complete line; its rerun times only the samples its part lacks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cross_modal_sd.data.sharding import (
    Shard,
    clear_done,
    mark_done,
    missing_ranks,
    request_digest,
)
from cross_modal_sd.evaluation.e2e import prepare_e2e, summarize_e2e, time_samples, with_baseline
from cross_modal_sd.exports import AdapterExport
from cross_modal_sd.pair import PairModels, make_source
from cross_modal_sd.speedup import CostProfile
from cross_modal_sd.utils import json_safe

log = logging.getLogger(__name__)

PARTS_DIR = "parts"
# Keys of conf/evaluate.yaml that decide what a part holds; ranks and reruns must agree on them.
REQUEST_KEYS = (
    "models",
    "data",
    "source",
    "max_new_tokens",
    "cores",
    "draft_cores",
    "warmup",
    "device",
    "cost_profile",
    "strategies",
    "decoding",
    "peers",
    "head_ckpt",
)


class PartError(ValueError):
    """A part file that belongs to another evaluation or cannot be read."""


def read_part(path: Path, request: str) -> tuple[list[dict[str, Any]], int]:
    """Entries of a part file (after its header) and the byte length of its complete lines.

    A missing file has no entries. A last line without its newline (the rank died writing it)
    is not counted, so appending after ``valid_bytes`` drops it.

    Raises:
        PartError: the header names another request, or a complete line is not JSON.
    """
    if not path.is_file():
        return [], 0
    data = path.read_bytes()
    valid = data.rfind(b"\n") + 1
    lines = data[:valid].decode().splitlines()
    if not lines:
        return [], 0
    try:
        header = json.loads(lines[0])
        entries = [json.loads(line) for line in lines[1:]]
    except json.JSONDecodeError as e:
        raise PartError(f"{path}: unreadable part file ({e})") from e
    if header.get("request") != request:
        raise PartError(
            f"{path}: written by an evaluation with another checkpoint or configuration; "
            "give this one another shard.dir (or remove the old parts)"
        )
    return entries, valid


class _PartWriter:
    """Appends lines to a part file, each flushed and fsynced (a record is an evaluated sample)."""

    def __init__(self, path: Path, header: Mapping[str, Any], valid_bytes: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a+b")  # noqa: SIM115 (closed by close())
        self.file.truncate(valid_bytes)  # a half-written last line goes
        if valid_bytes == 0:
            self.write(header)

    def write(self, entry: Mapping[str, Any]) -> None:
        self.file.write(json.dumps(json_safe(entry), allow_nan=False).encode() + b"\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def evaluate_part(
    cfg: DictConfig,
    export: AdapterExport,
    pair: PairModels,
    shard: Shard,
    root: Path,
    deployment: str,
) -> dict[str, Any]:
    """Time this rank's block of samples into its part; merge when every rank is done.

    Args:
        cfg: composed ``conf/evaluate.yaml`` with ``mode=e2e``.
        export: the adapter export.
        pair: the loaded models.
        shard: this rank.
        root: folder shared by the ranks (``<shard.dir>/<deployment>``): parts under
            ``root/parts``, the merged outputs in ``root``.
        deployment: the deployment timed.

    Returns:
        ``rank``, ``world_size``, ``timed`` (samples timed now), ``resumed`` (samples the part
        already held), ``merged`` and ``waiting_for`` (ranks not done); when this rank merged,
        also ``report`` and ``records`` of all ranks, in sample order.

    Raises:
        PartError: ``root`` holds parts of another evaluation.
    """
    parts = root / PARTS_DIR
    setup = prepare_e2e(pair, export, cfg, deployment, cfg.data.get("cache_dir"))
    request_cfg = {k: cfg.get(k) for k in REQUEST_KEYS}
    request_cfg["ckpt"] = str(export.path)
    request_cfg["deployment"] = deployment
    request = request_digest(
        {
            **OmegaConf.to_container(OmegaConf.create(request_cfg), resolve=True),
            "W": shard.world_size,
        }
    )
    clear_done(parts, shard)
    path = parts / f"{shard.name}.jsonl"
    entries, valid = read_part(path, request)
    done = {e["record"]["sample_id"] for e in entries if "record" in e}
    source = make_source(cfg.source)
    start, n = shard.block(*source.units())
    samples = [s for _, s in source.samples(pair, skip=done, start=start, count=n) if s]
    writer = _PartWriter(path, {"request": request, **dataclasses.asdict(shard)}, valid)
    try:
        records, profiles, warnings = time_samples(
            setup, samples, on_record=lambda r: writer.write({"record": r})
        )
        for profile in profiles:
            writer.write({"profile": profile.to_dict()})
        for warning in warnings:
            writer.write({"warning": warning})
    finally:
        writer.close()
    mark_done(parts, shard, request, samples=len(done) + len(records))
    status = {
        "rank": shard.rank,
        "world_size": shard.world_size,
        "timed": len(records),
        "resumed": len(done),
    }
    waiting = missing_ranks(parts, shard.world_size, request)
    if waiting:
        log.info("rank %d done; waiting for ranks %s to merge %s", shard.rank, waiting, root)
        return {**status, "merged": False, "waiting_for": waiting}
    records, profiles, warnings, per_rank = [], [], [], []
    for rank in range(shard.world_size):
        part = parts / f"{Shard(rank, shard.world_size).name}.jsonl"
        entries = read_part(part, request)[0]
        per_rank.append(sum("record" in e for e in entries))
        for entry in entries:
            if "record" in entry:
                records.append(entry["record"])
            elif "profile" in entry:
                profiles.append(CostProfile.from_dict(entry["profile"], where=str(part)))
            elif "warning" in entry:
                warnings.append(f"rank {rank}: {entry['warning']}")
    report = summarize_e2e(setup, records, profiles, warnings)
    records = with_baseline(records, report["baseline_loop"])
    report["sharding"] = {
        "world_size": shard.world_size,
        "parts": str(parts),
        "samples_per_rank": per_rank,
        "merged_by": status,
    }
    return {**status, "merged": True, "waiting_for": [], "report": report, "records": records}
