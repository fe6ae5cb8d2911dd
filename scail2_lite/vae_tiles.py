"""Where the VAE cuts a frame into tiles: typed values shared by the VAE (vae.py) and the planner, which picks the
decode's cut (tiles, and four frames at a time or by frame) from the memory the card has (offload/planner.py), and the
rule for the encode's tiles, which depend on the input alone (`encode_tiling`). Pure Python: the planner imports it
without torch or diffusers.

Why tiles at all: the decoder's activations and causal cache grow with the pixels of what it decodes at once
(about 20 kB per output pixel in fp32, 15 kB by frame; RESULTS.md), so a 1280x704 frame needs ~18 GB while 256 px
tiles need 1.8 GB. Why large ones when they fit: small tiles decode 2.8x slower per frame (overlap and small
convolutions).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError

SCALE = 8  # pixels per latent pixel (the VAE's spatial compression)


@dataclass(frozen=True)
class Tiling:
    """Tiles of `height` x `width` pixels starting every `stride_h` / `stride_w` pixels (multiples of 8),
    diffusers' scheme: neighbours blend linearly over `tile - stride` pixels, and tiles start at every stride up
    to the frame's edge. A tile as long as the frame along an axis with a stride as long gives one tile along it
    (a strip)."""

    height: int
    width: int
    stride_h: int
    stride_w: int

    def __post_init__(self) -> None:
        for tile, stride in ((self.height, self.stride_h), (self.width, self.stride_w)):
            if tile % SCALE or stride % SCALE or not 0 < stride <= tile:
                raise UserError(f"VAE tile {tile} / stride {stride} px must be multiples of 8 with "
                                "0 < stride <= tile")

    @classmethod
    def square(cls, tile: int, stride: int | None = None) -> "Tiling":
        """Square tiles of `tile` pixels, by default overlapping by a quarter (stride 3/4 of the tile)."""
        stride = tile * 3 // 4 if stride is None else stride
        return cls(tile, tile, stride, stride)

    @classmethod
    def strips(cls, height: int, width: int, count: int) -> "Tiling":
        """`count` strips across the frame's longer side, each spanning the whole shorter side; neighbours overlap
        by a third of the stride (the square tiles' ratio: stride 3/4 of the tile)."""
        long_lat = max(height, width) // SCALE
        stride = -(-long_lat // count)
        tile = min(long_lat, stride + -(-stride // 3))
        if height >= width:
            return cls(tile * SCALE, width, stride * SCALE, width)
        return cls(height, tile * SCALE, height, stride * SCALE)

    def windows(self, h: int, w: int) -> list[tuple[int, int, int, int]]:
        """(row, col, height, width) latent windows over an h x w latent frame, in diffusers' order (rows of
        columns); one window when the tile covers the frame."""
        th, tw = self.height // SCALE, self.width // SCALE
        if h <= th and w <= tw:
            return [(0, 0, h, w)]
        sh, sw = self.stride_h // SCALE, self.stride_w // SCALE
        return [(i, j, min(th, h - i), min(tw, w - j)) for i in range(0, h, sh) for j in range(0, w, sw)]

    def covers(self, height: int, width: int) -> bool:
        """Whether a frame of height x width pixels is decoded whole (one tile)."""
        return height <= self.height and width <= self.width

    def largest_tile(self, height: int, width: int) -> int:
        """Pixels of the largest tile over a height x width frame."""
        return min(self.height, height) * min(self.width, width)

    def decoded_pixels(self, height: int, width: int) -> int:
        """Pixels decoded per frame, overlaps counted (the work relative to height x width)."""
        return sum(th * tw for _, _, th, tw in self.windows(height // SCALE, width // SCALE)) * SCALE * SCALE

    def describe(self, height: int, width: int) -> str:
        """'untiled', '256 px tiles' or '704x480 px tiles (3)' for a frame of height x width pixels."""
        if self.covers(height, width):
            return "untiled"
        n = len(self.windows(height // SCALE, width // SCALE))
        if self.height == self.width and self.stride_h == self.stride_w == self.height * 3 // 4:
            return f"{self.height} px tiles ({n})"
        return f"{min(self.height, height)}x{min(self.width, width)} px tiles ({n})"


@dataclass(frozen=True)
class DecodeCut:
    """How the VAE decode cuts its work, as the planner chose it for the card: spatial tiles (None: whole frames)
    and `by_frame`, the decoder's blocks past the last temporal upsampling one output frame at a time (less memory
    per pixel, slower: `WanVAE._decode_chunk`)."""

    tiling: Tiling | None = None
    by_frame: bool = False

    def describe(self, height: int, width: int) -> str:
        """'untiled', '704x576 px tiles (3)', 'untiled, by frame' for a frame of height x width pixels."""
        text = self.tiling.describe(height, width) if self.tiling is not None else "untiled"
        return text + (", by frame" if self.by_frame else "")


def from_setting(tile: int | None) -> Tiling | None:
    """`--vae-tile` / a profile's `vae_tile` (pixels, 0 = untiled) as a tiling; None (untiled) for 0 or None."""
    return Tiling.square(tile) if tile else None


# The encode, fp32, per input pixel of the largest tile: the live tensors traced on CPU (`bench_cards.py --parts
# trace`): one frame (a reference) runs the first causal chunk alone, 3,900 B/px at 64-256 px; a video runs 4-frame
# chunks with two cached frames per convolution, 14,400 B/px from 9 frames on (12,300 at 5).
ENCODE_IMAGE_BYTES_PER_PIXEL = 3_900
ENCODE_VIDEO_BYTES_PER_PIXEL = 14_400
# An input whose whole encode stays under this is encoded untiled on every card: the reference and the half-size
# pose video at 704p (3.5 and 3.2 GB) fit the smallest card the planner supports (an 8 GiB card leaves 6.7 GB). A
# larger input (a later segment's full-size history frames, custom sizes) goes in ENCODE_TILE tiles, again on
# every card: the encode's tiles never follow the plan, so the latents do not depend on the card.
ENCODE_WHOLE_MAX_BYTES = 4_000_000_000
ENCODE_TILE = 256


def encode_bytes(frames: int, height: int, width: int, tiling: Tiling | None) -> int:
    """Live tensor bytes of the encode of a frames x height x width input in `tiling` (None: untiled): its largest
    tile's activations."""
    pixels = tiling.largest_tile(height, width) if tiling is not None else height * width
    return pixels * (ENCODE_IMAGE_BYTES_PER_PIXEL if frames == 1 else ENCODE_VIDEO_BYTES_PER_PIXEL)


def encode_tiling(frames: int, height: int, width: int) -> Tiling | None:
    """The encode's tiles for an input of frames x height x width pixels: None (untiled, as upstream) when its
    encode fits ENCODE_WHOLE_MAX_BYTES, else ENCODE_TILE px squares. Untiled encodes fewer pixels (no overlaps) in
    larger convolutions and leaves no seams in the latents."""
    if encode_bytes(frames, height, width, None) <= ENCODE_WHOLE_MAX_BYTES:
        return None
    return Tiling.square(ENCODE_TILE)
