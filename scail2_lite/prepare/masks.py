"""From soft person masks (probabilities) to pure-colour masks: resizing, thresholds, temporal smoothing,
clean-up and painting.

The model reads each mask channel against a hard threshold (SPEC section 4), so every pixel written here is
exactly a palette colour or the background: masks are cut here, never blended.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .palette import BLACK, IDENTITIES, RGB, WHITE

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)

# A person covers at least 1% of the picture (upstream's MIN_MASK_RATIO); smaller finds are noise.
MIN_PERSON_SHARE = 0.01
# Pieces smaller than this share of the person's largest piece are speckles (mediapipe's limbs stay attached).
SPECK_SHARE = 0.02
# Enclosed background smaller than this share of the picture is a hole in the person; larger ones are real gaps
# (between an arm and the body, between the legs) and stay.
HOLE_SHARE = 0.002


def _scipy_ndimage():
    """scipy.ndimage, imported on first use (part of the `prepare` extra)."""
    try:
        from scipy import ndimage
    except ImportError:
        from ..errors import UserError

        raise UserError("prepare needs scipy: pip install 'scail2-lite[prepare]'") from None
    return ndimage


def upsample(soft: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a probability map (h, w) to `size` (H, W): edges land between pixels before the cut."""
    if soft.shape == tuple(size):
        return soft
    x = torch.from_numpy(np.ascontiguousarray(soft, dtype=np.float32))[None, None]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def box(mask: np.ndarray) -> Box | None:
    """Bounding box of a boolean mask, None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def box_center_x(mask: np.ndarray) -> float:
    """Horizontal centre of the bounding box (upstream orders people by it), as a fraction of the width."""
    b = box(mask)
    return (b[0] + b[2]) / 2 / mask.shape[1] if b else float("inf")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


def clean(mask: np.ndarray) -> np.ndarray:
    """Drop speckles (pieces below SPECK_SHARE of the largest) and fill small enclosed holes (below HOLE_SHARE
    of the picture); real gaps between limbs are larger and are kept."""
    nd = _scipy_ndimage()
    labels, count = nd.label(mask)
    if count > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        keep = sizes >= SPECK_SHARE * sizes.max()
        keep[0] = False
        mask = keep[labels]
    elif count == 0:
        return mask
    holes, count = nd.label(~mask)
    if count:
        sizes = np.bincount(holes.ravel())
        border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
        small = sizes < HOLE_SHARE * mask.size
        small[border] = False
        small[0] = False
        mask = mask | small[holes]
    return mask


def people_in_image(soft_masks: list[np.ndarray], size: tuple[int, int]) -> list[np.ndarray]:
    """Soft masks of one picture -> clean boolean masks at `size`, large enough to be a person, duplicates
    dropped (a mask mostly inside a larger one), in no particular order."""
    found: list[np.ndarray] = []
    for soft in sorted(soft_masks, key=lambda m: -float(m.sum())):
        mask = clean(upsample(soft, size) > 0.5)
        area = np.count_nonzero(mask)
        if area < MIN_PERSON_SHARE * mask.size:
            continue
        if any(np.count_nonzero(mask & kept) > 0.5 * area for kept in found):
            continue
        found.append(mask)
    return found


class TemporalSmoother:
    """Per identity: a running average of its probability map, then a two-threshold cut (a pixel turns on
    above `on`, and stays on until it falls below `off`), then `clean`. Edges stop flickering between frames
    and a one-frame dropout of the segmenter is bridged.

    Works at the size of the maps it is given (the segmenter's working size, about 512 px on the long side):
    the model reads driving masks at 1/16 of the output size, so finer edges buy nothing, and the clean-up
    costs a third of what it would at 512x896."""

    def __init__(self, weight: float = 0.7, on: float = 0.55, off: float = 0.4):
        self.weight = weight
        self.on = on
        self.off = off
        self.size: tuple[int, int] | None = None
        self._average: dict[int, np.ndarray] = {}
        self._previous: dict[int, np.ndarray] = {}

    def step(self, soft: dict[int, np.ndarray]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """{identity: probability map} -> {identity: (mask, score)}, at the size of the first map ever given;
        an identity absent this frame fades out through its average."""
        if self.size is None and soft:
            self.size = next(iter(soft.values())).shape
        out = {}
        for ident in sorted(set(soft) | set(self._average)):
            p = soft.get(ident)
            prev = self._average.get(ident)
            if p is None:
                avg = prev * (1 - self.weight)
            else:
                p = upsample(p, self.size)
                avg = p if prev is None else self.weight * p + (1 - self.weight) * prev
            self._average[ident] = avg
            was = self._previous.get(ident)
            mask = avg > self.on
            if was is not None:
                mask |= was & (avg > self.off)
            mask = clean(mask)
            self._previous[ident] = mask
            if mask.any():
                out[ident] = (mask, avg)
        return out


def paint(size: tuple[int, int], layers: list[tuple[RGB, np.ndarray, np.ndarray]], background: RGB) -> Image.Image:
    """A palette ("P") picture: each layer (colour, mask, score) painted where its mask is on, where masks
    overlap the highest score wins, so every pixel is exactly one colour. Indexed pixels are a third of RGB's
    bytes to compress, and read back as exactly these RGB colours."""
    index = np.zeros(size, dtype=np.uint8)
    for k, (_, mask, _) in enumerate(layers, start=1):
        index[mask] = k
    if len(layers) > 1:
        owners = np.sum([mask for _, mask, _ in layers], axis=0, dtype=np.uint8) > 1
        if owners.any():
            scores = np.stack([np.where(mask[owners], score[owners], -1.0) for _, mask, score in layers])
            index[owners] = scores.argmax(axis=0).astype(np.uint8) + 1
    used = [background, *(colour for colour, _, _ in layers)]
    # The other valid colours follow in the palette, so an editor working in indexed mode offers exactly them.
    spare = [c for c in (*(rgb for _, rgb in IDENTITIES), WHITE, BLACK) if c not in used]
    picture = Image.fromarray(index, mode="P")
    picture.putpalette([channel for colour in (*used, *spare) for channel in colour])
    return picture
