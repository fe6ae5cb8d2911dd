"""Reading and writing pictures: images (Pillow), videos and frame folders (PyAV), resizing, atomic mp4 output.

Tensors are float32 on the [-1, 1] scale, channels first: images (3, H, W), videos (3, T, H, W).
Sizes are (height, width) everywhere except `output_size`'s explicit (width, height) argument, named so.
"""

from __future__ import annotations

import os
import re
from contextlib import ExitStack
from dataclasses import dataclass
from enum import Enum
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from . import outputs
from .config import DEFAULT_FPS, SIZES
from .errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def _av():
    """PyAV, imported on first use: image-only work (and GPU benchmarks that read frame folders) runs without it."""
    try:
        import av
    except ImportError:
        raise UserError("reading or writing video files needs PyAV: pip install av") from None
    return av


def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (3, ..., H, W) on [-1, 1]."""
    x = torch.from_numpy(np.require(rgb, requirements=["C", "W"])).float().div_(127.5).sub_(1.0)
    return x.movedim(-1, 0)


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """float (3, T, H, W) on [-1, 1] -> uint8 (T, H, W, 3), each frame contiguous as PyAV and Pillow take it. One
    float copy, changed in place: every out-of-place step would allocate and fill another (the old form was 3x slower
    on a 704p group, RESULTS.md)."""
    x = frames.detach().float().add(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def read_image(path: str | Path, background: tuple[int, int, int] | None = None) -> torch.Tensor:
    """An image file -> (3, H, W), read as a viewer shows it: EXIF rotation applied; 16-bit, palette, grayscale
    and CMYK pictures converted to 8-bit RGB at their full range (a 16-bit grayscale PNG is not clipped to
    white). Transparent pixels are composited over `background` (RGB), the colour the caller's use expects
    behind the picture; without one, an image with transparent pixels is refused (what should show through is
    not ours to guess). Fully opaque alpha channels are dropped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        with Image.open(path) as img:
            rgb = _rgb8(ImageOps.exif_transpose(img), path, background)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read image ({e})") from None
    return _to_tensor(rgb)


