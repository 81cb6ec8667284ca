"""Adapters L1-L5: sizes, init behaviour, causality, padding, heads, export round trip, errors."""

import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cross_modal_sd.adapters import (
    Adapter,
    BottleneckAdapter,
    CausalTransformerAdapter,
    EagleAdapter,
    UnknownAdapterError,
    adapter_from_payload,
    adapter_payload,
    build_adapter,
)
from cross_modal_sd.config import group_option
from cross_modal_sd.exports import ExportError, load_export, save_export

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "adapter"
LEVELS = ["L1", "L2", "L3", "L4", "L5"]
# docs/design.md §8 sizes at d = 4096 ...
TARGET_PARAMS = {"L1": 2.1e6, "L2": 6.3e6, "L3": 16.8e6, "L4": 100e6, "L5": 100e6}
# ... and the exact counts of this implementation (biases, LayerNorms and alphas included).
EXACT_PARAMS = {
    "L1": 2_117_889,
    "L2": 6_337_283,
    "L3": 16_816_130,
    "L4": 100_706_304,
    "L5": 100_728_834,
}
# Small sequence-layer sizes so the tests stay fast; the structure is the YAML's.
SMALL = {"L4": {"ffn_dim": 64}, "L5": {"ffn_dim": 64, "head_bottleneck": 16}}


def small_adapter(level: str, in_dim: int = 32, out_dim: int = 32, **overrides) -> Adapter:
    cfg = {**group_option("adapter", level), **SMALL.get(level, {}), **overrides}
    return build_adapter(cfg, in_dim, out_dim)


