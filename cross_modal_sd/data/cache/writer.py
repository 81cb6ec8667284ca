"""Resumable, crash-safe writer of a hidden-pair cache."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cross_modal_sd.data.cache.files import safetensors_chunks, write_atomic
from cross_modal_sd.data.cache.format import (
    CONTENT_FIELDS,
    DTYPES,
    FORMAT_VERSION,
    LM_HEAD_NAME,
    LOCK_NAME,
    MANIFEST_NAME,
    SHARD_RE,
    TEMP_RE,
    CacheError,
    check_json,
    load_manifest,
    manifest_text,
    shard_name,
    validate_meta,
)


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
        self._meta = validate_meta(meta)
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
            check_json(f"extra of sample {sample_id!r}", dict(extra))
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
        chunks = list(safetensors_chunks({"weight": [w]}, {"format": "cross_modal_sd.lm_head"}))
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
        n_bytes, sha = write_atomic(self.root / LM_HEAD_NAME, chunks)
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
        n_bytes, sha = write_atomic(self.root / name, safetensors_chunks(tensors, metadata))
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
            if TEMP_RE.fullmatch(p.name):
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
            if SHARD_RE.fullmatch(p.name) and p.name not in listed:
                p.unlink()

    def _write_manifest(self) -> None:
        write_atomic(self.root / MANIFEST_NAME, [manifest_text(self._manifest).encode()])
