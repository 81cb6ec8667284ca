"""DSEC reader: event windows from `events.h5`, left RGB frames, clips and sequence splits.

A DSEC sequence directory holds::

    events/left/events.h5        events/{x,y,t,p}, ms_to_idx, t_offset (Blosc/zstd via hdf5plugin)
    images/left/rectified/*.png  left RGB frames, in time order
    images/timestamps.txt        one timestamp per frame (microseconds, same clock as t_offset + t)

Event times in the file are relative to `t_offset`; this module hands out absolute times, so events
and frames share one clock. `ms_to_idx[m]` is the index of the first event at or after m ms, so a
window is found by reading two entries of it and one short slice of `t`: a recording is never
loaded whole, and memory stays bounded by the largest window read.

A *clip* is a window of `clip_ms` (1 s in the prior system) from which `n_frames` frames are
sampled uniformly; the draft reads the events of its last `event_ms` (50 ms: EventGPT's trained
regime; None: the whole clip). Splits assign whole sequences, never clips, to train/val/test.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cross_modal_sd.data.events import EventStream

SENSOR_SIZE = (480, 640)  # (height, width) of DSEC's event cameras
EVENTS_FILE = "events/left/events.h5"
IMAGES_DIR = "images/left/rectified"
TIMESTAMPS_FILE = "images/timestamps.txt"
EVENT_DATASETS = ("events/x", "events/y", "events/t", "events/p", "ms_to_idx", "t_offset")
SPLITS = ("train", "val", "test")


class DsecError(ValueError):
    """A DSEC directory or file that lacks what a clip needs; the message names what is missing."""


@dataclass(frozen=True)
class Window:
    """A half-open time interval [start_us, end_us) in absolute microseconds."""

    start_us: int
    end_us: int

    def __str__(self) -> str:
        return f"[{self.start_us}, {self.end_us}) us"


class EventFile:
    """One DSEC `events.h5`, read window by window.

    Args:
        path: the `events.h5` file.

    Raises:
        FileNotFoundError: no such file.
        DsecError: a required dataset is missing.
    """

    def __init__(self, path: str | Path):
        import h5py
        import hdf5plugin  # noqa: F401 - registers the Blosc/zstd filters DSEC files are written with

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"DSEC events file not found: {self.path}")
        self._file = h5py.File(self.path, "r")
        missing = [name for name in EVENT_DATASETS if name not in self._file]
        if missing:
            self._file.close()
            raise DsecError(f"{self.path}: missing dataset(s) {missing}")
        self.t_offset = int(self._file["t_offset"][()])
        self._t = self._file["events/t"]
        self._ms_to_idx = self._file["ms_to_idx"]
        self.n_events = len(self._t)

    def time_range(self) -> Window:
        """Absolute [first event, last event + 1) of the recording (empty window if no events)."""
        if self.n_events == 0:
            return Window(self.t_offset, self.t_offset)
        return Window(int(self._t[0]) + self.t_offset, int(self._t[-1]) + self.t_offset + 1)

    def _index_at_ms(self, ms: int) -> int:
        """Index of the first event at or after `ms` milliseconds (relative time)."""
        if ms <= 0:
            return 0
        if ms >= len(self._ms_to_idx):
            return self.n_events
        return int(self._ms_to_idx[ms])

    def read(self, window: Window) -> EventStream:
        """Events with window.start_us <= t < window.end_us (absolute times in the stream)."""
        start = window.start_us - self.t_offset
        end = window.end_us - self.t_offset
        if end <= start or self.n_events == 0:
            return _empty_stream()
        # ms_to_idx brackets the window to within a millisecond at either end; one short read of
        # `t` then finds the exact bounds.
        lo = self._index_at_ms(start // 1000)
        hi = self._index_at_ms(-(-end // 1000))
        t = self._t[lo:hi].astype(np.int64)
        a = lo + int(np.searchsorted(t, start, side="left"))
        b = lo + int(np.searchsorted(t, end, side="left"))
        f = self._file
        return EventStream(
            x=f["events/x"][a:b].astype(np.int64),
            y=f["events/y"][a:b].astype(np.int64),
            t=t[a - lo : b - lo] + self.t_offset,
            p=f["events/p"][a:b].astype(np.int64),
        )

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> EventFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _empty_stream() -> EventStream:
    empty = np.zeros(0, dtype=np.int64)
    return EventStream(empty, empty, empty, empty)


def sample_frame_indices(n_available: int, n_frames: int) -> np.ndarray:
    """Uniform frame sampling, used at extraction and evaluation alike.

    Picks `n_frames` of `n_available` time-ordered frames at evenly spaced positions from the
    first to the last (rounded to the nearest frame); with fewer frames than asked, frames repeat.

    Raises:
        ValueError: if there are no frames or n_frames < 1.
    """
    if n_available < 1 or n_frames < 1:
        raise ValueError(f"cannot sample {n_frames} frames from {n_available}")
    return np.linspace(0, n_available - 1, n_frames).round().astype(np.int64)


class DsecSequence:
    """One sequence directory: its events file, frames and frame timestamps.

    Raises:
        FileNotFoundError: the events file, the timestamps file or the images directory is missing.
        DsecError: frame files and timestamps disagree in number, or timestamps are not increasing.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.name = self.root.name
        self.events_path = self.root / EVENTS_FILE
        if not self.events_path.is_file():
            raise FileNotFoundError(f"DSEC sequence {self.name}: no {EVENTS_FILE} in {self.root}")
        stamps = self.root / TIMESTAMPS_FILE
        if not stamps.is_file():
            raise FileNotFoundError(
                f"DSEC sequence {self.name}: no {TIMESTAMPS_FILE} in {self.root}"
            )
        images = self.root / IMAGES_DIR
        if not images.is_dir():
            raise FileNotFoundError(f"DSEC sequence {self.name}: no {IMAGES_DIR}/ in {self.root}")
        self.timestamps = np.loadtxt(stamps, dtype=np.int64, comments="#", ndmin=1)
        self.image_paths = sorted(images.glob("*.png"))
        if len(self.image_paths) != len(self.timestamps):
            raise DsecError(
                f"DSEC sequence {self.name}: {len(self.image_paths)} PNG files in {images} but "
                f"{len(self.timestamps)} timestamps in {stamps}"
            )
        if len(self.timestamps) and np.any(np.diff(self.timestamps) <= 0):
            raise DsecError(f"DSEC sequence {self.name}: timestamps in {stamps} are not increasing")
        self._events: EventFile | None = None

    @property
    def events(self) -> EventFile:
        """The events file, opened on first use and kept open."""
        if self._events is None:
            self._events = EventFile(self.events_path)
        return self._events

    def clip_windows(self, clip_us: int, stride_us: int) -> list[Window]:
        """Clips starting at the first frame every `stride_us`, inside both frames and events."""
        if clip_us < 1 or stride_us < 1:
            raise ValueError(f"clip and stride must be positive, got {clip_us} and {stride_us} us")
        if len(self.timestamps) == 0:
            return []
        span = self.events.time_range()
        first = max(int(self.timestamps[0]), span.start_us)
        last = min(int(self.timestamps[-1]) + 1, span.end_us)
        starts = range(first, last - clip_us + 1, stride_us)
        return [Window(s, s + clip_us) for s in starts]

    def frame_indices(self, window: Window, n_frames: int) -> np.ndarray:
        """Indices of the `n_frames` frames sampled in `window`.

        Raises:
            DsecError: no frame has a timestamp in the window.
        """
        lo, hi = np.searchsorted(self.timestamps, [window.start_us, window.end_us], side="left")
        if hi <= lo:
            raise DsecError(
                f"DSEC sequence {self.name}: no images in {window} "
                f"({self.root / IMAGES_DIR}, timestamps {self.root / TIMESTAMPS_FILE})"
            )
        return lo + sample_frame_indices(int(hi - lo), n_frames)

    def frames(self, window: Window, n_frames: int) -> np.ndarray:
        """uint8 (n_frames, H, W, 3) RGB frames sampled uniformly in `window`."""
        from PIL import Image

        out = []
        for i in self.frame_indices(window, n_frames):
            with Image.open(self.image_paths[i]) as img:
                out.append(np.asarray(img.convert("RGB")))
        return np.stack(out)

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None


