"""Hidden-state pair cache (DESIGN §6): on-disk format, resumable writer, memory-mapped reader.

A cache directory holds::

    manifest.json              models, prompt templates, dims, dtype, shards, sample records
    shard-00000.safetensors    h_draft (R, Dd), h_target (R, Dt), tokens (R,), offsets (S+1,)
    shard-00001.safetensors    ...
    lm_head.safetensors        weight (V, Dt) of the target model
    verified.json              written by the reader after checking checksums (verify="once")
    .lock                      held by a live CacheWriter

Sample j of a shard owns rows ``offsets[j]:offsets[j + 1]``; its row k holds the draft and target
final-layer states that predict answer token ``tokens[k]``. Rows are unpadded, in the cache's native
dtype, so a cache costs ``(Dd + Dt) * 2`` bytes per answer token in 16-bit.

Crash safety: shards, the lm_head and the manifest are each written to a ``*.tmp`` name, fsynced and
``os.replace``d into place, and the manifest (the commit record) is rewritten after every shard, so
a killed extraction leaves every listed shard complete. A new writer on the same directory deletes
temp files and unlisted shards and continues; samples that were only buffered are redone by the
caller, who skips ``done_ids()``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import mmap
import operator
import os
import re
import warnings
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
LM_HEAD_NAME = "lm_head.safetensors"
STAMP_NAME = "verified.json"
LOCK_NAME = ".lock"
PAIRINGS = ("teacher_forced", "index")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# safetensors dtype tags, and the numpy dtype the reader maps them with (bf16 as raw uint16 bits).
_ST_TAG = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.int32: "I32",
    torch.int64: "I64",
}
_TAG_TORCH = {tag: dt for dt, tag in _ST_TAG.items()}
_TAG_NUMPY = {
    "BF16": np.uint16,
    "F16": np.float16,
    "F32": np.float32,
    "I32": np.int32,
    "I64": np.int64,
}
_SHARD_RE = re.compile(r"shard-(\d+)\.safetensors")
_TEMP_RE = re.compile(
    r"(shard-\d+\.safetensors|lm_head\.safetensors|manifest\.json|verified\.json)\.tmp"
)
_MAX_HEADER_BYTES = 100_000_000
_HASH_CHUNK = 8 << 20
# The reader drops its page mappings after copying out this many bytes, so resident file pages
# never add more than this to a process's RSS, however large the cache (the page cache keeps them).
_RELEASE_EVERY_BYTES = 32 << 20
_PREFETCH_CHUNK = 2 << 20

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


# ----------------------------------------------------------------------------- file primitives


def _fsync_dir(root: Path) -> None:
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, chunks: Iterable[bytes | memoryview | np.ndarray]) -> tuple[int, str]:
    """Write ``chunks`` to ``path`` via a fsynced temp file; return (size, sha256 hex)."""
    tmp = path.with_name(path.name + ".tmp")
    digest = hashlib.sha256()
    size = 0
    with open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
            digest.update(chunk)
            size += memoryview(chunk).nbytes
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return size, digest.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """Raw little-endian bytes of a contiguous CPU tensor, without a copy."""
    return t.contiguous().view(torch.uint8).numpy()


def _safetensors_chunks(
    tensors: Mapping[str, Sequence[torch.Tensor]], metadata: Mapping[str, str]
) -> Iterable[bytes | np.ndarray]:
    """Stream a safetensors file whose tensor ``name`` is the dim-0 concatenation of its parts.

    Streaming the parts avoids building the concatenated shard (hundreds of MB) in memory.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    start = 0
    for name, parts in tensors.items():
        first = parts[0]
        nbytes = sum(p.numel() * p.element_size() for p in parts)
        shape = [sum(p.shape[0] for p in parts), *first.shape[1:]]
        header[name] = {
            "dtype": _ST_TAG[first.dtype],
            "shape": shape,
            "data_offsets": [start, start + nbytes],
        }
        start += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keeps the data section 8-byte aligned
    yield len(blob).to_bytes(8, "little") + blob
    for parts in tensors.values():
        for part in parts:
            yield _tensor_bytes(part)


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header without reading tensor data.

    Returns:
        The header dict (tensor name -> dtype/shape/data_offsets, plus ``__metadata__``) and the byte
        offset where the data section starts.

    Raises:
        CacheError: if the file is too short to hold its header or the header is not valid JSON.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CacheError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        n = int.from_bytes(raw, "little")
        if n > _MAX_HEADER_BYTES or 8 + n > size:
            raise CacheError(
                f"{path}: truncated or corrupt safetensors file "
                f"(header claims {n} bytes, file has {size})"
            )
        blob = f.read(n)
    try:
        header = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{path}: unreadable safetensors header ({e})") from e
    return header, 8 + n


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------ manifest


