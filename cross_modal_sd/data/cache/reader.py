"""Memory-mapped, random-access reader of a hidden-pair cache."""

from __future__ import annotations

import json
import math
import mmap
import operator
import os
import warnings
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from cross_modal_sd.data.cache.files import read_safetensors_header, sha256_file, write_atomic
from cross_modal_sd.data.cache.format import (
    DTYPES,
    MANIFEST_NAME,
    ST_TAG,
    STAMP_NAME,
    TAG_NUMPY,
    TAG_TORCH,
    CacheError,
    load_manifest,
    manifest_digest,
)

# The reader drops its page mappings after copying out this many bytes, so resident file pages
# never add more than this to a process's RSS, however large the cache (the page cache keeps them).
_RELEASE_EVERY_BYTES = 32 << 20
_PREFETCH_CHUNK = 2 << 20


class _Shard:
    """One memory-mapped shard: numpy views over its tensors and a copy of its offsets."""

    def __init__(self, path: Path, record: Mapping[str, Any], dims: tuple[int, int], dtype: str):
        header, start = read_safetensors_header(path)
        n_rows, n_samples = record["n_rows"], record["n_samples"]
        tag = ST_TAG[DTYPES[dtype]]
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
                self._mm, dtype=TAG_NUMPY[tag_], count=math.prod(shape), offset=begin
            )
            self.arrays[name] = arr.reshape(shape)
            self.starts[name] = begin
            self.torch_dtype[name] = TAG_TORCH[tag_]
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
                write_atomic(stamp_path, [json.dumps(fresh, indent=1).encode()])
            except OSError as e:
                warnings.warn(
                    f"{stamp_path}: cannot record verified checksums ({e}); they will be re-checked "
                    "on every open",
                    stacklevel=3,
                )
