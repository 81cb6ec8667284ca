"""Baseline and peers in one harness: every lossless peer reproduces the greedy baseline, and the
timing helpers measure what they say."""

from __future__ import annotations

import time

import pytest
import torch

from cross_modal_sd.decoding import (
    DecodeSpec,
    DraftInputs,
    Span,
    TargetInputs,
    hf_assisted,
    hf_greedy,
    hf_prompt_lookup,
    thread_budget,
    time_call,
    wrapper_greedy,
)
from cross_modal_sd.decoding.baselines import greedy_generation_config
from cross_modal_sd.models.architectures import DecoderSize, TowerSize, build_draft, build_target
from cross_modal_sd.models.prompts import encode_target_prompt
from cross_modal_sd.models.wrappers import TargetDecoder
from cross_modal_sd.world.tokenizer import build_tokenizer, text_vocab_limit

MAX_NEW = 12
QUESTIONS = ("what colour is the car ?", "which way is the truck moving ?", "describe the scene .")


@pytest.fixture(scope="module")
def setup():
    # One intra-op thread: on a shared 2-core machine OpenMP spin-waiting makes tiny ops ~20x slower.
    with thread_budget(1):
        torch.manual_seed(0)
        tok = build_tokenizer()
        limit = text_vocab_limit(tok)
        target = build_target(tok, TowerSize(), DecoderSize(layers=3), 32, 8).eval()
        assistant = build_draft(
            tok, TowerSize(), DecoderSize(layers=2), 32, 2
        ).language_model.eval()
        with torch.no_grad():  # varied answers (the default init repeats one token)
            for name, p in target.named_parameters():
                if p.dim() == 2 and ("language_model" in name or "lm_head" in name):
                    p.normal_(0.0, 0.1)
        spec = DecodeSpec(MAX_NEW, limit, tok.eos_token_id)
        samples = []
        for i in range(6):
            ids = encode_target_prompt(tok, QUESTIONS[i % 3], 8 * TowerSize().tokens(32))
            frames = torch.randn(1, 8, 3, 32, 32, generator=torch.Generator().manual_seed(i))
            samples.append(TargetInputs(torch.tensor([ids]), frames))
        # EOS takes over sample 0's third token, so at least one answer ends at EOS mid-way.
        third = hf_greedy(target, samples[0], spec, warmup=0).tokens[2]
        with torch.no_grad():
            target.lm_head.weight[tok.eos_token_id] = 1.02 * target.lm_head.weight[third]
        yield tok, target, assistant, spec, samples


def test_peers_reproduce_the_greedy_baseline(setup):
    tok, target, assistant, spec, samples = setup
    decoder = TargetDecoder(target, spec.vocab_limit)
    ends = set()
    for inputs in samples:
        base = hf_greedy(target, inputs, spec, warmup=0)
        ends.add("eos" if base.tokens[-1] == spec.eos_token_id else "cap")
        assert all(t < spec.vocab_limit for t in base.tokens)
        peers = [
            hf_prompt_lookup(target, inputs, spec, num_tokens=4, warmup=0),
            hf_assisted(target, inputs, assistant, spec, warmup=0),
            wrapper_greedy(decoder, inputs, spec, warmup=0),
        ]
        for peer in peers:
            assert peer.tokens == base.tokens, peer.method
    assert ends == {"eos", "cap"}


def test_assisted_peer_really_consults_the_assistant(setup):
    _, target, assistant, spec, samples = setup
    calls = []
    handle = assistant.register_forward_hook(lambda *_: calls.append(1))
    try:
        record = hf_assisted(target, samples[1], assistant, spec, warmup=0)
    finally:
        handle.remove()
    assert record.method == "assisted"
    assert len(calls) >= 1


def test_greedy_config_suppresses_non_text_ids(setup):
    tok, target, _, spec, _ = setup
    config = greedy_generation_config(target, spec, prompt_lookup_num_tokens=3)
    assert config.suppress_tokens == list(range(spec.vocab_limit, len(tok)))
    assert (config.do_sample, config.max_new_tokens, config.eos_token_id) == (False, MAX_NEW, 2)
    assert config.prompt_lookup_num_tokens == 3


def test_record_to_dict_counts_tokens(setup):
    _, target, _, spec, samples = setup
    record = hf_greedy(target, samples[1], spec, warmup=1).to_dict()
    assert record["method"] == "greedy"
    assert record["n_new"] == len(record["tokens"]) > 0
    assert record["total_ms"] > 0


def test_time_call_excludes_warmup_and_returns_last_result():
    calls = []

    def work():
        calls.append(len(calls))
        time.sleep(0.02 if len(calls) > 2 else 0.2)  # slow warm-ups must not be counted
        return len(calls)

    result, ms = time_call(work, warmup=2, repeats=3)
    assert result == 5 and len(calls) == 5
    assert 20 <= ms < 150


@pytest.mark.parametrize(("warmup", "repeats"), [(-1, 1), (0, 0)])
def test_time_call_rejects_bad_counts(warmup, repeats):
    with pytest.raises(ValueError, match="warmup >= 0 and repeats >= 1"):
        time_call(lambda: None, warmup=warmup, repeats=repeats)


def test_thread_budget_sets_and_restores():
    before = torch.get_num_threads()
    with thread_budget(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with thread_budget(None):
        assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="thread budget must be >= 1"):
        with thread_budget(0):
            pass


def test_span_overlap():
    assert Span(0.0, 10.0).overlap_ms(Span(4.0, 20.0)) == 6.0
    assert Span(0.0, 10.0).overlap_ms(Span(2.0, 3.0)) == 1.0
    assert Span(0.0, 1.0).overlap_ms(Span(2.0, 3.0)) == 0.0
    assert Span(2.0, 5.0).ms == 3.0


def test_inputs_must_be_batch_one():
    with pytest.raises(ValueError, match=r"DraftInputs.input_ids must have shape \(1, L\)"):
        DraftInputs(torch.zeros(5, dtype=torch.long), torch.zeros(1, 2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"TargetInputs.input_ids must have shape \(1, L\)"):
        TargetInputs(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 8, 3, 32, 32))
