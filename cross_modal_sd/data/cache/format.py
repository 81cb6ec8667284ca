"""On-disk format of the hidden-pair cache: names, dtype tags, ``CacheError``, the manifest."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
LM_HEAD_NAME = "lm_head.safetensors"
STAMP_NAME = "verified.json"
LOCK_NAME = ".lock"
PAIRINGS = ("teacher_forced", "index")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# safetensors dtype tags, and the numpy dtype the reader maps them with (bf16 as raw uint16 bits).
ST_TAG = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.int32: "I32",
    torch.int64: "I64",
}
TAG_TORCH = {tag: dt for dt, tag in ST_TAG.items()}
TAG_NUMPY = {
    "BF16": np.uint16,
    "F16": np.float16,
    "F32": np.float32,
    "I32": np.int32,
    "I64": np.int64,
}
# Shard files, and the temp files an interrupted write leaves (a new writer deletes the temp files
# and every shard the manifest does not list).
SHARD_RE = re.compile(r"shard-(\d+)\.safetensors")
TEMP_RE = re.compile(
    r"(shard-\d+\.safetensors|lm_head\.safetensors|manifest\.json|verified\.json)\.tmp"
)

_META_REQUIRED: dict[str, type] = {
    "pairing": str,
    "draft_model": str,
    "target_model": str,
    "draft_prompt_template": str,
    "target_prompt_template": str,
    "draft_dim": int,
    "target_dim": int,
    "dtype": str,
    "max_new_tokens": int,
}
_META_OPTIONAL = ("vocab_limit", "extra")
# Fields that decide what the rows mean; a resumed writer and the manifest digest both use them.
CONTENT_FIELDS = ("format_version", *_META_REQUIRED, "vocab_limit")


class CacheError(ValueError):
    """A hidden-pair cache that is malformed, corrupt, or incompatible with what was asked."""


def shard_name(index: int) -> str:
    """File name of shard ``index`` (``shard-00000.safetensors``)."""
    return f"shard-{index:05d}.safetensors"


def validate_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Check a writer's ``meta`` and return it normalised (``vocab_limit`` and ``extra`` filled in).

    Raises:
        ValueError: on unknown or missing keys, wrong types, or out-of-range values.
    """
    unknown = sorted(set(meta) - set(_META_REQUIRED) - set(_META_OPTIONAL))
    if unknown:
        raise ValueError(
            f"cache meta has unknown key(s) {unknown}; free-form metadata goes under meta['extra']"
        )
    missing = [k for k in _META_REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"cache meta is missing required key(s) {missing}")
    for key, kind in _META_REQUIRED.items():
        value = meta[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"cache meta[{key!r}] must be {kind.__name__}, got {value!r}")
    for key in ("draft_dim", "target_dim", "max_new_tokens"):
        if meta[key] < 1:
            raise ValueError(f"cache meta[{key!r}] must be positive, got {meta[key]}")
    if meta["pairing"] not in PAIRINGS:
        raise ValueError(
            f"cache meta['pairing'] must be one of {PAIRINGS}, got {meta['pairing']!r}"
        )
    if meta["dtype"] not in DTYPES:
        raise ValueError(
            f"cache meta['dtype'] must be one of {list(DTYPES)}, got {meta['dtype']!r}"
        )
    vocab_limit = meta.get("vocab_limit")
    if vocab_limit is not None and (
        not isinstance(vocab_limit, int) or isinstance(vocab_limit, bool) or vocab_limit < 1
    ):
        raise ValueError(
            f"cache meta['vocab_limit'] must be a positive int or None, got {vocab_limit!r}"
        )
    extra = meta.get("extra") or {}
    if not isinstance(extra, dict):
        raise ValueError(f"cache meta['extra'] must be a dict, got {type(extra).__name__}")
    check_json("cache meta['extra']", extra)
    out = {k: meta[k] for k in _META_REQUIRED}
    out["vocab_limit"] = vocab_limit
    out["extra"] = extra
    return out


def check_json(what: str, value: Any) -> None:
    """Raise ValueError naming ``what`` if ``value`` cannot be written as JSON."""
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} is not JSON-serialisable: {e}") from e


def manifest_text(manifest: Mapping[str, Any]) -> str:
    """Pretty JSON with one line per shard and per sample, so large manifests stay diffable."""
    lines = ["{"]
    items = list(manifest.items())
    for n, (key, value) in enumerate(items):
        comma = "," if n < len(items) - 1 else ""
        if key in ("shards", "samples") and value:
            rows = ",\n".join("    " + json.dumps(v, separators=(", ", ": ")) for v in value)
            lines.append(f"  {json.dumps(key)}: [\n{rows}\n  ]{comma}")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}{comma}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def load_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``manifest.json`` of a cache directory.

    Raises:
        FileNotFoundError: if the directory has no manifest.
        CacheError: if the manifest is not JSON, is of a newer format version, or lacks fields.
    """
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; {Path(root)} is not a hidden-pair cache")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{path}: manifest is not valid JSON ({e})") from e
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int):
        raise CacheError(f"{path}: manifest has no integer format_version")
    if version > FORMAT_VERSION:
        raise CacheError(
            f"{path}: manifest format_version {version} is newer than supported {FORMAT_VERSION}; "
            "update cross_modal_sd to read this cache"
        )
    required = (*CONTENT_FIELDS, "extra", "n_samples", "n_rows", "lm_head", "shards", "samples")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise CacheError(f"{path}: manifest lacks field(s) {missing}")
    return manifest


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 over the fields of a manifest that define the cache's content.

    Covers the content fields (format version, pairing, models, prompt templates, dims, dtype,
    max_new_tokens, vocab_limit), the lm_head checksum, every shard's checksum and counts, and
    every sample record (id, group, question id, length, placement). Free-form ``extra`` metadata
    is left out, so annotating a cache does not orphan adapters trained on it.
    """
    lm_head = manifest.get("lm_head")
    content = {
        "fields": {k: manifest[k] for k in CONTENT_FIELDS},
        "lm_head": lm_head["sha256"] if lm_head else None,
        "shards": [[s["sha256"], s["n_samples"], s["n_rows"]] for s in manifest["shards"]],
        "samples": [
            [s["id"], s["group"], s["question_id"], s["length"], s["shard"], s["index"]]
            for s in manifest["samples"]
        ],
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
