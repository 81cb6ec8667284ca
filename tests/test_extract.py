"""Teacher-forced extraction on the (small) mini world: pairing, storage, resume."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from cross_modal_sd.data.cache import HiddenPairCache
from cross_modal_sd.extract import extract
from cross_modal_sd.pair import MiniSource, load_pair


def _cfg(models, out, n_scenes=3):
    return OmegaConf.create(
        {
            "models": models,
            "source": {
                "_target_": "cross_modal_sd.pair.sources.MiniSource",
                "split": "train",
                "start": 500,
                "count": n_scenes,
            },
            "out_dir": str(out),
            "dtype": "float32",
            "shard_samples": 8,
            "max_new_tokens": None,
        }
    )


def test_extraction_is_teacher_forced_and_resumes(small_world_cfg, tmp_path):
    out = tmp_path / "cache"
    first = extract(_cfg(small_world_cfg, out, n_scenes=2))
    second = extract(_cfg(small_world_cfg, out, n_scenes=3))  # a longer run continues the first
    assert first["written"] == first["samples"] and second["resumed"] == first["samples"]
    cache = HiddenPairCache(out)
    assert len(cache) == second["samples"] and len(set(cache.sample_ids)) == len(cache)

    pair = load_pair(small_world_cfg)
    lm_head = cache.lm_head_weight()
    torch.testing.assert_close(lm_head, pair.target.lm_head_weight)
    samples = {i: s for i, s in MiniSource("train", 500, 3).samples(pair)}
    for i in range(len(cache)):
        row = cache[i]
        y = row["tokens"].tolist()
        # The stored target states reproduce the target's own greedy answer at every position.
        assert (pair.target.logits(row["h_target"]).argmax(-1) == row["tokens"]).all()
        # The stored draft states equal a fresh draft forward over its prompt + y[:-1].
        s = samples[row["sample_id"]]
        ids = torch.cat([s.draft_ids, torch.tensor([y[:-1]], dtype=torch.long)], 1)
        fresh = pair.draft.prefill(ids, s.event_pixels, keep_last=len(y)).hidden[0]
        torch.testing.assert_close(row["h_draft"], fresh, rtol=1e-5, atol=1e-5)
        assert row["group"] == s.group


def test_rerun_of_a_complete_extraction_writes_nothing(small_world_cfg, tmp_path):
    out = tmp_path / "cache"
    extract(_cfg(small_world_cfg, out, n_scenes=1))
    again = extract(_cfg(small_world_cfg, out, n_scenes=1))
    assert again["written"] == 0 and again["resumed"] == again["samples"]