def _validate_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
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
    _check_json("cache meta['extra']", extra)
    out = {k: meta[k] for k in _META_REQUIRED}
    out["vocab_limit"] = vocab_limit
    out["extra"] = extra
    return out


def _check_json(what: str, value: Any) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} is not JSON-serialisable: {e}") from e


def _manifest_text(manifest: Mapping[str, Any]) -> str:
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


# -------------------------------------------------------------------------------------- writer


class _RowStage:
    """Rows of the shard being built, in one buffer per tensor that is reused for every shard.

    Copying each sample into a long-lived buffer (instead of keeping per-sample tensors) costs one
    memcpy, keeps a shard a single contiguous write, and avoids allocating fresh memory per sample.
    """

    def __init__(self, widths: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, torch.dtype]):
        self.widths, self.dtypes = dict(widths), dict(dtypes)
        self.buffers: dict[str, torch.Tensor] = {}
        self.n_rows = 0

    def append(self, rows: Mapping[str, torch.Tensor]) -> None:
        length = next(iter(rows.values())).shape[0]
        need = self.n_rows + length
        for name, x in rows.items():
            buf = self.buffers.get(name)
            if buf is None or buf.shape[0] < need:
                grown = torch.empty(
                    max(need, 4096, need * 3 // 2), *self.widths[name], dtype=self.dtypes[name]
                )
                if buf is not None:
                    grown[: self.n_rows] = buf[: self.n_rows]
                self.buffers[name] = buf = grown
            buf[self.n_rows : need].copy_(x)  # casts to the cache dtype, and copies off the GPU
        self.n_rows = need

    def view(self, name: str) -> torch.Tensor:
        return self.buffers[name][: self.n_rows]


class CacheWriter:
    """Append (h_draft, h_target, token) rows per sample into a cache directory, crash-safely.

    Samples are buffered and written ``shard_samples`` at a time; the manifest is committed after
    every shard. Opening a writer on an existing cache with the same content fields resumes it:
    the caller skips ``done_ids()`` and adds the rest. One writer per directory at a time (an
    advisory lock enforces it; the OS drops the lock when the process dies).

    Example:
        >>> with CacheWriter(out_dir, meta) as writer:
        ...     writer.set_lm_head(target.lm_head.weight)
        ...     for s in samples:
        ...         if s.id not in writer.done_ids():
        ...             writer.add(s.id, s.scene, s.qid, h_draft, h_target, tokens)

    Args:
        root: Cache directory; created if missing.
        meta: Required keys ``pairing`` ("teacher_forced" | "index"), ``draft_model``,
            ``target_model``, ``draft_prompt_template``, ``target_prompt_template``, ``draft_dim``,
            ``target_dim``, ``dtype`` ("bfloat16" | "float16" | "float32"), ``max_new_tokens``;
            optional ``vocab_limit`` (tokens must be below it) and ``extra`` (free-form JSON dict).
        shard_samples: Samples per shard. About 512 keeps shards near 200 MB at 4096-wide 16-bit
            states with ~25-token answers.

    Raises:
        ValueError: on malformed meta.
        CacheError: if the directory holds a cache with other content fields (dims, models, ...),
            a listed shard is missing or resized, or another writer holds the directory.
    """

    def __init__(self, root: str | os.PathLike, meta: Mapping[str, Any], shard_samples: int = 512):
        if shard_samples < 1:
            raise ValueError(f"shard_samples must be >= 1, got {shard_samples}")
        self.root = Path(root)
        self.shard_samples = shard_samples
        self._meta = _validate_meta(meta)
        self._dtype = DTYPES[self._meta["dtype"]]
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = self._acquire_lock()
        self._buffer: list[dict[str, Any]] = []  # sample records of the shard being built
        self._buffered_ids: set[str] = set()
        self._stage = _RowStage(
            {
                "h_draft": (self._meta["draft_dim"],),
                "h_target": (self._meta["target_dim"],),
                "tokens": (),
            },
            {"h_draft": self._dtype, "h_target": self._dtype, "tokens": torch.int32},
        )
        self._closed = False
        try:
            self._remove_temp_files()
            if (self.root / MANIFEST_NAME).exists():
                self._manifest = self._resume()
            else:
                self._manifest = {
                    "format_version": FORMAT_VERSION,
                    **{k: v for k, v in self._meta.items() if k != "extra"},
                    "extra": self._meta["extra"],
                    "n_samples": 0,
                    "n_rows": 0,
                    "lm_head": None,
                    "shards": [],
                    "samples": [],
                }
            self._remove_unlisted_shards()
            self._done = {s["id"] for s in self._manifest["samples"]}
            self._write_manifest()
        except BaseException:
            self._release_lock()
            raise

    # -- public API

    def done_ids(self) -> set[str]:
        """Ids of samples committed to disk (buffered samples are not included)."""
        return set(self._done)

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest as last committed (a copy)."""
        return json.loads(json.dumps(self._manifest))

    def add(
        self,
        sample_id: str,
        group: str,
        question_id: str,
        h_draft: torch.Tensor,
        h_target: torch.Tensor,
        tokens: torch.Tensor,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Buffer one sample; writes a shard when ``shard_samples`` are buffered.

        Args:
            sample_id: Unique id of the sample in this cache.
            group: Scene/sequence id; train/val splits never separate a group.
            question_id: Id of the question template asked.
            h_draft: (L, Dd) draft final-layer states; cast to the cache dtype.
            h_target: (L, Dt) target final-layer states; cast to the cache dtype.
            tokens: (L,) integer answer tokens y, with 1 <= L <= max_new_tokens.
            extra: Optional JSON-serialisable per-sample metadata kept in the sample record.

        Raises:
            ValueError: on a duplicate id, wrong shapes, empty answers, non-integer tokens or
                tokens outside [0, vocab_limit).
        """
        self._check_open()
        for name, value in (
            ("sample_id", sample_id),
            ("group", group),
            ("question_id", question_id),
        ):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty str, got {value!r}")
        if sample_id in self._done or sample_id in self._buffered_ids:
            raise ValueError(f"sample id {sample_id!r} is already in the cache at {self.root}")
        toks = torch.as_tensor(tokens).detach()
        if (
            toks.ndim != 1
            or toks.is_floating_point()
            or toks.is_complex()
            or toks.dtype == torch.bool
        ):
            raise ValueError(
                f"tokens of sample {sample_id!r} must be a 1-D integer tensor, "
                f"got {toks.dtype} of shape {tuple(toks.shape)}"
            )
        length = toks.shape[0]
        if not 1 <= length <= self._meta["max_new_tokens"]:
            raise ValueError(
                f"sample {sample_id!r} has answer length {length}; expected 1..max_new_tokens "
                f"({self._meta['max_new_tokens']})"
            )
        limit = self._meta["vocab_limit"]
        low, high = int(toks.min()), int(toks.max())
        if low < 0 or (limit is not None and high >= limit):
            raise ValueError(
                f"tokens of sample {sample_id!r} span [{low}, {high}], outside [0, vocab_limit={limit})"
            )
        rows_d = self._check_rows(h_draft, "h_draft", sample_id, length, self._meta["draft_dim"])
        rows_t = self._check_rows(h_target, "h_target", sample_id, length, self._meta["target_dim"])
        record = {"id": sample_id, "group": group, "question_id": question_id, "length": length}
        if extra:
            _check_json(f"extra of sample {sample_id!r}", dict(extra))
            record["extra"] = dict(extra)
        self._stage.append({"h_draft": rows_d, "h_target": rows_t, "tokens": toks})
        self._buffer.append(record)
        self._buffered_ids.add(sample_id)
        if len(self._buffer) >= self.shard_samples:
            self.flush()

    def set_lm_head(self, weight: torch.Tensor) -> None:
        """Store the target's ``lm_head`` weight (V, Dt) beside the shards, in its own dtype.

        Calling it again with an identical weight (as a resumed extraction does) is a no-op.

        Raises:
            ValueError: on a shape that does not match ``target_dim`` or ``vocab_limit``.
            CacheError: if the cache already holds a different lm_head.
        """
        self._check_open()
        w = torch.as_tensor(weight).detach().to("cpu").contiguous()
        dt = self._meta["target_dim"]
        if w.ndim != 2 or w.shape[1] != dt or w.dtype not in DTYPES.values():
            raise ValueError(
                f"lm_head weight must be a (V, {dt}) float tensor, got {w.dtype} {tuple(w.shape)}"
            )
        limit = self._meta["vocab_limit"]
        if limit is not None and w.shape[0] < limit:
            raise ValueError(f"lm_head has {w.shape[0]} rows, fewer than vocab_limit={limit}")
        chunks = list(_safetensors_chunks({"weight": [w]}, {"format": "cross_modal_sd.lm_head"}))
        digest = hashlib.sha256()
        for c in chunks:
            digest.update(c)
        sha = digest.hexdigest()
        stored = self._manifest["lm_head"]
        if stored is not None:
            if stored["sha256"] == sha:
                return
            raise CacheError(
                f"{self.root / LM_HEAD_NAME}: the cache already holds a different lm_head "
                f"(sha256 {stored['sha256'][:12]}..., new {sha[:12]}...)"
            )
        n_bytes, sha = _write_atomic(self.root / LM_HEAD_NAME, chunks)
        self._manifest["lm_head"] = {
            "file": LM_HEAD_NAME,
            "shape": list(w.shape),
            "dtype": next(k for k, v in DTYPES.items() if v == w.dtype),
            "n_bytes": n_bytes,
            "sha256": sha,
        }
        self._write_manifest()

    def flush(self) -> None:
        """Write buffered samples as one (possibly short) shard and commit the manifest."""
        self._check_open()
        if not self._buffer:
            return
        index = len(self._manifest["shards"])
        name = shard_name(index)
        lengths = torch.tensor([r["length"] for r in self._buffer], dtype=torch.int64)
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths, 0)
        stage = self._stage
        tensors = {
            "h_draft": [stage.view("h_draft")],
            "h_target": [stage.view("h_target")],
            "tokens": [stage.view("tokens")],
            "offsets": [offsets],
        }
        metadata = {"format": "cross_modal_sd.hidden_pairs", "format_version": str(FORMAT_VERSION)}
        n_bytes, sha = _write_atomic(self.root / name, _safetensors_chunks(tensors, metadata))
        n_rows = int(offsets[-1])
        m = self._manifest
        m["shards"].append(
            {
                "file": name,
                "n_samples": len(self._buffer),
                "n_rows": n_rows,
                "n_bytes": n_bytes,
                "sha256": sha,
            }
        )
        for j, record in enumerate(self._buffer):
            m["samples"].append({**record, "shard": index, "index": j})
        m["n_samples"] += len(self._buffer)
        m["n_rows"] += n_rows
        self._write_manifest()
        self._done |= self._buffered_ids
        self._buffer, self._buffered_ids = [], set()
        stage.n_rows = 0

    def close(self) -> None:
        """Flush the last partial shard and release the directory."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._release_lock()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        # Buffered samples are complete even when the caller failed, so they are kept.
        self.close()

    # -- internals

    def _check_rows(
        self, x: torch.Tensor, name: str, sample_id: str, length: int, dim: int
    ) -> torch.Tensor:
        x = torch.as_tensor(x).detach()
        if x.shape != (length, dim) or not x.is_floating_point():
            raise ValueError(
                f"{name} of sample {sample_id!r} is {x.dtype} {tuple(x.shape)}; "
                f"expected a float ({length}, {dim}) tensor (one row per answer token)"
            )
        return x

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"CacheWriter for {self.root} is closed")

    def _acquire_lock(self) -> int:
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(fd)
            raise CacheError(f"{self.root}: another CacheWriter is writing this cache") from e
        return fd

    def _release_lock(self) -> None:
        if self._lock >= 0:
            os.close(self._lock)  # closing the fd drops the flock
            self._lock = -1

    def _remove_temp_files(self) -> None:
        for p in self.root.iterdir():
            if _TEMP_RE.fullmatch(p.name):
                p.unlink()

    def _resume(self) -> dict[str, Any]:
        path = self.root / MANIFEST_NAME
        manifest = load_manifest(self.root)
        if manifest["format_version"] != FORMAT_VERSION:
            raise CacheError(
                f"{path}: cache has format_version {manifest['format_version']}; this writer "
                f"only appends to format_version {FORMAT_VERSION}"
            )
        diffs = [
            f"{k}: cache {manifest[k]!r}, writer {self._meta[k]!r}"
            for k in CONTENT_FIELDS[1:]
            if manifest[k] != self._meta[k]
        ]
        if diffs:
            raise CacheError(
                f"{path}: cannot resume, the existing cache was written with other settings "
                f"({'; '.join(diffs)}); use a new directory"
            )
        for shard in manifest["shards"]:
            p = self.root / shard["file"]
            if not p.is_file():
                raise CacheError(f"{p}: shard listed in {path} is missing; cannot resume")
            if p.stat().st_size != shard["n_bytes"]:
                raise CacheError(
                    f"{p}: shard has {p.stat().st_size} bytes, {path} says {shard['n_bytes']}; "
                    "cannot resume"
                )
        manifest["extra"] = self._meta["extra"]
        return manifest

    def _remove_unlisted_shards(self) -> None:
        # A crash between a shard's rename and the manifest commit leaves a complete but
        # unrecorded shard; its samples are not in done_ids(), so they are redone.
        listed = {s["file"] for s in self._manifest["shards"]}
        for p in self.root.iterdir():
            if _SHARD_RE.fullmatch(p.name) and p.name not in listed:
                p.unlink()

    def _write_manifest(self) -> None:
        _write_atomic(self.root / MANIFEST_NAME, [_manifest_text(self._manifest).encode()])


# -------------------------------------------------------------------------------------- reader


class _Shard:
    """One memory-mapped shard: numpy views over its tensors and a copy of its offsets."""

    def __init__(self, path: Path, record: Mapping[str, Any], dims: tuple[int, int], dtype: str):
        header, start = read_safetensors_header(path)
        n_rows, n_samples = record["n_rows"], record["n_samples"]
        tag = _ST_TAG[DTYPES[dtype]]
        expected = {
            "h_draft": ((tag,), [n_rows, dims[0]]),
            "h_target": ((tag,), [n_rows, dims[1]]),
            "tokens": (("I32", "I64"), [n_rows]),
            "offsets": (("I64",), [n_samples + 1]),
        }
        size = path.stat().st_size
        spans = {}
        for name, (tags, shape) in expected.items():
            entry = header.get(name)
            if entry is None:
                raise CacheError(f"{path}: shard has no tensor {name!r}")
            if entry["dtype"] not in tags or entry["shape"] != shape:
                raise CacheError(
                    f"{path}: tensor {name!r} is {entry['dtype']} {entry['shape']}, "
                    f"manifest implies {'/'.join(tags)} {shape}"
                )
            begin, end = (start + o for o in entry["data_offsets"])
            if end > size:
                raise CacheError(
                    f"{path}: truncated shard ({size} bytes, tensor {name!r} ends at {end})"
                )
            spans[name] = (begin, entry["dtype"], shape)
        self.path = path
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.arrays: dict[str, np.ndarray] = {}
        self.starts: dict[str, int] = {}
        self.torch_dtype: dict[str, torch.dtype] = {}
        for name, (begin, tag_, shape) in spans.items():
            arr = np.frombuffer(
                self._mm, dtype=_TAG_NUMPY[tag_], count=math.prod(shape), offset=begin
            )
            self.arrays[name] = arr.reshape(shape)
            self.starts[name] = begin
            self.torch_dtype[name] = _TAG_TORCH[tag_]
        self.offsets = self.arrays.pop("offsets").copy()
        if self.offsets[0] != 0 or self.offsets[-1] != n_rows or np.any(np.diff(self.offsets) < 1):
            self.close()
            raise CacheError(f"{path}: offsets are not increasing from 0 to n_rows={n_rows}")

    def row_bytes(self, name: str, a: int, b: int) -> tuple[int, int]:
        arr = self.arrays[name]
        stride = arr.strides[0]
        return self.starts[name] + a * stride, self.starts[name] + b * stride

    def read(self, name: str, a: int, b: int) -> torch.Tensor:
        """Copy rows a:b of tensor ``name`` out of the mapping."""
        out = torch.from_numpy(np.array(self.arrays[name][a:b]))
        dt = self.torch_dtype[name]
        return out.view(dt) if out.dtype != dt else out

    def advise(self, advice: int, begin: int, end: int) -> None:
        page = mmap.PAGESIZE
        begin -= begin % page  # madvise wants a page-aligned start
        if end > begin:
            self._mm.madvise(advice, begin, end - begin)

    def release(self) -> None:
        """Drop this process's page mappings; the data stays in the OS page cache."""
        self._mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self.arrays.clear()
        if self._mm is not None:
            self._mm.close()
            self._mm = None


