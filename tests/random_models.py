"""Helpers that make tiny random models behave like language models in decoding tests."""

from __future__ import annotations

import torch


def liven(model) -> None:
    """Re-draws the text decoder's weights so greedy answers vary with the input.

    At the default init a tiny random decoder repeats one token whatever it reads. Attention
    outputs stay small so the answer depends mostly on the recent tokens; a draft decoder with
    the same weights then agrees with the target often but not always, which exercises partial
    acceptance through the real drafter.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ("language_model" in name or "lm_head" in name):
                p.normal_(0.0, 0.003 if "o_proj" in name else 0.1)


def boost_eos(model, token: int, eos: int) -> None:
    """EOS's lm_head row becomes 1.02x `token`'s: EOS wins wherever `token` would."""
    with torch.no_grad():
        model.lm_head.weight[eos] = 1.02 * model.lm_head.weight[token]
