"""The real pair's formats on tiny random checkpoints written in the exact real layouts.

Video-LLaVA: hub key names (`language_model.model.*`, `image_tower.*`, ...), two safetensors
shards and their index, the hub config fields, a Llama BPE tokenizer with `<image>`=32000,
`<video>`=32001, `<pad>`=32002 and a 32064-row vocabulary. EventGPT: `EventChat_llama` config
with `mm_visual_tower` a hub id, `pytorch_model-*.bin` shards and their index, CLIP weights in
the checkpoint or in a separate CLIP directory, 32003 embedding rows (three added tokens) against
`vocab_size: 32000` in config.json. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
    VideoLlavaImageProcessor,
)

from cross_modal_sd.data.cache import HiddenPairCache
from cross_modal_sd.data.dsec import write_sequence
from cross_modal_sd.data.events import EventStream, EventStreamError
from cross_modal_sd.extract import extract
from cross_modal_sd.models.eventgpt import PREFIX_MAP, EventGPT, eventgpt_config_dict
from cross_modal_sd.models.loading import (
    CheckpointError,
    _tower_matches,
    clip_vit_l14_336_config,
    load_eventgpt,
    load_videollava,
)
from cross_modal_sd.models.prompts import EVENT_PLACEHOLDER_ID, draft_prompt, encode_draft_prompt
from cross_modal_sd.models.real import (
    clip_preprocess,
    eventgpt_chunk_bounds,
    eventgpt_event_images,
    read_added_tokens,
)
from cross_modal_sd.pair import load_pair, make_source

TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)
VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=14
)
EV_TOKENS = {"<ev_patch>": 32000, "<ev_start>": 32001, "<ev_end>": 32002}
T_OFFSET = 7_000_000_000


# ------------------------------------------------------------------------- real-layout writers


def write_llama_tokenizer(d: Path, added: list[str]) -> None:
    """A byte-fallback BPE Llama tokenizer (tokenizer.json) with 32000 base ids plus `added`."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    corpus = [draft_prompt("what is happening in the scene?"), "USER: ASSISTANT: the road cars"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    while len(vocab) < 32000:
        vocab[f"▁unused{len(vocab)}"] = len(vocab)
    tok = Tokenizer.from_str(json.dumps(data))
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    entry = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
    names = ["<unk>", "<s>", "</s>", *added]
    decoder = {str(tok.token_to_id(t)): {"content": t, **entry} for t in names}
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>" if "<pad>" in added else "<unk>",
        "legacy": False,
        "padding_side": "left",
        "tokenizer_class": "LlamaTokenizer",
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config))


def write_shards(d: Path, state: dict, groups: list[list[str]], fmt: str) -> None:
    """Sharded weights with their index, named as transformers names them."""
    n = len(groups)
    ext, index_name = (
        ("safetensors", "model.safetensors.index.json")
        if fmt == "safetensors"
        else ("bin", "pytorch_model.bin.index.json")
    )
    prefix = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map, total = {}, 0
    for i, keys in enumerate(groups, start=1):
        name = f"{prefix}-{i:05d}-of-{n:05d}.{ext}"
        part = {k: state[k].contiguous() for k in keys}
        if fmt == "safetensors":
            save_file(part, str(d / name), metadata={"format": "pt"})
        else:
            torch.save(part, d / name)
        weight_map.update(dict.fromkeys(keys, name))
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (d / index_name).write_text(json.dumps(index, indent=2))


def _boost_non_text_rows(lm_head: torch.nn.Linear) -> None:
    """Makes ids >= 32000 win every unmasked argmax, so only the mask keeps them out."""
    with torch.no_grad():
        lm_head.weight[32000:] *= 100