def _rgb8(img: Image.Image, path: Path, background: tuple[int, int, int] | None) -> np.ndarray:
    """A decoded Pillow image -> uint8 (H, W, 3)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grayscale (Pillow's "I" holds it too)
        gray = np.asarray(img).astype(np.float64)
        return np.repeat((gray.clip(0, 65535) / 257).round().astype(np.uint8)[..., None], 3, axis=-1)
    if img.mode == "F":  # float TIFF/PFM: [0, 1] when it fits, else taken as 0..255
        gray = np.asarray(img).astype(np.float64)
        gray = gray * 255 if np.nanmax(gray, initial=0) <= 1.0 else gray
        return np.repeat(np.nan_to_num(gray).clip(0, 255).round().astype(np.uint8)[..., None], 3, axis=-1)
    if (img.mode == "P" and "transparency" in img.info) or img.mode in ("PA", "LA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode != "RGBA":
        return np.asarray(img.convert("RGB"))
    rgba = np.asarray(img)
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    if background is None:
        share = float((alpha < 255).mean())
        raise UserError(f"{path}: {share:.0%} of the picture is transparent and nothing says what should show "
                        "through; save it without transparency (flattened on the background you want)")
    a = alpha.astype(np.float64) / 255
    bg = np.asarray(background, dtype=np.float64)
    return (rgba[..., :3] * a + bg * (1 - a)).round().astype(np.uint8)


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def read_video(
    path: str | Path,
    size: tuple[int, int] | None = None,
    max_frames: int | None = None,
    per_frame: Callable[[torch.Tensor], torch.Tensor] | None = None,
    background: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, float]:
    """A video file (mp4, webm, mov, gif, ...) or a folder of numbered images -> ((3, T, H, W), fps).

    Folders are read in natural order (frame2 before frame10) at 16 fps. With `size`, each frame is resized as an
    8-bit video frame (`resize_crop(..., eight_bit=True)`), then `per_frame` (e.g. a 2x2 average) is applied, while
    decoding: a long high-resolution video never sits in memory at full size. Transparent pixels (frames with
    alpha, videos in a pixel format with alpha) are composited over `background`, or refused without one, as in
    `read_image`.
    """
    path = Path(path)

    def prepared(image: torch.Tensor) -> torch.Tensor:
        image = resize_crop(image, size, eight_bit=True) if size else image
        return per_frame(image) if per_frame is not None else image

    if path.is_dir():
        files = [p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
        files.sort(key=lambda p: _natural_key(p.name))
        if not files:
            raise UserError(f"{path}: folder has no images ({', '.join(IMAGE_SUFFIXES)})")
        frames = []
        for file in files[:max_frames]:
            image = read_image(file, background)
            if frames and image.shape != frames[0].shape and size is None:
                raise UserError(f"{file}: size {image.shape[2]}x{image.shape[1]} differs from the first frame's")
            frames.append(prepared(image))
        return torch.stack(frames, dim=1), float(DEFAULT_FPS)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    frames = []
    try:
        with _av().open(str(path)) as container:
            if not container.streams.video:
                raise UserError(f"{path}: no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else float(DEFAULT_FPS)
            alpha = _has_alpha(stream.codec_context.pix_fmt)  # GIFs decode as bgra: judged frame by frame
            for frame in container.decode(stream):
                rgb = frame.to_ndarray(format="rgb24") if not alpha else _rgb8(
                    Image.fromarray(frame.to_ndarray(format="rgba"), "RGBA"), path, background)
                frames.append(prepared(_to_tensor(rgb)))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except _av().FFmpegError as e:
        raise UserError(f"{path}: cannot read video ({e})") from None
    if not frames:
        raise UserError(f"{path}: video has no frames")
    return torch.stack(frames, dim=1), fps


def _has_alpha(pix_fmt: str | None) -> bool:
    """Whether an FFmpeg pixel format carries alpha (yuva420p, rgba, argb, bgra, ya8, gbrap, pal8 has none)."""
    return bool(pix_fmt) and any(tag in pix_fmt for tag in ("yuva", "rgba", "argb", "bgra", "abgr", "ya8", "ya16",
                                                            "gbrap"))


def video_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of a video file or of the first image of a frame folder, without decoding the video."""
    path = Path(path)
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: _natural_key(p.name))
        if not files:
            raise UserError(f"{path}: folder has no images ({', '.join(IMAGE_SUFFIXES)})")
        return tuple(read_image(files[0], (0, 0, 0)).shape[1:])  # type: ignore[return-value]
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        with _av().open(str(path)) as container:
            if not container.streams.video:
                raise UserError(f"{path}: no video stream")
            stream = container.streams.video[0]
            return stream.codec_context.height, stream.codec_context.width
    except _av().FFmpegError as e:
        raise UserError(f"{path}: cannot read video ({e})") from None


