"""Footage with known truth, from real photos that ship inside packages: the people of scikit-image's
astronaut and matplotlib's Grace Hopper, cut out with the mattes in `data/`, composited onto moving
backgrounds (scikit-image's rocket and coffee photos). Every pixel a person covers is known, so segmentation
can be scored (IoU) and identities checked, with no download. Used by the tests, the benchmark and the README's
preview picture; needs scikit-image and matplotlib (the `test` extra).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(__file__).resolve().parent / "data"
PEOPLE = ("astronaut", "grace_hopper")


def photo(name: str) -> np.ndarray:
    """A packaged photo as uint8 RGB: the people (PEOPLE) and the backgrounds ("rocket", "coffee")."""
    if name == "grace_hopper":
        from matplotlib import cbook

        with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as img:
            return np.asarray(img.convert("RGB"))
    import skimage.data

    return getattr(skimage.data, name)()


def cutout(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(photo, boolean matte of its person)."""
    with Image.open(DATA / f"{name}_matte.png") as img:
        matte = np.asarray(img.convert("L")) > 127
    return photo(name), matte


@dataclass(frozen=True)
class Footage:
    """frames (T, H, W, 3) uint8; truth (T, P, H, W): what each person covers (what is visible of them), people
    in left-to-right order on frame 0; overlap (T,): frames where the people's whole shapes touch."""

    frames: np.ndarray
    truth: np.ndarray
    overlap: np.ndarray


def _resize(rgb: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    return np.array(Image.fromarray(rgb).resize((size[1], size[0]), resample))


def place(canvas: np.ndarray, person: tuple[np.ndarray, np.ndarray], center_x: float, bottom: float,
          height: float) -> np.ndarray:
    """Paint a cut-out person (scaled to `height` px, bottom-centre at (center_x, bottom)) onto `canvas` in
    place; returns the canvas pixels they cover."""
    rgb, matte = person
    h = max(1, round(height))
    w = max(1, round(rgb.shape[1] * h / rgb.shape[0]))
    rgb = _resize(rgb, (h, w), Image.BICUBIC)
    matte = _resize(matte.astype(np.uint8) * 255, (h, w), Image.NEAREST) > 127
    x0, y0 = round(center_x - w / 2), round(bottom - h)
    ch, cw = canvas.shape[:2]
    xs, ys, xe, ye = max(0, x0), max(0, y0), min(cw, x0 + w), min(ch, y0 + h)
    covered = np.zeros((ch, cw), dtype=bool)
    if xs >= xe or ys >= ye:
        return covered
    part = matte[ys - y0:ye - y0, xs - x0:xe - x0]
    canvas[ys:ye, xs:xe][part] = rgb[ys - y0:ye - y0, xs - x0:xe - x0][part]
    covered[ys:ye, xs:xe] = part
    return covered


def _panning(size: tuple[int, int], frames: int) -> list[np.ndarray]:
    """The rocket photo, enlarged and mirrored into a wide strip, panned right and bobbing up and down."""
    h, w = size
    strip = photo("rocket")
    scale = 1.25 * h / strip.shape[0]
    strip = _resize(strip, (round(strip.shape[0] * scale), round(strip.shape[1] * scale)), Image.BICUBIC)
    while strip.shape[1] < w + h:
        strip = np.concatenate([strip, strip[:, ::-1]], axis=1)
    out = []
    for t in range(frames):
        u = t / max(1, frames - 1)
        x = round(u * (strip.shape[1] - w))
        y = round((strip.shape[0] - h) * (0.5 + 0.5 * np.sin(2 * np.pi * u)))
        out.append(strip[y:y + h, x:x + w].copy())
    return out


def reference(name: str, size: tuple[int, int] = (512, 640)) -> tuple[np.ndarray, np.ndarray]:
    """A reference photo: the person standing on the coffee photo's background. Returns (rgb, truth)."""
    canvas = _resize(photo("coffee"), size, Image.BICUBIC)
    truth = place(canvas, cutout(name), size[1] * 0.5, size[0], size[0] * 0.8)
    return canvas, truth


def pair(size: tuple[int, int] = (480, 800)) -> tuple[np.ndarray, np.ndarray]:
    """A two-character reference: Grace Hopper on the left, the astronaut on the right, on the coffee photo.
    Returns (rgb, truth (2, H, W)), left to right."""
    canvas = _resize(photo("coffee"), size, Image.BICUBIC)
    left = place(canvas, cutout("grace_hopper"), size[1] * 0.27, size[0], size[0] * 0.8)
    right = place(canvas, cutout("astronaut"), size[1] * 0.73, size[0], size[0] * 0.75)
    return canvas, np.stack([left & ~right, right])


def dancing(name: str, size: tuple[int, int] = (512, 896), frames: int = 81) -> Footage:
    """One person swaying left and right, growing and shrinking, over the panning background."""
    person = cutout(name)
    shots, truth = [], []
    for t, canvas in enumerate(_panning(size, frames)):
        u = t / max(1, frames - 1)
        cx = size[1] * (0.5 + 0.15 * np.sin(2 * np.pi * u))
        height = size[0] * (0.8 + 0.08 * np.sin(4 * np.pi * u))
        truth.append(place(canvas, person, cx, size[0], height)[None])
        shots.append(canvas)
    return Footage(np.stack(shots), np.stack(truth), np.zeros(frames, dtype=bool))


def crossing(size: tuple[int, int] = (288, 512), frames: int = 49) -> Footage:
    """Grace Hopper walks left to right in front; the astronaut, further back, right to left: they cross in
    the middle, one hiding the other. Truth holds what is visible of each, Grace Hopper first (left at t=0)."""
    back, front = cutout("astronaut"), cutout("grace_hopper")
    shots, truth, overlap = [], [], []
    for t, canvas in enumerate(_panning(size, frames)):
        u = t / max(1, frames - 1)
        whole_back = place(canvas, back, size[1] * (0.85 - 0.7 * u), size[0], size[0] * 0.6)
        whole_front = place(canvas, front, size[1] * (0.15 + 0.7 * u), size[0], size[0] * 0.66)
        truth.append(np.stack([whole_front, whole_back & ~whole_front]))
        overlap.append(bool((whole_front & whole_back).any()))
        shots.append(canvas)
    return Footage(np.stack(shots), np.stack(truth), np.array(overlap))
