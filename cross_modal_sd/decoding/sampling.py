"""How the target picks its tokens: greedy, or sampling kept exact under speculation.

`Sampling` holds the settings (``temperature=0`` is greedy); `TokenChooser` applies them to the
rows of a target forward in every loop of the repo (the SD loop and the lean baseline loop).

Greedy: a draft is accepted while it equals the row's argmax, and the argmax of the first
mismatching row (or of the row after the last draft: the bonus) is committed.

Sampling (docs/design.md §11): the target's distribution of a row is its logits through
transformers' own warpers in `generate`'s order (temperature, top-k, top-p), so the baseline's
``generate(do_sample=True, ...)`` and the SD loop sample from the same ``p``. Every drafter here
drafts deterministically (``q`` one-hot on the draft ``d``), so speculative sampling's rule
"accept with probability min(1, p(d)/q(d)), else sample from the normalised residual
max(0, p - q)" becomes: accept ``d`` with probability ``p(d)``; on a rejection sample from ``p``
with ``d`` removed and renormalised. A draft tree's node with several children applies this
recursively (`TokenChooser.walk`): each child in turn against what the earlier ones left. The
committed tokens are then distributed exactly as the target's own sampling (tested by a
chi-square test in ``tests/test_sampling.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass(frozen=True)
class Sampling:
    """Decoding settings of the target (and of every method compared with it).

    Attributes:
        temperature: 0 decodes greedily; > 0 samples from the logits divided by it.
        top_k: keep the k most probable ids (0: all).
        top_p: keep the smallest set of ids whose probability reaches top_p (1: all).
        seed: seeds the run's random stream (a run's tokens are reproducible from it).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"sampling.top_k must be an int >= 0 (0: off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling.top_p must lie in (0, 1], got {self.top_p!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"sampling.seed must be an int, got {self.seed!r}")

    @classmethod
    def from_node(cls, node: Mapping[str, Any] | None) -> Sampling:
        """The settings of a config node (``conf/evaluate.yaml``'s ``sampling``; None: greedy).

        Raises:
            ValueError: a bad setting, or an unknown key.
        """
        node = dict(node or {})
        known = {"temperature", "top_k", "top_p", "seed"}
        if set(node) - known:
            raise ValueError(
                f"sampling: unknown keys {sorted(set(node) - known)}; known: {sorted(known)}"
            )
        return cls(
            temperature=float(node.get("temperature", 0.0)),
            top_k=int(node.get("top_k", 0)),
            top_p=float(node.get("top_p", 1.0)),
            seed=int(node.get("seed", 0)),
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def name(self) -> str:
        """Short label, e.g. ``greedy`` or ``T1-p0.9-k0``."""
        if self.greedy:
            return "greedy"
        return f"T{self.temperature:g}-p{self.top_p:g}-k{self.top_k}"

    def warpers(self) -> LogitsProcessorList:
        """transformers' warpers for these settings, in `generate`'s order (none: greedy)."""
        out = LogitsProcessorList()
        if self.greedy:
            return out
        if self.temperature != 1.0:
            out.append(TemperatureLogitsWarper(float(self.temperature)))
        if self.top_k:
            out.append(TopKLogitsWarper(top_k=self.top_k))
        if self.top_p < 1.0:
            out.append(TopPLogitsWarper(top_p=float(self.top_p)))
        return out

    def generate_kwargs(self) -> dict:
        """`GenerationConfig` arguments that sample exactly as `TokenChooser` does."""
        if self.greedy:
            return {"do_sample": False}
        return {
            "do_sample": True,
            "temperature": float(self.temperature),
            "top_k": self.top_k,
            "top_p": float(self.top_p),
        }


GREEDY = Sampling()


class TokenChooser:
    """Chooses the committed tokens of a forward's rows under `Sampling` (one per run).

    Args:
        sampling: the settings.
        generator: the run's random stream (sampling only; default: seeded with
            ``sampling.seed`` on the CPU).
        acceptance: ``p(d) -> probability of accepting d`` (default: ``p(d)`` itself, the exact
            rule); only tests replace it, to show that a biased rule is caught.
    """

    def __init__(
        self,
        sampling: Sampling = GREEDY,
        generator: torch.Generator | None = None,
        acceptance=None,
    ):
        self.sampling = sampling
        self.warpers = sampling.warpers()
        if generator is None and not sampling.greedy:
            generator = torch.Generator().manual_seed(sampling.seed)
        self.generator = generator
        self.acceptance = acceptance or (lambda p: p)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(n, V) masked logits -> (n, V) the target's sampling distributions (float32, CPU)."""
        scores = self.warpers(None, logits.float())
        return scores.softmax(dim=-1).cpu()

    def _draw(self, p: torch.Tensor) -> int:
        return int(torch.multinomial(p, 1, generator=self.generator))

    def _uniform(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def choose(self, logits: torch.Tensor, drafts: Sequence[int]) -> tuple[int, list[int]]:
        """Accepts a prefix of ``drafts`` against the rows of ``logits`` and adds the target's
        token after it.

        Args:
            logits: (n, V); row i is the target's distribution for draft i's position.
            drafts: at most n drafts. With n > len(drafts), the row after the last draft gives
                a bonus token when all are accepted; with n == len(drafts), it does not.

        Returns:
            The number of accepted drafts and the committed tokens (accepted drafts, then the
            correction or bonus where there is one).
        """
        n, k = logits.shape[0], len(drafts)
        if k > n:
            raise ValueError(f"{k} drafts for {n} rows of logits")
        path, committed = self.walk(logits, lambda i: [i + 1] if i + 1 < k else [], drafts)
        return len(path), committed

    def walk(
        self,
        logits: torch.Tensor,
        children: Callable[[int], Sequence[int]],
        tokens: Sequence[int],
    ) -> tuple[list[int], list[int]]:
        """Accepts a path down a draft tree: at each node (from the root, -1) one of its
        children or none, then the target's token where the path stops.

        Greedy: the child equal to the row's argmax. Sampling: recursive rejection with
        deterministic drafts: child c is accepted with probability r(c), r the row's
        distribution with the children tried before removed and renormalised; when all are
        rejected, the token is drawn from what is left of r. The path's tokens are then
        distributed as the target's own sampling (each step draws exactly from p).

        Args:
            logits: (n, V); row ``i + 1`` is the target's distribution after node i (row 0:
                after the root). A path reaching node n - 1 ends without a token after it.
            children: node -> its children, tried in this order.
            tokens: every node's draft token.

        Returns:
            The accepted nodes, root to deepest, and the committed tokens (theirs, then the
            target's where there is a row for it).
        """
        greedy = logits.argmax(dim=-1).tolist() if self.sampling.greedy else None
        probs = None if greedy is not None else self.probs(logits)
        path: list[int] = []
        committed: list[int] = []
        node = -1
        while node + 1 < logits.shape[0]:
            kids = list(children(node))
            if greedy is not None:
                token = greedy[node + 1]
                chosen = next((c for c in kids if tokens[c] == token), None)
            else:
                chosen, token = self._branch(probs[node + 1], [tokens[c] for c in kids])
                chosen = None if chosen is None else kids[chosen]
            committed.append(token)
            if chosen is None:
                break
            path.append(chosen)
            node = chosen
        return path, committed

    def _branch(self, p: torch.Tensor, drafts: Sequence[int]) -> tuple[int | None, int]:
        """Recursive rejection of one row over distinct deterministic drafts: (index of the
        accepted draft or None, the committed token)."""
        residual = p.clone()
        for j, d in enumerate(drafts):
            mass = float(residual.sum())
            if self._uniform() < self.acceptance(float(residual[d]) / mass):
                return j, int(d)
            if float(residual[d]) < mass:  # else it held all the mass (only a biased rule)
                residual[d] = 0.0
        return None, self._draw(residual / residual.sum())


GREEDY_CHOOSER = TokenChooser()  # stateless: shared by every greedy loop
