"""Alignment metrics: known values on hand-built tensors, and module == functional."""

import math

import pytest
import torch
from torch import nn

from cross_modal_sd.metrics import (
    AcceptedLengthHistogram,
    AlignmentMetrics,
    PositionAcceptance,
    ThresholdAcceptance,
    TokenAcceptLength,
    TokenMatch,
    accept_at,
    accepted_length_histogram,
    consecutive_at,
    cos_sim_stats,
    cosine,
    draft_tokens,
    expected_run,
    leading_run,
    position_acceptance,
    token_accept_len,
    token_match,
)

TAUS = (0.80, 0.85, 0.90, 0.95)
SCALAR_KEYS = {
    "cos_sim",
    "cos_sim_std",
    *(f"accept@{t:.2f}" for t in TAUS),
    *(f"consecutive@{t:.2f}" for t in TAUS),
    "token_match",
    "token_accept_len",
}
NAN = float("nan")


def prefix_mask(lengths: list[int], T: int) -> torch.Tensor:
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)


def test_cosine_known_values_and_masked_positions_are_zero():
    pred = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]], [[0.0, 1.0], [-2.0, 0.0], [3.0, 0]]])
    target = torch.tensor(
        [[[2.0, 0.0], [1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0], [1.0, 0]]]
    )
    mask = prefix_mask([2, 3], 3)
    expected = torch.tensor([[1.0, 1 / math.sqrt(2), 0.0], [0.0, -1.0, 1.0]])
    torch.testing.assert_close(cosine(pred, target, mask), expected)


def test_cos_sim_stats_ignores_padding():
    # Valid cosines 1 and 0 (mean 0.5, population std 0.5); the padded perfect match must not count.
    pred = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    assert cos_sim_stats(pred, target, prefix_mask([2], 3)) == pytest.approx((0.5, 0.5))


def test_cosine_uses_float32_math_for_16bit_inputs():
    # Squared norm 4 * 300² = 360000 overflows float16 (max 65504).
    big = torch.full((1, 1, 4), 300.0, dtype=torch.float16)
    cos = cosine(big, big, torch.ones(1, 1, dtype=torch.bool))
    assert cos.dtype == torch.float32
    assert cos.item() == pytest.approx(1.0)


def test_cos_exactly_at_tau_counts():
    cos = torch.tensor([[0.90, 0.89, 0.95, 1.0]])
    mask = prefix_mask([3], 4)
    for c in (cos, cos.double()):
        assert accept_at(c, mask, 0.90) == pytest.approx(2 / 3)
        assert consecutive_at(c, mask, 0.90) == 1.0
        metric = ThresholdAcceptance(TAUS)
        metric.update(c, mask)
        out = metric.compute()
        assert out["accept@0.90"].item() == pytest.approx(2 / 3)
        assert out["consecutive@0.90"].item() == 1.0
        assert out["accept@0.95"].item() == pytest.approx(1 / 3)
        assert out["consecutive@0.80"].item() == 3.0  # the padded 1.0 does not extend the run


def test_leading_run_stops_at_first_miss_and_at_padding():
    hits = torch.tensor(
        [
            [True, True, True, True],  # all accepted
            [False, True, True, True],  # none accepted
            [True, True, False, True],  # a later match after the gap does not count
            [True, True, True, True],  # padded after 2: padding stops the run
            [True, True, True, True],  # no valid position
        ]
    )
    mask = prefix_mask([4, 4, 4, 2, 0], 4)
    assert leading_run(hits, mask).tolist() == [4, 0, 2, 2, 0]
    # Trailing dims are independent criteria.
    stacked = torch.stack([hits, ~hits], dim=-1)  # (B, T, 2)
    assert leading_run(stacked, mask).tolist() == [[4, 0], [0, 1], [2, 0], [2, 0], [0, 0]]
    # Sample means skip the all-padding row: (4 + 0 + 2 + 2) / 4.
    cos = hits.float()
    assert consecutive_at(cos, mask, 0.5) == 2.0


