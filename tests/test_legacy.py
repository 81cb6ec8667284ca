"""Import of the prior system's chunked caches: identical read-back, index pairing, bounded RAM."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from cross_modal_sd.data.cache import HiddenPairCache, load_manifest
from cross_modal_sd.legacy import LegacyCacheError, import_legacy_cache, main

VOCAB = 32064  # Video-LLaVA's padded vocabulary; ids >= 32000 are never tokens


def write_legacy(root: Path, chunks: list[int], max_seq: int, dims: tuple[int, int], seed: int = 0):
    """A prior-system directory: index.json + chunks/chunk_XXXXXX.pt, zero-padded float32.

    Returns the unpadded (h_draft, h_target, metadata) of every sample, in order.
    """
    gen = torch.Generator().manual_seed(seed)
    (root / "chunks").mkdir(parents=True)
    entries, samples, start = [], [], 0
    for n in chunks:
        lens = torch.randint(1, max_seq + 1, (n,), generator=gen)
        egpt = torch.zeros(n, max_seq, dims[0])
        vl = torch.zeros(n, max_seq, dims[1])
        metadata = []
        for i, length in enumerate(lens.tolist()):
            egpt[i, :length] = torch.randn(length, dims[0], generator=gen)
            vl[i, :length] = torch.randn(length, dims[1], generator=gen)
            g = start + i
            metadata.append(
                {
                    "sample_idx": g // 2,
                    "question_idx": g % 2,
                    "question": f"q{g % 2}?",
                    "egpt_text": f"draft {g}",
                    "vl_text": f"target {g}",
                    "seq_len": length,
                }
            )
            samples.append((egpt[i, :length].clone(), vl[i, :length].clone(), metadata[-1]))
        name = f"chunk_{start:06d}.pt"
        torch.save(
            {
                "egpt_hidden": egpt,
                "vl_hidden": vl,
                "seq_lens": lens,
                "metadata": metadata,
                "chunk_id": start,
                "n_samples": n,
            },
            root / "chunks" / name,
        )
        entries.append({"path": name, "start_idx": start, "n_samples": n})
        start += n
    config = {
        "split": "train",
        "duration": "1s",
        "quant": "4bit",
        "max_new_tokens": max_seq,
        "hidden_dim": dims[1],
    }
    index = {"total_samples": start, "chunk_size": max(chunks), "chunks": entries, "config": config}
    (root / "index.json").write_text(json.dumps(index))
    return samples


def _lm_head(path: Path, dim: int, seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    weight = torch.randn(vocab, dim, generator=torch.Generator().manual_seed(seed))
    # The prior system's vl_lm_head.pt layout.
    torch.save({"lm_head_weight": weight, "vocab_size": VOCAB, "hidden_dim": dim}, path)
    return weight


def test_legacy_chunks_convert_and_read_back_identically(tmp_path):
    samples = write_legacy(tmp_path / "old", [5, 4], max_seq=7, dims=(16, 24))
    weight = _lm_head(tmp_path / "vl_lm_head.pt", 24)
    out = tmp_path / "new"
    result = import_legacy_cache(tmp_path / "old", out, tmp_path / "vl_lm_head.pt", shard_samples=4)
    assert result == {"out_dir": str(out), "samples": 9, "written": 9, "resumed": 0}

    manifest = load_manifest(out)
    assert manifest["pairing"] == "index" and manifest["vocab_limit"] == 32000
    assert (manifest["draft_dim"], manifest["target_dim"], manifest["max_new_tokens"]) == (
        16,
        24,
        7,
    )
    cache = HiddenPairCache(out)
    torch.testing.assert_close(cache.lm_head_weight(), weight, rtol=0, atol=0)
    assert len(cache) == 9
    for i, (h_d, h_t, meta) in enumerate(samples):
        row = cache[i]
        assert row["sample_id"] == f"train/{meta['sample_idx']}/q{meta['question_idx']}"
        assert row["group"] == f"train/{meta['sample_idx']}"
        torch.testing.assert_close(row["h_draft"], h_d, rtol=0, atol=0)
        torch.testing.assert_close(row["h_target"], h_t, rtol=0, atol=0)
        # Tokens: the target's greedy choice among text ids, recomputed from its own states.
        expected = (h_t @ weight[:32000].T).argmax(-1)
        assert row["tokens"].tolist() == expected.tolist()
    record = manifest["samples"][3]
    assert record["extra"] == {
        "legacy_index": 3,
        "question": "q1?",
        "draft_text": "draft 3",
        "target_text": "target 3",
    }

    again = import_legacy_cache(tmp_path / "old", out, tmp_path / "vl_lm_head.pt", shard_samples=4)
    assert again["written"] == 0 and again["resumed"] == 9


def test_sequence_groups_and_bf16_storage(tmp_path):
    samples = write_legacy(tmp_path / "old", [4], max_seq=5, dims=(8, 8))
    _lm_head(tmp_path / "head.pt", 8)
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"train/0": "zurich_city_00_a", "train/1": "interlaken_00_c"}))
    main(
        [
            str(tmp_path / "old"),
            str(tmp_path / "new"),
            "--lm-head",
            str(tmp_path / "head.pt"),
            "--dtype",
            "bfloat16",
            "--groups",
            str(groups),
        ]
    )
    cache = HiddenPairCache(tmp_path / "new")
    assert cache.groups == [
        "zurich_city_00_a",
        "zurich_city_00_a",
        "interlaken_00_c",
        "interlaken_00_c",
    ]
    assert cache[0]["h_draft"].dtype == torch.bfloat16
    torch.testing.assert_close(cache[2]["h_target"], samples[2][1].bfloat16(), rtol=0, atol=0)


def test_bad_legacy_input_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no index.json"):
        import_legacy_cache(tmp_path, tmp_path / "new", tmp_path / "head.pt")
    write_legacy(tmp_path / "old", [3, 3], max_seq=4, dims=(8, 8))
    _lm_head(tmp_path / "head.pt", 8)
    (tmp_path / "old" / "chunks" / "chunk_000003.pt").unlink()
    with pytest.raises(FileNotFoundError, match="lists chunk 'chunk_000003.pt', missing"):
        import_legacy_cache(tmp_path / "old", tmp_path / "new", tmp_path / "head.pt")
    torch.save(
        {"egpt_hidden": torch.zeros(2, 3, 8)}, tmp_path / "old" / "chunks" / "chunk_000003.pt"
    )
    with pytest.raises(
        LegacyCacheError, match=r"chunk_000003.pt: chunk lacks \['vl_hidden', 'seq_lens'\]"
    ):
        import_legacy_cache(tmp_path / "old", tmp_path / "new", tmp_path / "head.pt")
    _lm_head(tmp_path / "wide.pt", 16)
    (tmp_path / "old" / "chunks" / "chunk_000003.pt").unlink()
    (tmp_path / "old" / "index.json").write_text(
        json.dumps({"chunks": [{"path": "chunk_000000.pt", "start_idx": 0, "n_samples": 3}]})
    )
    with pytest.raises(LegacyCacheError, match="target states are 8 wide"):
        import_legacy_cache(tmp_path / "old", tmp_path / "new", tmp_path / "wide.pt")


def _rss_anon_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise RuntimeError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_conversion_does_not_load_a_whole_chunk_into_memory(tmp_path):
    # One 64 MiB chunk (two 32 MiB tensors, half padding); converting it must not hold it. A
    # small vocabulary keeps the lm_head and the logits out of the measurement.
    write_legacy(tmp_path / "old", [128], max_seq=128, dims=(512, 512), seed=3)
    _lm_head(tmp_path / "head.pt", 512, vocab=64)
    write_legacy(tmp_path / "warm", [2], max_seq=4, dims=(512, 512))
    import_legacy_cache(
        tmp_path / "warm", tmp_path / "warm_out", tmp_path / "head.pt", vocab_limit=64
    )
    base, peak, stop = _rss_anon_kb(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_anon_kb())
            stop.wait(0.002)

    watcher = threading.Thread(target=sample)
    watcher.start()
    try:
        import_legacy_cache(
            tmp_path / "old",
            tmp_path / "new",
            tmp_path / "head.pt",
            vocab_limit=64,
            shard_samples=16,
        )
    finally:
        stop.set()
        watcher.join()
    grown_mib = (peak[0] - base) / 1024
    assert grown_mib < 24, f"anonymous memory grew by {grown_mib:.0f} MiB for a 64 MiB chunk"
    assert len(HiddenPairCache(tmp_path / "new")) == 128
