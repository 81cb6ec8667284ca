"""Hidden-pair cache: writer/reader round trips, crash-resume, and every corruption error."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import pickle
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cross_modal_sd.data.cache import (
    FORMAT_VERSION,
    CacheError,
    CacheWriter,
    HiddenPairCache,
    manifest_digest,
)

DD, DT, VOCAB = 6, 5, 50  # different widths, so a swapped draft/target would show


def make_meta(**overrides):
    meta = {
        "pairing": "teacher_forced",
        "draft_model": "test/draft",
        "target_model": "test/target",
        "draft_prompt_template": "USER: <event>\n{q} ASSISTANT:",
        "target_prompt_template": "USER: <video>\n{q} ASSISTANT:",
        "draft_dim": DD,
        "target_dim": DT,
        "dtype": "float32",
        "max_new_tokens": 12,
        "vocab_limit": VOCAB,
    }
    meta.update(overrides)
    return meta


def make_samples(n, seed=0):
    """Deterministic samples: (id, group, question_id, h_draft, h_target, tokens)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 1 + (i * 5) % 12
        out.append(
            (
                f"s{i:03d}",
                f"g{i // 2}",
                f"q{i % 3}",
                torch.randn(length, DD, generator=gen),
                torch.randn(length, DT, generator=gen),
                torch.randint(0, VOCAB, (length,), generator=gen),
            )
        )
    return out


def write_cache(root, samples, shard_samples=3, **meta):
    with CacheWriter(root, make_meta(**meta), shard_samples=shard_samples) as writer:
        writer.set_lm_head(torch.arange(VOCAB * DT, dtype=torch.float32).reshape(VOCAB, DT))
        for s in samples:
            writer.add(*s)
    return Path(root)


def cache_contents(cache):
    return {
        (x := cache[i])["sample_id"]: (x["h_draft"], x["h_target"], x["tokens"], x["group"])
        for i in range(len(cache))
    }


# --------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_round_trip_preserves_rows_tokens_and_ids(tmp_path, dtype):
    samples = make_samples(8)
    cache = HiddenPairCache(write_cache(tmp_path, samples, dtype=dtype))
    torch_dtype = getattr(torch, dtype)
    assert len(cache) == 8 and cache.dims == (DD, DT)
    for i, (sid, group, _, hd, ht, tk) in enumerate(samples):
        got = cache[i]
        assert got["sample_id"] == sid and got["group"] == group
        assert got["h_draft"].dtype == torch_dtype and got["h_draft"].shape == (len(tk), DD)
        torch.testing.assert_close(got["h_draft"], hd.to(torch_dtype), rtol=0, atol=0)
        torch.testing.assert_close(got["h_target"], ht.to(torch_dtype), rtol=0, atol=0)
        assert got["tokens"].dtype == torch.int64 and torch.equal(got["tokens"], tk)
    assert cache[-1]["sample_id"] == "s007"
    with pytest.raises(IndexError, match="out of range"):
        cache[8]


def test_shards_are_standard_safetensors_with_offsets(tmp_path):
    samples = make_samples(7)
    root = write_cache(tmp_path, samples, shard_samples=3)
    manifest = json.loads((root / "manifest.json").read_text())
    assert [s["n_samples"] for s in manifest["shards"]] == [3, 3, 1]
    shard = load_file(root / "shard-00001.safetensors")
    lengths = [len(s[5]) for s in samples[3:6]]
    assert shard["offsets"].tolist() == [0, lengths[0], sum(lengths[:2]), sum(lengths)]
    assert shard["h_draft"].shape == (sum(lengths), DD) and shard["tokens"].dtype == torch.int32
    torch.testing.assert_close(shard["h_target"][: lengths[0]], samples[3][4], rtol=0, atol=0)
    for rec in manifest["shards"]:
        assert rec["sha256"] == hashlib.sha256((root / rec["file"]).read_bytes()).hexdigest()
        assert rec["n_bytes"] == (root / rec["file"]).stat().st_size
    assert manifest["samples"][4] == {
        "id": "s004",
        "group": "g2",
        "question_id": "q1",
        "length": len(samples[4][5]),
        "shard": 1,
        "index": 1,
    }
    assert manifest["format_version"] == FORMAT_VERSION and manifest["n_rows"] == sum(
        len(s[5]) for s in samples
    )


