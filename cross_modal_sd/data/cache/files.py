"""Low-level file I/O of the cache: atomic fsynced writes, streamed safetensors, headers, hashes."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cross_modal_sd.data.cache.format import ST_TAG, CacheError

_MAX_HEADER_BYTES = 100_000_000
_HASH_CHUNK = 8 << 20


def _fsync_dir(root: Path) -> None:
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, chunks: Iterable[bytes | memoryview | np.ndarray]) -> tuple[int, str]:
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


def safetensors_chunks(
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
            "dtype": ST_TAG[first.dtype],
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