def test_expected_run_under_sampling_by_hand():
    """Two ids read straight from the state (lm_head = I): logits (0, 0) give p = 1/2 each,
    (ln 3, 0) give 3/4 and 1/4."""
    half, three = [0.0, 0.0], [math.log(3), 0.0]
    states = torch.tensor([[half, three, half], [half, three, three]])
    drafts = torch.tensor([[0, 0, 0], [1, 0, 1]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    run = expected_run(states, torch.eye(2), drafts, mask)
    # 1/2 + 1/2 * 3/4 (the third position is padding); 1/2 + 3/8 + 3/8 * 1/4.
    assert run.tolist() == pytest.approx([0.875, 0.96875])
    # T -> small: the argmax is certain, other ids never drawn, ties stay 1/2 each:
    # 1/2 + 1/2 * 1; 1/2 + 1/2 * 1 + 1/2 * 1 * 0.
    cold = expected_run(states, torch.eye(2), drafts, mask, temperature=0.01)
    assert cold.tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        expected_run(states, torch.eye(2), drafts, mask, temperature=0.0)


def test_leading_run_rejects_non_prefix_mask():
    mask = torch.tensor([[True, False, True]])
    with pytest.raises(ValueError, match="prefix of each row"):
        leading_run(torch.ones(1, 3, dtype=torch.bool), mask)


def test_draft_tokens_tie_goes_to_lowest_id_and_vocab_limit_masks_high_ids():
    weight = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [5.0, 0.0]])  # ids 1, 2 tie
    pred = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    assert draft_tokens(pred, weight).tolist() == [[3, 0]]
    assert draft_tokens(pred, weight, vocab_limit=3).tolist() == [[1, 0]]
    assert draft_tokens(pred.bfloat16(), weight.bfloat16(), vocab_limit=3).tolist() == [[1, 0]]
    with pytest.raises(ValueError, match="vocab_limit must be in"):
        draft_tokens(pred, weight, vocab_limit=5)


def test_draft_tokens_uses_float32_logits():
    # Logits 1 and 1 + 2^-8 tie in bfloat16 (8-bit mantissa) but not in float32.
    weight = torch.tensor([[1.0, 0.0], [1.0 + 2**-8, 0.0]])
    pred = torch.tensor([[[1.0, 0.0]]], dtype=torch.bfloat16)
    assert draft_tokens(pred, weight).tolist() == [[1]]


# Runs 4, 1, 0; padded positions agree (0 == 0, 4 == 4) and must not count.
PRED_TOKENS = torch.tensor([[5, 6, 7, 8], [1, 9, 3, 0], [4, 4, 0, 0]])
TOKENS = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 0], [3, 4, 0, 0]])
TOKEN_MASK = prefix_mask([4, 3, 2], 4)


def test_token_metrics_known_values():
    hits = PRED_TOKENS == TOKENS
    assert token_match(PRED_TOKENS, TOKENS, TOKEN_MASK) == pytest.approx(7 / 9)
    assert token_accept_len(PRED_TOKENS, TOKENS, TOKEN_MASK) == pytest.approx(5 / 3)
    # Position 4 exists in no sample -> NaN.
    curve = torch.tensor([2 / 3, 1 / 3, 1 / 2, 1.0, NAN], dtype=torch.float64)
    torch.testing.assert_close(position_acceptance(hits, TOKEN_MASK, 5), curve, equal_nan=True)
    # Run 4 is clamped into the last bin.
    assert accepted_length_histogram(hits, TOKEN_MASK, 3).tolist() == [1, 1, 0, 1]

    metrics = [TokenMatch(), TokenAcceptLength(), PositionAcceptance(5), AcceptedLengthHistogram(3)]
    for m in metrics[:2]:
        m.update(PRED_TOKENS, TOKENS, TOKEN_MASK)
    for m in metrics[2:]:
        m.update(hits, TOKEN_MASK)
    assert metrics[0].compute().item() == pytest.approx(7 / 9)
    assert metrics[1].compute().item() == pytest.approx(5 / 3)
    torch.testing.assert_close(metrics[2].compute(), curve.float(), equal_nan=True)
    assert metrics[3].compute().tolist() == [1, 1, 0, 1]