def test_lm_head_round_trip_and_conflicts(tmp_path):
    root = write_cache(tmp_path, make_samples(2))
    w = HiddenPairCache(root).lm_head_weight()
    assert torch.equal(w, torch.arange(VOCAB * DT, dtype=torch.float32).reshape(VOCAB, DT))
    with CacheWriter(root, make_meta()) as writer:
        writer.set_lm_head(w.clone())  # identical: a resumed extraction may set it again
        with pytest.raises(CacheError, match="already holds a different lm_head"):
            writer.set_lm_head(w + 1)
        with pytest.raises(ValueError, match=r"lm_head weight must be a \(V, 5\)"):
            writer.set_lm_head(torch.zeros(VOCAB, DT + 1))
    bare = tmp_path / "bare"
    with CacheWriter(bare, make_meta()) as writer:
        writer.add(*make_samples(1)[0])
    with pytest.raises(CacheError, match="cache has no lm_head"):
        HiddenPairCache(bare).lm_head_weight()


def test_extra_metadata_is_kept_but_not_in_digest(tmp_path):
    samples = make_samples(4)
    a = write_cache(tmp_path / "a", samples, extra={"note": "first"})
    with CacheWriter(tmp_path / "b", make_meta(extra={"note": "second"}), shard_samples=3) as w:
        w.set_lm_head(torch.arange(VOCAB * DT, dtype=torch.float32).reshape(VOCAB, DT))
        for s in samples[:3]:
            w.add(*s)
        w.add(*samples[3], extra={"seconds": 1.5})
    ca, cb = HiddenPairCache(a), HiddenPairCache(tmp_path / "b")
    assert ca.manifest["extra"] == {"note": "first"}
    assert cb.manifest["samples"][3]["extra"] == {"seconds": 1.5}
    assert ca.digest == cb.digest == manifest_digest(json.loads((a / "manifest.json").read_text()))
    other = write_cache(tmp_path / "c", make_samples(4, seed=1))
    assert HiddenPairCache(other).digest != ca.digest


# ----------------------------------------------------------------------------- writer checks


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (lambda s: (s[0], "g", "q", s[3], s[4], s[5]), "already in the cache"),
        (
            lambda s: ("new", "g", "q", s[3][:, :4], s[4], s[5]),
            r"h_draft of sample 'new' is .*expected",
        ),
        (
            lambda s: ("new", "g", "q", s[3], s[4][:, :3], s[5]),
            r"h_target .* \(11, 3\); expected a float \(11, 5\)",
        ),
        (lambda s: ("new", "g", "q", s[3][:0], s[4][:0], s[5][:0]), "answer length 0"),
        (lambda s: ("new", "g", "q", s[3], s[4], s[5] + VOCAB), "outside \\[0, vocab_limit=50\\)"),
        (lambda s: ("new", "g", "q", s[3], s[4], s[5].float()), "1-D integer tensor"),
        (lambda s: ("", "g", "q", s[3], s[4], s[5]), "sample_id must be a non-empty str"),
    ],
    ids=["duplicate", "draft_width", "target_width", "empty", "vocab", "float_tokens", "no_id"],
)
def test_add_rejects_bad_samples(tmp_path, args, match):
    sample = make_samples(3)[2]
    with CacheWriter(tmp_path, make_meta()) as writer:
        writer.add(*sample)
        with pytest.raises(ValueError, match=match):
            writer.add(*args(sample))


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        (make_meta(draft_dims=4), r"unknown key\(s\) \['draft_dims'\]"),
        ({k: v for k, v in make_meta().items() if k != "target_model"}, "missing required key"),
        (make_meta(pairing="by_index"), "pairing'\\] must be one of"),
        (make_meta(dtype="float64"), "dtype'\\] must be one of"),
        (make_meta(draft_dim=0), "draft_dim'\\] must be positive"),
    ],
)
def test_writer_rejects_bad_meta(tmp_path, meta, match):
    with pytest.raises(ValueError, match=match):
        CacheWriter(tmp_path, meta)


def test_resume_with_other_meta_is_refused(tmp_path):
    write_cache(tmp_path, make_samples(2))
    with pytest.raises(CacheError, match=r"cannot resume.*draft_dim: cache 6, writer 8"):
        CacheWriter(tmp_path, make_meta(draft_dim=8))
    with pytest.raises(CacheError, match=r"target_model: cache 'test/target', writer 'other'"):
        CacheWriter(tmp_path, make_meta(target_model="other"))