@dataclass(frozen=True)
class Clip:
    """One clip of one sequence: frames are sampled in `window`, events read in `event_window`."""

    sequence: str
    window: Window
    event_window: Window

    @property
    def clip_id(self) -> str:
        return f"{self.sequence}/{self.window.start_us}"


@dataclass(frozen=True)
class ClipData:
    """What both models read about a clip: its events and its sampled RGB frames."""

    clip: Clip
    events: EventStream
    frames: np.ndarray  # uint8 (F, H, W, 3)


def find_sequences(root: str | Path) -> dict[str, Path]:
    """Sequence directories under `root` (directly, or one level down as in train/ and test/).

    Raises:
        FileNotFoundError: `root` does not exist or holds no sequence.
        DsecError: two sequences share a name.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"DSEC root not found: {root}")
    found: dict[str, Path] = {}
    for events in sorted([*root.glob(f"*/{EVENTS_FILE}"), *root.glob(f"*/*/{EVENTS_FILE}")]):
        seq = events.parents[2]
        if seq.name in found:
            raise DsecError(f"two DSEC sequences named {seq.name!r}: {found[seq.name]} and {seq}")
        found[seq.name] = seq
    if not found:
        raise FileNotFoundError(f"no DSEC sequence under {root} (looked for */{EVENTS_FILE})")
    return found


def split_sequences(
    names: Sequence[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    explicit: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, list[str]]:
    """Assigns whole sequences to train/val/test.

    Without `explicit`, sequences are ranked by ``sha256(f"{seed}:{name}")``; the first
    ``round(test_fraction * N)`` go to test, the next ``round(val_fraction * N)`` to val (each at
    least one when its fraction is positive), the rest to train.

    Raises:
        ValueError: bad fractions, or an explicit split naming an unknown split, an unknown
            sequence, or one sequence twice.
    """
    names = sorted(set(names))
    if explicit is not None:
        unknown_splits = sorted(set(explicit) - set(SPLITS))
        if unknown_splits:
            raise ValueError(
                f"explicit DSEC split has unknown split(s) {unknown_splits}; use {SPLITS}"
            )
        out = {s: sorted(explicit.get(s) or []) for s in SPLITS}
        listed = [n for s in SPLITS for n in out[s]]
        twice = sorted({n for n in listed if listed.count(n) > 1})
        if twice:
            raise ValueError(f"explicit DSEC split puts sequence(s) {twice} in more than one split")
        absent = sorted(set(listed) - set(names))
        if absent:
            raise ValueError(f"explicit DSEC split names sequence(s) {absent} not found on disk")
        return out
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"need val_fraction, test_fraction >= 0 with a sum below 1, got {val_fraction}, "
            f"{test_fraction}"
        )
    counts = []
    for fraction in (test_fraction, val_fraction):
        n = round(fraction * len(names))
        counts.append(max(n, 1) if fraction > 0 else n)
    ranked = sorted(names, key=lambda n: hashlib.sha256(f"{seed}:{n}".encode()).hexdigest())
    n_test, n_val = counts
    return {
        "train": sorted(ranked[n_test + n_val :]),
        "val": sorted(ranked[n_test : n_test + n_val]),
        "test": sorted(ranked[:n_test]),
    }


def load_questions(questions: Sequence[str] | None, questions_file: str | None) -> list[str]:
    """The question list: inline, or a JSON file of strings or of {"question": ...} records.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: neither is given, both are, or the file holds something else.
    """
    if bool(questions) == bool(questions_file):
        raise ValueError("give exactly one of data.questions and data.questions_file")
    if questions:
        return [str(q) for q in questions]
    path = Path(questions_file)
    if not path.is_file():
        raise FileNotFoundError(f"questions file not found: {path}")
    raw = json.loads(path.read_text())
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{path}: expected a non-empty JSON list of questions")
    out = []
    for item in raw:
        q = item.get("question") if isinstance(item, dict) else item
        if not isinstance(q, str) or not q:
            raise ValueError(
                f"{path}: entry {item!r} is neither a string nor a {{'question': str}}"
            )
        out.append(q)
    return out


class DsecReader:
    """Clips of a DSEC root, split by sequence, streamed one clip at a time.

    Args:
        root: DSEC root (sequence directories directly below it or one level down).
        clip_ms: clip length; frames are sampled over the whole clip.
        event_ms: the draft reads the events of the clip's last `event_ms`; None: the whole clip.
        stride_ms: distance between clip starts (None: `clip_ms`, non-overlapping clips).
        n_frames: frames sampled per clip.
        val_fraction, test_fraction, seed, sequences: the sequence split (see `split_sequences`).
    """

    def __init__(
        self,
        root: str | Path,
        clip_ms: float = 1000,
        event_ms: float | None = None,
        stride_ms: float | None = None,
        n_frames: int = 8,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        sequences: Mapping[str, Sequence[str]] | None = None,
    ):
        self.root = Path(root)
        self.clip_us = round(clip_ms * 1000)
        self.event_us = None if event_ms is None else round(event_ms * 1000)
        self.stride_us = self.clip_us if stride_ms is None else round(stride_ms * 1000)
        if self.event_us is not None and not 0 < self.event_us <= self.clip_us:
            raise ValueError(f"event_ms must lie in (0, clip_ms={clip_ms}], got {event_ms}")
        self.n_frames = n_frames
        self.paths = find_sequences(self.root)
        self.splits = split_sequences(
            list(self.paths), val_fraction, test_fraction, seed, sequences
        )

    @classmethod
    def from_config(cls, data_cfg: Mapping) -> DsecReader:
        """Builds the reader from a `conf/data/dsec.yaml` node."""
        sequences = data_cfg.get("sequences")
        if sequences is not None:
            sequences = {k: list(v or []) for k, v in dict(sequences).items()}
        return cls(
            root=data_cfg["root"],
            clip_ms=data_cfg["clip_ms"],
            event_ms=data_cfg.get("event_ms"),
            stride_ms=data_cfg.get("stride_ms"),
            n_frames=data_cfg.get("n_frames", 8),
            val_fraction=data_cfg.get("val_fraction", 0.1),
            test_fraction=data_cfg.get("test_fraction", 0.1),
            seed=data_cfg.get("seed", 0),
            sequences=sequences,
        )

    def clips(self, split: str) -> Iterator[tuple[DsecSequence, Clip]]:
        """Clips of a split, sequence by sequence in name order (one sequence open at a time)."""
        if split not in self.splits:
            raise ValueError(f"unknown DSEC split {split!r}; known: {SPLITS}")
        for name in self.splits[split]:
            seq = DsecSequence(self.paths[name])
            try:
                for window in seq.clip_windows(self.clip_us, self.stride_us):
                    ev_start = (
                        window.start_us if self.event_us is None else window.end_us - self.event_us
                    )
                    yield seq, Clip(name, window, Window(ev_start, window.end_us))
            finally:
                seq.close()

    def load(self, seq: DsecSequence, clip: Clip) -> ClipData:
        """Reads the clip's events and sampled frames."""
        return ClipData(
            clip, seq.events.read(clip.event_window), seq.frames(clip.window, self.n_frames)
        )


