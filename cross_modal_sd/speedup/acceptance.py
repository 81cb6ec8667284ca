"""How many drafts the target accepts: per-sample teacher-forced match and confidence sequences.

Under teacher-forced pairing (docs/design.md §6) the drafter's state at answer position ``i``
(having read the target's answer up to ``i``) is exactly the state SD gives it whenever the
committed answer reaches ``i``: in round 1 while every earlier draft was accepted, and in any
later round after the drafter is synced to the committed answer. So one sample's acceptance is
two sequences over its answer positions: ``match[i]`` (the drafter's token equals the target's)
and ``confidence[i]`` (the drafter's top-1 probability there, which a confidence policy reads).
The speedup model replays the SD loop over them (`cross_modal_sd.speedup.model`).

The best source is an export's own validation split (`from_export`: every val sample's
sequences, recorded at export), which the evaluated test samples were never part of. Curves
alone (older exports, other systems' figures) give synthetic sequences (`from_runs`): runs of
accepted drafts drawn from the first-round distribution, each ending at a miss, which assumes a
later round's ``i``-th draft behaves like round 1's ``i``-th. Where drafts after a miss follow
the drafter's own wrong context, their confidences are taken as teacher-forced ones.

A feature head (`adapters.FeatureHead`) drafts from the target's own states, which after a
verification are exactly the teacher-forced ones; its drafts after the first feed on its own
outputs, so its acceptance is not a per-position match but a run per start: ``head_runs[i][L]``
is the leading run of its self-fed chain from committed length ``L + 1`` (`metrics.chains`,
recorded at export for the same validation samples: `with_head`).

Exports made since trees and sampling also record, per position, the drafter's largest
probabilities and where the target's token stands among them (``top``/``rank``: a draft tree's
accepted path, `speedup.model`), and the target's largest logits with where the draft stands
among them (``target_logits``/``draft_rank``; a head's ``miss_rank`` for its first wrong
draft). `sampled` turns these into the acceptance of a sampled run (T > 0): with deterministic
drafts the target accepts draft ``d`` with probability ``p(d)``, ``p`` its distribution under the
run's temperature, top-k and top-p. Two approximations, stated where they are used: positions
keep their teacher-forced distributions after a sampled token leaves the greedy answer, and
the target's distribution is its `TARGET_TOP` largest logits (exact for vocabularies that
small or ``top_k`` within it).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from cross_modal_sd.decoding.sampling import Sampling


@dataclass(frozen=True)
class Acceptance:
    """Per-sample teacher-forced acceptance (see the module docstring).

    Attributes:
        match: per sample, whether the drafter's token at each answer position equals the
            target's (the sample's answer length is the sequence's length).
        confidence: per sample, the drafter's top-1 probability at each position.
        source: where the sequences come from.
        head_runs: per sample, a feature head's accepted run from every committed length
            (entry ``L`` for length ``L + 1``; capped at ``head_k``), or None.
        head_k: the longest chain the runs were scored to.
        top: per sample and position, the drafter's largest probabilities, best first (None:
            not recorded; draft trees are then not priced).
        rank: per sample and position, where the target's token stands in ``top`` (-1: not).
        target_logits: per sample, (n, M) the target's largest logits at each position, best
            first (None: not recorded; sampling is then not priced).
        draft_rank: per sample and position, where the drafter's token stands among them.
        head_miss_rank: per sample and start, where the head chain's first wrong draft stands
            among them (-1: not, or no wrong draft).
        head_top / head_rank: per sample, start and depth, a head's largest probabilities on
            the chain that reads the answer, and where the answer's token stands among them
            (its draft trees; depths never scored have no entry).
    """

    match: tuple[tuple[bool, ...], ...]
    confidence: tuple[tuple[float, ...], ...]
    source: str = ""
    head_runs: tuple[tuple[int, ...], ...] | None = None
    head_k: int = 0
    top: tuple[tuple[tuple[float, ...], ...], ...] | None = None
    rank: tuple[tuple[int, ...], ...] | None = None
    target_logits: tuple[torch.Tensor, ...] | None = field(default=None, compare=False)
    draft_rank: tuple[tuple[int, ...], ...] | None = None
    head_miss_rank: tuple[tuple[int, ...], ...] | None = None
    head_top: tuple[tuple[tuple[tuple[float, ...], ...], ...], ...] | None = None
    head_rank: tuple[tuple[tuple[int, ...], ...], ...] | None = None

    def __post_init__(self):
        if not self.match:
            raise ValueError("Acceptance: no samples")
        if len(self.match) != len(self.confidence):
            raise ValueError(
                f"Acceptance: {len(self.match)} match sequences, {len(self.confidence)} "
                f"confidence sequences"
            )
        for i, (m, c) in enumerate(zip(self.match, self.confidence, strict=True)):
            if not m or len(m) != len(c):
                raise ValueError(
                    f"Acceptance: sample {i} has {len(m)} matches, {len(c)} confidences"
                )

    def with_head(self, export: Any) -> Acceptance:
        """These samples with a feature head's runs from its export (same validation split).

        Raises:
            ValueError: the export holds no chain runs, or other samples than these.
        """
        val = getattr(export, "val_acceptance", None) or {}
        where = str(getattr(export, "path", "export"))
        if "runs" not in val:
            raise ValueError(f"{where}: no head chain runs (val_acceptance['runs']); re-export it")
        lengths = [int(n) for n in val["lengths"]]
        if lengths != self.lengths:
            raise ValueError(
                f"{where}: its validation answers ({len(lengths)} samples) are not the adapter's "
                f"({len(self.lengths)}): train both on the same cache and split"
            )
        runs = tuple(
            tuple(int(r) for r in row[: n - 1])
            for row, n in zip(val["runs"].tolist(), lengths, strict=True)
        )
        misses = None
        if "miss_rank" in val:
            misses = tuple(
                tuple(int(r) for r in row[: n - 1])
                for row, n in zip(val["miss_rank"].tolist(), lengths, strict=True)
            )
        trees: dict[str, Any] = {}
        if "tree_top" in val and "tree_rank" in val:
            tops, ranks = [], []
            for top, rank, n in zip(val["tree_top"], val["tree_rank"], lengths, strict=True):
                scored = top[: n - 1].float().sum(dim=-1) > 0  # (n - 1, k): depths scored
                depths = scored.int().cumprod(dim=1).sum(dim=1).tolist()  # leading ones
                tops.append(
                    tuple(
                        tuple(tuple(p) for p in row[:d])
                        for row, d in zip(top[: n - 1].float().tolist(), depths, strict=True)
                    )
                )
                ranks.append(
                    tuple(
                        tuple(row[:d])
                        for row, d in zip(rank[: n - 1].tolist(), depths, strict=True)
                    )
                )
            trees = {"head_top": tuple(tops), "head_rank": tuple(ranks)}
        return replace(
            self,
            head_runs=runs,
            head_k=int(val["k"]),
            head_miss_rank=misses,
            **trees,
            source=f"{self.source}; head chains of {where}",
        )

    def with_head_runs(self, hist: Sequence[float], k: int = 8, seed: int = 0) -> Acceptance:
        """These samples with synthetic head runs: from every committed length an independent
        run drawn from ``hist`` (P(run = r), r = 0..k), cut at the answer's end (seeded). For
        other systems' figures and other answer lengths, where no chains were recorded."""
        total = float(sum(hist))
        if len(hist) != k + 1 or total <= 0 or any(h < 0 for h in hist):
            raise ValueError(f"head run histogram needs {k + 1} non-negative bins: {list(hist)}")
        rng = random.Random(seed)
        weights = [h / total for h in hist]
        runs = tuple(
            tuple(min(rng.choices(range(k + 1), weights)[0], n - start) for start in range(1, n))
            for n in self.lengths
        )
        return replace(self, head_runs=runs, head_k=k, source=f"{self.source}; synthetic head runs")

    @property
    def lengths(self) -> list[int]:
        """Answer length of each sample."""
        return [len(m) for m in self.match]

    @property
    def first_run_mean(self) -> float:
        """Mean leading run of matches (what round 1 accepts with unlimited drafting)."""
        return sum(_run(m, 0) for m in self.match) / len(self.match)

    @classmethod
    def from_arrays(
        cls,
        match: torch.Tensor,
        confidence: torch.Tensor,
        lengths: torch.Tensor,
        source: str = "",
        **more: torch.Tensor,
    ) -> Acceptance:
        """From padded ``(S, L)`` match and confidence tensors and ``(S,)`` lengths; ``more``:
        the padded ``top`` (S, L, K), ``rank``, ``target_logits`` (S, L, M) and ``draft_rank``
        where an export holds them (`metrics.offline.acceptance_arrays`)."""
        n = lengths.tolist()

        def rows(t: torch.Tensor, cast) -> tuple:
            return tuple(
                tuple(cast(v) for v in row[:k]) for row, k in zip(t.tolist(), n, strict=True)
            )

        extra: dict[str, Any] = {}
        if "top_probs" in more and "rank" in more:
            extra["top"] = rows(more["top_probs"], lambda v: tuple(float(x) for x in v))
            extra["rank"] = rows(more["rank"], int)
        if "target_logits" in more and "draft_rank" in more:
            extra["target_logits"] = tuple(
                t[:k].float() for t, k in zip(more["target_logits"], n, strict=True)
            )
            extra["draft_rank"] = rows(more["draft_rank"], int)
        return cls(rows(match, bool), rows(confidence, float), source, **extra)

    @classmethod
    def from_export(
        cls, export: Any, lengths: Sequence[int] | None = None, seed: int = 0
    ) -> Acceptance:
        """From an export: its validation split's sequences, or (exports without them) its
        accepted-length histogram as synthetic runs over `lengths`.

        Raises:
            ValueError: the export holds neither, or curves without `lengths`.
        """
        val = getattr(export, "val_acceptance", None)
        where = str(getattr(export, "path", "export"))
        if val and "runs" in val:
            raise ValueError(f"{where}: a feature head's export; pass it to `with_head`")
        if val:
            more = {k: v for k, v in val.items() if k not in ("match", "confidence", "lengths")}
            return cls.from_arrays(
                val["match"], val["confidence"], val["lengths"], f"val split of {where}", **more
            )
        curves = getattr(export, "curves", None) or {}
        hist = curves.get("val/accepted_length_hist", curves.get("accepted_length_hist"))
        if hist is None:
            raise ValueError(
                f"{where}: no validation acceptance (val_acceptance) and no accepted-length "
                f"curve; re-export it with `python train.py`"
            )
        if not lengths:
            raise ValueError(f"{where}: holds curves only; answer lengths are needed to use them")
        return cls.from_runs(hist, lengths, seed, source=f"curves of {where} (synthetic runs)")

    @classmethod
    def from_runs(
        cls,
        hist: Sequence[float],
        lengths: Sequence[int],
        seed: int = 0,
        repeats: int = 20,
        source: str = "",
    ) -> Acceptance:
        """Synthetic sequences: runs of matches drawn from ``hist`` (P(run = r), the last bin
        ``r >= len - 1``), each followed by a miss; confidence 1 on matches and 0 on misses (a
        confidence policy then stops exactly at the first miss: the oracle). Each length is
        drawn `repeats` times (seeded)."""
        total = float(sum(hist))
        if not hist or total <= 0 or any(h < 0 for h in hist):
            raise ValueError(f"run histogram needs non-negative counts, positive sum: {list(hist)}")
        weights = [h / total for h in hist]
        rng = random.Random(seed)
        match, conf = [], []
        for n in lengths:
            for _ in range(repeats):
                seq: list[bool] = []
                while len(seq) < n:
                    r = rng.choices(range(len(weights)), weights)[0]
                    if r == len(weights) - 1:  # the open last bin: the rest of the answer
                        r = n
                    seq += [True] * r + [False]
                seq = seq[:n]
                match.append(tuple(seq))
                conf.append(tuple(1.0 if m else 0.0 for m in seq))
        return cls(tuple(match), tuple(conf), source or "synthetic runs")

    @classmethod
    def geometric(
        cls, q: float, lengths: Sequence[int], repeats: int = 20, source: str = ""
    ) -> Acceptance:
        """Every draft accepted with probability ``q`` independently (runs geometric)."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must lie in [0, 1], got {q}")
        longest = max(lengths)
        hist = [q**r * (1 - q) for r in range(longest)] + [q**longest]
        return cls.from_runs(hist, lengths, repeats=repeats, source=source or f"geometric q={q:g}")

    @classmethod
    def from_mean(
        cls, accepted: float, lengths: Sequence[int], repeats: int = 20, source: str = ""
    ) -> Acceptance:
        """Runs of ``accepted`` matches on average: a two-point histogram at its floor and
        ceiling."""
        if accepted < 0:
            raise ValueError(f"accepted must be >= 0, got {accepted}")
        low = int(accepted)
        hist = [0.0] * (low + 3)
        hist[low] = low + 1 - accepted
        hist[low + 1] = accepted - low
        return cls.from_runs(
            hist, lengths, repeats=repeats, source=source or f"mean run {accepted:g}"
        )

    def sampled(self, sampling: Sampling, repeats: int = 20, seed: int = 0) -> Acceptance:
        """The acceptance of runs sampled under ``sampling`` (see the module docstring):
        every sample's match sequence (and head runs) drawn ``repeats`` times, seeded. A draft
        at position i is accepted with probability ``p_i(d_i)``; a head chain's draft within its
        greedy run with ``p`` of the target's token, and its first wrong draft with ``p`` of it
        (its chain then ends).

        Raises:
            ValueError: greedy settings, or no target distributions recorded.
        """
        if sampling.greedy:
            raise ValueError("sampled: temperature 0 is greedy; use the acceptance as it is")
        if self.target_logits is None or self.draft_rank is None:
            raise ValueError(
                f"{self.source}: no target distributions (target_logits) recorded; re-export "
                f"with `python train.py` to predict sampled runs"
            )
        if self.head_runs is not None and self.head_miss_rank is None:
            raise ValueError(f"{self.source}: the head export has no miss_rank; re-export it")
        warpers = sampling.warpers()
        rng = random.Random(seed)
        match, conf, runs = [], [], []
        for i, logits in enumerate(self.target_logits):
            p = warpers(None, logits.clone()).softmax(dim=-1).tolist()  # (n, M)
            alpha = [_prob(p, pos, r) for pos, r in enumerate(self.draft_rank[i])]
            for _ in range(repeats):
                match.append(tuple(rng.random() < a for a in alpha))
                conf.append(self.confidence[i])
                if self.head_runs is None:
                    continue
                row = []
                for start, run in enumerate(self.head_runs[i]):
                    kept = 0
                    while kept < run and rng.random() < p[start + 1 + kept][0]:
                        kept += 1
                    miss = self.head_miss_rank[i][start]
                    at = start + 1 + run  # the first wrong draft's position (none past the end)
                    if kept == run and at < len(p) and rng.random() < _prob(p, at, miss):
                        kept += 1
                    row.append(kept)
                runs.append(tuple(row))
        return Acceptance(
            tuple(match),
            tuple(conf),
            f"{self.source}; sampled {sampling.name} x{repeats}",
            tuple(runs) if self.head_runs is not None else None,
            self.head_k,
        )

    def to_dict(self) -> dict[str, Any]:
        """Summary for reports (the sequences themselves stay in the export)."""
        return {
            "source": self.source,
            "n_samples": len(self.match),
            "mean_length": sum(self.lengths) / len(self.match),
            "first_run_mean": self.first_run_mean,
        }


def _prob(p: Sequence[Sequence[float]], pos: int, rank: int) -> float:
    """``p[pos][rank]``, 0 for a token not among them (``rank`` -1)."""
    return p[pos][rank] if rank >= 0 else 0.0


def _run(match: Sequence[bool], start: int, limit: int | None = None) -> int:
    """Leading matches from ``start`` (at most ``limit``)."""
    n = 0
    end = len(match) if limit is None else min(len(match), start + limit)
    for i in range(start, end):
        if not match[i]:
            break
        n += 1
    return n
