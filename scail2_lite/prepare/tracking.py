"""Keeping each person's identity (so their colour) through a video: overlap matching with motion and
appearance, solved as one assignment per frame so two people never swap or share an identity.

Segmenters report people per frame in any order (mediapipe) or with ids of their own that can break
(SAM3 after an occlusion). Identities are fixed on the first frame; every later detection is matched to
them by the overlap with where each person is expected (last mask moved by its recent motion), by colour
appearance (which tells people apart after they cross), by distance, and by the segmenter's own id when
it has one. A person who is not found keeps their identity and is matched again when they reappear.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .masks import MIN_PERSON_SHARE, upsample

# Matching runs on small copies (long side TRACK_SIDE): overlap and colour statistics need no detail.
TRACK_SIDE = 160
# Costs: a pair costing more than UNMATCHED is worse than leaving the person unmatched this frame.
UNMATCHED = 1.6
SAME_KEY_BONUS = 0.5
# People hidden behind others still count when a sliver shows; below this share of the frame they are noise.
MIN_VISIBLE_SHARE = MIN_PERSON_SHARE / 4
# How many frames of motion to extrapolate for a person who is not seen.
MAX_COAST = 8
BINS = 4  # per colour channel: 64-bin appearance histograms


@dataclass(frozen=True)
class Detection:
    """One person found in one frame: a probability map at the segmenter's working size, and the
    segmenter's own track id when it keeps one."""

    soft: np.ndarray
    key: int | None = None


@dataclass
class _Track:
    mask: np.ndarray
    hist: np.ndarray
    center: np.ndarray
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(2))
    missed: int = 0
    key: int | None = None


def _track_size(shape: tuple[int, ...]) -> tuple[int, int]:
    h, w = shape[:2]
    scale = TRACK_SIDE / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def _shrink_frame(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour subsample: colour histograms need representative pixels, not smooth ones."""
    h, w = frame.shape[:2]
    rows = (np.arange(size[0]) * h // size[0])[:, None]
    cols = (np.arange(size[1]) * w // size[1])[None, :]
    return frame[rows, cols]


def _histogram(frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    pixels = frame[mask] // (256 // BINS)
    index = (pixels[:, 0].astype(np.int64) * BINS + pixels[:, 1]) * BINS + pixels[:, 2]
    hist = np.bincount(index, minlength=BINS**3).astype(np.float64)
    return hist / max(hist.sum(), 1.0)


def _center(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return np.array([xs.mean() / w, ys.mean() / h])


def _shift(mask: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Move a mask by a fraction of its size (dx, dy), filling with False."""
    h, w = mask.shape
    dx, dy = int(round(offset[0] * w)), int(round(offset[1] * h))
    if dx == 0 and dy == 0:
        return mask
    out = np.zeros_like(mask)
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = mask[ys, xs]
    return out


def _hellinger(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.sqrt(max(0.0, 1.0 - np.sqrt(p * q).sum())))


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


def _assign(cost: np.ndarray) -> list[int | None]:
    """The cheapest way to give each track (row) a different detection (column) or none (cost UNMATCHED);
    inf marks a forbidden pair. Exact, by dynamic programming over the set of detections already taken:
    at most 6 tracks and a handful of detections, so a few thousand states."""
    n_tracks, n_found = cost.shape
    best: dict[int, tuple[float, tuple[int | None, ...]]] = {0: (0.0, ())}
    for i in range(n_tracks):
        step: dict[int, tuple[float, tuple[int | None, ...]]] = {}
        for taken, (total, picks) in best.items():
            options = [(None, UNMATCHED)] + [(j, cost[i, j]) for j in range(n_found)
                                             if not taken >> j & 1 and np.isfinite(cost[i, j])]
            for j, c in options:
                key = taken if j is None else taken | 1 << j
                if key not in step or total + c < step[key][0]:
                    step[key] = (total + c, picks + (j,))
        best = step
    return list(min(best.values(), key=lambda v: v[0])[1])


class IdentityTracker:
    """Identities 0..n-1 are the first frame's people in the order given; `update` maps each later frame's
    detections onto them."""

    def __init__(self, people: list[np.ndarray], frame: np.ndarray):
        self.size = _track_size(frame.shape)
        small = _shrink_frame(frame, self.size)
        self._tracks = []
        for person in people:
            mask = upsample(person.astype(np.float32), self.size) > 0.5
            self._tracks.append(_Track(mask, _histogram(small, mask), _center(mask)))

    def update(self, detections: list[Detection], frame: np.ndarray) -> dict[int, np.ndarray]:
        """{identity: probability map} for the people found in this frame (at the detections' own size)."""
        small = _shrink_frame(frame, self.size)
        found = []
        for det in detections:
            mask = upsample(det.soft, self.size) > 0.5
            if np.count_nonzero(mask) >= MIN_VISIBLE_SHARE * mask.size:
                found.append((det, mask))
        predicted = [_shift(t.mask, t.velocity * min(t.missed + 1, MAX_COAST)) for t in self._tracks]
        n_tracks, n_found = len(self._tracks), len(found)
        cost = np.full((n_tracks, n_found), np.inf)
        hists = [_histogram(small, mask) for _, mask in found]
        centers = [_center(mask) for _, mask in found]
        for i, (track, expected) in enumerate(zip(self._tracks, predicted)):
            where = track.center + track.velocity * min(track.missed + 1, MAX_COAST)
            for j, (det, mask) in enumerate(found):
                c = (1 - _overlap(expected, mask)) + _hellinger(track.hist, hists[j])
                c += float(np.abs(where - centers[j]).sum())
                if det.key is not None and det.key == track.key:
                    c -= SAME_KEY_BONUS
                if c < UNMATCHED:
                    cost[i, j] = c
        out: dict[int, np.ndarray] = {}
        for i, j in enumerate(_assign(cost)):
            track = self._tracks[i]
            if j is None:
                track.missed += 1
                continue
            det, mask = found[j]
            steps = track.missed + 1
            track.velocity = 0.5 * track.velocity + 0.5 * (centers[j] - track.center) / steps
            track.center, track.mask, track.missed, track.key = centers[j], mask, 0, det.key
            touching = any(np.count_nonzero(mask & other) for k, other in enumerate(predicted) if k != i)
            if not touching:  # learn appearance only from unoccluded views
                track.hist = 0.9 * track.hist + 0.1 * hists[j]
            out[i] = det.soft
        return out