def test_one_writer_per_directory(tmp_path):
    with CacheWriter(tmp_path, make_meta()):
        with pytest.raises(CacheError, match="another CacheWriter is writing this cache"):
            CacheWriter(tmp_path, make_meta())
    CacheWriter(tmp_path, make_meta()).close()  # the lock is released on close


def test_resume_appends_after_done_ids(tmp_path):
    samples = make_samples(7)
    write_cache(tmp_path, samples[:4], shard_samples=3)
    with CacheWriter(tmp_path, make_meta(), shard_samples=3) as writer:
        assert writer.done_ids() == {s[0] for s in samples[:4]}
        for s in samples:
            if s[0] not in writer.done_ids():
                writer.add(*s)
    cache = HiddenPairCache(tmp_path)
    assert cache.sample_ids == [s[0] for s in samples]
    assert [s["n_samples"] for s in cache.manifest["shards"]] == [3, 1, 3]


# ------------------------------------------------------------------------- crash and resume


def _write_then_die(root, samples, kill_at):
    """Child process: write samples with 3 per shard, SIGKILL itself at ``kill_at``."""
    real_replace = os.replace

    def replace(src, dst):
        second_shard = Path(dst).name == "shard-00001.safetensors"
        if kill_at == "shard_written_not_renamed" and second_shard:
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
        if kill_at == "shard_renamed_not_committed" and second_shard:
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace  # this process only
    with CacheWriter(root, make_meta(), shard_samples=3) as writer:
        for i, s in enumerate(samples):
            writer.add(*s)
            if kill_at == "mid_shard" and i == 7:
                os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize(
    ("kill_at", "committed"),
    [("mid_shard", 6), ("shard_written_not_renamed", 3), ("shard_renamed_not_committed", 3)],
)
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, kill_at, committed):
    samples = make_samples(11)
    reference = HiddenPairCache(write_cache(tmp_path / "ref", samples))
    root = tmp_path / "crash"
    proc = mp.get_context("fork").Process(target=_write_then_die, args=(root, samples, kill_at))
    proc.start()
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    leftovers = sorted(p.name for p in root.iterdir())
    if kill_at == "shard_written_not_renamed":
        assert "shard-00001.safetensors.tmp" in leftovers
    if kill_at == "shard_renamed_not_committed":
        assert "shard-00001.safetensors" in leftovers  # complete on disk, but not in the manifest

    with CacheWriter(root, make_meta(), shard_samples=3) as writer:
        assert writer.done_ids() == {s[0] for s in samples[:committed]}
        assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]
        writer.set_lm_head(torch.arange(VOCAB * DT, dtype=torch.float32).reshape(VOCAB, DT))
        for s in samples:
            if s[0] not in writer.done_ids():
                writer.add(*s)

    resumed = HiddenPairCache(root, verify="full")
    assert resumed.sample_ids == reference.sample_ids  # no duplicates, no gaps, same order
    got, want = cache_contents(resumed), cache_contents(reference)
    for sid, (hd, ht, tk, group) in want.items():
        assert torch.equal(got[sid][0], hd) and torch.equal(got[sid][1], ht)
        assert torch.equal(got[sid][2], tk) and got[sid][3] == group
    assert resumed.digest == reference.digest


# ---------------------------------------------------------------------------- reader errors


def test_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest; .* is not a hidden-pair cache"):
        HiddenPairCache(tmp_path)


def test_missing_shard_is_named(tmp_path):
    root = write_cache(tmp_path, make_samples(7))
    (root / "shard-00001.safetensors").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"shard-00001\.safetensors: file listed in .* missing"
    ):
        HiddenPairCache(root)


def test_truncated_shard_is_named(tmp_path):
    root = write_cache(tmp_path, make_samples(7))
    path = root / "shard-00002.safetensors"
    size = path.stat().st_size
    os.truncate(path, size - 16)
    with pytest.raises(
        CacheError,
        match=rf"shard-00002\.safetensors: file is truncated \({size - 16} bytes, .* {size}\)",
    ):
        HiddenPairCache(root, verify=False)