def write_sequence(
    root: str | Path,
    events: EventStream,
    t_offset: int,
    image_timestamps: Sequence[int],
    images: np.ndarray,
    chunk_events: int = 4096,
) -> Path:
    """Writes a sequence in DSEC's layout (Blosc/zstd-compressed `events.h5`, PNGs, timestamps).

    For building test fixtures and converting other recordings; `events.t` are absolute
    microseconds, stored relative to `t_offset` as DSEC does, with `ms_to_idx` computed from them.

    Args:
        root: the sequence directory to create.
        events: time-sorted events with absolute timestamps >= t_offset.
        t_offset: the recording's time offset (microseconds).
        image_timestamps: one absolute timestamp per image.
        images: uint8 (N, H, W, 3) RGB frames.
        chunk_events: HDF5 chunk length of the event datasets.
    """
    import h5py
    import hdf5plugin
    from PIL import Image

    root = Path(root)
    t_rel = np.asarray(events.t, dtype=np.int64) - t_offset
    if len(t_rel) and (t_rel.min() < 0 or np.any(np.diff(t_rel) < 0)):
        raise ValueError("events must be time-sorted and not earlier than t_offset")
    n_ms = int(t_rel[-1] // 1000) + 2 if len(t_rel) else 1
    ms_to_idx = np.searchsorted(t_rel, np.arange(n_ms) * 1000, side="left").astype(np.uint64)
    path = root / EVENTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    blosc = hdf5plugin.Blosc(cname="zstd", clevel=1, shuffle=hdf5plugin.Blosc.SHUFFLE)
    chunks = (max(1, min(chunk_events, len(t_rel))),)
    with h5py.File(path, "w") as f:
        for name, values, dtype in (
            ("x", events.x, np.uint16),
            ("y", events.y, np.uint16),
            ("t", t_rel, np.uint32),
            ("p", events.p, np.uint8),
        ):
            f.create_dataset(
                f"events/{name}", data=np.asarray(values, dtype=dtype), chunks=chunks, **blosc
            )
        f.create_dataset("ms_to_idx", data=ms_to_idx)
        f.create_dataset("t_offset", data=np.int64(t_offset))
    (root / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(root / IMAGES_DIR / f"{i:06d}.png")
    (root / TIMESTAMPS_FILE).write_text("".join(f"{int(t)}\n" for t in image_timestamps))
    return root
