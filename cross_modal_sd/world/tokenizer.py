"""The mini world's shared word-level tokenizer, laid out like the real Vicuna vocabulary.

Ids 0/1/2 are `<unk>`/`<s>`/`</s>`, then the words, then the multimodal specials at the top
(`<image>`, `<video>`, `<pad>`), so "mask logits of ids >= the first special" works the
same way as the real pair's ">= 32000".
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from cross_modal_sd.models.prompts import IMAGE_TOKEN, VICUNA_SYSTEM, VIDEO_TOKEN
from cross_modal_sd.world.qa import vocabulary

SPECIALS_TOP = (IMAGE_TOKEN, VIDEO_TOKEN, "<pad>")


def _split(text: str) -> list[str]:
    """Spaces punctuation off words so the word-level vocabulary stays small."""
    for p in ".,?'":
        text = text.replace(p, f" {p} ")
    return text.split()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Builds the tokenizer from the mini world's closed vocabulary (deterministic)."""
    words = sorted(set(vocabulary()) | set(_split(VICUNA_SYSTEM)))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    for s in SPECIALS_TOP:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Punctuation attached to words in prompts ("assistant." "human's") splits off like the answers.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split("'", "isolated"),
            pre_tokenizers.Split(".", "isolated"),
            pre_tokenizers.Split(",", "isolated"),
            pre_tokenizers.Split("?", "isolated"),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=[IMAGE_TOKEN, VIDEO_TOKEN],
    )
    fast.padding_side = "left"
    return fast


def text_vocab_limit(tokenizer: PreTrainedTokenizerFast) -> int:
    """First id that is not a text token (logits at ids >= this are masked)."""
    return tokenizer.convert_tokens_to_ids(SPECIALS_TOP[0])
