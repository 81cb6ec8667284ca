"""`scripts/gpu_check.py` without a GPU: the random-weight pair at `--shapes tiny` on the CPU, the
mini-world section on the session's small world, the real shapes on the meta device, bad input.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from cross_modal_sd.adapters import build_adapter
from cross_modal_sd.config import group_option
from cross_modal_sd.exports import ExportError, save_export
from cross_modal_sd.models.architectures import PAIR_SHAPES, clip_vit_l14_336_config, random_pair
from cross_modal_sd.models.real import video_token_count
from cross_modal_sd.speedup import CostProfile, load_profile
from cross_modal_sd.world.config import MiniWorldConfig

KS = "32,1,3"
MAX_NEW = 8


def _load_script():
    if "gpu_check" in sys.modules:
        return sys.modules["gpu_check"]
    path = Path(__file__).parents[1] / "scripts" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return _load_script()


@pytest.fixture(scope="module")
def world_build(small_world_cfg) -> Path:
    """The session's small world: one build directory (named by its config digest)."""
    config = MiniWorldConfig.from_dict(OmegaConf.to_container(small_world_cfg.world))
    return Path(small_world_cfg.root) / config.digest()


@pytest.fixture(scope="module")
def tiny_run(gpu_check, world_build, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "report" / "gpu_check.json"
    argv = ["--shapes", "tiny", "--device", "cpu", "--dtype", "float32", "--ks", KS]
    argv += ["--repeats", "1", "--max-new-tokens", str(MAX_NEW), "--out", str(out)]
    argv += ["--mini-root", str(world_build), "--mini-samples", "4"]
    return gpu_check.main(argv), out


def test_tiny_check_writes_every_cost_the_profile_needs(gpu_check, tiny_run):
    returned, out = tiny_run
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))
    assert report["weights"] == "random" and report["dtype"] == "float32"
    # The report's profile is what `load_profile` reads from the file, field for field.
    profile = load_profile(out)
    assert profile == CostProfile.from_dict(returned["cost_profile"])
    assert [k for k, _ in profile.verify_points] == [1, 3, 32]
    assert all(ms > 0 for _, ms in profile.verify_points)
    for key in ("target_prefill_ms", "target_token_ms", "draft_prefill_ms", "draft_token_ms"):
        assert getattr(profile, key) > 0, key
    assert profile.adapter_ms > 0 and profile.target_contention > 0
    assert profile.draft_contention > 0 and profile.round_trip_ms >= 0
    # The baseline line is HF generate's, timed at 1, half the cap and the cap.
    meta = profile.meta
    assert meta["baseline_lengths"] == [1, MAX_NEW // 2, MAX_NEW]
    assert list(meta["baselines"]) == ["generate"]
    assert meta["baselines"]["generate"] == [profile.baseline_prefill_ms, profile.baseline_token_ms]
    assert meta["repeats"] == 1 and meta["device"] == "cpu"
    # Prompt positions: the text ids around each visual block plus the block itself
    # (8 frames x (4 x 4 patches + CLS); 5 temporal + 6 x 6 patches + CLS spatial event tokens).
    shapes = report["shapes"]
    assert shapes["video_tokens"] == 8 * 17 and shapes["event_tokens"] == 5 + 37
    assert shapes["decoder"]["hidden"] == 64 and shapes["tower"]["patch"] == 14
    assert meta["target_prompt_positions"] == sum(gpu_check.TARGET_TEXT_IDS) + 8 * 17
    assert meta["draft_prompt_positions"] == sum(gpu_check.DRAFT_TEXT_IDS) + 5 + 37
    # The cost shape comes from the profile and the measured baseline run.
    ratios, base = report["ratios"], report["baseline"]
    assert ratios["target_prefill_over_baseline"] == pytest.approx(
        profile.target_prefill_ms / base["total_ms"]
    )
    assert ratios["draft_prefill_over_target_prefill"] == pytest.approx(
        profile.draft_prefill_ms / profile.target_prefill_ms
    )
    assert ratios["draft_token_over_target_token"] == pytest.approx(
        profile.draft_token_ms / profile.target_token_ms
    )
    assert ratios["speedup"] == pytest.approx(base["total_ms"] / report["sd"]["total_ms"])
    concurrency = report["concurrency"]
    assert concurrency["target_contention"] == profile.target_contention
    assert concurrency["round_trip_ms"] == profile.round_trip_ms
    assert concurrency["runner"] == "LocalRunner: a thread"
    # The pair's own SD run reproduces its baseline in float32.
    assert 1 <= base["n_new"] <= MAX_NEW and len(base["tokens"]) == base["n_new"]
    assert report["sd"]["tokens"] == base["tokens"] and report["sd"]["lossless"]
    assert report["sd"]["config"]["policy"]["gamma"] == 5
    assert set(report["stages_s"]) == {"mini_load", "load", "baseline", "costs", "sd", "mini_runs"}


def test_tiny_check_mini_world_is_lossless_in_float32(tiny_run, world_build):
    mini = tiny_run[0]["mini"]
    assert mini["world"] == str(world_build)
    assert (mini["device"], mini["dtype"], mini["concurrency"]) == ("cpu", "float32", "threads")
    assert mini["n_samples"] == 4 and mini["lossless_samples"] == 4
    assert mini["lossless_rate"] == 1.0 and mini["mismatches"] == []
    assert mini["max_new_tokens"] == 24  # the small world's cap
    assert list(mini["strategies"]) == ["sd_fixed_draft_model"]
    sd = mini["strategies"]["sd_fixed_draft_model"]
    assert sd["lossless_rate"] == 1.0 and sd["tau"] >= 1.0
    low, high = sd["speedup"]["ci95"]
    assert low <= sd["speedup"]["ratio_of_means"] <= high
    assert mini["adapter"].startswith("untrained L1")


def test_printed_report_shows_costs_ratios_and_concurrency(gpu_check, tiny_run, capsys):
    returned, out = tiny_run
    gpu_check.print_report(returned, out)
    text = " ".join(capsys.readouterr().out.split())  # rich wraps lines at its width
    for k in (1, 3, 32):
        assert f"verify k={k}" in text
    profile = load_profile(out)
    assert f"{profile.target_prefill_ms:.2f}" in text
    assert "cost shape (prior pair ~0.43 / ~0.27 / ~0.7)" in text
    r = returned["ratios"]
    assert f"target prefill / baseline {r['target_prefill_over_baseline']:.2f}" in text
    assert f"round-1 target contention {profile.target_contention:.2f}" in text
    assert f"round trip {profile.round_trip_ms:.3f} ms" in text
    assert "mini lossless rate 100.0% (4/4 samples token for token)" in text
    assert f"-> {out}" in text


def test_real_shapes_are_the_released_configs_built_in_bf16():
    """At the real shapes on the meta device: the parameter counts of the released 7B pair,
    2056 video tokens, EventGPT's tower equal to CLIP ViT-L/14-336, everything in bf16."""
    shapes = PAIR_SHAPES["real"]
    cfg = shapes.target_config()
    assert video_token_count(SimpleNamespace(config=cfg)) == cfg.video_seq_length == 2056
    assert cfg.text_config.vocab_size == 32064 and cfg.vision_config.image_size == 224
    llama, tower = shapes.draft_configs(5)
    assert llama.event_frames == 5
    reference = clip_vit_l14_336_config().to_dict()
    assert {k: tower.to_dict()[k] for k in reference} == reference
    assert shapes.tokens_per_image(shapes.event_size) == 577
    assert (llama.hidden_size, llama.num_hidden_layers, llama.intermediate_size) == (
        4096,
        32,
        11008,
    )
    assert (shapes.decoder.hidden, shapes.decoder.layers, shapes.decoder.mlp) == (4096, 32, 11008)
    target, draft = random_pair(shapes, "meta", torch.bfloat16)
    assert sum(p.numel() for p in target.parameters()) == 7_366_279_168
    assert sum(p.numel() for p in draft.parameters()) == 7_079_708_672
    assert {p.dtype for m in (target, draft) for p in m.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # restored


def test_baseline_lengths_span_the_prefill_to_the_cap(gpu_check):
    assert gpu_check.baseline_lengths(2) == [1, 2]
    assert gpu_check.baseline_lengths(3) == [1, 2, 3]
    assert gpu_check.baseline_lengths(30) == [1, 15, 30]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--target", "t"], "--target and --draft go together"),
        (["--target", "t", "--draft", "d", "--shapes", "tiny"], "--shapes sizes random weights"),
        (["--dsec-root", "x", "--clip", "c"], "--clip, --dsec-root need --target/--draft"),
        (["--ks", "0,4"], "needs at least one k >= 1"),
        (["--ks", "1,two"], "must be comma-separated integers"),
        (["--mini-samples", "-1"], "--mini-samples must be >= 0, got -1"),
        (["--gamma", "0"], "--gamma must be >= 1"),
        (["--repeats", "0"], "--repeats must be >= 1, got 0"),
        (["--max-new-tokens", "1"], "--max-new-tokens must be >= 2"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--adapter", "missing/best_model.pt"], "no such file"),
        (["--mini-strategies", "sd_greedy"], "--mini-strategies: unknown strategy 'sd_greedy'"),
        (["--mini-strategies", "prompt_lookup"], "SD strategies only"),
        (["--shapes", "huge"], "invalid choice: 'huge'"),
    ],
)
def test_bad_arguments_exit_with_a_message(gpu_check, capsys, argv, message):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(argv)
    assert message in capsys.readouterr().err


def test_defaults_differ_by_weights_only_where_documented(gpu_check):
    random = gpu_check.parse_args([])
    assert (random.shapes, random.mini_samples, random.device, random.ks) == (
        "real",
        50,
        "cuda",
        [1, 2, 4, 8, 16, 32],
    )
    assert random.threads is None  # CUDA: torch's own setting
    assert random.mini_strategies == ["sd_fixed"]
    real = gpu_check.parse_args(["--target", "t", "--draft", "d", "--device", "cpu"])
    assert real.mini_samples == 0 and real.threads == 1
    assert gpu_check.models_config(real)["kind"] == "eventgpt_videollava"


def test_mini_root_is_a_directory_of_builds_or_one_build(gpu_check, world_build, tmp_path):
    root, config = gpu_check.mini_world_source(world_build)
    assert root == world_build.parent and config.digest() == world_build.name
    assert gpu_check.mini_world_source(tmp_path) == (tmp_path, MiniWorldConfig())
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="is a file; pass a directory of builds or one build"):
        gpu_check.mini_world_source(tmp_path / "f")
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    shutil.copy(world_build / "BUILD.json", renamed / "BUILD.json")
    with pytest.raises(ValueError, match=rf"digest {world_build.name}, not the directory's name"):
        gpu_check.mini_world_source(renamed)


