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


class TinyTarget:
    """A tiny random Video-LLaVA (2 frames, 2 decoder layers, livened) behind the decoding API,
    with the mini tokenizer and one prompt read over several random videos."""

    def __init__(self, question: str = "what colour is the car ?", videos: int = 1):
        from cross_modal_sd.decoding import TargetInputs
        from cross_modal_sd.models.architectures import DecoderSize, TowerSize, build_target
        from cross_modal_sd.models.prompts import encode_target_prompt
        from cross_modal_sd.models.wrappers import TargetDecoder
        from cross_modal_sd.world.tokenizer import build_tokenizer, text_vocab_limit

        torch.manual_seed(0)
        self.tok = build_tokenizer()
        self.limit = text_vocab_limit(self.tok)
        self.eos = self.tok.eos_token_id
        self.model = build_target(self.tok, TowerSize(), DecoderSize(layers=2), 32, 2).eval()
        liven(self.model)
        self.target = TargetDecoder(self.model, self.limit)
        ids = torch.tensor([encode_target_prompt(self.tok, question, 2 * TowerSize().tokens(32))])
        self.videos = [
            TargetInputs(
                ids, torch.randn(1, 2, 3, 32, 32, generator=torch.Generator().manual_seed(v))
            )
            for v in range(videos)
        ]