def randomize_(adapter: Adapter, seed: int = 0) -> Adapter:
    """Overwrite every parameter (the zero/identity inits would hide mixing across positions)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return adapter.eval()


@pytest.mark.parametrize("level", LEVELS)
def test_param_count_at_4096_from_yaml(level):
    cfg = OmegaConf.load(CONF_DIR / f"{level}.yaml")
    with torch.device("meta"):
        adapter = instantiate(cfg, in_dim=4096, out_dim=4096)
    count = adapter.num_parameters()
    assert abs(count - TARGET_PARAMS[level]) <= 0.05 * TARGET_PARAMS[level]
    assert count == EXACT_PARAMS[level]
    assert adapter.config["name"] == level


def test_is_sequence_flags_and_heads():
    flags = {level: small_adapter(level).is_sequence for level in LEVELS}
    assert flags == {"L1": False, "L2": False, "L3": False, "L4": True, "L5": True}
    assert EagleAdapter.head_names == ("align", "next")
    assert BottleneckAdapter.head_names == ("align",)


@pytest.mark.parametrize("level", ["L1", "L2", "L3"])
def test_bottleneck_starts_as_final_layernorm(level):
    torch.manual_seed(0)
    adapter = small_adapter(level)
    h = torch.randn(2, 5, 32) * 3 + 1
    torch.testing.assert_close(adapter(h), F.layer_norm(h, (32,)))


def test_bottleneck_stops_being_layernorm_once_branch_is_nonzero():
    torch.manual_seed(0)
    adapter = small_adapter("L1")
    with torch.no_grad():
        adapter.blocks[0].up.weight.fill_(0.1)
    h = torch.randn(2, 5, 32)
    assert not torch.allclose(adapter(h), F.layer_norm(h, (32,)))


@pytest.mark.parametrize("level", ["L4", "L5"])
def test_sequence_adapters_start_as_identity(level):
    torch.manual_seed(0)
    adapter = small_adapter(level)
    h = torch.randn(2, 6, 32)
    heads = adapter.forward_heads(h)
    assert set(heads) == set(adapter.head_names)
    for out in heads.values():
        torch.testing.assert_close(out, h)


def test_token_fusion_starts_as_noop_and_then_matters():
    torch.manual_seed(0)
    adapter = small_adapter("L5", fuse_tokens=True, vocab_size=11)
    h = torch.randn(1, 4, 32)
    tokens = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(adapter(h, tokens=tokens), h)
    randomize_(adapter)
    assert not torch.allclose(adapter(h, tokens=tokens), adapter(h, tokens=tokens.flip(1)))


SEQUENCE_CASES = [
    ("L4", {}),
    ("L5", {}),
    ("L5", {"fuse_tokens": True, "vocab_size": 11}),
]


def _call(adapter, h, mask=None, tokens=None):
    kwargs = {"tokens": tokens} if adapter.uses_tokens else {}
    return adapter.forward_heads(h, mask, **kwargs)


@pytest.mark.parametrize(("level", "overrides"), SEQUENCE_CASES)
def test_sequence_adapters_are_causal_and_prefix_consistent(level, overrides):
    torch.manual_seed(0)
    adapter = randomize_(small_adapter(level, **overrides))
    h = torch.randn(2, 7, 32)
    tokens = torch.randint(0, 11, (2, 7))
    full = _call(adapter, h, tokens=tokens)
    for k in range(7):
        prefix = _call(adapter, h[:, : k + 1], tokens=tokens[:, : k + 1])
        for head, out in prefix.items():
            torch.testing.assert_close(out[:, k], full[head][:, k], atol=1e-5, rtol=1e-5)
    # Changing the future must leave the past untouched, and must change the future itself.
    h_future = h.clone()
    h_future[:, 4:] = torch.randn(2, 3, 32)
    changed = _call(adapter, h_future, tokens=tokens)
    for head in full:
        torch.testing.assert_close(changed[head][:, :4], full[head][:, :4], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(changed[head][:, 4:], full[head][:, 4:])


@pytest.mark.parametrize("level", ["L4", "L5"])
def test_sequence_adapters_mix_positions(level):
    # Causality tests pass trivially for a per-position map; make sure the past does matter.
    torch.manual_seed(0)
    adapter = randomize_(small_adapter(level))
    h = torch.randn(1, 5, 32)
    h_past = h.clone()
    h_past[:, 0] = torch.randn(32)
    assert not torch.allclose(adapter(h)[:, 4], adapter(h_past)[:, 4])


@pytest.mark.parametrize(
    ("level", "overrides"),
    [("L1", {}), ("L2", {}), ("L3", {}), *SEQUENCE_CASES],
)
def test_padding_does_not_change_valid_outputs(level, overrides):
    torch.manual_seed(0)
    adapter = randomize_(small_adapter(level, in_dim=32, out_dim=48, **overrides))
    h = torch.randn(2, 6, 32)
    tokens = torch.randint(0, 11, (2, 6))
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    garbage = h.clone()
    garbage[1, 4:] = float("nan")
    garbage_tokens = tokens.clone()
    garbage_tokens[1, 4:] = -100
    padded = _call(adapter, garbage, mask, garbage_tokens)
    alone = _call(adapter, h[1:, :4], tokens=tokens[1:, :4])
    full_row = _call(adapter, h[:1], tokens=tokens[:1])
    for head, out in padded.items():
        torch.testing.assert_close(out[1, :4], alone[head][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[0], full_row[head][0], atol=1e-5, rtol=1e-5)
        assert torch.equal(out[1, 4:], torch.zeros(2, 48))
    # Gradients stay finite although the padding holds NaN.
    garbage.requires_grad_(True)
    sum(out.sum() for out in _call(adapter, garbage, mask, garbage_tokens).values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in adapter.parameters() if p.grad is not None)


def test_eagle_heads_are_separate_and_trained_by_their_own_loss():
    torch.manual_seed(0)
    adapter = randomize_(small_adapter("L5"))
    align_ids = {id(p) for p in adapter.align_head.parameters()}
    next_ids = {id(p) for p in adapter.next_head.parameters()}
    assert adapter.align_head is not adapter.next_head and not align_ids & next_ids
    h = torch.randn(2, 5, 32)
    target = torch.randn(2, 5, 32)
    for head, other in (("align", adapter.next_head), ("next", adapter.align_head)):
        adapter.zero_grad(set_to_none=True)
        own = getattr(adapter, f"{head}_head")
        F.mse_loss(adapter.forward_heads(h)[head], target).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in own.parameters())
        assert all(p.grad is None for p in other.parameters())
        assert adapter.trunk.attn.qkv.weight.grad.abs().sum() > 0
    torch.testing.assert_close(adapter(h), adapter.forward_heads(h)["align"])
    assert not torch.allclose(adapter.forward_heads(h)["next"], adapter(h))


@pytest.mark.parametrize(("level", "overrides"), [("L1", {}), ("L3", {}), *SEQUENCE_CASES])
def test_payload_round_trip_gives_identical_outputs(level, overrides):
    torch.manual_seed(0)
    adapter = randomize_(small_adapter(level, in_dim=32, out_dim=48, **overrides))
    buffer = io.BytesIO()
    torch.save({**adapter_payload(adapter), "metrics": {"val/token_match": 0.5}}, buffer)
    buffer.seek(0)
    payload = torch.load(buffer, weights_only=True)
    assert payload["adapter_config"] == adapter.config
    rebuilt = adapter_from_payload(payload).eval()
    assert type(rebuilt) is type(adapter)
    h = torch.randn(2, 5, 32)
    tokens = torch.randint(0, 11, (2, 5))
    for head, out in _call(adapter, h, tokens=tokens).items():
        assert torch.equal(out, _call(rebuilt, h, tokens=tokens)[head])


def test_save_and_load_adapter_file(tmp_path):
    torch.manual_seed(0)
    adapter = randomize_(small_adapter("L2"))
    path = tmp_path / "best_model.pt"
    save_export(adapter, path, metrics={"val/cos_sim": 0.9})
    h = torch.randn(1, 3, 32)
    assert torch.equal(load_export(path).adapter.eval()(h), adapter(h))
    with pytest.raises(ExportError, match=r"missing\.pt: no such file"):
        load_export(tmp_path / "missing.pt")


@pytest.mark.parametrize("level", LEVELS)
def test_different_in_and_out_dims(level):
    torch.manual_seed(0)
    adapter = small_adapter(level, in_dim=32, out_dim=48)
    h = torch.randn(3, 5, 32)
    out = adapter(h, torch.ones(3, 5, dtype=torch.bool))
    assert out.shape == (3, 5, 48)
    assert torch.isfinite(out).all()


def test_bottleneck_with_different_dims_starts_as_layernorm_of_projection():
    torch.manual_seed(0)
    adapter = small_adapter("L2", in_dim=32, out_dim=48)
    h = torch.randn(2, 4, 32)
    expected = F.layer_norm(adapter.blocks[0].skip(h), (48,))
    torch.testing.assert_close(adapter(h), expected)


def test_hydra_instantiate_and_build_adapter_agree():
    cfg = OmegaConf.load(CONF_DIR / "L3.yaml")
    via_hydra = instantiate(cfg, in_dim=32, out_dim=40)
    via_build = build_adapter(cfg, 32, 40)
    via_name = build_adapter(group_option("adapter", "L3"), 32, 40)
    assert via_hydra.config == via_build.config == via_name.config
    assert via_build.config["in_dim"] == 32 and via_build.config["out_dim"] == 40


def test_unknown_name_and_target_errors():
    with pytest.raises(
        ValueError, match=r"unknown adapter 'L9'.*known: H1, H2, L1, L2, L3, L4, L5"
    ):
        group_option("adapter", "L9")
    with pytest.raises(UnknownAdapterError, match=r"'os\.system'.*known targets: .*EagleAdapter"):
        build_adapter({"_target_": "os.system", "name": "L1"}, 32, 32)
    with pytest.raises(ValueError, match="no '_target_'"):
        build_adapter({"name": "L1"}, 32, 32)


def test_build_adapter_dim_errors():
    config = small_adapter("L1", in_dim=32, out_dim=48).config
    with pytest.raises(ValueError, match=r"in_dim=32 but in_dim=64 was requested"):
        build_adapter(config, in_dim=64)
    with pytest.raises(ValueError, match="has no out_dim and none was passed"):
        build_adapter(group_option("adapter", "L1"), in_dim=32)
    with pytest.raises(ValueError, match="in_dim must be a positive int"):
        BottleneckAdapter(0, 32)


def test_payload_errors():
    adapter = small_adapter("L1")
    with pytest.raises(ValueError, match=r"lacks \['state_dict'\]"):
        adapter_from_payload({"adapter_config": adapter.config})
    payload = adapter_payload(adapter)
    payload["adapter_config"]["bottleneck_dim"] = 8
    with pytest.raises(ValueError, match="weights do not match its adapter_config"):
        adapter_from_payload(payload)


def test_bad_input_errors():
    adapter = small_adapter("L4")
    h = torch.randn(2, 3, 32)
    with pytest.raises(ValueError, match=r"h must have shape \(B, T, 32\), got \(2, 3, 16\)"):
        adapter(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="mask must be torch.bool"):
        adapter(h, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"mask shape \(2, 4\) does not match"):
        adapter(h, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="split into 8 heads of even width"):
        CausalTransformerAdapter(36, 36)


def test_token_fusion_errors():
    with pytest.raises(ValueError, match="fuse_tokens=True needs a positive int vocab_size"):
        small_adapter("L5", fuse_tokens=True)
    fused = small_adapter("L5", fuse_tokens=True, vocab_size=11)
    h = torch.randn(1, 3, 32)
    with pytest.raises(ValueError, match="no tokens were passed"):
        fused(h)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 11\), got range \[0, 11\]"):
        fused(h, tokens=torch.tensor([[0, 5, 11]]))
    with pytest.raises(ValueError, match="tokens were passed but fuse_tokens is False"):
        small_adapter("L5")(h, tokens=torch.tensor([[0, 1, 2]]))
