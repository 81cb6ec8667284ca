"""Sample sources: where extraction and end-to-end evaluation take their samples from.

A source is chosen by the `_target_` of a `conf/source/*` config and instantiated with
`make_source`. Both sources share three keys: ``split``, ``start`` (first unit) and ``count``
(units taken; None = all), where a unit is a mini-world scene or a DSEC clip, all of whose
questions become samples. Samples are streamed (a DSEC split does not fit in memory), and
samples whose id is in ``skip`` come out as ``(id, None)`` without being prepared, so a resumed
extraction does no work for them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from cross_modal_sd.data.dsec import SENSOR_SIZE, DsecReader, load_questions
from cross_modal_sd.models.prompts import encode_draft_prompt, encode_target_prompt
from cross_modal_sd.pair.models import PairModels
from cross_modal_sd.pair.samples import PairSample
from cross_modal_sd.world.samples import scene_samples

Samples = Iterator[tuple[str, PairSample | None]]


class SampleSource(ABC):
    """A split of scenes or clips, each asked every question.

    Args:
        split: train | val | test.
        start: first unit (scene / clip) of the split.
        count: units taken from ``start`` (None: to the end of the split).
    """

    unit: ClassVar[str]
    name: ClassVar[str]

    def __init__(self, split: str, start: int = 0, count: int | None = None):
        if not isinstance(start, int) or start < 0:
            raise ValueError(f"source.start must be an int >= 0, got {start!r}")
        if count is not None and (not isinstance(count, int) or count < 1):
            raise ValueError(f"source.count must be an int >= 1 or null, got {count!r}")
        self.split, self.start, self.count = split, start, count

    @abstractmethod
    def samples(
        self,
        pair: PairModels,
        skip: frozenset[str] | set[str] = frozenset(),
        start: int | None = None,
        count: int | None = None,
    ) -> Samples:
        """``(sample_id, sample)`` of units ``start .. start + count - 1`` (None: the source's
        own ``start`` / ``count``); ids in ``skip`` come out as ``(id, None)``."""

    @abstractmethod
    def units(self) -> tuple[int, int]:
        """``(first, count)`` of the units this source covers (what ranks split between them)."""

    def describe(self) -> str:
        """E.g. ``mini test scenes 0..9``."""
        first, n = self.units()
        return f"{self.name} {self.split} {self.unit} {first}..{first + n - 1}"


class MiniSource(SampleSource):
    """Scenes of the mini world the pair was built with (`models=mini`)."""

    unit, name = "scenes", "mini"

    def __init__(self, split: str = "train", start: int = 0, count: int | None = 10):
        super().__init__(split, start, count)
        if count is None:
            raise ValueError("source.count must be set for the mini world (its splits are endless)")

    def units(self) -> tuple[int, int]:
        return self.start, self.count

    def samples(self, pair, skip=frozenset(), start=None, count=None) -> Samples:
        if pair.world is None:
            raise ValueError("source=mini needs the mini-world pair (models=mini)")
        tok, c = pair.tokenizer, pair.world.config
        start = self.start if start is None else start
        count = self.count if count is None else count
        for s in scene_samples(
            c.seed,
            self.split,
            count,
            c.image_size,
            c.n_frames,
            c.event_frames,
            start=start,
            event_size=c.event_size,
        ):
            if s.sample_id in skip:
                yield s.sample_id, None
                continue
            sample = PairSample(
                sample_id=s.sample_id,
                group=s.scene.scene_id,
                question_id=s.qa.qtype,
                target_ids=torch.tensor(
                    [encode_target_prompt(tok, s.qa.question, pair.n_video_tokens)]
                ),
                frames=s.frames[None],
                draft_ids=torch.tensor([encode_draft_prompt(tok, s.qa.question)]),
                event_pixels=s.event_pixels[None],
                reference=s.qa.answer,
            )
            yield s.sample_id, sample


class DsecSource(SampleSource):
    """Clips of DSEC driving sequences (`models=eventgpt_videollava`), each asked `questions`.

    Args:
        root: DSEC root (`<root>/<sequence>/` or `<root>/{train,test}/<sequence>/`).
        clip_ms / event_ms / stride_ms / n_frames / val_fraction / test_fraction / seed /
            sequences: how sequences split and clips are cut (see `DsecReader`).
        sensor_size: (height, width) of the event canvas.
        questions / questions_file: the questions asked about every clip.
    """

    unit, name = "clips", "dsec"

    def __init__(
        self,
        root: str,
        split: str = "train",
        start: int = 0,
        count: int | None = None,
        clip_ms: int = 1000,
        event_ms: int | None = None,
        stride_ms: int | None = None,
        n_frames: int = 8,
        sensor_size: Sequence[int] = SENSOR_SIZE,
        questions: Sequence[str] | None = None,
        questions_file: str | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        sequences: Mapping[str, Sequence[str]] | None = None,
    ):
        super().__init__(split, start, count)
        self.reader = DsecReader(
            root=root,
            clip_ms=clip_ms,
            event_ms=event_ms,
            stride_ms=stride_ms,
            n_frames=n_frames,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
            sequences={k: list(v or []) for k, v in dict(sequences).items()} if sequences else None,
        )
        self.questions = load_questions(questions, questions_file)
        self.sensor_size = tuple(sensor_size)

    def units(self) -> tuple[int, int]:
        total = sum(1 for _ in self.reader.clips(self.split))
        count = total - self.start if self.count is None else self.count
        return self.start, max(0, min(count, total - self.start))

    def samples(self, pair, skip=frozenset(), start=None, count=None) -> Samples:
        """Clips are read one at a time; a clip whose questions are all in `skip` is not read."""
        spec = pair.inputs
        if spec is None:
            raise ValueError("source=dsec needs the real pair (models=eventgpt_videollava)")
        if self.reader.n_frames != spec.n_frames:
            raise ValueError(
                f"source.n_frames={self.reader.n_frames} but the target reads {spec.n_frames}"
            )
        start = self.start if start is None else start
        count = self.count if count is None else count
        taken = 0
        for k, (seq, clip) in enumerate(self.reader.clips(self.split)):
            if k < start:
                continue
            if count is not None and taken >= count:
                return
            taken += 1
            ids = [f"{clip.clip_id}/q{j}" for j in range(len(self.questions))]
            if all(i in skip for i in ids):
                yield from ((i, None) for i in ids)
                continue
            data = self.reader.load(seq, clip)
            where = f"DSEC {clip.sequence} events {clip.event_window}"
            frames = spec.frames(data.frames)
            events = spec.event_pixels(data.events, self.sensor_size, where)
            for j, (sample_id, question) in enumerate(zip(ids, self.questions, strict=True)):
                if sample_id in skip:
                    yield sample_id, None
                    continue
                yield (
                    sample_id,
                    PairSample(
                        sample_id=sample_id,
                        group=clip.sequence,
                        question_id=f"q{j}",
                        target_ids=spec.target_ids(question),
                        frames=frames,
                        draft_ids=spec.draft_ids(question),
                        event_pixels=events,
                    ),
                )


def make_source(cfg: Mapping[str, Any] | DictConfig, **overrides: Any) -> SampleSource:
    """The source a `conf/source/*` node names by `_target_`, with ``overrides`` applied.

    Raises:
        ValueError: no `_target_`, or it does not name a `SampleSource`.
    """
    node = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    node.update(overrides)
    target = node.get("_target_")
    if not target:
        raise ValueError(f"source config has no _target_ (keys: {sorted(node)})")
    source = hydra.utils.instantiate(node)
    if not isinstance(source, SampleSource):
        raise ValueError(f"source._target_={target!r} is not a SampleSource")
    return source
