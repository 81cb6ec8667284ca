"""Hidden-state pair cache (docs/design.md §6): on-disk format, resumable writer, memory-mapped reader.

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

Modules: ``format`` (names, dtype tags, ``CacheError``, the manifest), ``files`` (atomic writes,
streamed safetensors, headers, hashes), ``writer`` (``CacheWriter``), ``reader``
(``HiddenPairCache``), ``parts`` (``merge_parts`` of per-rank part caches).
"""

from __future__ import annotations

from cross_modal_sd.data.cache.files import read_safetensors_header, sha256_file
from cross_modal_sd.data.cache.format import (
    CONTENT_FIELDS,
    DTYPES,
    FORMAT_VERSION,
    LM_HEAD_NAME,
    LOCK_NAME,
    MANIFEST_NAME,
    PAIRINGS,
    STAMP_NAME,
    CacheError,
    load_manifest,
    manifest_digest,
    shard_name,
)
from cross_modal_sd.data.cache.parts import PARTS_DIR, merge_parts
from cross_modal_sd.data.cache.reader import HiddenPairCache
from cross_modal_sd.data.cache.writer import CacheWriter

__all__ = [
    "CONTENT_FIELDS",
    "DTYPES",
    "FORMAT_VERSION",
    "LM_HEAD_NAME",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "PAIRINGS",
    "PARTS_DIR",
    "STAMP_NAME",
    "CacheError",
    "CacheWriter",
    "HiddenPairCache",
    "load_manifest",
    "manifest_digest",
    "merge_parts",
    "read_safetensors_header",
    "sha256_file",
    "shard_name",
]