@pytest.mark.parametrize("shape", [(2, 3), (0, 3), (2, 0)], ids=["all-padding", "no-rows", "T=0"])
def test_empty_mask_gives_nan_without_crashing(shape):
    B, T = shape
    mask = torch.zeros(B, T, dtype=torch.bool)
    pred, target = torch.randn(B, T, 4), torch.randn(B, T, 4)
    tokens = torch.zeros(B, T, dtype=torch.long)
    cos, hits = cosine(pred, target, mask), tokens == tokens
    assert all(math.isnan(v) for v in cos_sim_stats(pred, target, mask))
    assert math.isnan(accept_at(cos, mask, 0.9))
    assert math.isnan(consecutive_at(cos, mask, 0.9))
    assert math.isnan(token_match(tokens, tokens, mask))
    assert math.isnan(token_accept_len(tokens, tokens, mask))
    assert position_acceptance(hits, mask, 3).isnan().all()
    assert accepted_length_histogram(hits, mask, 3).tolist() == [0, 0, 0, 0]

    metrics = AlignmentMetrics(torch.randn(5, 4), TAUS, max_len=3)
    metrics.update(pred, target, tokens, mask)
    assert all(v.isnan() for v in metrics.compute().values())
    curves = metrics.compute_curves()
    assert curves["position_acceptance"].isnan().all()
    assert curves["accepted_length_hist"].tolist() == [0, 0, 0, 0]