def _flip_last_byte(path, keep_mtime):
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_checksum_mismatch_is_named(tmp_path):
    root = write_cache(tmp_path, make_samples(7))
    _flip_last_byte(root / "shard-00000.safetensors", keep_mtime=False)
    HiddenPairCache(root, verify="size")  # same size: only a checksum notices
    with pytest.raises(CacheError, match=r"shard-00000\.safetensors: sha256 checksum mismatch"):
        HiddenPairCache(root, verify=True)


def test_verify_once_rechecks_only_changed_files(tmp_path):
    root = write_cache(tmp_path, make_samples(7))
    HiddenPairCache(root)  # default "once": hashes everything, records it
    stamp = json.loads((root / "verified.json").read_text())
    assert set(stamp) == {"shard-00000.safetensors", "shard-00001.safetensors",
                          "shard-00002.safetensors", "lm_head.safetensors"}  # fmt: skip
    # Same size and mtime: trusted without re-hashing (the documented cost of "once").
    _flip_last_byte(root / "lm_head.safetensors", keep_mtime=True)
    HiddenPairCache(root)
    with pytest.raises(CacheError, match=r"lm_head\.safetensors: sha256 checksum mismatch"):
        HiddenPairCache(root, verify="full")
    # A changed mtime makes "once" hash that file again.
    _flip_last_byte(root / "shard-00001.safetensors", keep_mtime=False)
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors: sha256 checksum mismatch"):
        HiddenPairCache(root)


def test_newer_format_version_is_refused(tmp_path):
    root = write_cache(tmp_path, make_samples(2))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        CacheError,
        match=rf"manifest.json: manifest format_version {FORMAT_VERSION + 1} is newer than "
        rf"supported {FORMAT_VERSION}",
    ):
        HiddenPairCache(root)


def test_expected_dims_mismatch_names_the_dim(tmp_path):
    root = write_cache(tmp_path, make_samples(2))
    HiddenPairCache(root, expected_dims=(DD, DT))
    with pytest.raises(CacheError, match=r"target_dim is 5 but 4096 was expected"):
        HiddenPairCache(root, expected_dims=(DD, 4096))
    with pytest.raises(CacheError, match=r"draft_dim is 6 but 7 was expected"):
        HiddenPairCache(root, expected_dims=(7, DT))


def test_check_finite_reports_sample_ids_and_rows(tmp_path):
    samples = make_samples(7)
    samples[1][3][0, 2] = float("nan")  # s001 row 0 (h_draft)
    samples[6][4][3, 1] = float("inf")  # s006 row 3 (h_target)
    samples[6][4][4, 0] = float("-inf")  # s006 row 4
    root = write_cache(tmp_path, samples)
    cache = HiddenPairCache(root)
    assert cache.check_finite(raise_error=False) == {"s001": [0], "s006": [3, 4]}
    with pytest.raises(
        CacheError,
        match=r"shard-00000\.safetensors: 1 NaN/inf row\(s\) in sample\(s\) 's001'; "
        r".*shard-00002\.safetensors: 2 NaN/inf row\(s\) in sample\(s\) 's006'",
    ):
        cache.check_finite()
    clean = HiddenPairCache(write_cache(tmp_path / "clean", make_samples(7)))
    assert clean.check_finite() == {}


def test_duplicate_sample_records_are_refused(tmp_path):
    root = write_cache(tmp_path, make_samples(4))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["samples"][3]["id"] = manifest["samples"][0]["id"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"duplicate sample ids \['s000'\]"):
        HiddenPairCache(root)


# ------------------------------------------------------------------------- process handling


def test_cache_pickles_without_open_mappings(tmp_path):
    root = write_cache(tmp_path, make_samples(7))
    cache = HiddenPairCache(root)
    first = cache[4]
    assert cache._shards  # a shard is mapped in this process
    clone = pickle.loads(pickle.dumps(cache))
    assert not clone._shards
    assert torch.equal(clone[4]["h_draft"], first["h_draft"])


def test_get_many_matches_single_reads(tmp_path):
    cache = HiddenPairCache(write_cache(tmp_path, make_samples(9)))
    many = cache.get_many([8, 0, 4, -1])
    for got, i in zip(many, [8, 0, 4, 8], strict=True):
        one = cache[i]
        assert got["sample_id"] == one["sample_id"]
        assert torch.equal(got["h_draft"], one["h_draft"]) and torch.equal(
            got["tokens"], one["tokens"]
        )
