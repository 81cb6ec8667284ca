"""Loading the draft (EventGPT layout) and the target (Video-LLaVA) from local directories.

The same functions load the mini models written by `cross_modal_sd.world.build` and the real
7B checkpoints on a GPU box; nothing here downloads unless given a hub id.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, VideoLlavaForConditionalGeneration

from cross_modal_sd.models.architectures import clip_vit_l14_336_config
from cross_modal_sd.models.eventgpt import EventGPT, _from_original_key, read_eventgpt_config

CLIP_PREFIX = "model.visual_tower.visual_tower."
TOWER = "encoder.visual_tower."  # where the CLIP tower sits in the EventGPT module
INNER = "vision_model."


def _tower_nests_vision_model() -> bool:
    """Whether this transformers' `CLIPVisionModel` keeps its weights under `vision_model.`.

    transformers < 5 did (as every EventGPT checkpoint and CLIP directory does); 5 does not.
    """
    tiny = CLIPVisionConfig(
        hidden_size=4,
        intermediate_size=4,
        num_hidden_layers=1,
        num_attention_heads=1,
        image_size=2,
        patch_size=1,
    )
    with torch.device("meta"):
        return "vision_model" in dict(CLIPVisionModel(tiny).named_children())


def _tower_key(key: str, nested: bool) -> str:
    """A tower key in the layout this transformers' `CLIPVisionModel` expects."""
    if not key.startswith(TOWER):
        return key
    rest = key[len(TOWER) :].removeprefix(INNER)
    return TOWER + (INNER if nested else "") + rest


class CheckpointError(FileNotFoundError):
    """A checkpoint directory that is missing files or weights; the message names them."""


def _weight_files(directory: Path) -> list[Path]:
    """Weight files of a checkpoint: single file or the shards named by an index JSON."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            shards = [directory / n for n in shard_names]
            missing = [str(p) for p in shards if not p.is_file()]
            if missing:
                raise CheckpointError(f"{index} names shards that are missing: {missing}")
            return shards
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (directory / single).is_file():
            return [directory / single]
    raise CheckpointError(
        f"no weights in {directory}: expected model.safetensors, pytorch_model.bin or a "
        "sharded index (model.safetensors.index.json / pytorch_model.bin.index.json)"
    )


def _iter_tensors(
    files: list[Path], keep: Callable[[str], bool] = lambda key: True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Streams (key, tensor) of the kept keys from safetensors or torch .bin files.

    safetensors files are read tensor by tensor; .bin files are memory-mapped, so only the tensors
    taken are read either way.
    """
    from safetensors import safe_open

    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    if keep(key):
                        yield key, f.get_tensor(key)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            yield from ((k, v) for k, v in state.items() if keep(k))


def _find_clip(directory: Path, mm_visual_tower: str | None, clip_dir: str | None) -> list[Path]:
    """Candidate CLIP directories, in order; the first holding a config.json is used."""
    candidates = [Path(clip_dir)] if clip_dir else []
    if mm_visual_tower:
        candidates += [directory / mm_visual_tower, Path(mm_visual_tower)]
    return candidates


