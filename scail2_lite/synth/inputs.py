"""A synthetic input set: a drawn figure dancing over a moving background, with its colour-coded masks."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .weights import temporary_path


BLUE, RED = (0, 0, 255), (255, 0, 0)


def _figure(draw, cx: float, cy: float, s: float, phase: float, fill: tuple[int, int, int] | None) -> None:
    """A stick figure with thick limbs; `fill` paints it one colour (masks), else it gets skin/shirt/trouser colours."""
    skin, shirt, legs = (fill,) * 3 if fill else ((236, 188, 150), (220, 120, 40), (50, 60, 120))
    w = max(2, int(s * 0.09))
    hip, neck = (cx, cy + 0.15 * s), (cx, cy - 0.25 * s)
    draw.line([neck, hip], fill=shirt, width=int(w * 2.2))
    for side in (-1, 1):
        arm = math.pi / 2 + side * (0.9 + 0.6 * math.sin(phase + side))
        elbow = (neck[0] + side * 0.2 * s * abs(math.sin(arm)), neck[1] + 0.2 * s * math.cos(arm))
        draw.line([neck, elbow, (elbow[0] + side * 0.12 * s, elbow[1] - 0.15 * s * math.sin(phase))], fill=shirt, width=w)
        leg = 0.35 * math.sin(phase + (side > 0) * math.pi)
        foot = (hip[0] + 0.4 * s * math.sin(leg) + side * 0.05 * s, hip[1] + 0.4 * s * math.cos(leg))
        draw.line([hip, foot], fill=legs, width=int(w * 1.3))
    r = 0.11 * s
    draw.ellipse([cx - r, neck[1] - 2.1 * r, cx + r, neck[1] - 0.1 * r], fill=skin)


def _background(h: int, w: int) -> np.ndarray:
    grad = np.linspace(0, 1, h)[:, None, None]
    return (np.array([70, 110, 150]) * (1 - grad) + np.array([200, 190, 170]) * grad).repeat(w, 1).astype(np.uint8)


def _scene(h: int, w: int, phase: float, mask_bg: tuple[int, int, int] | None,
           figures: tuple[tuple[tuple[int, int, int], float], ...] = ((BLUE, 0.3), (RED, 0.7))) -> np.ndarray:
    """The figures (identity colour, x position) over the background; with `mask_bg` set, a colour-coded mask
    (identity 1 blue, 2 red) on that background."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(_background(h, w)) if mask_bg is None else Image.new("RGB", (w, h), mask_bg)
    draw = ImageDraw.Draw(img)
    s = 0.8 * h
    for k, (color, x) in enumerate(figures):
        cx = w * x + 0.05 * w * math.sin(phase + k)
        _figure(draw, cx, h * 0.5, s, phase + k * 1.3, color if mask_bg is not None else None)
    return np.array(img)


def _save_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    tmp = temporary_path(path)
    Image.fromarray(arr).save(tmp, format="PNG")
    os.replace(tmp, path)


# Extra reference views (multi-reference, SPEC section 6), in the order generate takes them: the empty scene
# (a background view: white where the background is visible, here all of it), then identity 1 seen alone in
# another pose (a character view: its colour on black). (image, mask) file names.
EXTRA_REFERENCES: tuple[tuple[str, str], ...] = (
    ("extra_background.png", "extra_background_mask.png"),
    ("extra_character.png", "extra_character_mask.png"),
)


def write_extra_references(folder: Path, scale: str) -> list[tuple[Path, Path]]:
    """The extra reference views and their masks in `folder` (each file written atomically; deterministic, so
    writing them again over an existing set changes nothing); returns the (image, mask) pairs in order."""
    h, w = (128, 128) if scale == "tiny" else (512, 896)
    folder.mkdir(parents=True, exist_ok=True)
    alone = ((BLUE, 0.5),)
    arrays = (
        (_background(h, w), np.full((h, w, 3), 255, np.uint8)),
        (_scene(h, w, 1.7, None, alone), _scene(h, w, 1.7, (0, 0, 0), alone)),
    )
    pairs = []
    for (image_name, mask_name), (image, mask) in zip(EXTRA_REFERENCES, arrays):
        _save_png(folder / image_name, image)
        _save_png(folder / mask_name, mask)
        pairs.append((folder / image_name, folder / mask_name))
    return pairs


def _write_mp4(path: Path, frames: Iterable[np.ndarray], size: tuple[int, int], fps: int) -> None:
    """uint8 (H, W, 3) frames -> H.264 mp4 through media's atomic writer, one frame in RAM at a time."""
    from ..media import VideoWriter

    with VideoWriter(path, fps, size) as writer:
        for rgb in frames:
            writer.write(torch.from_numpy(rgb).float().div_(127.5).sub_(1.0).permute(2, 0, 1).unsqueeze(1))


def write_inputs(folder: Path, scale: str, fps: int = 16, as_frames: bool = False) -> None:
    """ref.png, ref_mask.png (animation mode: on white), driving.mp4, driving_mask.mp4 (on black), and the extra
    reference views (`EXTRA_REFERENCES`); with `as_frames` the two videos are folders of numbered PNGs instead
    (`driving/`, `driving_mask/`: no PyAV)."""
    from PIL import Image

    (h, w), n = ((128, 128), 17) if scale == "tiny" else ((512, 896), 81)
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in (("ref.png", _scene(h, w, 0.0, None)), ("ref_mask.png", _scene(h, w, 0.0, (255, 255, 255)))):
        _save_png(folder / name, arr)
    write_extra_references(folder, scale)
    phases = [2 * math.pi * i / n for i in range(n)]
    for name, bg in (("driving", None), ("driving_mask", (0, 0, 0))):
        frames = (_scene(h, w, p, bg) for p in phases)
        if not as_frames:
            _write_mp4(folder / f"{name}.mp4", frames, (h, w), fps)
            continue
        (folder / name).mkdir(exist_ok=True)
        for i, arr in enumerate(frames):
            Image.fromarray(arr).save(folder / name / f"{i:04d}.png", format="PNG")

