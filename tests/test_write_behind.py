"""write_behind.WriteBehind: the groups are written in order on the worker while the caller goes on, the worker's
error reaches the caller, and leaving on an error drops what waits without writing beside the caller's clean-up."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from scail2_lite import media
from scail2_lite.write_behind import WriteBehind

from tests.test_media import smooth_video


def groups(n: int) -> list[np.ndarray]:
    return [np.full((2, 4, 4, 3), i, np.uint8) for i in range(n)]


def test_groups_are_written_in_order_and_counted() -> None:
    written, told = [], []
    with WriteBehind(written.append, depth=2, on_written=told.append) as writes:
        for g in groups(7):
            writes.put(g)
    assert [int(g[0, 0, 0, 0]) for g in written] == list(range(7))
    assert writes.frames_written == 14 and told == list(range(2, 15, 2))
    assert writes.seconds >= 0.0 and writes.waited >= 0.0


def test_puts_return_while_the_worker_is_still_writing() -> None:
    """The writer holds its first group until the caller has handed over `depth` more: were `put` synchronous,
    the release would come only after the wait timed out."""
    release, held = threading.Event(), []

    def write(frames: np.ndarray) -> None:
        held.append(release.wait(timeout=30))

    with WriteBehind(write, depth=3) as writes:
        for g in groups(4):  # the first goes to the worker, three wait
            writes.put(g)
        release.set()
    assert held == [True] * 4


@pytest.mark.parametrize("at", ["put", "finish"])
def test_the_workers_error_reaches_the_caller(at: str) -> None:
    seen = []

    def write(frames: np.ndarray) -> None:
        seen.append(int(frames[0, 0, 0, 0]))
        if frames[0, 0, 0, 0] == 1:
            raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        with WriteBehind(write, depth=1) as writes:
            writes.put(groups(2)[0])
            writes.put(groups(2)[1])
            if at == "put":
                for g in groups(50):  # raised at a put before these are all handed over
                    writes.put(g)
    assert seen[:2] == [0, 1] and 1 not in seen[2:]  # nothing is written after the error


def test_an_error_in_the_caller_drops_the_waiting_groups() -> None:
    started, release, written = threading.Event(), threading.Event(), []

    def write(frames: np.ndarray) -> None:
        started.set()
        release.wait(timeout=30)
        written.append(frames)

    with pytest.raises(KeyboardInterrupt):
        with WriteBehind(write, depth=5) as writes:
            for g in groups(6):
                writes.put(g)
            started.wait(timeout=30)
            threading.Timer(0.5, release.set).start()  # long after the drop below
            raise KeyboardInterrupt
    assert len(written) == 1  # the group being written when the caller stopped; the five waiting were dropped


def test_a_video_written_behind_holds_the_in_line_writers_frames(tmp_path) -> None:
    """The encoder gets the in-line writer's frames, in order, and the file decodes to them. x264 does not repeat its
    bytes for this small pattern, even on one thread (two encodes decoded 0.011 apart; bench_video_bytes.py), so
    each file is held to the source within the codec's loss (0.019 here), far below a swapped group (0.29) or a
    frame off (0.08)."""
    video = smooth_video()
    media.write_video(tmp_path / "inline.mp4", video, fps=16)
    handed: list[np.ndarray] = []
    with media.VideoWriter(tmp_path / "behind.mp4", 16, (64, 64)) as writer:
        def write(frames: np.ndarray) -> None:
            handed.append(frames.copy())
            writer.write_rgb(frames)

        with WriteBehind(write, depth=2) as writes:
            for group in video.split(4, dim=1):
                writes.put(media.to_uint8(group))
    assert np.array_equal(np.concatenate(handed), media.to_uint8(video))
    for name in ("behind.mp4", "inline.mp4"):
        back = media.read_video(tmp_path / name)[0]
        assert back.shape == video.shape and (back - video).abs().mean() < 0.04, name
