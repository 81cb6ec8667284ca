"""EventGPT architecture and loaders, Video-LLaVA round trip, decoding wrappers, build checks."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import VideoLlavaForConditionalGeneration

from cross_modal_sd.models.architectures import DecoderSize, TowerSize, build_draft, build_target
from cross_modal_sd.models.eventgpt import PREFIX_MAP, save_eventgpt
from cross_modal_sd.models.loading import CheckpointError, load_eventgpt, load_videollava
from cross_modal_sd.models.prompts import (
    EVENT_PLACEHOLDER_ID,
    encode_draft_prompt,
    encode_target_prompt,
)
from cross_modal_sd.models.wrappers import DraftDecoder, TargetDecoder, crop_cache
from cross_modal_sd.world.build import verify_build
from cross_modal_sd.world.tokenizer import build_tokenizer, text_vocab_limit


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def draft(tok):
    torch.manual_seed(0)
    return build_draft(tok, TowerSize(), DecoderSize(layers=2), 32, 2).eval()


@pytest.fixture(scope="module")
def target(tok):
    torch.manual_seed(1)
    return build_target(tok, TowerSize(), DecoderSize(layers=3), 32, 8).eval()


def _draft_inputs(tok):
    ids = torch.tensor([encode_draft_prompt(tok, "which way is the car moving ?")])
    return ids, torch.randn(1, 2, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def test_eventgpt_logits_equal_an_independent_reference(tok, draft):
    ids, ev = _draft_inputs(tok)
    with torch.no_grad():
        got = draft(ids, ev).logits
        # Reference: CLIP last hidden state per image -> projector -> adaptor -> pooling -> Llama.
        enc = draft.encoder
        feats = torch.stack(
            [enc.visual_tower(pixel_values=ev[:, t]).last_hidden_state for t in range(2)], 1
        )
        feats = enc.feature_adaptor(
            enc.visual_projector[2](torch.nn.functional.gelu(enc.visual_projector[0](feats)))
        )
        pooled = torch.cat([feats.mean(2), feats.mean(1)], 1)  # (1, 2 + 17, D)
        p = ids[0].tolist().index(EVENT_PLACEHOLDER_ID)
        emb = draft.language_model.get_input_embeddings()
        embeds = torch.cat([emb(ids[:, :p]), pooled, emb(ids[:, p + 1 :])], 1)
        ref = draft.language_model(inputs_embeds=embeds).logits
    assert pooled.shape[1] == 2 + 17
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_eventgpt_save_load_round_trip_in_original_layout(tok, draft, tmp_path):
    save_eventgpt(draft, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "EventChat_llama" and cfg["mm_visual_tower"] == "visual_tower"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    for prefix in (
        "model.visual_tower.visual_tower.vision_model.embeddings.",
        "model.visual_tower.visual_tower.vision_model.encoder.layers.0.",
        "model.visual_projector.0.",
        "model.visual_projector.2.",
        "model.feature_adaptor.",
        "model.embed_tokens.",
        "model.layers.0.",
        "lm_head.",
    ):
        assert any(k.startswith(prefix) for k in keys), prefix
    loaded = load_eventgpt(tmp_path)
    ids, ev = _draft_inputs(tok)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, ev).logits, draft(ids, ev).logits, rtol=0, atol=0)


def test_eventgpt_loader_reports_missing_pieces(tok, draft, tmp_path):
    save_eventgpt(draft, tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "moved.safetensors")
    with pytest.raises(CheckpointError, match="no weights in"):
        load_eventgpt(tmp_path)
    (tmp_path / "moved.safetensors").rename(tmp_path / "model.safetensors")
    index = {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_eventgpt(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()
    import shutil

    shutil.rmtree(tmp_path / "visual_tower")
    with pytest.raises(CheckpointError, match="CLIP vision tower config not found"):
        load_eventgpt(tmp_path)


def test_prefix_map_covers_every_parameter(draft):
    ours = [p for _, p in PREFIX_MAP]
    assert all(any(k.startswith(p) for p in ours) for k in draft.state_dict())


def test_videollava_round_trip(tok, target, tmp_path):
    target.save_pretrained(tmp_path)
    loaded = load_videollava(str(tmp_path))
    assert isinstance(loaded, VideoLlavaForConditionalGeneration)
    ids = torch.tensor([encode_target_prompt(tok, "what colour is the car ?", 136)])
    frames = torch.randn(1, 8, 3, 32, 32)
    with torch.no_grad():
        a = target(input_ids=ids, pixel_values_videos=frames).logits
        b = loaded(input_ids=ids, pixel_values_videos=frames).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights in"):
        load_videollava(str(tmp_path))


def test_decoder_masks_non_text_ids_and_crop_then_continue_matches_recompute(tok, target):
    limit = text_vocab_limit(tok)
    dec = TargetDecoder(target, limit)
    ids = torch.tensor([encode_target_prompt(tok, "describe the scene .", 136)])
    frames = torch.randn(1, 8, 3, 32, 32)
    out = dec.prefill(ids, frames)
    assert (
        torch.isinf(out.logits[..., limit:]).all() and torch.isfinite(out.logits[..., :limit]).all()
    )
    extra = torch.tensor([[5, 6, 7]])
    dec.forward_tokens(extra, out.cache)
    crop_cache(out.cache, ids.shape[1] + 1)
    after = dec.forward_tokens(torch.tensor([[9]]), out.cache)
    fresh = dec.prefill(torch.cat([ids, torch.tensor([[5, 9]])], 1), frames)
    torch.testing.assert_close(after.logits[:, -1], fresh.logits[:, -1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after.hidden[:, -1], fresh.hidden[:, -1], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="cannot crop"):
        crop_cache(out.cache, 10_000)


def test_draft_decoder_hidden_states_are_post_norm(tok, draft):
    dec = DraftDecoder(draft, text_vocab_limit(tok))
    ids, ev = _draft_inputs(tok)
    out = dec.prefill(ids, ev, keep_last=None)
    with torch.no_grad():
        ref = draft(ids, ev).logits
    with torch.no_grad():
        got = draft.language_model.lm_head(out.hidden.clone())
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_verify_build_names_the_missing_or_altered_file(tmp_path):
    with pytest.raises(CheckpointError, match="BUILD.json is missing"):
        verify_build(tmp_path)
    (tmp_path / "target").mkdir()
    weights = tmp_path / "target" / "model.safetensors"
    weights.write_bytes(b"1234")
    files = {"target/model.safetensors": {"bytes": 4, "sha256": "0" * 64}}
    from cross_modal_sd.world import build

    required = {r: {"bytes": 0, "sha256": ""} for r in build.REQUIRED if r not in files}
    (tmp_path / "BUILD.json").write_text(json.dumps({"files": {**files, **required}}))
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        verify_build(tmp_path)
    weights.write_bytes(b"12")
    with pytest.raises(CheckpointError, match="has 2 bytes, expected 4"):
        verify_build(tmp_path)
    weights.unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        verify_build(tmp_path)
