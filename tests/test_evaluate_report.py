"""Report arithmetic on hand-built per-sample records: means, both speedups with their bootstrap
intervals, share slower, losslessness against HF generate, histograms, the choice of the
baseline loop, the cost shape, and the Markdown tables."""

from __future__ import annotations

import math

import pytest

from cross_modal_sd.evaluation.e2e import choose_baseline, cost_ratios, with_baseline
from cross_modal_sd.evaluation.report import (
    accepted_length_histogram,
    aggregate,
    position_acceptance,
    prefill_window,
    render_e2e,
    render_prefill_window,
)
from cross_modal_sd.metrics.intervals import bootstrap_speedup
from cross_modal_sd.speedup import CostProfile

MAX_LEN = 4


def _sd(tokens, total, drafted, accepted, prefill=10.0, tau=2.0):
    return {
        "method": "sd/fixed-3/draft_model",
        "tokens": tokens,
        "total_ms": total,
        "drafted": drafted,
        "accepted": accepted,
        "tau": tau,
        "prefill_ms": prefill,
        "draft_prefill_ms": 2.0,
        "draft_ms": 4.0,
        "verify_ms": 6.0,
        "decode_ms": 8.0,
        "overlap_ms": 5.0,
        "wait_ms": 1.0,
    }


def _records():
    # Baseline 100 ms and 300 ms; SD 50 ms (2x) and 300 ms (1x, equal: not slower); the peer is
    # slower on sample 2 and wrong on sample 1.
    return [
        {
            "sample_id": "a",
            "baseline": {"method": "greedy", "tokens": [5, 6, 2], "total_ms": 100.0},
            "strategies": {
                "sd": _sd([5, 6, 2], 50.0, [3, 1], [2, 0], tau=1.5),
                "peer": {"method": "prompt_lookup", "tokens": [5, 7, 2], "total_ms": 80.0},
            },
        },
        {
            "sample_id": "b",
            "baseline": {"method": "greedy", "tokens": [2], "total_ms": 300.0},
            "strategies": {
                "sd": _sd([2], 300.0, [0], [0], tau=1.0),
                "peer": {"method": "prompt_lookup", "tokens": [2], "total_ms": 600.0},
            },
        },
    ]


@pytest.fixture
def report():
    return aggregate(_records(), {"sd": "sd", "peer": "peer"}, MAX_LEN)


def test_speedup_ratio_of_means_differs_from_mean_of_ratios(report):
    sd = report["strategies"]["sd"]["speedup"]
    assert sd["ratio_of_means"] == pytest.approx(200.0 / 175.0)
    assert sd["mean_of_ratios"] == pytest.approx((2.0 + 1.0) / 2)
    peer = report["strategies"]["peer"]["speedup"]
    assert peer["ratio_of_means"] == pytest.approx(200.0 / 340.0)
    assert peer["mean_of_ratios"] == pytest.approx((100 / 80 + 0.5) / 2)
    base = report["strategies"]["baseline"]["speedup"]
    assert (base["ratio_of_means"], base["mean_of_ratios"]) == (1.0, 1.0)
    assert base["ci95"] == [1.0, 1.0]  # every resample of a method against itself is 1


def test_every_speedup_has_a_bootstrap_interval_around_it(report):
    for s in report["strategies"].values():
        for key in ("speedup", "speedup_vs_generate"):
            lo, hi = s[key]["ci95"]
            assert lo <= s[key]["ratio_of_means"] <= hi
            lo, hi = s[key]["mean_of_ratios_ci95"]
            assert lo <= s[key]["mean_of_ratios"] <= hi
    # Two samples, SD 2x and 1x: resamples hold both twice, one of each, or the other twice.
    assert report["strategies"]["sd"]["speedup"]["mean_of_ratios_ci95"] == [1.0, 2.0]


