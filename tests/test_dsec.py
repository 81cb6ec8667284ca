"""DSEC reader on fixtures written in DSEC's layout (Blosc/zstd events.h5, PNGs, timestamps)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from cross_modal_sd.data.dsec import (
    EVENTS_FILE,
    IMAGES_DIR,
    TIMESTAMPS_FILE,
    DsecError,
    DsecReader,
    DsecSequence,
    EventFile,
    Window,
    find_sequences,
    load_questions,
    sample_frame_indices,
    split_sequences,
    write_sequence,
)
from cross_modal_sd.data.events import EventStream

T_OFFSET = 5_000_000_123  # microseconds; event times in the file are relative to it


def _events(n: int, span_us: int, seed: int = 0) -> EventStream:
    rng = np.random.default_rng(seed)
    t = np.sort(rng.integers(0, span_us, n)) + T_OFFSET
    return EventStream(
        x=rng.integers(0, 640, n), y=rng.integers(0, 480, n), t=t, p=rng.integers(0, 2, n)
    )


def _frames(n: int) -> np.ndarray:
    """Frame i is a constant image of value i, so a frame identifies itself."""
    return np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 12, 16, 3)).copy()


@pytest.fixture(scope="module")
def stream():
    return _events(5000, 20_000)


@pytest.fixture(scope="module")
def sequence_dir(tmp_path_factory, stream):
    root = tmp_path_factory.mktemp("dsec") / "zurich_city_00_a"
    stamps = T_OFFSET + 500 + 1000 * np.arange(20)  # a frame every 1 ms, from 0.5 ms on
    return write_sequence(root, stream, T_OFFSET, stamps, _frames(20), chunk_events=512)


@pytest.mark.parametrize(
    "start,end",
    [
        (2_500, 7_300),  # unaligned to ms
        (3_000, 3_001),  # one microsecond
        (-1_000, 900),  # starts before the recording
        (19_000, 40_000),  # ends after it
        (25_000, 26_000),  # entirely after it: empty
    ],
)
def test_window_read_equals_brute_force_selection(sequence_dir, stream, start, end):
    with EventFile(sequence_dir / EVENTS_FILE) as f:
        assert f.t_offset == T_OFFSET
        got = f.read(Window(T_OFFSET + start, T_OFFSET + end))
    keep = (stream.t >= T_OFFSET + start) & (stream.t < T_OFFSET + end)
    for name in ("x", "y", "t", "p"):
        np.testing.assert_array_equal(getattr(got, name), getattr(stream, name)[keep])


def test_window_bounds_include_start_and_exclude_end(sequence_dir, stream):
    t = int(stream.t[1234])
    with EventFile(sequence_dir / EVENTS_FILE) as f:
        at_start = f.read(Window(t, t + 1))
        before = f.read(Window(t - 10, t))
    assert len(at_start) == int((stream.t == t).sum()) and (at_start.t == t).all()
    assert (before.t < t).all() and len(before) == int(
        ((stream.t >= t - 10) & (stream.t < t)).sum()
    )


def test_fixture_is_blosc_zstd_compressed_like_dsec(sequence_dir):
    with h5py.File(sequence_dir / EVENTS_FILE, "r") as f:
        assert "32001" in f["events/t"]._filters  # HDF5 filter id of Blosc
        assert f["events/t"].dtype == np.uint32 and f["t_offset"][()] == T_OFFSET


def test_events_file_missing_dataset_is_named(tmp_path):
    path = tmp_path / "events.h5"
    with h5py.File(path, "w") as f:
        for name in ("events/x", "events/y", "events/t", "events/p", "t_offset"):
            f.create_dataset(name, data=np.zeros(3, dtype=np.int64))
    with pytest.raises(DsecError, match=r"missing dataset\(s\) \['ms_to_idx'\]"):
        EventFile(path)
    with pytest.raises(FileNotFoundError, match="events file not found"):
        EventFile(tmp_path / "absent.h5")


def test_uniform_frame_sampling():
    np.testing.assert_array_equal(sample_frame_indices(20, 8), [0, 3, 5, 8, 11, 14, 16, 19])
    np.testing.assert_array_equal(sample_frame_indices(1, 3), [0, 0, 0])
    with pytest.raises(ValueError, match="cannot sample 8 frames from 0"):
        sample_frame_indices(0, 8)


def test_clip_frames_and_event_window(sequence_dir, stream):
    reader = DsecReader(
        sequence_dir.parent, clip_ms=10, event_ms=2, n_frames=4, val_fraction=0, test_fraction=0
    )
    clips = list(reader.clips("train"))
    # Frames from 0.5 ms to 19.5 ms, events up to < 20 ms: clips start at frame 0 every 10 ms.
    assert [c.window for _, c in clips] == [Window(T_OFFSET + 500, T_OFFSET + 10_500)]
    seq, clip = clips[0]
    assert clip.event_window == Window(T_OFFSET + 8_500, T_OFFSET + 10_500)
    data = reader.load(seq, clip)
    # Frames 0..9 lie in the window; four sampled uniformly are 0, 3, 6, 9.
    assert data.frames.shape == (4, 12, 16, 3)
    assert data.frames[:, 0, 0, 0].tolist() == [0, 3, 6, 9]
    keep = (stream.t >= T_OFFSET + 8_500) & (stream.t < T_OFFSET + 10_500)
    np.testing.assert_array_equal(data.events.t, stream.t[keep])
    assert clip.clip_id == f"zurich_city_00_a/{T_OFFSET + 500}"


def test_window_without_images_names_the_sequence(sequence_dir):
    seq = DsecSequence(sequence_dir)
    with pytest.raises(
        DsecError, match=r"zurich_city_00_a: no images in \[.*images/left/rectified"
    ):
        seq.frames(Window(T_OFFSET + 100_000, T_OFFSET + 200_000), 8)


def test_sequence_missing_pieces_are_named(tmp_path, stream):
    root = write_sequence(
        tmp_path / "seq_a", stream, T_OFFSET, [T_OFFSET, T_OFFSET + 10], _frames(2)
    )
    (root / IMAGES_DIR / "000001.png").unlink()
    with pytest.raises(DsecError, match="1 PNG files .* but 2 timestamps"):
        DsecSequence(root)
    (root / TIMESTAMPS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="seq_a: no images/timestamps.txt"):
        DsecSequence(root)
    with pytest.raises(FileNotFoundError, match=f"seq_b: no {EVENTS_FILE}"):
        DsecSequence(tmp_path / "seq_b")


def test_split_by_sequence_is_disjoint_seeded_and_explicit_lists_are_checked():
    names = [f"seq_{i:02d}" for i in range(20)]
    split = split_sequences(names, val_fraction=0.1, test_fraction=0.2, seed=0)
    assert [len(split[s]) for s in ("train", "val", "test")] == [14, 2, 4]
    assert sorted(sum(split.values(), [])) == names
    assert split == split_sequences(list(reversed(names)), 0.1, 0.2, seed=0)
    assert split != split_sequences(names, 0.1, 0.2, seed=1)
    explicit = {"train": ["seq_00"], "test": ["seq_01"]}
    assert split_sequences(names, 0, 0, 0, explicit) == {
        "train": ["seq_00"],
        "val": [],
        "test": ["seq_01"],
    }
    with pytest.raises(ValueError, match=r"sequence\(s\) \['seq_00'\] in more than one split"):
        split_sequences(names, 0, 0, 0, {"train": ["seq_00"], "val": ["seq_00"]})
    with pytest.raises(ValueError, match=r"sequence\(s\) \['nope'\] not found on disk"):
        split_sequences(names, 0, 0, 0, {"train": ["nope"]})


def test_sequences_are_found_one_level_down_and_names_must_be_unique(tmp_path, stream):
    for split in ("train", "test"):
        write_sequence(tmp_path / split / f"{split}_seq", stream, T_OFFSET, [T_OFFSET], _frames(1))
    assert sorted(find_sequences(tmp_path)) == ["test_seq", "train_seq"]
    write_sequence(tmp_path / "test" / "train_seq", stream, T_OFFSET, [T_OFFSET], _frames(1))
    with pytest.raises(DsecError, match="two DSEC sequences named 'train_seq'"):
        find_sequences(tmp_path)


def test_questions_inline_or_from_a_file(tmp_path):
    assert load_questions(["a?", "b?"], None) == ["a?", "b?"]
    path = tmp_path / "q.json"
    path.write_text('[{"question": "what?"}, "why?"]')
    assert load_questions(None, str(path)) == ["what?", "why?"]
    with pytest.raises(ValueError, match="exactly one of data.questions and data.questions_file"):
        load_questions(["a?"], str(path))