def make_batches(seed: int = 0, vocab: int = 11, dim: int = 8):
    """Three batches with different T and ragged lengths (one all-padding row)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, dim, generator=gen)
    batches = []
    for lengths, T in (([5, 3, 0], 5), ([7, 1], 7), ([2, 3, 3, 1], 3)):
        target = torch.randn(len(lengths), T, dim, generator=gen)
        # Per-position noise levels spread the cosine over all thresholds and mix token hits/misses.
        scale = torch.rand(len(lengths), T, 1, generator=gen) * 0.8
        pred = target + scale * torch.randn(target.shape, generator=gen)
        tokens = draft_tokens(target, weight)
        batches.append((pred, target, tokens, prefix_mask(lengths, T)))
    return weight, batches


def concat_padded(batches):
    T = max(b[0].shape[1] for b in batches)

    def pad(x):  # right-pad dim 1 to T with zeros / False
        return torch.cat([x, x.new_zeros(x.shape[0], T - x.shape[1], *x.shape[2:])], dim=1)

    return [torch.cat([pad(b[i]) for b in batches]) for i in range(4)]


def assert_metrics_equal(a: dict, b: dict, rtol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(
            torch.as_tensor(a[key]).double(),
            torch.as_tensor(b[key]).double(),
            rtol=rtol,
            atol=1e-6,
            equal_nan=True,
            msg=key,
        )


def test_batch_accumulation_equals_functional_on_concatenated_data():
    weight, batches = make_batches()
    metrics = AlignmentMetrics(weight, TAUS, max_len=6)
    for batch in batches:
        metrics.update(*batch)
    got = metrics.compute() | metrics.compute_curves()
    assert set(metrics.compute()) == SCALAR_KEYS

    pred, target, tokens, mask = concat_padded(batches)
    cos = cosine(pred, target, mask)
    hits = draft_tokens(pred, weight) == tokens
    mean, std = cos_sim_stats(pred, target, mask)
    expected = {"cos_sim": mean, "cos_sim_std": std}
    expected |= {f"accept@{t:.2f}": accept_at(cos, mask, t) for t in TAUS}
    expected |= {f"consecutive@{t:.2f}": consecutive_at(cos, mask, t) for t in TAUS}
    pred_tokens = draft_tokens(pred, weight)
    expected["token_match"] = token_match(pred_tokens, tokens, mask)
    expected["token_accept_len"] = token_accept_len(pred_tokens, tokens, mask)
    expected["position_acceptance"] = position_acceptance(hits, mask, 6)
    expected["accepted_length_hist"] = accepted_length_histogram(hits, mask, 6)
    assert_metrics_equal(got, expected)
    # The data are not degenerate: some but not all tokens match, and τ splits the positions.
    assert 0 < expected["token_match"] < 1
    assert expected["accept@0.80"] > expected["accept@0.95"] > 0


def test_ddp_style_merge_equals_single_instance():
    weight, batches = make_batches(seed=1)
    full, left, right = (AlignmentMetrics(weight, TAUS, max_len=6) for _ in range(3))
    for batch in batches:
        full.update(*batch)
    for batch in batches[:2]:
        left.update(*batch)
    right.update(*batches[2])
    left.merge_state(right)
    assert_metrics_equal(
        left.compute() | left.compute_curves(), full.compute() | full.compute_curves(), rtol=0
    )
    left.reset()
    with pytest.warns(UserWarning, match="called before the ``update``"):
        assert all(v.isnan() for v in left.compute().values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_inputs_match_float32(dtype):
    gen = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(16, 6, generator=gen))
    weight = q.T.contiguous()  # (V=6, D=16) orthonormal rows: wide argmax margins
    tokens = torch.randint(0, 6, (4, 5), generator=gen)
    drafted = torch.where(torch.rand(4, 5, generator=gen) < 0.3, (tokens + 1) % 6, tokens)
    target = 4 * weight[tokens] + 0.3 * torch.randn(4, 5, 16, generator=gen)  # (B, T, D)
    pred = 4 * weight[drafted] + 0.3 * torch.randn(4, 5, 16, generator=gen)
    mask = prefix_mask([5, 4, 2, 1], 5)
    results = []
    for p, t, w in ((pred, target, weight), (pred.to(dtype), target.to(dtype), weight.to(dtype))):
        metrics = AlignmentMetrics(w, TAUS, max_len=5)
        metrics.update(p, t, tokens, mask)
        results.append(metrics.compute())
    full, half = results
    for key in ("cos_sim", "cos_sim_std"):
        assert half[key].item() == pytest.approx(full[key].item(), abs=1e-2)
    for key in ("token_match", "token_accept_len"):
        assert half[key].item() == full[key].item()
    assert 0 < full["token_match"].item() < 1


def test_alignment_metrics_lm_head_is_not_a_parameter_or_state():
    weight = nn.Parameter(torch.randn(7, 4))
    metrics = AlignmentMetrics(weight, TAUS, max_len=4, vocab_limit=5)
    assert list(metrics.parameters()) == []
    assert "lm_head_weight" not in metrics.state_dict()
    assert metrics.lm_head_weight.shape == (5, 4)
    assert not metrics.lm_head_weight.requires_grad


def test_alignment_metrics_without_lm_head_reports_cosine_only():
    metrics = AlignmentMetrics(None, TAUS)
    pred = torch.randn(2, 3, 4)
    metrics.update(pred, pred, None, prefix_mask([3, 1], 3))
    out = metrics.compute()
    assert set(out) == SCALAR_KEYS - {"token_match", "token_accept_len"}
    assert out["cos_sim"].item() == pytest.approx(1.0)
    assert out["consecutive@0.95"].item() == 2.0
    assert metrics.compute_curves() == {}


def test_bad_inputs_raise_clear_errors():
    pred = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        cosine(pred, pred, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"mask shape \(2, 4\) does not match"):
        cosine(pred, pred, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="must share a"):
        cosine(pred, torch.randn(2, 3, 5), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="pred hidden size 4 != lm_head_weight in-features 5"):
        draft_tokens(pred, torch.randn(7, 5))
    with pytest.raises(ValueError, match="tokens are required"):
        AlignmentMetrics(torch.randn(7, 4)).update(pred, pred, None, torch.ones(2, 3).bool())
    with pytest.raises(ValueError, match="max_len must be >= 1"):
        PositionAcceptance(0)


@pytest.mark.gpu
def test_lm_head_on_cpu_with_cuda_inputs():
    weight, batches = make_batches()
    cpu_metrics = AlignmentMetrics(weight, TAUS, max_len=6)
    cuda_metrics = AlignmentMetrics(weight, TAUS, max_len=6).cuda()
    cuda_metrics.lm_head_weight = weight  # a weight left on another device is moved per update
    for batch in batches:
        cpu_metrics.update(*batch)
        cuda_metrics.update(*(x.cuda() for x in batch))
    got = {k: v.cpu() for k, v in (cuda_metrics.compute() | cuda_metrics.compute_curves()).items()}
    assert_metrics_equal(got, cpu_metrics.compute() | cpu_metrics.compute_curves())
