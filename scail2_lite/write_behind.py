"""Writing frames behind the work that makes them: one worker thread runs a writer's calls in their order, so that
encoding the mp4 (CPU: colour conversion and H.264) overlaps the GPU work of the run, whose host thread mostly waits.
Written synchronously, the video's encoding added to the run instead. An untiled VAE decode streams its frames, so
they are encoded while it decodes the next; a tiled one streams its last tile's (blended with the tiles before), and
what is left is encoded while the next segment runs. The last segment's wait on the encoder is the run's "video
write" phase: x264 holds back about its look-ahead (40 frames at `medium`) until the file is finished.

Only what is handed over moves to the worker; when the frames are written is the caller's: `put` returns at once
unless `depth` groups already wait (then it blocks, and that time is `waited`), `finish` waits for the rest. The
first error on the worker comes back to the caller at its next `put` or at `finish`, as raised there. Leaving the
context on an exception (or Ctrl-C) drops the waiting groups and waits only for the one being written, so the
writer's own exit (the atomic file's discard) never runs beside a write.
"""

from __future__ import annotations

import queue
import threading
import time
from types import TracebackType
from typing import Callable

import numpy as np


class WriteBehind:
    """`write(frames)` calls on a worker thread, for 8-bit frame groups (t, H, W, 3): a segment's worth waiting (81
    frames at 704p) is 219 MB of RAM. `on_written(frames written so far)` is called on the worker after each group
    (a progress task's update). `seconds`: the worker's time in `write`; `waited`: the caller's time blocked in
    `put` and `finish`, what the overlap did not hide."""

    def __init__(self, write: Callable[[np.ndarray], None], depth: int,
                 on_written: Callable[[int], None] | None = None) -> None:
        self._write = write
        self._on_written = on_written
        self._queue: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="write-behind", daemon=True)
        self._error: BaseException | None = None
        self._cancelled = threading.Event()
        self.frames_written = 0
        self.seconds = 0.0
        self.waited = 0.0

    def __enter__(self) -> "WriteBehind":
        self._thread.start()
        return self

    def put(self, frames: np.ndarray) -> None:
        """Hand one group to the worker; it must not be changed in place afterwards."""
        self._raise_error()
        self._blocking(lambda: self._queue.put(frames))
        self._raise_error()

    def finish(self) -> None:
        """Wait until every group handed over is written; raise the worker's error, if any."""
        if self._thread.is_alive():
            self._blocking(lambda: (self._queue.put(None), self._thread.join()))
        self._raise_error()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.finish()
            return
        self._cancelled.set()
        while True:  # drop what waits; the worker sees the sentinel after its current group
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        self._thread.join()

    def _blocking(self, fn: Callable[[], object]) -> None:
        t = time.perf_counter()
        try:
            fn()
        finally:
            self.waited += time.perf_counter() - t

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (frames := self._queue.get()) is not None:
            if self._cancelled.is_set() or self._error is not None:
                continue  # drain until the sentinel: a later put must not block on a dead worker
            t = time.perf_counter()
            try:
                self._write(frames)
            except BaseException as e:  # handed to the caller's thread, raised there
                self._error = e
                continue
            finally:
                self.seconds += time.perf_counter() - t
            self.frames_written += len(frames)
            if self._on_written is not None:
                self._on_written(self.frames_written)
