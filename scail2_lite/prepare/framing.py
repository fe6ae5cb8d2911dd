"""Reference framing: scale and pad the reference so its character stands in the picture as the driving
person does in the first frame (same height fraction, same place), on a canvas of the video's shape.

`generate` resizes the reference and the video to the same output size, each with a centre crop. A
full-bleed portrait used in replacement mode therefore brings a character much taller than the person it
replaces (about 1.7x in users' reports), and the result inherits the wrong scale. Fitting here fixes it
before any resizing, and the preview shows the two boxes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .masks import Box
from .palette import RGB


@dataclass(frozen=True)
class Framing:
    """How the reference was placed: `scale` and `offset` (x, y) map reference pixels onto the canvas;
    `character` is the character's box on the canvas, `target` the driving person's box mapped onto it."""

    scale: float
    offset: tuple[float, float]
    canvas: tuple[int, int]
    character: Box
    target: Box


def _map_box(b: Box, sx: float, sy: float, ox: float = 0.0, oy: float = 0.0) -> Box:
    return (round(b[0] * sx + ox), round(b[1] * sy + oy), round(b[2] * sx + ox), round(b[3] * sy + oy))


def _place(picture: np.ndarray, scale: float, offset: tuple[float, float], canvas: tuple[int, int],
           resample: int, pad: RGB | int | None) -> np.ndarray:
    """Resize `picture` by `scale`, put its top-left corner at `offset` on a canvas; outside it the canvas is
    `pad`, or the picture's edge pixels carried outwards when `pad` is None."""
    h, w = picture.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    scaled = np.asarray(Image.fromarray(picture).resize(size, resample))
    ch, cw = canvas
    x0, y0 = round(offset[0]), round(offset[1])
    # Rows/columns of the canvas -> rows/columns of the scaled picture (clamped: edge carried outwards).
    rows = np.clip(np.arange(ch) - y0, 0, size[1] - 1)
    cols = np.clip(np.arange(cw) - x0, 0, size[0] - 1)
    out = scaled[rows[:, None], cols[None, :]]
    if pad is not None:
        inside_r = (np.arange(ch) >= y0) & (np.arange(ch) < y0 + size[1])
        inside_c = (np.arange(cw) >= x0) & (np.arange(cw) < x0 + size[0])
        out = out.copy()
        out[~(inside_r[:, None] & inside_c[None, :])] = pad
    return out


def fit_reference(image: np.ndarray, people: list[np.ndarray], character: Box, target: Box,
                  frame_size: tuple[int, int], pad: RGB | None) -> tuple[np.ndarray, list[np.ndarray], Framing]:
    """Reframe `image` and its people's masks: the character's box (`character`, reference pixels) gets the
    height fraction and the bottom-centre position that `target` (first driving frame, `frame_size` pixels)
    has. The canvas has the frame's aspect and the reference's height (rounded to even sizes). Padding is `pad`
    (replacement: black, like the reference mask's background), or the picture's edges carried outwards."""
    fh, fw = frame_size
    ch = image.shape[0] - image.shape[0] % 2
    cw = max(2, round(ch * fw / fh / 2) * 2)
    scale = (target[3] - target[1]) / fh * ch / max(1, character[3] - character[1])
    want_x = (target[0] + target[2]) / 2 / fw * cw
    want_bottom = target[3] / fh * ch
    offset = (want_x - scale * (character[0] + character[2]) / 2, want_bottom - scale * character[3])
    canvas = (ch, cw)
    fitted = _place(image, scale, offset, canvas, Image.LANCZOS, pad)
    # Masks follow the picture: cleared where it is padded, carried outwards where its edges are.
    masks = [_place(m.astype(np.uint8) * 255, scale, offset, canvas, Image.NEAREST, None if pad is None else 0) > 127
             for m in people]
    framing = Framing(scale, offset, canvas, _map_box(character, scale, scale, *offset),
                      _map_box(target, cw / fw, ch / fh))
    return fitted, masks, framing
