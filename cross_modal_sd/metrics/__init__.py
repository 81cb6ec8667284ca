"""Alignment metrics, defined once: plain functions and their torchmetrics counterparts."""

from cross_modal_sd.metrics.functional import (
    accept_at,
    accepted_length_histogram,
    consecutive_at,
    cos_sim_stats,
    cosine,
    draft_tokens,
    draft_top1,
    leading_run,
    position_acceptance,
    token_accept_len,
    token_match,
    topk_hits,
)
from cross_modal_sd.metrics.modules import (
    DEFAULT_TAUS,
    AcceptedLengthHistogram,
    AlignmentMetrics,
    CosineStats,
    PositionAcceptance,
    ThresholdAcceptance,
    TokenAcceptLength,
    TokenMatch,
)

__all__ = [
    "DEFAULT_TAUS",
    "AcceptedLengthHistogram",
    "AlignmentMetrics",
    "CosineStats",
    "PositionAcceptance",
    "ThresholdAcceptance",
    "TokenAcceptLength",
    "TokenMatch",
    "accept_at",
    "accepted_length_histogram",
    "consecutive_at",
    "cos_sim_stats",
    "cosine",
    "draft_tokens",
    "draft_top1",
    "topk_hits",
    "leading_run",
    "position_acceptance",
    "token_accept_len",
    "token_match",
]
