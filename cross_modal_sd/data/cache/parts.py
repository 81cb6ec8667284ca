"""Merging per-rank part caches under one root manifest, without copying rows."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cross_modal_sd.data.cache.files import write_atomic
from cross_modal_sd.data.cache.format import (
    CONTENT_FIELDS,
    LOCK_NAME,
    MANIFEST_NAME,
    CacheError,
    load_manifest,
    manifest_text,
)

PARTS_DIR = "parts"


def merge_parts(
    root: str | os.PathLike, parts: Sequence[str | os.PathLike] | None = None
) -> dict[str, Any]:
    """Commit one manifest at ``root`` that lists its own shards and those of its part caches.

    A part is a complete cache in a subdirectory of ``root`` (``parts/<name>/`` by default),
    written by its own process. No row is copied: the merged manifest points at the parts' shard
    files through paths relative to ``root``, so a merge of tens of GB costs one small file. The
    sample order is the root's own samples, then each part's in order. Merging again after a part
    grew simply lists the new shards.

    Args:
        root: Cache directory that receives the merged manifest.
        parts: Part directories under ``root``, in sample order; all ``root/parts/*`` holding a
            manifest, sorted by name, when None.

    Returns:
        The merged manifest.

    Raises:
        CacheError: a part lies outside ``root``, was written with other content fields, holds
            another lm_head, lists a missing or resized shard, or shares a sample id with another.
    """
    root = Path(root)
    if parts is None:
        base = root / PARTS_DIR
        parts = sorted(p for p in base.iterdir() if (p / MANIFEST_NAME).is_file())
    sources: list[tuple[str, dict[str, Any]]] = []
    lock = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        # A merge by another process (or a writer on root itself) finishes first.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / MANIFEST_NAME).is_file():
            own = _own_part(load_manifest(root))
            if own["shards"]:
                sources.append(("", own))
        for part in parts:
            part = Path(part)
            try:
                rel = part.resolve().relative_to(root.resolve()).as_posix()
            except ValueError as e:
                raise CacheError(f"{part}: a part cache must lie inside {root}") from e
            sources.append((rel, load_manifest(part)))
        if not sources:
            raise CacheError(f"{root}: nothing to merge (no part caches under {root / PARTS_DIR})")
        merged = _merge_manifests(root, sources)
        write_atomic(root / MANIFEST_NAME, [manifest_text(merged).encode()])
    finally:
        os.close(lock)
    return merged


def _own_part(manifest: dict[str, Any]) -> dict[str, Any]:
    """The part of a root manifest that lies in root itself (not under a part directory).

    Such shards were written by a single-process extraction before the cache was continued by
    several processes; a merge keeps them and re-lists every part.
    """
    kept = [i for i, s in enumerate(manifest["shards"]) if "/" not in s["file"]]
    new_index = {old: new for new, old in enumerate(kept)}
    own = dict(manifest)
    own["shards"] = [manifest["shards"][i] for i in kept]
    own["samples"] = [
        {**s, "shard": new_index[s["shard"]]}
        for s in manifest["samples"]
        if s["shard"] in new_index
    ]
    own["n_samples"] = len(own["samples"])
    own["n_rows"] = sum(s["n_rows"] for s in own["shards"])
    head = manifest["lm_head"]
    own["lm_head"] = head if head is not None and "/" not in head["file"] else None
    return own


def _merge_manifests(root: Path, sources: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One manifest from ``(path relative to root, manifest)`` pairs; see ``merge_parts``."""
    first_rel, first = sources[0]
    merged: dict[str, Any] = {k: first[k] for k in CONTENT_FIELDS}
    merged |= {"extra": first["extra"], "n_samples": 0, "n_rows": 0, "lm_head": None}
    merged |= {"shards": [], "samples": []}
    owner: dict[str, str] = {}
    for rel, m in sources:
        where = root / rel / MANIFEST_NAME
        diffs = [k for k in CONTENT_FIELDS if m[k] != first[k]]
        if diffs:
            raise CacheError(
                f"{where}: written with other settings than {root / first_rel / MANIFEST_NAME} "
                f"(differing fields {diffs}); parts of one cache must come from one extraction"
            )
        prefix = f"{rel}/" if rel else ""
        head = m["lm_head"]
        if head is not None:
            if merged["lm_head"] is None:
                merged["lm_head"] = {**head, "file": prefix + head["file"]}
            elif merged["lm_head"]["sha256"] != head["sha256"]:
                raise CacheError(f"{where}: holds another lm_head than {merged['lm_head']['file']}")
        offset = len(merged["shards"])
        for shard in m["shards"]:
            path = root / (prefix + shard["file"])
            if not path.is_file() or path.stat().st_size != shard["n_bytes"]:
                raise CacheError(f"{path}: shard listed in {where} is missing or resized")
            merged["shards"].append({**shard, "file": prefix + shard["file"]})
        for sample in m["samples"]:
            if sample["id"] in owner:
                raise CacheError(
                    f"{where}: sample {sample['id']!r} is also in {owner[sample['id']]}; "
                    "each sample must be extracted by one part only"
                )
            owner[sample["id"]] = str(where)
            merged["samples"].append({**sample, "shard": sample["shard"] + offset})
        merged["n_samples"] += m["n_samples"]
        merged["n_rows"] += m["n_rows"]
    return merged
