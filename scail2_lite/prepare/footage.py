"""The user's pictures as uint8 RGB arrays, frame by frame, and the files `prepare` writes from them.

Frames are decoded one at a time (a long video never sits in memory). The driving video is copied byte for
byte when it is used whole, so `generate` reads exactly the frames that were segmented; a trimmed one is
re-encoded. Masks are PNG files (indexed colour, lossless), so reading them back gives exactly the colours
written, and any image editor can touch them up.
"""

from __future__ import annotations

import queue
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import av
import numpy as np
import torch
from PIL import Image

from .. import media
from ..config import DEFAULT_FPS
from ..errors import UserError

# PNG's fastest deflate level: masks are flat colour and still compress about 100:1.
PNG_COMPRESSION = 1


def read_picture(path: Path) -> np.ndarray:
    """An image file -> uint8 (H, W, 3), as `generate` reads it (EXIF rotation applied, alpha dropped)."""
    image = media.read_image(path)
    return image.add(1).mul(127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def write_png(path: Path, picture: np.ndarray | Image.Image) -> None:
    """uint8 RGB array or a PIL picture (masks are palette pictures) -> PNG."""
    if isinstance(picture, np.ndarray):
        picture = Image.fromarray(picture)
    picture.save(path, format="PNG", compress_level=PNG_COMPRESSION)


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def frame_files(folder: Path) -> list[Path]:
    """The images of a frame folder in the order `generate` reads them (natural: 2 before 10)."""
    files = [p for p in folder.iterdir() if p.suffix.lower() in media.IMAGE_SUFFIXES]
    return sorted(files, key=lambda p: _natural_key(p.name))


@dataclass(frozen=True)
class Video:
    """A driving video (file or frame folder) and how much of it is used."""

    path: Path
    fps: float
    size: tuple[int, int]  # (height, width) of the frames
    limit: int | None = None  # first N frames only
    count: int | None = None  # frames that will be read, when the container says (for progress bars)

    @classmethod
    def open(cls, path: Path, limit: int | None = None) -> "Video":
        """Probe without decoding; `limit` trims to the first N frames, cut to 4k+1 (the model's frame rule)."""
        path = Path(path)
        if limit is not None:
            limit = (limit - 1) // 4 * 4 + 1
        if path.is_dir():
            files = frame_files(path)
            if not files:
                raise UserError(f"{path}: folder has no images ({', '.join(media.IMAGE_SUFFIXES)})")
            count = len(files) if limit is None else min(limit, len(files))
            return cls(path, float(DEFAULT_FPS), media.video_size(path), limit, count)
        if not path.is_file():
            raise UserError(f"{path}: file not found")
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise UserError(f"{path}: no video stream")
                stream = container.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate
                size = (stream.codec_context.height, stream.codec_context.width)
                count = stream.frames or None
        except av.FFmpegError as e:
            raise UserError(f"{path}: cannot read video ({e})") from None
        if count is not None and limit is not None:
            count = min(count, limit)
        return cls(path, float(rate) if rate else float(DEFAULT_FPS), size, limit, count or limit)

    @property
    def trimmed(self) -> bool:
        return self.limit is not None

    def frames(self) -> Iterator[np.ndarray]:
        """uint8 (H, W, 3) frames, decoded one at a time, up to `limit`."""
        if self.path.is_dir():
            for i, file in enumerate(frame_files(self.path)):
                if self.limit is not None and i >= self.limit:
                    return
                frame = read_picture(file)
                if frame.shape[:2] != self.size:
                    raise UserError(f"{file}: size {frame.shape[1]}x{frame.shape[0]} differs from the first frame's")
                yield frame
            return
        try:
            with av.open(str(self.path)) as container:
                for i, frame in enumerate(container.decode(container.streams.video[0])):
                    if self.limit is not None and i >= self.limit:
                        return
                    yield frame.to_ndarray(format="rgb24")
        except av.FFmpegError as e:
            raise UserError(f"{self.path}: cannot read video ({e})") from None


class DrivingCopy:
    """Writes the driving video into the output folder: a byte copy when used whole, else the first frames
    re-encoded (H.264, at the source frame rate; odd sizes lose their last row/column, the masks too)."""

    def __init__(self, video: Video, folder: Path):
        self.video = video
        if video.path.is_dir():
            self.path = folder / "driving"
        elif video.trimmed:
            self.path = folder / "driving.mp4"
        else:
            self.path = folder / f"driving{video.path.suffix.lower()}"
        self._writer: media.VideoWriter | None = None
        self._files = frame_files(video.path) if video.path.is_dir() else []
        self.count = 0

    @property
    def size(self) -> tuple[int, int]:
        """Size of the frames as written (and as the masks must be)."""
        h, w = self.video.size
        return (h - h % 2, w - w % 2) if self._encodes else (h, w)

    @property
    def _encodes(self) -> bool:
        return self.video.trimmed and not self.video.path.is_dir()

    def crop(self, frame: np.ndarray) -> np.ndarray:
        h, w = self.size
        return frame[:h, :w]

    def __enter__(self) -> "DrivingCopy":
        if self.video.path.is_dir():
            self.path.mkdir()
        elif self._encodes:
            self._writer = media.VideoWriter(self.path, self.video.fps, self.size).__enter__()
        return self

    def add(self, frame: np.ndarray) -> None:
        """Frame `count` (already cropped to `size`) was used."""
        if self.video.path.is_dir():
            src = self._files[self.count]
            shutil.copyfile(src, self.path / src.name)
        elif self._writer is not None:
            x = torch.from_numpy(frame).permute(2, 0, 1)[:, None].float().div_(127.5).sub_(1.0)
            self._writer.write(x)
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._writer is not None:
            self._writer.__exit__(exc_type, exc, tb)
        elif exc_type is None and not self.video.path.is_dir():
            shutil.copyfile(self.video.path, self.path)


_DONE = object()


def prefetched(items: Iterator, depth: int = 4) -> Iterator:
    """`items`, produced by a background thread up to `depth` ahead: decoding releases the GIL, so the next
    frames are decoded while this one is segmented. Errors surface in the consumer; stopping early stops
    the thread."""
    box: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        box.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            box.put((_DONE, None))
        except BaseException as e:  # handed to the consumer, raised there
            box.put((_DONE, e))

    worker = threading.Thread(target=produce, daemon=True)
    worker.start()
    try:
        while True:
            item, error = box.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():
            try:
                box.get(timeout=0.1)
            except queue.Empty:
                pass
        worker.join()


class BackgroundWriter:
    """Writes PNGs on a worker thread (PNG compression releases the GIL) while the next frame is computed.
    `close` waits for the queue and raises the first error; leaving the block by an exception drops what
    is still queued."""

    def __init__(self, depth: int = 8):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, daemon=True)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is None:
                try:
                    write_png(*job)
                except BaseException as e:
                    self._error = e

    def __enter__(self) -> "BackgroundWriter":
        self._thread.start()
        return self

    def write(self, path: Path, picture: Image.Image) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((path, picture))

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._error = self._error or exc
        self._queue.put(None)
        self._thread.join()
        if exc_type is None and self._error is not None:
            raise self._error


class EvenSample:
    """Keeps about `keep` items spread evenly over a stream of unknown length (for the preview grid): every
    `stride`-th item is kept, and when too many are held every other one goes and the stride doubles."""

    def __init__(self, keep: int):
        self.keep = keep
        self.stride = 1
        self.items: list[tuple[int, object]] = []

    def offer(self, index: int, make) -> None:
        """Keep item `index` if it falls on the stride; `make()` builds it only then."""
        if index % self.stride:
            return
        self.items.append((index, make()))
        if len(self.items) > 2 * self.keep:
            self.stride *= 2
            self.items = [(i, x) for i, x in self.items if i % self.stride == 0]

    def pick(self, count: int) -> list[tuple[int, object]]:
        """`count` of the kept items, evenly spread, first and last included."""
        if len(self.items) <= count:
            return list(self.items)
        chosen = np.linspace(0, len(self.items) - 1, count).round().astype(int)
        return [self.items[i] for i in chosen]