def _tower_matches(state: dict[str, torch.Tensor], cfg: CLIPVisionConfig, nested: bool) -> bool:
    """Whether the tower weights in `state` have exactly the shapes `cfg` implies."""
    p = TOWER + (INNER if nested else "")
    n_pos = (cfg.image_size // cfg.patch_size) ** 2 + 1
    expected = {
        p + "embeddings.patch_embedding.weight": (
            cfg.hidden_size,
            3,
            cfg.patch_size,
            cfg.patch_size,
        ),
        p + "embeddings.position_embedding.weight": (n_pos, cfg.hidden_size),
        p + f"encoder.layers.{cfg.num_hidden_layers - 1}.mlp.fc1.weight": (
            cfg.intermediate_size,
            cfg.hidden_size,
        ),
    }
    too_deep = p + f"encoder.layers.{cfg.num_hidden_layers}.mlp.fc1.weight"
    return too_deep not in state and all(
        k in state and tuple(state[k].shape) == shape for k, shape in expected.items()
    )


def load_eventgpt(
    directory: str | Path,
    clip_dir: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> EventGPT:
    """Loads an EventGPT checkpoint in the original layout.

    Args:
        directory: checkpoint directory (config.json + single or sharded weights).
        clip_dir: CLIP vision tower directory; needed when the checkpoint's `mm_visual_tower`
            does not point at a local directory, and used for the tower's weights when the
            checkpoint does not carry them under `model.visual_tower.visual_tower.`.
        dtype: parameter dtype.
        device: target device.

    Returns:
        The model in eval mode.

    Tensors are cast and moved to `device` one at a time as they are read, so host memory holds
    at most one tensor beyond what `device` is; buffers (rotary `inv_freq`, CLIP position ids)
    keep their own dtypes as transformers' own loading leaves them.
    """
    directory = Path(directory)
    llama_cfg, mm = read_eventgpt_config(directory)
    files = _weight_files(directory)

    def place(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    nested = _tower_nests_vision_model()
    state: dict[str, torch.Tensor] = {}
    for key, value in _iter_tensors(files, keep=lambda k: not _is_rebuilt_buffer(k)):
        ours = _from_original_key(key)
        if ours is not None:
            state[_tower_key(ours, nested)] = place(value)
    embed = state.get("language_model.model.embed_tokens.weight")
    if embed is None:
        raise CheckpointError(f"{directory}: no model.embed_tokens.weight in {files}")
    # The vocabulary size is what the embedding matrix says (EventGPT adds tokens after Vicuna's).
    llama_cfg.vocab_size = embed.shape[0]

    candidates = _find_clip(directory, mm.get("mm_visual_tower"), clip_dir)
    clip_path = next((c for c in candidates if (c / "config.json").is_file()), None)
    has_tower = any(k.startswith(TOWER) for k in state)
    if clip_path is not None:
        vision_cfg = CLIPVisionConfig.from_pretrained(clip_path)
    elif has_tower and _tower_matches(state, clip_vit_l14_336_config(), nested):
        # `mm_visual_tower` is usually a hub id; the tower inside the checkpoint has exactly
        # ViT-L/14-336's shapes, so its config is known without the hub.
        vision_cfg = clip_vit_l14_336_config()
    else:
        raise CheckpointError(
            f"CLIP vision tower config not found for {directory}: tried "
            f"{[str(c) for c in candidates]}; pass clip_dir= a local CLIP ViT-L/14-336 directory"
        )
    if not has_tower and clip_path is not None:
        for key, value in _iter_tensors(
            _weight_files(clip_path),
            keep=lambda k: k.startswith(INNER) and not _is_rebuilt_buffer(k),
        ):
            state[_tower_key(TOWER + key, nested)] = place(value)
    if not any(k.startswith(TOWER) for k in state):
        raise CheckpointError(
            f"no CLIP weights: neither {directory} ({CLIP_PREFIX}*) nor {clip_path} (vision_model.*)"
        )
    if "language_model.lm_head.weight" not in state and llama_cfg.tie_word_embeddings:
        state["language_model.lm_head.weight"] = embed

    with torch.device("meta"):
        model = EventGPT(llama_cfg, vision_cfg)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    # Position ids of CLIP are a buffer that some checkpoints omit; everything else must be there.
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise CheckpointError(
            f"{directory}: weights do not match the EventGPT layout; "
            f"missing {missing[:8]}{'…' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
        )
    _materialise_buffers(model)
    return model.to(device=device).eval()


def _is_rebuilt_buffer(key: str) -> bool:
    """Buffers older checkpoints carry but this transformers rebuilds from the config."""
    return key.endswith(("rotary_emb.inv_freq", "embeddings.position_ids"))


def _materialise_buffers(model: torch.nn.Module) -> None:
    """Recreates buffers left on the meta device (non-persistent ones are not in checkpoints).

    A module holding such a buffer is rebuilt on the CPU from its own config (rotary embeddings
    compute `inv_freq` in their constructor) and its buffers are copied over; CLIP's position ids
    are a plain range.
    """
    for module in model.modules():
        meta = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if not meta:
            continue
        if hasattr(module, "config") and not isinstance(module, EventGPT):
            fresh = dict(type(module)(module.config).named_buffers(recurse=False))
        else:
            fresh = {}
        for name in meta:
            shape = getattr(module, name).shape
            if name in fresh:
                value = fresh[name]
            elif name == "position_ids":
                value = torch.arange(shape[-1]).expand(shape).clone()
            else:
                raise CheckpointError(f"cannot rebuild buffer {name} of {type(module).__name__}")
            setattr(module, name, torch.nn.Buffer(value, persistent=False))


def load_videollava(
    path: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    quantization_config=None,
) -> VideoLlavaForConditionalGeneration:
    """Loads Video-LLaVA from a local directory (or, on a GPU box, a hub id).

    Args:
        path: directory written by `save_pretrained` or a hub id such as
            `LanguageBind/Video-LLaVA-7B-hf`.
        dtype: parameter dtype.
        device: target device.
        quantization_config: optional transformers quantization config (e.g. bitsandbytes 4-bit).
    """
    local = Path(path)
    if local.exists():
        _weight_files(local)  # fail early, naming the missing file
        if not (local / "config.json").is_file():
            raise CheckpointError(f"Video-LLaVA checkpoint has no config.json: {local}")
    kwargs = {"dtype": dtype}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": device}
    model = VideoLlavaForConditionalGeneration.from_pretrained(path, **kwargs)
    if quantization_config is None:
        model = model.to(device)
    return model.eval()