def test_an_adapter_for_other_sizes_fails_before_any_timing(
    gpu_check, world_build, tmp_path, capsys
):
    path = tmp_path / "best_model.pt"
    save_export(build_adapter(group_option("adapter", "L1"), 32, 48), path)
    argv = ["--shapes", "tiny", "--device", "cpu", "--mini-root", str(world_build)]
    with pytest.raises(ExportError, match="draft_dim=32, target_dim=48"):
        gpu_check.main([*argv, "--adapter", str(path), "--out", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()
    printed = capsys.readouterr().out
    assert "mini world: open" in printed and "pair:" not in printed  # no pair loaded or timed


def test_an_unreadable_pair_adapter_fails_before_the_checkpoints_load(gpu_check, tmp_path, capsys):
    path = tmp_path / "best_model.pt"
    path.write_text("not a torch file")
    argv = ["--target", str(tmp_path / "no_target"), "--draft", str(tmp_path / "no_draft")]
    argv += ["--device", "cpu", "--adapter", str(path), "--out", str(tmp_path / "r.json")]
    with pytest.raises(ExportError, match="not a readable torch file"):
        gpu_check.main(argv)
    assert not (tmp_path / "r.json").exists()
    assert "pair:" not in capsys.readouterr().out


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without CUDA"
)
def test_cuda_without_a_cuda_device_is_a_clear_error(gpu_check, tmp_path):
    with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
        gpu_check.main(["--shapes", "tiny", "--out", str(tmp_path / "r.json")])