def frame_count(path: str | Path) -> int:
    """Frames in a video file (from its header; estimated from its duration when the header has no count) or a
    frame folder, without decoding: for estimates made before the work (a disk-space check)."""
    path = Path(path)
    if path.is_dir():
        return sum(1 for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    try:
        with _av().open(str(path)) as container:
            if not container.streams.video:
                raise UserError(f"{path}: no video stream")
            stream = container.streams.video[0]
            if stream.frames:
                return stream.frames
            rate = stream.average_rate or stream.guessed_rate or DEFAULT_FPS
            seconds = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else (
                container.duration / 1e6 if container.duration else 0.0)
            return max(1, round(seconds * float(rate)))
    except _av().FFmpegError as e:
        raise UserError(f"{path}: cannot read video ({e})") from None


def resize_crop(x: torch.Tensor, size: tuple[int, int], eight_bit: bool = False) -> torch.Tensor:
    """Resize (C, H, W) or (C, T, H, W) on [-1, 1] to `size` = (h, w) without distortion, as upstream's
    `resize_for_rectangle_crop` (SPEC section 9): scale (aspect kept, the covering side truncated to an integer) so
    the picture covers the target, bicubic with antialiasing (torchvision's default, also when enlarging), then cut
    the excess equally from both sides (center crop, the odd pixel at the end).

    Images (reference, its mask) are resized as floats and not clamped, as upstream; with `eight_bit` the frames
    are resized as 8-bit values and rounded and clamped back to them, as torchvision does for upstream's uint8
    video tensors (driving video and its mask). Masks are resized like pictures: their colours are thresholded
    only afterwards (conditioning.compress_mask), so an edge pixel counts where the resized colour stays bright.
    """
    th, tw = size
    video = x.dim() == 4
    frames = x.movedim(0, 1) if video else x[None]  # (T, C, H, W)
    h, w = frames.shape[-2:]
    if w / h > tw / th:
        nh, nw = th, max(tw, int(w * th / h))
    else:
        nh, nw = max(th, int(h * tw / w)), tw
    if (nh, nw) != (h, w):
        frames = frames.float()
        if eight_bit:  # back to the exact 8-bit values the frames were decoded from
            frames = frames.add(1.0).mul_(127.5).round_()
        frames = F.interpolate(frames, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        if eight_bit:
            frames = frames.clamp_(0, 255).round_().div_(127.5).sub_(1.0)
    top, left = (nh - th) // 2, (nw - tw) // 2
    frames = frames[..., top : top + th, left : left + tw]
    return frames.movedim(0, 1).contiguous() if video else frames[0].contiguous()


def orientation(hw: tuple[int, int]) -> str:
    """"landscape", "portrait" or "square" for a (height, width)."""
    h, w = hw
    return "landscape" if w > h else "portrait" if h > w else "square"


def output_size(preset_or_wh: str | tuple[int, int], reference_hw: tuple[int, int]) -> tuple[int, int]:
    """The generation size (h, w) from a preset name ("512p", "704p") or an explicit (width, height).

    Presets are landscape in `SIZES` and turn portrait when the reference image (`reference_hw`, its height and
    width) is portrait, as upstream's `generate.py` swaps its target size: a square reference keeps landscape.
    Explicit sizes are used as given and must be divisible by 32.
    """
    if isinstance(preset_or_wh, str):
        if preset_or_wh not in SIZES:
            raise UserError(f"unknown size {preset_or_wh!r}; choose one of {', '.join(SIZES)} or give --width/--height")
        h, w = SIZES[preset_or_wh]
        return (w, h) if orientation(reference_hw) == "portrait" else (h, w)
    width, height = preset_or_wh
    for flag, value in (("--width", width), ("--height", height)):
        if value <= 0 or value % 32:
            nearest = max(32, round(value / 32) * 32)
            raise UserError(f"{flag} {value} is not a positive multiple of 32 (try {nearest})")
    return height, width


def _h264_codec() -> str:
    """libx264 when this FFmpeg build has it, else whichever encoder FFmpeg registers for H.264."""
    av = _av()
    try:
        av.Codec("libx264", "w")
        return "libx264"
    except av.FFmpegError:
        pass
    try:
        return av.Codec("h264", "w").name
    except av.FFmpegError:
        raise UserError("this PyAV/FFmpeg build has no H.264 encoder; reinstall `av` from PyPI") from None


class EncoderThreads(Enum):
    """FFmpeg's threading of the encoder: each frame cut in slices (PyAV's default) or several frames at once."""

    SLICE = "SLICE"
    FRAME = "FRAME"


@dataclass(frozen=True)
class H264:
    """libx264's settings for the videos we write. `threads` is a choice of speed only (`bench_video_write.py
    --threads`): the bytes repeat, or not, alike under both (`bench_video_bytes.py`)."""

    crf: int = 17
    preset: str = "medium"
    threads: EncoderThreads = EncoderThreads.SLICE


class VideoWriter:
    """Context manager writing an H.264 (yuv420p) mp4 atomically, frame groups at a time.

    Frames go to a hidden temporary file in the destination folder, renamed onto `path` only when the block
    exits cleanly; an exception or Ctrl-C deletes it, so there is never a partial mp4. `size` is (h, w), both
    even (yuv420p halves chroma).
    """

    def __init__(self, path: str | Path, fps: float, size: tuple[int, int], h264: H264 = H264()):
        h, w = size
        if h <= 0 or w <= 0 or h % 2 or w % 2:
            raise UserError(f"H.264 (yuv420p) needs an even width and height, got {w}x{h}")
        if fps <= 0:
            raise UserError(f"fps must be positive, got {fps}")
        self.path = Path(path)
        self.fps = fps
        self.size = (h, w)
        self.h264 = h264
        self.frames_written = 0
        self._tmp: Path | None = None
        self._container = None
        self._stream = None
        self._signals = ExitStack()

    def __enter__(self) -> "VideoWriter":
        folder = self.path.parent
        if not folder.is_dir():
            raise UserError(f"{folder}: output folder does not exist")
        self._signals.enter_context(outputs.interruptible())  # SIGTERM, too, removes the temporary file
        self._tmp = outputs.temporary_file(self.path)
        try:
            self._container = _av().open(str(self._tmp), mode="w", format="mp4")
            codec = _h264_codec()
            stream = self._container.add_stream(codec, rate=Fraction(self.fps).limit_denominator(1001))
            stream.height, stream.width = self.size
            stream.pix_fmt = "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": str(self.h264.crf), "preset": self.h264.preset}
                stream.codec_context.thread_type = self.h264.threads.value
            self._stream = stream
        except BaseException:
            self._discard()
            raise
        return self

    def write(self, frames: torch.Tensor) -> None:
        """Append frames (3, t, H, W) on [-1, 1]."""
        if frames.dim() != 4 or frames.shape[0] != 3 or tuple(frames.shape[2:]) != self.size:
            raise ValueError(f"expected frames (3, t, {self.size[0]}, {self.size[1]}), got {tuple(frames.shape)}")
        self.write_rgb(to_uint8(frames))

    def write_rgb(self, frames: np.ndarray) -> None:
        """Append frames already in 8 bits, (t, H, W, 3) uint8 as `to_uint8` makes them."""
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (*self.size, 3):
            raise ValueError(f"expected uint8 frames (t, {self.size[0]}, {self.size[1]}, 3), got {frames.dtype} "
                             f"{frames.shape}")
        for rgb in frames:
            frame = _av().VideoFrame.from_ndarray(rgb, format="rgb24")
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
            self.frames_written += 1

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self._discard()
            return
        self.close()

    def close(self) -> None:
        """Finish the file: the encoder's last packets, then the rename onto `path`. The exit does it when not called
        before (the pipeline calls it inside a timed phase); after it, an error only leaves the finished file."""
        if self._container is None:
            return
        try:
            if self.frames_written == 0:
                raise ValueError("no frames were written")
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
            self._container = None
            os.replace(self._tmp, self.path)
        except BaseException:
            self._discard()
            raise
        finally:
            self._signals.close()

    def _discard(self) -> None:
        if self._container is not None:
            try:
                self._container.close()
            except _av().FFmpegError:
                pass
            self._container = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._signals.close()


def write_video(path: str | Path, frames: torch.Tensor, fps: float = DEFAULT_FPS) -> None:
    """Write a whole video (3, T, H, W) on [-1, 1] as an H.264 mp4, atomically."""
    with VideoWriter(path, fps, tuple(frames.shape[2:])) as writer:
        writer.write(frames)


def save_frames(folder: str | Path, frames: torch.Tensor) -> None:
    """Write frames (3, T, H, W) as 00000.png, 00001.png, ... into a new (or empty) folder, built aside then
    renamed."""
    folder = outputs.check_folder_target(folder, "--save-frames")
    with outputs.new_folder(folder) as tmp:
        for i, rgb in enumerate(to_uint8(frames)):
            Image.fromarray(rgb).save(tmp / f"{i:05d}.png")


def side_by_side(reference: torch.Tensor, driving: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """Preview frames reference | driving | result: (3, H, W), (3, T, h, w), (3, T, H, W) -> (3, T, H, W2).

    The reference and the driving frames are scaled (aspect kept) to the result's height, widths rounded to
    even so the preview stays H.264-encodable. Works on any frame range, so it can be called per decoded group.
    """
    t, height = result.shape[1], result.shape[2]
    if driving.shape[1] != t:
        raise ValueError(f"driving has {driving.shape[1]} frames, result {t}")

    def to_height(x: torch.Tensor) -> torch.Tensor:  # (T, 3, h, w) -> (T, 3, height, even width)
        width = max(2, round(x.shape[-1] * height / x.shape[-2] / 2) * 2)
        if tuple(x.shape[-2:]) == (height, width):
            return x
        shrink = width < x.shape[-1]
        return F.interpolate(x.float(), size=(height, width), mode="bilinear", align_corners=False, antialias=shrink)

    ref = to_height(reference[None]).expand(t, -1, -1, -1)
    drv = to_height(driving.movedim(1, 0))
    return torch.cat([ref, drv, result.movedim(1, 0).float()], dim=-1).clamp_(-1, 1).movedim(0, 1)
