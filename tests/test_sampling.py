"""Lossless speculative sampling: the SD loop's answers are distributed as the target's own.

A tiny random Video-LLaVA samples at temperature 0.7 with top-k 3, so an answer's first three
tokens fall in at most 27 cells whose exact probabilities are computed from the target's
forwards. SD runs (many seeds) with scripted drafts, right and wrong at chosen positions, are
compared with them by a chi-square goodness-of-fit test at significance 1e-3: an exact sampler
fails it with probability 0.001 for a random seed set (the seed set here is fixed, so the
outcome is reproducible), and a deliberately biased acceptance rule must fail it (a mild one,
accepting with probability p^0.8 instead of p, and accepting always). Draft trees are checked
the same way: recursive rejection over each node's children.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from random_models import TinyTarget

from cross_modal_sd.decoding import (
    DecodeSpec,
    DraftPolicy,
    Sampling,
    ScriptedDrafter,
    ScriptedHead,
    SDConfig,
    TokenChooser,
    TreeShape,
    hf_greedy,
    loop_tokens,
    speculative_generate,
    thread_budget,
    wrapper_greedy,
)

SAMPLING = Sampling(temperature=0.7, top_k=3)
LENGTH = 3  # answer tokens compared
RUNS = 800
ALPHA = 1e-3
SLOW = pytest.mark.slow  # make test-full only


class Tiny(TinyTarget):
    """A tiny target, one prompt, the exact distribution of its first `LENGTH` tokens."""

    def __init__(self):
        super().__init__()
        self.inputs = self.videos[0]
        self.spec = DecodeSpec(LENGTH, self.limit, self.eos, SAMPLING)
        self.exact = self._exact()
        spec = DecodeSpec(LENGTH, self.limit, self.eos)
        self.greedy = hf_greedy(self.model, self.inputs, spec).tokens

    def _exact(self) -> dict[tuple[int, ...], float]:
        """P(answer[:LENGTH]) for every answer the sampler can give (enumerated)."""
        chooser = TokenChooser(SAMPLING)
        out = self.target.prefill(self.inputs.input_ids, self.inputs.pixel_values_videos)
        probs: dict[tuple[int, ...], float] = {}

        def walk(prefix: tuple[int, ...], p_prefix: float, row: torch.Tensor, cache) -> None:
            p = chooser.probs(row[None])[0]
            for token in torch.nonzero(p).flatten().tolist():
                seq, q = (*prefix, token), p_prefix * float(p[token])
                if len(seq) == LENGTH or token == self.eos:
                    probs[seq] = q
                    continue
                nxt = copy.deepcopy(cache)
                step = self.target.forward_tokens(torch.tensor([[token]]), nxt)
                walk(seq, q, step.logits[0, -1], nxt)

        walk((), 1.0, out.logits[0, -1], out.cache)
        return probs


@pytest.fixture(scope="module")
def tiny():
    with thread_budget(1):
        yield Tiny()


def chi_square(counts: Counter, exact: dict, runs: int) -> tuple[float, int, float]:
    """(statistic, degrees of freedom, p-value); cells expected below 5 pooled into one."""
    unseen = set(counts) - set(exact)
    assert not unseen, f"answers the target cannot sample: {sorted(unseen)[:3]}"
    small = [s for s in exact if exact[s] * runs < 5]
    cells = [([s], exact[s]) for s in exact if exact[s] * runs >= 5]
    if small:
        cells.append((small, sum(exact[s] for s in small)))
    stat = sum(
        (sum(counts[s] for s in seqs) - runs * p) ** 2 / (runs * p) for seqs, p in cells if p > 0
    )
    dof = len(cells) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(stat / 2)))
    return stat, dof, p_value


def sd_answers(tiny: Tiny, config: SDConfig, wrong_at=(), acceptance=None, head=False) -> Counter:
    """Counts of SD answers over `RUNS` seeds (with `acceptance`: a replaced rule)."""
    drafter = ScriptedDrafter(tiny.greedy, tiny.limit, wrong_at=wrong_at)
    scripted_head = ScriptedHead(tiny.greedy, tiny.limit, wrong_at=wrong_at) if head else None
    counts: Counter = Counter()
    for seed in range(RUNS):
        chooser = TokenChooser(SAMPLING, torch.Generator().manual_seed(seed), acceptance)
        result = speculative_generate(
            tiny.target, drafter, tiny.inputs, None, config, head=scripted_head, chooser=chooser
        )
        counts[tuple(result.tokens)] += 1
    return counts


def config(
    tiny: Tiny, decode: str = "draft_model", round1: str = "cross_modal", tree: bool = False
) -> SDConfig:
    policy = DraftPolicy(gamma=2, tree=TreeShape(nodes=4, top_k=2) if tree else None)
    return SDConfig(policy, decode, LENGTH, tiny.eos, round1, SAMPLING)


def test_the_cells_are_a_distribution_the_target_can_stray_from(tiny):
    assert sum(tiny.exact.values()) == pytest.approx(1.0, abs=1e-5)
    assert 8 <= len(tiny.exact) <= 27
    # The greedy answer is likely but far from certain: acceptance is neither all nor none.
    assert 0.05 < tiny.exact.get(tuple(tiny.greedy), 0.0) < 0.9


@pytest.mark.parametrize(
    ("decode", "round1", "wrong_at", "tree"),
    [
        # ~15 s each: make test runs the hybrid and a tree; make test-full all of them.
        pytest.param("draft_model", "cross_modal", (), False, marks=SLOW),  # the greedy path
        pytest.param("draft_model", "cross_modal", (1,), False, marks=SLOW),  # a middle miss
        pytest.param("autoregressive", "cross_modal", (0,), False, marks=SLOW),  # round 1 wrong
        ("head", "cross_modal", (2,), False),  # the hybrid
        pytest.param("head", "none", (), False, marks=SLOW),  # head only
        # Trees: recursive rejection over two children per node (the scripted second branch
        # is the greedy token where the first is wrong, another token where it is right).
        ("draft_model", "cross_modal", (1,), True),
        pytest.param("head", "cross_modal", (0,), True, marks=SLOW),
    ],
)
def test_sd_sampling_distribution_equals_the_target_s(tiny, decode, round1, wrong_at, tree):
    cfg = config(tiny, decode, round1, tree)
    counts = sd_answers(tiny, cfg, wrong_at, head=decode == "head")
    stat, dof, p_value = chi_square(counts, tiny.exact, RUNS)
    assert p_value > ALPHA, f"chi2 {stat:.1f} on {dof} dof, p = {p_value:.2e}"


@pytest.mark.parametrize(
    ("rule", "tree"),
    [
        (lambda p: p**0.8, False),
        pytest.param(lambda p: 1.0, False, marks=SLOW),
        # In a tree the over-accepted second branch partly makes up for the first (p^0.8 gives
        # p = 2.5e-3 at 800 runs), so the mild rule is p^0.6 there (p = 2e-34).
        pytest.param(lambda p: p**0.6, True, marks=SLOW),
        pytest.param(lambda p: 1.0, True, marks=SLOW),
    ],
    ids=["p^0.8-chain", "always-chain", "p^0.6-tree", "always-tree"],
)
def test_a_biased_acceptance_rule_fails_the_distribution_test(tiny, rule, tree):
    counts = sd_answers(tiny, config(tiny, tree=tree), acceptance=rule)
    _, _, p_value = chi_square(counts, tiny.exact, RUNS)
    assert p_value < ALPHA


def test_lean_loop_sampling_distribution_equals_the_target_s(tiny):
    counts = Counter(
        tuple(loop_tokens(tiny.target, tiny.inputs, tiny.spec, torch.Generator().manual_seed(s)))
        for s in range(RUNS)
    )
    assert chi_square(counts, tiny.exact, RUNS)[2] > ALPHA


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_lean_loop_samples_what_generate_samples_from_the_same_seed(tiny, seed):
    spec = DecodeSpec(8, tiny.limit, tiny.eos, SAMPLING)
    ours = wrapper_greedy(tiny.target, tiny.inputs, spec, warmup=0, seed=seed).tokens
    assert ours == hf_greedy(tiny.model, tiny.inputs, spec, warmup=0, seed=seed).tokens


def test_sampling_runs_are_reproducible_from_their_seed(tiny):
    cfg = config(tiny, "draft_model")
    drafter = ScriptedDrafter(tiny.greedy, tiny.limit, wrong_at=(1,))

    def run(seed: int) -> list[int]:
        chooser = TokenChooser(SAMPLING, torch.Generator().manual_seed(seed))
        return speculative_generate(
            tiny.target, drafter, tiny.inputs, None, cfg, chooser=chooser
        ).tokens

    answers = [run(s) for s in range(12)]
    assert answers == [run(s) for s in range(12)]
    assert len({tuple(a) for a in answers}) > 1  # it does sample


def test_sampling_chooser_rows_follow_transformers_warpers():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    p = TokenChooser(Sampling(temperature=0.5, top_k=2)).probs(logits)[0]
    assert p[2:].sum() == 0  # top-2
    assert float(p[0] / p[1]) == pytest.approx(float(torch.tensor(2.0).exp()))  # (4-3)/0.5
    # softmax: 0.636, 0.234, 0.086, ...: top-p 0.5 keeps the first id alone, 0.8 the first two
    p = TokenChooser(Sampling(temperature=1.0, top_p=0.5)).probs(logits)[0]
    assert torch.nonzero(p).flatten().tolist() == [0]
    p = TokenChooser(Sampling(temperature=1.0, top_p=0.8)).probs(logits)[0]
    assert torch.nonzero(p).flatten().tolist() == [0, 1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"temperature": 1.0, "top_p": 0.0}, r"top_p must lie in \(0, 1\]"),
        ({"temperature": 1.0, "top_p": 1.5}, r"top_p must lie in \(0, 1\]"),
        ({"temperature": 1.0, "top_k": -1}, "top_k must be an int >= 0"),
    ],
)
def test_bad_sampling_settings_fail_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampling(**kwargs)


def test_sd_config_round_trips_its_sampling():
    cfg = SDConfig(sampling=Sampling(temperature=1.0, top_p=0.9, seed=3))
    assert SDConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.name.endswith("/T1-p0.9-k0")
    legacy = {k: v for k, v in SDConfig().to_dict().items() if k != "sampling"}
    assert SDConfig.from_dict(legacy).sampling.greedy  # records from before sampling
