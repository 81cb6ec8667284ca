"""The speedup model: hand-computed runs, the prior system's own arithmetic, the loop's counts with
stub drafters, acceptance from curves and records, profile files, and validation on a recorded
mini-world run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cross_modal_sd.analysis.speedup_model import (
    Acceptance,
    CostProfile,
    ProfileError,
    conditional_from_position_acceptance,
    config_from_records,
    load_profile,
    mean_profile,
    predict_speedup,
    predicted_speedups,
    render_validation,
    save_profile,
    split_e2e_records,
    validate,
)
from cross_modal_sd.decoding import (
    DraftPolicy,
    GreedySpec,
    ScriptedDrafter,
    SDConfig,
    speculative_generate,
    thread_budget,
)
from cross_modal_sd.decoding.baselines import greedy_tokens

FIXTURES = Path(__file__).parent / "fixtures"


def _toy_profile(**changes) -> CostProfile:
    costs = dict(
        target_prefill_ms=10.0,
        target_token_ms=1.0,
        verify_points=((0, 1.0), (4, 3.0)),  # V(k) = 1 + 0.5 k
        draft_prefill_ms=2.0,
        draft_token_ms=0.5,
        adapter_ms=0.1,
    )
    return CostProfile(**(costs | changes))


def _config(decode: str, policy: DraftPolicy, cap: int = 16) -> SDConfig:
    return SDConfig(policy=policy, decode=decode, max_new_tokens=cap)


# ------------------------------------------------------------------------------ hand-computed


def test_draft_model_run_by_hand():
    """8-token answer (ends with EOS, cap 16), 3 drafts per round, round 1 accepts 2, later rounds
    accept everything.

    Round 1: max(P_t 10, J_d 2 + 3 x 0.1 + 2 x 0.5) = 10, then V(2) = 2 commits 3 tokens.
    Round 2: resync 0.5 + drafting 3 x 0.1 + 2 x 0.5 = 1.8, V(3) = 2.5, commits 4 (p = 7).
    Round 3: one token left: the draft proposes the EOS and stops: 0.5 + 0.1, V(1) = 1.5.
    Total 18.4 ms against a baseline of 10 + 7 x 1 = 17 ms.
    """
    acc = Acceptance(first_round=(0, 0, 1), conditional=(1.0,))
    out = predict_speedup(_toy_profile(), acc, _config("draft_model", DraftPolicy(gamma=3)), [8])
    assert out["total_ms"] == pytest.approx(18.4)
    assert out["baseline_ms"] == pytest.approx(17.0)
    assert out["speedup"]["ratio_of_means"] == pytest.approx(17.0 / 18.4)
    assert (out["rounds"], out["drafted"], out["accepted"]) == (3, 7, 6)
    assert out["target_forwards"] == 4  # prefill + three verifies
    assert out["round1_ms"] == pytest.approx(12.0)
    assert out["draft_ms"] == pytest.approx(1.3 + 1.8 + 0.6)


def test_autoregressive_run_by_hand_and_contention():
    acc = Acceptance(first_round=(0, 0, 1), conditional=(1.0,))
    config = _config("autoregressive", DraftPolicy(gamma=3))
    out = predict_speedup(_toy_profile(), acc, config, [8])
    assert out["total_ms"] == pytest.approx(10 + 2 + 5 * 1.0)
    # Serialised round 1 (contention 1) adds the draft job (3.3 ms) to the target prefill.
    slow = predict_speedup(_toy_profile(contention=1.0, round1_overhead_ms=0.2), acc, config, [8])
    assert slow["total_ms"] - out["total_ms"] == pytest.approx(3.3 + 0.2)


def test_rejected_first_draft_costs_no_verify_and_commits_one_token():
    acc = Acceptance(first_round=(1.0,), conditional=(0.0,))
    out = predict_speedup(_toy_profile(), acc, _config("autoregressive", DraftPolicy(gamma=3)), [5])
    assert out["verify_ms"] == 0.0
    assert out["total_ms"] == pytest.approx(10 + 4 * 1.0)
    assert out["target_forwards"] == 5


def test_expectation_mixes_outcomes_linearly():
    """Half the samples accept 0, half accept 2: the prediction is the mean of the two."""
    config = _config("autoregressive", DraftPolicy(gamma=3))
    mixed = predict_speedup(_toy_profile(), Acceptance((1, 0, 1), (0.5,)), config, [8])
    low = predict_speedup(_toy_profile(), Acceptance((1,), (0.5,)), config, [8])
    high = predict_speedup(_toy_profile(), Acceptance((0, 0, 1), (0.5,)), config, [8])
    assert mixed["total_ms"] == pytest.approx((low["total_ms"] + high["total_ms"]) / 2)


def test_prefill_policy_drafts_while_the_target_prefills():
    # (P_t - P_d + T_d) / (A + T_d) = 8.5 / 0.6 = 14.2 -> 15 drafts, the first after prefill.
    profile = _toy_profile()
    assert profile.prefill_drafts() == 15
    acc = Acceptance(first_round=(1.0,), conditional=(0.0,))
    out = predict_speedup(
        profile, acc, _config("autoregressive", DraftPolicy(gamma="prefill")), [8]
    )
    assert out["first_drafted"] == 15
    assert out["round1_ms"] == pytest.approx(2.0 + 15 * 0.1 + 14 * 0.5)


def test_answer_longer_than_the_cap_is_rejected():
    with pytest.raises(ValueError, match="exceeds max_new_tokens=16"):
        predict_speedup(
            _toy_profile(), Acceptance.from_mean(1.0), _config("draft_model", DraftPolicy()), [17]
        )


# --------------------------------------------------------------------------- the prior system


def test_prior_system_arithmetic_is_reproduced():
    """DESIGN §12: 317 ms prefill, 14 ms/token, ~70 ms to verify ~21 drafts, 4.4 accepted in
    round 1 of a 30-token answer, then the target alone: baseline 736 ms, SD 721 ms (1.02x)."""
    profile = load_profile("prior_rtx4090")
    acc = Acceptance.from_mean(4.4)
    assert profile.prefill_drafts() == 21
    assert profile.verify_ms(21) == pytest.approx(70.0)
    for policy in (DraftPolicy(gamma=21), DraftPolicy(gamma="prefill")):
        out = predict_speedup(profile, acc, _config("autoregressive", policy, cap=32), [30])
        assert out["first_drafted"] == 21
        assert out["first_accepted"] == pytest.approx(4.4)
        assert out["baseline_ms"] == pytest.approx(736, rel=0.03)
        assert out["total_ms"] == pytest.approx(721, rel=0.03)
        assert abs(out["speedup"]["ratio_of_means"] - 736 / 721) <= 0.05


def test_prior_costs_make_decode_phase_drafting_a_loss_at_any_acceptance():
    """With a draft token at 0.7x a target token, a drafted token costs T_d + A + the verify
    slope (10 + 1.6 + 2.7 ms) > T_t (14 ms): drafting after round 1 loses even when every draft
    is accepted. A 4x cheaper drafter wins at high acceptance and still loses at low."""

    def speedups(profile, q):
        acc = Acceptance.from_mean(4.4, q=q)
        policy = DraftPolicy(gamma="prefill", decode_gamma=5)
        return {
            decode: predict_speedup(profile, acc, _config(decode, policy, cap=32), [30])["speedup"][
                "ratio_of_means"
            ]
            for decode in ("autoregressive", "draft_model")
        }

    prior = load_profile("prior_rtx4090")
    for q in (0.3, 1.0):
        s = speedups(prior, q)
        assert s["draft_model"] < s["autoregressive"]
    cheap = prior.with_(draft_token_ms=2.5, adapter_ms=0.4)
    assert speedups(cheap, 0.95)["draft_model"] > speedups(cheap, 0.95)["autoregressive"] + 0.15
    assert speedups(cheap, 0.2)["draft_model"] < speedups(cheap, 0.2)["autoregressive"]


# ------------------------------------------------------------- the loop's counts, stub drafters


@pytest.fixture(scope="module")
def tiny():
    from cross_modal_sd.analysis.cost_profile import mini_models

    with thread_budget(1):
        models = mini_models()
        spec = GreedySpec(12, models.target.vocab_limit, None)
        reference = greedy_tokens(models.target, models.target_inputs, spec)
    return models, reference


@pytest.mark.parametrize("decode", ["autoregressive", "draft_model"])
@pytest.mark.parametrize(
    ("policy", "correct_upto"),
    [
        (DraftPolicy(gamma=3), None),
        (DraftPolicy(gamma=3), 0),
        (DraftPolicy(gamma=4), 2),
        (DraftPolicy(kind="confidence", threshold=0.5, max_drafts=5), None),
    ],
)
def test_predicted_counts_equal_the_loop_with_stub_drafters(tiny, decode, policy, correct_upto):
    """Accept all / none / up to k: the model's rounds, drafts, accepted drafts and target
    forwards equal what `speculative_generate` does (no EOS: answers run to the cap)."""
    models, reference = tiny
    config = SDConfig(policy=policy, decode=decode, max_new_tokens=12)
    drafter = ScriptedDrafter(reference, models.target.vocab_limit, correct_upto=correct_upto)
    with thread_budget(1):
        record = speculative_generate(
            models.target, drafter, models.target_inputs, None, config
        ).to_dict()
    assert record["tokens"] == reference
    upto = 99 if correct_upto is None else correct_upto
    acc = Acceptance(
        first_round=tuple([0] * upto + [1]),
        conditional=(1.0 if correct_upto is None else 0.0,),
        first_round_stop=(0.0,) if policy.kind == "confidence" else None,  # never drops
        later_stop=(0.0,) if policy.kind == "confidence" else None,
    )
    out = predict_speedup(_toy_profile(), acc, config, [len(reference)])
    assert out["rounds"] == record["rounds"]
    assert out["drafted"] == sum(record["drafted"])
    assert out["accepted"] == sum(record["accepted"])
    assert out["first_drafted"] == record["drafted"][0]
    assert out["target_forwards"] == record["target_forwards"]


# ------------------------------------------------------------------------------- acceptance


def test_conditional_curve_from_position_acceptance():
    q = conditional_from_position_acceptance([0.8, 0.4, 0.2, float("nan"), 0.0, 0.0])
    assert q == pytest.approx((0.8, 0.5, 0.5, 1.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="the first point is missing"):
        conditional_from_position_acceptance([None, 0.5])


def test_acceptance_from_mean_and_from_curves():
    acc = Acceptance.from_mean(4.4)
    assert acc.first_round_mean == pytest.approx(4.4)
    assert acc.q(0) == pytest.approx(4.4 / 5.4)
    curves = Acceptance.from_curves([0.5, 0.25], [2, 1, 1])
    assert curves.first_round == pytest.approx((0.5, 0.25, 0.25))
    assert curves.q(7) == pytest.approx(0.5)  # the last value repeats
    with pytest.raises(ValueError, match="first_round: need non-negative counts"):
        Acceptance(first_round=(0, 0), conditional=(0.5,))


def test_acceptance_from_export_curves_names_missing_curves():
    curves = {"val/position_acceptance": [0.5], "val/accepted_length_hist": [1, 1]}
    assert Acceptance.from_export_curves(curves, "x.pt").first_round == (0.5, 0.5)
    with pytest.raises(ValueError, match=r"x\.pt: no accepted_length_hist curve"):
        Acceptance.from_export_curves({"val/position_acceptance": [0.5]}, "x.pt")


def _record(method, drafted, accepted, n_tokens, stop="eos"):
    return {
        "method": method,
        "tokens": list(range(n_tokens)),
        "drafted": drafted,
        "accepted": accepted,
        "rounds": len(drafted),
        "stop": stop,
        "total_ms": 1.0,
        "decode_ms": 0.5,
        "target_forwards": 1 + len(drafted),
    }


def test_acceptance_from_records_censors_by_the_drafts_proposed():
    # Later rounds (gamma 3): (accepted, drafted) = (3, 3), (1, 3), (0, 2).
    records = [
        _record("sd/fixed-3/draft_model", [3, 3, 3], [2, 3, 1], 10),
        _record("sd/fixed-3/draft_model", [3, 2], [0, 0], 4),
    ]
    config = SDConfig(policy=DraftPolicy(gamma=3), decode="draft_model", max_new_tokens=16)
    acc = Acceptance.from_records(records, config)
    assert acc.first_round == pytest.approx((0.5, 0.0, 0.5, 0.0))
    # q0: 2 of the 3 rounds accept draft 0; q1: 1 of the 2 reaching it; q2: the 1 reaching it.
    assert acc.conditional == pytest.approx((2 / 3, 0.5, 1.0))
    first_only = Acceptance.from_records(records, config, later="first_round")
    assert first_only.conditional == pytest.approx((0.5, 1.0, 0.0))


def test_confidence_stop_hazard_from_records():
    """Round caps censor: a round that drafted as many as it could tells nothing of a stop."""
    config = SDConfig(
        policy=DraftPolicy(kind="confidence", threshold=0.5, max_drafts=4),
        decode="draft_model",
        max_new_tokens=30,
    )
    label = config.name
    records = [
        _record(label, [1, 2, 4], [1, 2, 0], 12),  # later: stops at 2, capped at 4
        _record(label, [2, 1], [0, 1], 5),  # later: stops at 1
    ]
    acc = Acceptance.from_records(records, config)
    assert acc.first_round_stop == pytest.approx((0.5, 1.0))  # h1: 1 of 2; h2: 1 of 1
    assert acc.later_stop == pytest.approx((1 / 3, 1 / 2, 0.0, 0.0))


def test_config_from_records_reads_the_label():
    records = [_record("sd/fixed-prefill/draft_model", [7, 5, 4], [1, 2, 0], 20, "max_new_tokens")]
    config = config_from_records(records)
    assert config.policy.gamma == "prefill" and config.policy.decode_gamma == 5
    assert (config.decode, config.max_new_tokens) == ("draft_model", 20)
    with pytest.raises(ValueError, match="'greedy' is not an SD configuration label"):
        config_from_records([{"method": "greedy"}])


# -------------------------------------------------------------------------------- profiles


def test_profile_round_trip_and_embedded_profiles(tmp_path):
    profile = _toy_profile(name="toy", meta={"device": "cpu"})
    path = save_profile(profile, tmp_path / "p.json")
    assert load_profile(path) == profile
    report = {"mode": "e2e", "cost_profile": json.loads(path.read_text())}
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert load_profile(tmp_path / "report.json") == profile


def test_profile_errors_name_the_file_and_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="shipped: .*prior_rtx4090"):
        load_profile("no_such_profile")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"mode": "e2e"}))
    with pytest.raises(ProfileError, match=r"bad\.json: holds no cost profile"):
        load_profile(bad)
    data = _toy_profile().to_dict() | {"target_prefil_ms": 3}
    with pytest.raises(ProfileError, match=r"unknown cost profile fields \['target_prefil_ms'\]"):
        load_profile(data)
    data = _toy_profile().to_dict()
    del data["draft_token_ms"]
    with pytest.raises(ProfileError, match=r"lacks \['draft_token_ms'\]"):
        load_profile(data)
    with pytest.raises(ProfileError, match="contention must be >= 0"):
        _toy_profile(contention=-0.1)


def test_verify_line_is_fitted_to_the_points():
    profile = _toy_profile(verify_points=((1, 2.0), (3, 3.0), (5, 4.0)))
    assert profile.verify_line == pytest.approx((1.5, 0.5))
    single = _toy_profile(verify_points=((10, 6.0),))
    assert single.verify_ms(10) == pytest.approx(6.0) and single.verify_ms(0) == 1.0


# -------------------------------------------------------------------------- recorded run


def test_validation_on_a_recorded_mini_world_run():
    """A recorded e2e run (`benchmarks/bench_speedup_model.py --fixture`: all four decoding
    configurations) with cost profiles measured between its chunks of samples: the validation
    reproduces the recorded predictions, and every one is within 10% of the measured speedup."""
    run = json.loads((FIXTURES / "mini_e2e_run.json").read_text())
    records, baseline = split_e2e_records(run["samples"])
    chunks = [load_profile(p) for p in run["chunk_profiles"]]
    profiles = [chunks[i // run["chunk"]] for i in range(len(baseline))]
    rows = validate(records, baseline, profiles)
    assert {r["method"] for r in rows} == set(run["expected"])
    for row in rows:
        expected = run["expected"][row["method"]]
        assert row["measured_speedup"] == pytest.approx(expected["measured_speedup"])
        assert row["predicted_speedup"] == pytest.approx(expected["predicted_speedup"])
        assert abs(row["error"]) <= 0.10, row
    # One profile for the whole run predicts within a few percent of the per-chunk ones.
    single = validate(records, baseline, load_profile(run["cost_profile"]))
    for row, one in zip(rows, single, strict=True):
        assert one["predicted_speedup"] == pytest.approx(row["predicted_speedup"], rel=0.05)
    assert all(math.isfinite(r["error_first_round"]) for r in rows)
    assert render_validation(rows).count("| sd/") == len(rows)


def test_validate_rejects_unpaired_records():
    records = {"sd_fixed": [_record("sd/fixed-3/draft_model", [3], [0], 4)]}
    with pytest.raises(ValueError, match="'sd_fixed' has 1 records for 2 baseline records"):
        validate(records, [{"tokens": [0], "total_ms": 1.0}] * 2, _toy_profile())


def test_predicted_speedups_for_a_report_use_measured_stops_for_confidence_only():
    run = json.loads((FIXTURES / "mini_e2e_run.json").read_text())
    offline = Acceptance.from_curves([0.9, 0.8, 0.7], [1, 1, 1, 7])
    configs = {
        name: config_from_records([s["strategies"][name] for s in run["samples"]])
        for name in run["samples"][0]["strategies"]
    }
    out = predicted_speedups(load_profile(run["cost_profile"]), offline, configs, run["samples"])
    assert set(out) == set(configs)
    for name, pred in out.items():
        confidence = configs[name].policy.kind == "confidence"
        assert pred["acceptance"] == ("offline, stops as measured" if confidence else "offline")
        assert pred["ratio_of_means"] == pytest.approx(pred["baseline_ms"] / pred["total_ms"])


def test_cost_profile_command_measures_a_loadable_profile(tmp_path):
    from cross_modal_sd.analysis.cost_profile import main

    with thread_budget(1):
        profile = load_profile(main(["--out", str(tmp_path / "p.json"), "--repeats", "1"]))
    assert profile.name == "mini_cpu" and profile.meta["threads"] == 1
    assert profile.meta["video_tokens"] == 136  # 8 frames x 17 tokens of the mini world
    assert [k for k, _ in profile.verify_points] == [1, 2, 4, 8, 16]
    # A 149-token prefill costs more than one decode step; the baseline grows with length.
    assert profile.target_prefill_ms > profile.target_token_ms > 0
    assert profile.baseline_token_ms > 0 and profile.prefill_drafts_measured >= 1
    fixed = [drafts for drafts, _, _ in profile.meta["round1_probes"][:-1]]
    assert fixed[0] == 1 and fixed == sorted(fixed)  # fixed probes propose exactly their count


def test_gpu_check_output_reads_as_a_profile(tmp_path):
    """`scripts/gpu_check.py` JSON: costs direct, the adapter cost and round 1's contention read
    off its SD run. Here drafting 13 tokens with 12 feeds took 13 A + 12 x 10 = 146 ms (A = 2);
    round 1 took 389 ms = V(4) 24 + P_t 300 + 0.5 x J_d (80 + 5 x 2 + 4 x 10 = 130)."""
    report = {
        "environment": {"device": "NVIDIA H200"},
        "models": {"target": "t", "draft": "d"},
        "dtype": "bfloat16",
        "quantization": None,
        "costs": {
            "target_prefill_ms": 300.0,
            "target_token_ms": 15.0,
            "verify_ms": {"1": 18.0, "4": 24.0, "16": 48.0},
            "draft_prefill_ms": 80.0,
            "draft_token_ms": 10.0,
        },
        "baseline": {"total_ms": 735.0, "n_new": 30},
        "sd": {"drafted": [5, 5, 3], "accepted": [2, 5, 1], "draft_ms": 146.0,
               "total_ms": 589.0, "decode_ms": 200.0},
    }  # fmt: skip
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(report))
    profile = load_profile(path)
    assert profile.verify_line == pytest.approx((16.0, 2.0))
    assert profile.adapter_ms == pytest.approx(2.0)
    assert profile.contention == pytest.approx(0.5)
    assert profile.baseline_ms(30) == pytest.approx(735.0)
    assert "NVIDIA H200" in profile.source
    del report["costs"]["draft_token_ms"]
    path.write_text(json.dumps(report))
    with pytest.raises(ProfileError, match=r"gpu_check costs incomplete .*draft_token_ms"):
        load_profile(path)


def test_mean_profile_averages_costs_and_keeps_text():
    a = _toy_profile(name="a", contention=0.5, prefill_drafts_measured=2.0)
    b = _toy_profile(
        name="b", target_prefill_ms=20.0, verify_points=((0, 3.0), (4, 5.0)), contention=1.5
    )
    m = mean_profile([a, b])
    assert m.target_prefill_ms == 15.0 and m.contention == 1.0 and m.name == "a"
    assert m.verify_points == ((0, 2.0), (4, 4.0))
    assert m.prefill_drafts_measured == 2.0  # measured in one only: None stays out of the mean
    with pytest.raises(ValueError, match="verify at different k"):
        mean_profile([a, _toy_profile(verify_points=((1, 1.0), (4, 3.0)))])