class HiddenPairCache:
    """Memory-mapped, random-access reader of a hidden-pair cache.

    Opening checks the manifest (format version, fields, sample/shard consistency), that every
    shard and the lm_head exist with the sizes the manifest records, and optionally their sha256.
    Shards are mapped lazily, at most ``max_open_shards`` per process, and page mappings are
    dropped after every ~32 MiB read, so RSS stays bounded whatever the cache size. The object is
    picklable and reopens its mappings in each process, so DataLoader workers work under both
    ``fork`` and ``spawn``.

    Args:
        root: Cache directory.
        verify: Checksum policy. ``"once"`` (default) hashes each shard and the lm_head the first
            time they are seen and records (size, mtime, sha256) in ``verified.json``; later opens
            only re-hash files whose size or mtime changed, so a cache is read in full once in its
            life rather than at every open (a corruption that keeps size and mtime goes unseen). ``True``/``"full"`` hashes everything on every open. ``False``/
            ``"size"`` checks existence and sizes only (truncation is still caught).
        expected_dims: Optional ``(draft_dim, target_dim)`` the caller needs.
        max_open_shards: Per-process cap on simultaneously mapped shards (file descriptors).

    Raises:
        FileNotFoundError: if the manifest, a shard or the lm_head file is missing.
        CacheError: on a newer format version, truncated or resized files, checksum mismatches,
            inconsistent sample records, or dims other than ``expected_dims``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        verify: bool | str = "once",
        expected_dims: tuple[int, int] | None = None,
        max_open_shards: int = 32,
    ):
        self.root = Path(root)
        self.max_open_shards = max_open_shards
        self.manifest = load_manifest(self.root)
        self._manifest_path = self.root / MANIFEST_NAME
        m = self.manifest
        self.dims: tuple[int, int] = (m["draft_dim"], m["target_dim"])
        self.dtype: str = m["dtype"]
        if m["dtype"] not in DTYPES:
            raise CacheError(f"{self._manifest_path}: unsupported dtype {m['dtype']!r}")
        if expected_dims is not None:
            for name, got, want in zip(
                ("draft_dim", "target_dim"), self.dims, expected_dims, strict=True
            ):
                if want is not None and got != want:
                    raise CacheError(
                        f"{self._manifest_path}: {name} is {got} but {want} was expected "
                        f"(cache dims {self.dims}, expected {tuple(expected_dims)})"
                    )
        self._index_samples()
        self._check_files(verify)
        self.digest = manifest_digest(m)
        self._shards: OrderedDict[int, _Shard] = OrderedDict()
        self._pid = os.getpid()
        self._unreleased = 0

    # -- metadata

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __repr__(self) -> str:
        return (
            f"HiddenPairCache({str(self.root)!r}, samples={len(self)}, rows={self.manifest['n_rows']}, "
            f"dims={self.dims}, dtype={self.dtype})"
        )

    def lm_head_weight(self) -> torch.Tensor:
        """Load the target ``lm_head`` weight (V, Dt) into memory.

        Raises:
            CacheError: if the cache has no lm_head or it has the wrong shape.
        """
        info = self.manifest["lm_head"]
        if info is None:
            raise CacheError(
                f"{self._manifest_path}: cache has no lm_head (set_lm_head never called)"
            )
        path = self.root / info["file"]
        weight = load_file(path)["weight"]
        if list(weight.shape) != info["shape"] or weight.shape[1] != self.dims[1]:
            raise CacheError(
                f"{path}: lm_head is {tuple(weight.shape)}, manifest says {tuple(info['shape'])} "
                f"with target_dim {self.dims[1]}"
            )
        return weight

    # -- rows

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Sample ``i`` as a dict.

        Returns:
            ``h_draft`` (L, Dd) and ``h_target`` (L, Dt) in the cache dtype, ``tokens`` (L,) int64,
            ``sample_id`` and ``group`` strings. Tensors are copies, not views of the mapping.
        """
        return self.get_many([i])[0]

    def get_many(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Read several samples at once, in the given order.

        All their byte ranges are announced to the kernel (``MADV_WILLNEED``) before the first
        copy, so the reads of a shuffled batch are in flight together instead of one by one.
        """
        n = len(self)
        idx = []
        for i in indices:
            i = operator.index(i)
            if not -n <= i < n:
                raise IndexError(f"sample index {i} out of range for a cache of {n} samples")
            idx.append(i % n)
        plan = []
        for i in idx:
            shard = self._open(int(self._shard_of[i]))
            j = int(self._index_in_shard[i])
            a, b = int(shard.offsets[j]), int(shard.offsets[j + 1])
            if b - a != self.lengths[i]:
                raise CacheError(
                    f"{shard.path}: sample {self.sample_ids[i]!r} has {b - a} rows, "
                    f"manifest says {self.lengths[i]}"
                )
            plan.append((shard, a, b))
        if len(plan) > 1:
            for shard, a, b in plan:
                for name in ("h_draft", "h_target"):
                    shard.advise(mmap.MADV_WILLNEED, *shard.row_bytes(name, a, b))
        out = []
        for i, (shard, a, b) in zip(idx, plan, strict=True):
            out.append(
                {
                    "h_draft": shard.read("h_draft", a, b),
                    "h_target": shard.read("h_target", a, b),
                    "tokens": shard.read("tokens", a, b).long(),
                    "sample_id": self.sample_ids[i],
                    "group": self.groups[i],
                }
            )
            self._unreleased += (b - a) * self._row_bytes
        if self._unreleased > _RELEASE_EVERY_BYTES:
            for shard in self._shards.values():
                shard.release()
            self._unreleased = 0
        return out

    def check_finite(
        self, raise_error: bool = True, block_rows: int = 2048
    ) -> dict[str, list[int]]:
        """Scan every row for NaN/inf, shard by shard (sequential, bounded memory).

        Args:
            raise_error: Raise instead of returning when bad rows exist.
            block_rows: Rows converted to torch per step.

        Returns:
            ``{sample_id: [row positions k within the sample]}`` for samples with non-finite
            rows in h_draft or h_target; empty when the cache is clean.

        Raises:
            CacheError: if ``raise_error`` and any row is non-finite; the message names each shard
                file and the affected sample ids.
        """
        bad: dict[str, list[int]] = {}
        problems = []
        for s in range(len(self.manifest["shards"])):
            shard = self._open(s)
            rows = np.zeros(len(shard.arrays["tokens"]), dtype=bool)
            for name in ("h_draft", "h_target"):
                for a in range(0, len(rows), block_rows):
                    block = shard.read(name, a, a + block_rows)
                    rows[a : a + len(block)] |= ~torch.isfinite(block).all(dim=1).numpy()
                    shard.release()
            bad_rows = np.flatnonzero(rows)
            if len(bad_rows) == 0:
                continue
            owners = np.searchsorted(shard.offsets, bad_rows, side="right") - 1
            ids: dict[str, None] = {}  # ordered set
            for row, j in zip(bad_rows, owners, strict=True):
                sid = self.sample_ids[self._by_shard[s][j]]
                bad.setdefault(sid, []).append(int(row - shard.offsets[j]))
                ids[sid] = None
            shown = ", ".join(repr(x) for x in list(ids)[:10]) + (" ..." if len(ids) > 10 else "")
            problems.append(f"{shard.path}: {len(bad_rows)} NaN/inf row(s) in sample(s) {shown}")
        if problems and raise_error:
            raise CacheError("non-finite hidden states: " + "; ".join(problems))
        return bad

    def prefetch(self, shards: Iterable[int]) -> None:
        """Ask the OS to start reading whole shards into its page cache, without waiting.

        ``ShardWindowSampler`` calls this for the next window of shards, so disk reads overlap with
        batch assembly. It costs page cache (shared, evictable), not process memory.
        """
        for s in shards:
            record = self.manifest["shards"][s]
            fd = os.open(self.root / record["file"], os.O_RDONLY)
            try:
                # Linux caps one WILLNEED at the device's readahead size, so ask chunk by chunk.
                for start in range(0, record["n_bytes"], _PREFETCH_CHUNK):
                    os.posix_fadvise(fd, start, _PREFETCH_CHUNK, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def close(self) -> None:
        """Unmap all shards of this process."""
        for shard in self._shards.values():
            shard.close()
        self._shards.clear()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_shards"] = OrderedDict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    # -- internals

    def _open(self, s: int) -> _Shard:
        if self._pid != os.getpid():
            # A forked child shares the parent's mappings; map its own so neither disturbs the other.
            self._shards = OrderedDict()
            self._pid = os.getpid()
        shard = self._shards.get(s)
        if shard is not None:
            self._shards.move_to_end(s)
            return shard
        record = self.manifest["shards"][s]
        shard = _Shard(self.root / record["file"], record, self.dims, self.dtype)
        self._shards[s] = shard
        if len(self._shards) > self.max_open_shards:
            _, evicted = self._shards.popitem(last=False)
            evicted.close()
        return shard

    def _index_samples(self) -> None:
        m, path = self.manifest, self._manifest_path
        samples, shards = m["samples"], m["shards"]
        try:
            self.sample_ids: list[str] = [s["id"] for s in samples]
            self.groups: list[str] = [s["group"] for s in samples]
            self.question_ids: list[str] = [s["question_id"] for s in samples]
            self.lengths = np.array([s["length"] for s in samples], dtype=np.int64)
            self._shard_of = np.array([s["shard"] for s in samples], dtype=np.int64)
            self._index_in_shard = np.array([s["index"] for s in samples], dtype=np.int64)
        except KeyError as e:
            raise CacheError(f"{path}: a sample record lacks field {e}") from e
        if len(samples) != m["n_samples"]:
            raise CacheError(f"{path}: n_samples is {m['n_samples']} but {len(samples)} are listed")
        if len(set(self.sample_ids)) != len(samples):
            dup = sorted(k for k, c in Counter(self.sample_ids).items() if c > 1)
            raise CacheError(f"{path}: duplicate sample ids {dup[:10]}")
        n_shards = len(shards)
        if len(samples) and (self._shard_of.min() < 0 or self._shard_of.max() >= n_shards):
            raise CacheError(f"{path}: a sample record points to a shard that is not listed")
        counts = np.bincount(self._shard_of, minlength=n_shards)
        rows = np.bincount(self._shard_of, weights=self.lengths, minlength=n_shards)
        for s, shard in enumerate(shards):
            if counts[s] != shard["n_samples"] or rows[s] != shard["n_rows"]:
                raise CacheError(
                    f"{path}: sample records of {shard['file']} give {counts[s]} samples and "
                    f"{int(rows[s])} rows, the shard entry says {shard['n_samples']} and "
                    f"{shard['n_rows']}"
                )
        # Cache indices grouped by shard, in shard order; each group must use indices 0..n-1.
        order = np.lexsort((self._index_in_shard, self._shard_of))
        within = np.arange(len(samples)) - np.repeat(np.cumsum(counts) - counts, counts)
        if not np.array_equal(self._index_in_shard[order], within):
            raise CacheError(f"{path}: sample records do not index each shard 0..n-1 exactly once")
        self._by_shard = np.split(order, np.cumsum(counts)[:-1]) if n_shards else []
        self.shard_index = self._shard_of
        self._row_bytes = sum(self.dims) * DTYPES[self.dtype].itemsize

    def _check_files(self, verify: bool | str) -> None:
        mode = {True: "full", False: "size"}[verify] if isinstance(verify, bool) else verify
        if mode not in ("once", "full", "size"):
            raise ValueError(
                f"verify must be True, False, 'once', 'full' or 'size', got {verify!r}"
            )
        files = [(s["file"], s["n_bytes"], s["sha256"]) for s in self.manifest["shards"]]
        lm_head = self.manifest["lm_head"]
        if lm_head is not None:
            files.append((lm_head["file"], lm_head["n_bytes"], lm_head["sha256"]))
        stats = {}
        for name, n_bytes, _ in files:
            p = self.root / name
            if not p.is_file():
                raise FileNotFoundError(f"{p}: file listed in {self._manifest_path} is missing")
            st = p.stat()
            if st.st_size != n_bytes:
                what = "truncated" if st.st_size < n_bytes else "larger than recorded"
                raise CacheError(
                    f"{p}: file is {what} ({st.st_size} bytes, {self._manifest_path} says {n_bytes})"
                )
            stats[name] = [st.st_size, st.st_mtime_ns]
        if mode == "size":
            return
        stamp_path = self.root / STAMP_NAME
        stamp: dict[str, Any] = {}
        if mode == "once" and stamp_path.is_file():
            try:
                stamp = json.loads(stamp_path.read_text())
            except (OSError, ValueError):
                stamp = {}
        fresh = {}
        for name, _, sha in files:
            known = stamp.get(name)
            if known == [*stats[name], sha]:
                fresh[name] = known
                continue
            got = sha256_file(self.root / name)
            if got != sha:
                raise CacheError(
                    f"{self.root / name}: sha256 checksum mismatch (file {got[:16]}..., "
                    f"manifest {sha[:16]}...); the file is corrupt"
                )
            fresh[name] = [*stats[name], sha]
        if mode == "once" and fresh != stamp:
            try:
                _write_atomic(stamp_path, [json.dumps(fresh, indent=1).encode()])
            except OSError as e:
                warnings.warn(
                    f"{stamp_path}: cannot record verified checksums ({e}); they will be re-checked "
                    "on every open",
                    stacklevel=3,
                )


# --------------------------------------------------------------------------------------- parts

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
        _write_atomic(root / MANIFEST_NAME, [_manifest_text(merged).encode()])
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
