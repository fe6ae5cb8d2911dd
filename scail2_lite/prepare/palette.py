"""The mask colours as RGB bytes, taken from the model's own plane table so they cannot drift from it."""

from __future__ import annotations

from ..conditioning import PALETTE, PLANES

RGB = tuple[int, int, int]

_PATTERNS = dict(PLANES)
# Identity k (0-based) is painted IDENTITIES[k]: blue, red, green, magenta, cyan, yellow, as trained.
IDENTITIES: tuple[tuple[str, RGB], ...] = tuple(
    (name, tuple(255 * bit for bit in _PATTERNS[name])) for name in PALETTE  # type: ignore[misc]
)
WHITE: RGB = (255, 255, 255)
BLACK: RGB = (0, 0, 0)


def identity_rgb(index: int) -> RGB:
    """RGB of identity `index` (0-based)."""
    return IDENTITIES[index][1]


def backgrounds(replace: bool) -> tuple[RGB, RGB]:
    """(reference mask background, driving mask background): animation white/black, replacement black/white."""
    return (BLACK, WHITE) if replace else (WHITE, BLACK)