def test_bootstrap_on_hand_built_samples():
    # Constant ratio: every resample gives exactly 2.
    assert bootstrap_speedup([10.0] * 5, [5.0] * 5) == {
        "ratio_of_means": [2.0, 2.0],
        "mean_of_ratios": [2.0, 2.0],
    }
    # Half the samples 1x, half 3x: the interval of the mean of ratios covers 2 and narrows with
    # the sample count (it shrinks like 1 / sqrt(n)).
    narrow = bootstrap_speedup([3.0, 3.0] * 200, [3.0, 1.0] * 200)["mean_of_ratios"]
    wide = bootstrap_speedup([3.0, 3.0] * 5, [3.0, 1.0] * 5)["mean_of_ratios"]
    assert wide[0] < narrow[0] < 2.0 < narrow[1] < wide[1]
    assert narrow[1] - narrow[0] == pytest.approx(2 * 1.96 * 1.0 / 400**0.5, rel=0.15)
    assert bootstrap_speedup([1.0, 2.0], [1.0, 1.0], seed=3) == bootstrap_speedup(
        [1.0, 2.0], [1.0, 1.0], seed=3
    )  # seeded: reproducible
    with pytest.raises(ValueError, match="paired 1-d samples"):
        bootstrap_speedup([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive times"):
        bootstrap_speedup([1.0, 0.0], [1.0, 1.0])


def _window_records(head_ms, hybrid_ms):
    return [
        {"strategies": {"head": {"total_ms": h}, "hybrid": {"total_ms": y}}}
        for h, y in zip(head_ms, hybrid_ms, strict=True)
    ]


@pytest.mark.parametrize(
    ("head_ms", "hybrid_ms", "verdict"),
    [
        ([10.0, 12.0, 11.0] * 10, [9.0, 10.5, 10.0] * 10, "paid"),
        ([10.0, 12.0, 11.0] * 10, [11.0, 13.0, 12.5] * 10, "did not pay"),
        ([10.0, 12.0] * 10, [12.0, 10.0] * 10, "undecided"),
    ],
)
def test_prefill_window_verdict_reads_the_interval(head_ms, hybrid_ms, verdict):
    out = prefill_window(_window_records(head_ms, hybrid_ms), "shared")
    assert out["verdict"] == verdict and out["deployment"] == "shared"
    assert out["vs_head"]["ratio_of_means"] == pytest.approx(sum(head_ms) / sum(hybrid_ms))
    line = render_prefill_window(out)
    assert f"drafting {verdict.upper()}" in line and "taken from the target's prefill" in line


def test_prefill_window_needs_head_and_hybrid():
    records = [{"strategies": {"head": {"total_ms": 1.0}}}]
    assert prefill_window(records, "shared") is None


def test_the_chosen_baseline_is_the_faster_loop():
    records = [
        {"baselines": {"generate": {"total_ms": g}, "loop": {"total_ms": lp}}}
        for g, lp in ((10.0, 8.0), (10.0, 13.0), (10.0, 8.5))
    ]
    assert choose_baseline(records) == "loop"  # 9.83 ms on average against 10
    records[1]["baselines"]["loop"]["total_ms"] = 14.0
    assert choose_baseline(records) == "generate"  # now 10.17 against 10
    assert with_baseline(records, "generate")[0]["baseline"] == {"total_ms": 10.0}


def test_share_slower_counts_strictly_slower_samples(report):
    assert report["strategies"]["sd"]["slower_share"] == 0.0  # equal time is not slower
    assert report["strategies"]["peer"]["slower_share"] == 0.5
    assert report["strategies"]["baseline"]["slower_share"] == 0.0


def test_sd_means_and_acceptance(report):
    sd = report["strategies"]["sd"]
    assert sd["total_ms"] == 175.0
    assert sd["tokens"] == 2.0
    assert sd["tau"] == 1.25
    assert sd["accept_rate"] == pytest.approx(2 / 4)  # summed over samples and rounds
    assert sd["accepted_mean"] == 1.0
    assert sd["drafted_mean"] == 2.0
    assert sd["first_round_accepted_mean"] == 1.0
    assert sd["overlap_share"] == pytest.approx(5.0 / 10.0)
    assert sd["accepted_length_hist"] == [1, 0, 1, 0, 0]
    # Round 1 drafted 3 (accepted 2) and 0: positions 0, 1 accepted, position 2 rejected.
    assert sd["position_acceptance"] == [1.0, 1.0, 0.0, None]


def test_unmeasured_quantities_are_none_not_zero(report):
    peer = report["strategies"]["peer"]
    for key in ("prefill_ms", "draft_ms", "verify_ms", "tau", "accept_rate", "accepted_mean"):
        assert peer[key] is None, key
    assert report["strategies"]["baseline"]["tau"] == 1.0


def test_lossless_is_judged_on_sd_configurations_and_peers_are_flagged(report):
    assert report["lossless_rate"] == 1.0
    assert report["lossless"] is True
    assert report["strategies"]["sd"]["flag"] is None
    peer = report["strategies"]["peer"]
    assert peer["lossless_rate"] == 0.5 and peer["lossless"] is False
    assert peer["flag"].startswith("NOT LOSSLESS: 1 of 2")
    assert any(w.startswith("peer: NOT LOSSLESS") for w in report["warnings"])


def test_one_wrong_sd_output_lowers_lossless_rate_and_is_loud():
    records = _records()
    records[1]["strategies"]["sd"]["tokens"] = [3]
    report = aggregate(records, {"sd": "sd", "peer": "peer"}, MAX_LEN)
    assert report["lossless_rate"] == 0.5
    assert report["lossless"] is False
    md = render_e2e(report)
    assert "WARNING: NOT LOSSLESS" in md
    assert "NOT LOSSLESS: 1 of 2 outputs differ" in md


def test_cost_ratios_come_from_the_probes_and_the_chosen_baseline():
    profile = CostProfile(
        target_prefill_ms=50.0,
        target_token_ms=10.0,
        verify_points=((1, 11.0),),
        draft_prefill_ms=15.0,
        draft_token_ms=8.0,
        target_contention=1.04,
    )
    pair = type("Pair", (), {"world": None})()
    costs = cost_ratios(profile, 200.0, pair)
    assert costs["target_prefill_share"] == pytest.approx(50.0 / 200.0)
    assert costs["draft_prefill_ratio"] == pytest.approx(15.0 / 50.0)
    assert costs["draft_token_ratio"] == pytest.approx(8.0 / 10.0)
    assert costs["contention"] == 1.04 and costs["regime"] == "real"
    assert costs["reference"]["target_prefill_share"] == 0.43


def test_report_holds_the_required_keys(report):
    assert report["n_samples"] == 2
    required = (
        "prefill_ms",
        "draft_ms",
        "verify_ms",
        "decode_ms",
        "total_ms",
        "tokens",
        "tau",
        "accept_rate",
        "accepted_mean",
        "drafted_mean",
        "speedup",
        "accepted_length_hist",
        "slower_share",
    )
    for name in ("baseline", "sd", "peer"):
        assert set(required) <= set(report["strategies"][name]), name


def test_markdown_renders_the_tables(report):
    report["cost_ratios"] = {"draft_prefill_ratio": 0.3, "regime": "reference"}
    md = render_e2e(report, ["speedup_distribution.png"])
    assert "**lossless_rate: 1.000**" in md
    assert "| strategy | method | total ms | tokens | speedup (ratio of means) |" in md
    lo, hi = report["strategies"]["sd"]["speedup"]["ci95"]
    assert f"| sd | sd/fixed-3/draft_model | 175.00 | 2.00 | 1.14 [{lo:.2f}, {hi:.2f}] |" in md
    assert "| draft prefill / target prefill | 0.300 | 0.270 |" in md
    assert "Cost shape, regime `reference`" in md
    assert "| accepted | sd |" in md  # histogram table, SD configurations only
    assert "| position | sd |" in md
    assert "![speedup_distribution.png](speedup_distribution.png)" in md


def test_histogram_and_curve_helpers():
    assert accepted_length_histogram([0, 2, 9, 2], 3) == [1, 0, 2, 1]  # 9 lands in the last bin
    assert position_acceptance([2, 1, 0], [1, 1, 0], 3) == [1.0, 0.0, None]


def test_aggregate_rejects_empty_and_incomplete_input():
    with pytest.raises(ValueError, match="no evaluation records"):
        aggregate([], {"sd": "sd"}, MAX_LEN)
    records = _records()
    del records[0]["strategies"]["peer"]
    with pytest.raises(ValueError, match=r"record 'a' lacks strategies \['peer'\]"):
        aggregate(records, {"sd": "sd", "peer": "peer"}, MAX_LEN)


def test_nan_free_numbers(report):
    for s in report["strategies"].values():
        for v in s["speedup"].values():
            assert all(math.isfinite(x) for x in (v if isinstance(v, list) else [v]))