def write_videollava(d: Path, seed: int = 0) -> VideoLlavaForConditionalGeneration:
    """Video-LLaVA in the hub layout; returns the source model."""
    config_json = {
        "architectures": ["VideoLlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_token_index": 32000,
        "video_token_index": 32001,
        "model_type": "video_llava",
        "pad_token_id": 32001,
        "projector_hidden_act": "gelu",
        "text_config": {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 32064,
            "pad_token_id": 0,
            "torch_dtype": "float16",
            **TEXT,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "image_size": 28,
            "projection_dim": 32,
            "vocab_size": 32000,
            **VISION,
        },
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "image_seq_length": 4,
        "video_seq_length": 40,
        "torch_dtype": "float16",
        "transformers_version": "4.41.0.dev0",
        "vocab_size": 32064,
    }
    torch.manual_seed(seed)
    # The source is built in float32 (the hub's torch_dtype fields would make parts of it fp16).
    drop = ("architectures", "model_type", "torch_dtype")
    kwargs = {k: v for k, v in config_json.items() if k not in drop}
    kwargs["text_config"] = {k: v for k, v in kwargs["text_config"].items() if k != "torch_dtype"}
    model = VideoLlavaForConditionalGeneration(VideoLlavaConfig(**kwargs)).eval()
    _boost_non_text_rows(model.lm_head)
    renames = (
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.image_tower.", "image_tower."),
        ("model.video_tower.", "video_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    )
    state = {}
    for key, value in model.state_dict().items():
        new = next(new + key[len(old) :] for old, new in renames if key.startswith(old))
        state[new] = value
    d.mkdir(parents=True)
    lm = [k for k in state if k.startswith("language_model.")]
    write_shards(d, state, [lm, [k for k in state if k not in lm]], "safetensors")
    (d / "config.json").write_text(json.dumps(config_json, indent=2))
    write_llama_tokenizer(d, ["<image>", "<video>", "<pad>"])
    return model


def write_clip(d: Path, seed: int = 1) -> CLIPModel:
    """A CLIP directory laid out like openai/clip-vit-large-patch14-336 (text + vision)."""
    torch.manual_seed(seed)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    cfg = CLIPConfig(
        text_config=text, vision_config={**VISION, "image_size": 28}, projection_dim=32
    )
    model = CLIPModel(cfg).eval()
    model.save_pretrained(d)
    return model


def write_eventgpt(
    d: Path, clip: CLIPModel, tower_inside: bool, fmt: str = "bin", seed: int = 2
) -> EventGPT:
    """EventGPT in its original layout; returns the source model."""
    torch.manual_seed(seed)
    llama = LlamaConfig(vocab_size=32003, bos_token_id=1, eos_token_id=2, pad_token_id=0, **TEXT)
    model = EventGPT(llama, clip.config.vision_config).eval()
    model.encoder.visual_tower.load_state_dict(clip.vision_model.state_dict())
    _boost_non_text_rows(model.language_model.lm_head)
    state = {}
    tower = "model.visual_tower.visual_tower."
    for key, value in model.state_dict().items():
        orig, ours = next((o, w) for o, w in PREFIX_MAP if key.startswith(w))
        key = orig + key[len(ours) :]
        if key.startswith(tower) and not key.startswith(tower + "vision_model."):
            key = tower + "vision_model." + key[len(tower) :]  # EventGPT's (transformers 4) keys
        state[key] = value
    if not tower_inside:
        state = {k: v for k, v in state.items() if not k.startswith("model.visual_tower.")}
    # Older checkpoints carry the rotary buffers; the loader must ignore them.
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    d.mkdir(parents=True)
    keys = list(state)
    write_shards(d, state, [keys[: len(keys) // 2], keys[len(keys) // 2 :]], fmt)
    config = eventgpt_config_dict(model, visual_tower="openai/clip-vit-large-patch14-336")
    config.update(vocab_size=32000, mm_use_im_start_end=True, mm_use_im_patch_token=True)
    config.update(tune_mm_mlp_adapter=False, mm_hidden_size=32, torch_dtype="bfloat16")
    (d / "config.json").write_text(json.dumps(config, indent=2))
    (d / "added_tokens.json").write_text(json.dumps(EV_TOKENS))
    return model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    clip = write_clip(root / "clip-vit-large-patch14-336")
    return {
        "root": root,
        "target_model": write_videollava(root / "Video-LLaVA-7B-hf"),
        "target": root / "Video-LLaVA-7B-hf",
        "clip": root / "clip-vit-large-patch14-336",
        "clip_model": clip,
        "draft_model": write_eventgpt(root / "EventGPT-7b", clip, tower_inside=False),
        "draft": root / "EventGPT-7b",
    }


def models_cfg(ckpts, **over) -> dict:
    cfg = OmegaConf.load(Path(__file__).parents[1] / "conf/models/eventgpt_videollava.yaml")
    cfg.merge_with(
        {
            "target": str(ckpts["target"]),
            "draft": str(ckpts["draft"]),
            "clip": str(ckpts["clip"]),
            "device": "cpu",
            "dtype": "float32",
            "max_new_tokens": 4,
            **over,
        }
    )
    return cfg


# --------------------------------------------------------------------------------- loaders


def test_videollava_hub_layout_loads_and_matches_its_source(ckpts):
    loaded = load_videollava(str(ckpts["target"]))
    source = ckpts["target_model"]
    ids = torch.tensor([[1, 3, 4] + [32001] * 40 + [5, 6]])
    frames = torch.randn(1, 8, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = loaded(input_ids=ids, pixel_values_videos=frames).logits
        want = source(input_ids=ids, pixel_values_videos=frames).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert loaded.config.vision_feature_select_strategy == "default"


def _reference_logits(draft_dir: Path, clip_dir: Path, ids: torch.Tensor, ev: torch.Tensor):
    """EventGPT computed straight from the checkpoint files, without the EventGPT module."""
    raw = {}
    for shard in sorted(draft_dir.glob("pytorch_model-*.bin")):
        raw.update(torch.load(shard, weights_only=True))
    clip_raw = load_file(str(clip_dir / "model.safetensors"))
    tower = CLIPVisionModel(CLIPConfig.from_pretrained(clip_dir).vision_config).eval()
    tower.load_state_dict(
        {
            k.removeprefix("vision_model."): v
            for k, v in clip_raw.items()
            if k.startswith("vision_model.")
        }
    )
    feats = tower(pixel_values=ev[0]).last_hidden_state  # (T, S, W)
    p, a = "model.visual_projector.", "model.feature_adaptor."
    h = torch.nn.functional.gelu(feats @ raw[p + "0.weight"].T + raw[p + "0.bias"])
    h = h @ raw[p + "2.weight"].T + raw[p + "2.bias"]
    h = h @ raw[a + "weight"].T + raw[a + "bias"]  # (T, S, D)
    pooled = torch.cat([h.mean(1), h.mean(0)])  # (T + S, D): temporal then spatial tokens
    llama_state = {
        k: v
        for k, v in raw.items()
        if not k.startswith(("model.visual", "model.feature_adaptor")) and "inv_freq" not in k
    }
    rows = llama_state["model.embed_tokens.weight"].shape[0]
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=rows, **TEXT)).eval()
    llama.load_state_dict(llama_state)
    i = ids[0].tolist().index(EVENT_PLACEHOLDER_ID)
    emb = llama.get_input_embeddings()
    embeds = torch.cat([emb(ids[:, :i]), pooled[None], emb(ids[:, i + 1 :])], 1)
    return llama(inputs_embeds=embeds).logits


def test_eventgpt_sharded_bin_with_separate_clip_equals_reference(ckpts):
    model = load_eventgpt(ckpts["draft"], clip_dir=str(ckpts["clip"]))
    assert model.config.vocab_size == 32003  # from the embedding, not config.json's 32000
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpts["target"])
    ids = torch.tensor([encode_draft_prompt(tok, "what is ahead?", (32001, 32002))])
    ev = torch.randn(1, 5, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(ids, ev).logits
        want = _reference_logits(ckpts["draft"], ckpts["clip"], ids, ev)
    assert got.shape[1] == ids.shape[1] - 1 + 5 + 5  # 5 temporal + 5 spatial event tokens
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_eventgpt_safetensors_shards_with_tower_inside(ckpts, tmp_path):
    source = write_eventgpt(
        tmp_path / "egpt", ckpts["clip_model"], tower_inside=True, fmt="safetensors"
    )
    model = load_eventgpt(tmp_path / "egpt", clip_dir=str(ckpts["clip"]))
    ids = torch.tensor([[1, 5, EVENT_PLACEHOLDER_ID, 7]])
    ev = torch.randn(1, 5, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, ev).logits, source(ids, ev).logits, rtol=0, atol=0)
    # Tower inside, but its config neither local nor ViT-L/14-336-shaped: named, not guessed.
    with pytest.raises(CheckpointError, match="CLIP vision tower config not found"):
        load_eventgpt(tmp_path / "egpt")


def test_vit_l14_336_tower_is_recognised_by_its_shapes():
    cfg = clip_vit_l14_336_config()
    p = "encoder.visual_tower.vision_model."
    state = {
        p + "embeddings.patch_embedding.weight": torch.empty(1024, 3, 14, 14, device="meta"),
        p + "embeddings.position_embedding.weight": torch.empty(577, 1024, device="meta"),
        p + "encoder.layers.23.mlp.fc1.weight": torch.empty(4096, 1024, device="meta"),
    }
    assert _tower_matches(state, cfg, nested=True)
    state[p + "encoder.layers.24.mlp.fc1.weight"] = torch.empty(4096, 1024, device="meta")
    assert not _tower_matches(state, cfg, nested=True)  # a 25th layer: another tower
    del state[p + "encoder.layers.24.mlp.fc1.weight"]
    state[p + "embeddings.position_embedding.weight"] = torch.empty(257, 1024, device="meta")
    assert not _tower_matches(state, cfg, nested=True)  # ViT-L/14 at 224


def test_loaders_name_missing_shards_and_clip_weights(ckpts, tmp_path):
    import shutil

    bad = tmp_path / "egpt"
    shutil.copytree(ckpts["draft"], bad)
    (bad / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match=r"missing: \[.*pytorch_model-00002-of-00002.bin"):
        load_eventgpt(bad, clip_dir=str(ckpts["clip"]))
    text_only = tmp_path / "clip_text_only"
    shutil.copytree(ckpts["clip"], text_only)
    weights = load_file(str(text_only / "model.safetensors"))
    save_file(
        {k: v for k, v in weights.items() if k.startswith("text_model.")},
        str(text_only / "model.safetensors"),
    )
    with pytest.raises(CheckpointError, match=r"no CLIP weights: neither .*EventGPT-7b"):
        load_eventgpt(ckpts["draft"], clip_dir=str(text_only))
    with pytest.raises(CheckpointError, match="pass clip_dir= a local CLIP ViT-L/14-336"):
        load_eventgpt(ckpts["draft"])
    target = tmp_path / "vl"
    shutil.copytree(ckpts["target"], target)
    (target / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors"):
        load_videollava(str(target))


# ---------------------------------------------------------------------------------- inputs


def test_clip_preprocess_equals_the_transformers_processors():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (8, 270, 360, 3), dtype=np.uint8)
    ours = clip_preprocess(frames, 224)
    # Video-LLaVA's PIL processor; its per-frame transform is the one video frames get.
    proc = VideoLlavaImageProcessor()
    theirs = proc(images=list(frames), return_tensors="pt", return_legacy_image_output=False)
    torch.testing.assert_close(ours, theirs["pixel_values"], rtol=0, atol=1e-5)
    events = rng.integers(0, 256, (2, 480, 640, 3), dtype=np.uint8)
    proc = CLIPImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
    )
    torch.testing.assert_close(
        clip_preprocess(events, 336),
        proc(list(events), return_tensors="pt")["pixel_values"],
        rtol=0,
        atol=1e-5,
    )


def test_event_images_use_eventgpt_chunks_and_colours():
    assert eventgpt_chunk_bounds(13, 5).tolist() == [0, 2, 4, 6, 8, 13]  # remainder to the last
    assert eventgpt_chunk_bounds(3, 5).tolist() == [0, 0, 0, 0, 0, 3]
    # 13 events on a 4x6 sensor; events 8 and 12 hit the same pixel: the later one (blue) wins.
    x = np.array([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 2])
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    p = np.array([1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 0])
    images = eventgpt_event_images(EventStream(x, y, np.arange(13), p), (4, 6), 5, "test")
    assert images.shape == (5, 4, 6, 3)
    assert images[0, 0, 0].tolist() == [255, 0, 0] and images[0, 0, 1].tolist() == [0, 0, 255]
    assert images[0, 0, 2].tolist() == [255, 255, 255]  # event 2 belongs to the second image
    assert images[4, 2, 2].tolist() == [0, 0, 255]
    assert (images[4] != 255).any(axis=-1).sum() == 4  # events 8..12 touch four pixels
    with pytest.raises(EventStreamError, match="DSEC seq: no events in the window"):
        eventgpt_event_images(EventStream(*(np.zeros(0, int),) * 4), (480, 640), 5, "DSEC seq")
    with pytest.raises(EventStreamError, match="1 events outside the sensor size 640x480"):
        eventgpt_event_images(
            EventStream(np.array([640]), np.array([0]), np.array([0]), np.array([1])),
            (480, 640),
            5,
            "s",
        )


def test_eventgpt_prompt_keeps_the_text_around_the_placeholder(ckpts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpts["target"])
    q = "what is ahead?"
    ids = encode_draft_prompt(tok, q, wrap=(32001, 32002))
    i = ids.index(EVENT_PLACEHOLDER_ID)
    assert ids[i - 1 : i + 2] == [32001, EVENT_PLACEHOLDER_ID, 32002]
    assert (
        ids[: i - 1] == tok(draft_prompt(q).split("<event>")[0]).input_ids
    )  # BOS + system + USER:
    tail = ids[i + 2 :]
    assert tail[0] != tok.bos_token_id and tok.decode(tail) == f"\n{q} ASSISTANT:"
    # The mini world's word-level tokenizer: BOS, the words, the placeholder, no second BOS.
    from cross_modal_sd.world.tokenizer import build_tokenizer

    mini = build_tokenizer()
    ids = encode_draft_prompt(mini, "what colour is the car ?")
    i = ids.index(EVENT_PLACEHOLDER_ID)
    assert ids[0] == mini.bos_token_id and mini.bos_token_id not in ids[1:]
    assert mini.decode(ids[i + 1 :]) == "what colour is the car ? ASSISTANT:"


def test_added_tokens_are_read_without_a_tokenizer_library(ckpts):
    assert read_added_tokens(ckpts["draft"]) == EV_TOKENS
    assert read_added_tokens(ckpts["target"])["<video>"] == 32001


# --------------------------------------------------------------------- pair and extraction


@pytest.fixture(scope="module")
def dsec_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsec")
    rng = np.random.default_rng(0)
    for name in ("interlaken_00_c", "zurich_city_01_a"):
        n = 3000
        t = np.sort(rng.integers(0, 260_000, n))
        t[0] = 0  # events and frames start together, so clips start at t_offset
        events = EventStream(
            x=rng.integers(0, 640, n),
            y=rng.integers(0, 480, n),
            t=t + T_OFFSET,
            p=rng.integers(0, 2, n),
        )
        stamps = T_OFFSET + 50_000 * np.arange(6)  # 20 Hz frames over 250 ms
        frames = rng.integers(0, 256, (6, 24, 32, 3), dtype=np.uint8)
        write_sequence(root / "train" / name, events, T_OFFSET, stamps, frames)
    return root


def dsec_cfg(root) -> dict:
    """`conf/source/dsec.yaml` over the test sequences: 100 ms clips, two questions."""
    cfg = OmegaConf.load(Path(__file__).parents[1] / "conf/source/dsec.yaml")
    cfg.merge_with(
        {
            "root": str(root),
            "clip_ms": 100,
            "event_ms": 50,
            "val_fraction": 0,
            "test_fraction": 0,
            "questions": ["what is ahead?", "is the road busy?"],
        }
    )
    return cfg


def test_real_pair_extracts_teacher_forced_pairs_from_dsec(ckpts, dsec_root, tmp_path):
    models = models_cfg(ckpts)
    cfg = OmegaConf.create(
        {
            "models": models,
            "source": dsec_cfg(dsec_root),
            "out_dir": str(tmp_path / "cache"),
            "dtype": "float32",
            "shard_samples": 4,
            "max_new_tokens": None,
        }
    )
    first = extract(cfg)
    # Two sequences x two 100 ms clips (frames at 0..250 ms) x two questions.
    assert first["written"] == 8 and first["resumed"] == 0
    cache = HiddenPairCache(tmp_path / "cache")
    assert sorted(set(cache.groups)) == ["interlaken_00_c", "zurich_city_01_a"]
    assert cache.sample_ids[0] == f"interlaken_00_c/{T_OFFSET}/q0"
    assert cache.manifest["vocab_limit"] == 32000 and cache.manifest["pairing"] == "teacher_forced"

    pair = load_pair(models)
    row = cache[1]
    logits = row["h_target"] @ pair.target.lm_head_weight.T
    assert (logits.argmax(-1) >= 32000).all()  # unmasked, an added token would win ...
    assert (pair.target.logits(row["h_target"]).argmax(-1) == row["tokens"]).all()  # ... masked, y
    sample = next(s for i, s in make_source(cfg.source).samples(pair) if i == row["sample_id"])
    assert sample.frames.shape == (1, 8, 3, 28, 28) and sample.event_pixels.shape == (
        1,
        5,
        3,
        28,
        28,
    )
    y = row["tokens"].tolist()
    ids = torch.cat([sample.draft_ids, torch.tensor([y[:-1]])], 1)
    fresh = pair.draft.prefill(ids, sample.event_pixels, keep_last=len(y)).hidden[0]
    torch.testing.assert_close(row["h_draft"], fresh, rtol=1e-5, atol=1e-5)

    again = extract(cfg)
    assert again["written"] == 0 and again["resumed"] == 8


def test_real_pair_settings_are_checked_before_and_after_loading(ckpts, tmp_path):
    with pytest.raises(ValueError, match="quantization=4bit needs a CUDA device"):
        load_pair(models_cfg(ckpts, quantization="4bit"))
    with pytest.raises(ValueError, match="models.dtype must be auto or one of"):
        load_pair(models_cfg(ckpts, dtype="fp8"))
    import shutil

    bad = tmp_path / "egpt"
    shutil.copytree(ckpts["draft"], bad)
    (bad / "added_tokens.json").unlink()
    with pytest.raises(
        CheckpointError, match=r"sets mm_use_im_start_end but .* lack \['<ev_start>', '<ev_end>'\]"
    ):
        load_pair(models_cfg(ckpts, draft=str(bad)))


# ------------------------------------------------------------------------------- gpu check


def _gpu_check_module():
    path = Path(__file__).parents[1] / "scripts" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


def test_gpu_check_arguments_are_validated():
    gpu_check = _gpu_check_module()
    args = gpu_check.parse_args(["--target", "t", "--draft", "d", "--ks", "8,1,2,8"])
    assert args.ks == [1, 2, 8] and args.device == "cuda" and args.quantization is None
    assert gpu_check.models_config(args)["kind"] == "eventgpt_videollava"
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--target", "t", "--draft", "d", "--ks", "0"])


def test_gpu_check_dry_run_on_cpu_writes_its_report(ckpts, dsec_root, tmp_path):
    gpu_check = _gpu_check_module()
    out = tmp_path / "report" / "gpu_check.json"
    argv = [
        "--target",
        str(ckpts["target"]),
        "--draft",
        str(ckpts["draft"]),
        "--clip",
        str(ckpts["clip"]),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--max-new-tokens",
        "4",
        "--ks",
        "1,3",
        "--repeats",
        "1",
        "--dsec-root",
        str(dsec_root),
        "--clip-ms",
        "100",
        "--out",
        str(out),
    ]
    returned = gpu_check.main(argv)
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))
    assert report["sd"]["lossless"] and report["sd"]["tokens"] == report["baseline"]["tokens"]
    profile = report["cost_profile"]
    assert [k for k, _ in profile["verify_points"]] == [1, 3]
    assert report["sample"]["source"].startswith("DSEC interlaken_00_c/")
    costs = {**profile, **profile["meta"]}
    from transformers import AutoTokenizer

    from cross_modal_sd.models.prompts import encode_target_prompt

    tok, q = AutoTokenizer.from_pretrained(ckpts["target"]), gpu_check.QUESTION
    assert costs["target_prompt_positions"] == len(encode_target_prompt(tok, q, 8 * 5))
    # The placeholder becomes 5 temporal + 5 spatial event tokens.
    assert costs["draft_prompt_positions"] == len(encode_draft_prompt(tok, q, (32001, 32002))) + 9
    for key in ("target_prefill_ms", "target_token_ms", "draft_prefill_ms", "draft_token_ms"):
        assert costs[key] > 0


def test_documented_commands_compose(ckpts, dsec_root):
    from hydra import compose, initialize_config_dir

    conf = str(Path(__file__).parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose(
            "extract",
            overrides=[
                "models=eventgpt_videollava",
                "source=dsec",
                "data=dsec",
                f"models.draft={ckpts['draft']}",
                f"source.root={dsec_root}",
                "source.split=val",
                "dtype=bfloat16",
            ],
        )
        ev = compose(
            "evaluate",
            overrides=["models=eventgpt_videollava", "source=dsec", "data=dsec", "source.root=x"],
        )
        train = compose("train", overrides=["source=dsec", "data=dsec"])
    assert cfg.models.kind == "eventgpt_videollava" and cfg.models.dtype == "bfloat16"
    source = make_source(cfg.source)
    assert source.name == "dsec" and source.split == "val"
    assert cfg.out_dir == "checkpoints/dsec/cache/val"
    # Evaluation times test clips and checks the export against the train cache's manifest.
    assert ev.source.split == "test" and ev.source.count == 10
    assert ev.data.cache_dir == "checkpoints/dsec/cache/test" and ev.models.vocab_limit == 32000
    assert train.data.cache_dir == "checkpoints/dsec/cache/train"
