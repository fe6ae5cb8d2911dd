"""SCAIL-2's own conditioning tensors (SPEC section 4): 28-channel masks, mask checks, segments, history mask.

Pure tensor code: nothing here calls the VAE. All images and videos are float tensors on the [-1, 1] scale,
channels first: images (3, H, W), videos (3, T, H, W).

Which tensor goes in at which size (kept consistent with `inputs.load_inputs`, upstream's rules, SPEC section 9):
- reference mask: bicubic-resized to the full output size (H, W), not thresholded yet -> `reference_mask_channels`
  -> (28, 1+Tl, H/8, W/8).
- driving mask video: bicubic-resized to the full size as 8-bit frames, then halved by `half_res` (upstream's
  bilinear at scale 0.5) -> (3, T, H/2, W/2) -> `driving_mask_channels` -> (28, Tl, H/16, W/16). The colours are
  thresholded only here, after both resizes, as upstream does. (ComfyUI instead area-resizes the mask straight to
  half size, and the reference mask nearest-neighbour.)
"""

from __future__ import annotations

from typing import Sequence

import torch

from .config import SEGMENT_LEN, SEGMENT_OVERLAP
from .errors import UserError

# A channel is "on" when its 8-bit value is above 225 (upstream: `(225 - 127.5) / 127.5` on the [-1, 1] scale).
ON_THRESHOLD = (225.0 - 127.5) / 127.5
# Plane order of the 7 binary planes, fixed by training: (R, G, B) on/off pattern of each.
PLANES: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("white", (1, 1, 1)),
    ("red", (1, 0, 0)),
    ("green", (0, 1, 0)),
    ("blue", (0, 0, 1)),
    ("yellow", (1, 1, 0)),
    ("magenta", (1, 0, 1)),
    ("cyan", (0, 1, 1)),
)
# Identity colours the model was trained on, in assignment order.
PALETTE: tuple[str, ...] = ("blue", "red", "green", "magenta", "cyan", "yellow")
TEMPORAL_STRIDE = 4
SPATIAL_STRIDE = 8
MASK_CHANNELS = 7 * TEMPORAL_STRIDE
# composite_on_black keeps a pixel when any mask channel exceeds 0.1 on the [0, 1] scale (ComfyUI's rule; upstream
# does not composite at all: `GenerationSettings.composite_reference` opts in).
COMPOSITE_THRESHOLD = 0.1 * 2 - 1


def latent_frames(num_frames: int) -> int:
    """Latent frames of a 4k+1-frame video under the Wan VAE's causal 4x temporal stride."""
    return (num_frames - 1) // TEMPORAL_STRIDE + 1


def half_res(x: torch.Tensor) -> torch.Tensor:
    """2x2 average downsample of the last two axes: upstream's bilinear at scale 0.5 (align_corners False), within a
    rounding of `F.interpolate`'s values, whose own bits change with the tensor's shape. Elementwise, so these do
    not: a frame alone or the whole video give the same; far quicker than a mean over the windows (RESULTS.md)."""
    h, w = x.shape[-2:]
    if h % 2 or w % 2:
        raise UserError(f"half_res needs even height and width, got {h}x{w}")
    top = (x[..., ::2, ::2] + x[..., ::2, 1::2]) * 0.5
    bottom = (x[..., 1::2, ::2] + x[..., 1::2, 1::2]) * 0.5
    return (top + bottom) * 0.5


def _plane_coverage(mask: torch.Tensor) -> torch.Tensor:
    """(3, T, H, W) colour mask -> (T, 7, H/8, W/8): the share of each 8x8 area whose pixels have each exact on/off
    pattern of PLANES. Counted in bytes (a count is at most 64) rather than pooling seven full-size float planes:
    the same values, exactly, as they are whole 64ths, at a fraction of the memory traffic."""
    on = mask.float() > ON_THRESHOLD
    code = (on[0].to(torch.uint8) << 2) | (on[1].to(torch.uint8) << 1) | on[2].to(torch.uint8)  # (T, H, W)
    t, h, w = code.shape
    s = SPATIAL_STRIDE
    patterns = torch.tensor([4 * r + 2 * g + b for _, (r, g, b) in PLANES], dtype=torch.uint8, device=code.device)
    hits = (code[None] == patterns.view(-1, 1, 1, 1)).view(torch.uint8)  # (7, T, H, W)
    counts = hits.view(-1, t, h, w // s, s).sum(-1, dtype=torch.uint8).view(-1, t, h // s, s, w // s).sum(
        3, dtype=torch.uint8)
    return counts.transpose(0, 1).float() / (s * s)


def compress_mask(mask: torch.Tensor) -> torch.Tensor:
    """Colour mask video (3, T, H, W), T = 4k+1 -> (28, Tl, H/8, W/8) binary-coverage latent (no VAE).

    7 binary planes per frame, area-downsampled by 8 in space; frame 0 is repeated 4 times in front so that
    every latent frame packs 4 consecutive frames x 7 planes (frame-major: channel = 7 * frame + plane).
    """
    if mask.dim() != 4 or mask.shape[0] != 3:
        raise UserError(f"a colour mask video must be (3, T, H, W), got {tuple(mask.shape)}")
    _, t, h, w = mask.shape
    if (t - 1) % TEMPORAL_STRIDE:
        raise UserError(f"mask video needs 4k+1 frames, got {t}")
    if h % SPATIAL_STRIDE or w % SPATIAL_STRIDE:
        raise UserError(f"mask size {h}x{w} is not divisible by {SPATIAL_STRIDE}")
    planes = _plane_coverage(mask)  # (T, 7, h, w): exact area downsample
    padded = torch.cat([planes[:1].expand(TEMPORAL_STRIDE - 1, -1, -1, -1), planes], dim=0)
    packed = padded.reshape(latent_frames(t), MASK_CHANNELS, h // SPATIAL_STRIDE, w // SPATIAL_STRIDE)
    return packed.permute(1, 0, 2, 3).contiguous()


def reference_mask_channels(ref_mask: torch.Tensor, latent_frames: int) -> torch.Tensor:
    """Reference mask (3, H, W) at output size -> (28, 1+Tl, H/8, W/8): its own frame, then Tl zero frames."""
    first = compress_mask(ref_mask[:, None])
    return torch.cat([first, first.new_zeros(MASK_CHANNELS, latent_frames, *first.shape[2:])], dim=1)


def additional_ref_mask_channels(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Extra reference masks, each (3, H, W) at output size -> (28, N, H/8, W/8): each compressed alone as a
    one-frame video (4 identical copies of its 7 planes), no zero frames (SPEC section 6)."""
    return torch.cat([compress_mask(m[:, None]) for m in masks], dim=1)


def driving_mask_channels(mask_video: torch.Tensor) -> torch.Tensor:
    """Driving mask video (3, T, H/2, W/2), already resized and halved (`half_res`) -> (28, Tl, H/16, W/16)."""
    return compress_mask(mask_video)


def composite_on_black(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ComfyUI's replacement-mode reference (`--composite-reference`): keep pixels whose mask has any channel above
    0.1 on the [0, 1] scale (-0.8 on [-1, 1]), paint the rest black (-1). `image` and `mask` are (3, H, W) at the
    same size. Upstream VAE-encodes the reference as given in both modes."""
    if image.shape != mask.shape:
        mw, mh, iw, ih = mask.shape[-1], mask.shape[-2], image.shape[-1], image.shape[-2]
        raise UserError(f"the reference mask is {mw}x{mh} but the image is {iw}x{ih}")
    keep = mask.amax(dim=0, keepdim=True) > COMPOSITE_THRESHOLD
    return torch.where(keep, image, torch.full_like(image, -1.0))


def _colour_counts(mask: torch.Tensor) -> tuple[int, int, int]:
    """(black, white, identity-coloured) pixel counts of a colour mask, each channel on above 225."""
    on = mask.float() > ON_THRESHOLD
    r, g, b = on[0], on[1], on[2]
    black, white = int((~(r | g | b)).sum()), int((r & g & b).sum())
    return black, white, on[0].numel() - black - white


def _off_palette(mask: torch.Tensor, name: str, background: str) -> list[str]:
    """A warning when many pixels are far (more than ~64/255 in some channel) from every pure colour. H.264's
    4:2:0 chroma blurs colour edges over a couple of pixels, which on a small mask is several percent of it, so
    only a share that edges cannot explain is reported."""
    # A channel's pure value is +1 above the threshold, else -1; more than 0.5 from it, for values within +-1.5
    # (8-bit frames, and bicubic's overshoot on the reference), is the one interval below: no temporaries in floats.
    m = mask.float()
    far = ((m > -0.5) & (m <= ON_THRESHOLD)).any(dim=0)
    share = far.sum().item() / far.numel()
    if share > 0.10:
        return [f"{share:.0%} of the {name} pixels are not pure colours; identities must be painted "
                f"{', '.join(PALETTE)} on a {background} background"]
    return []


def check_mask(mask: torch.Tensor, kind: str, replace: bool) -> list[str]:
    """Warnings for a colour mask (3, H, W) or (3, T, H, W) that the model would silently misread.

    Animation: driving mask on black, reference mask on white; replacement: the reverse. Identities must use the
    palette colours. A mask with no palette pixel at all has no foreground: UserError.
    """
    if kind not in ("reference", "driving"):
        raise ValueError(f"kind must be 'reference' or 'driving', got {kind!r}")
    name = f"{kind} mask"
    n_black, n_white, foreground = _colour_counts(mask)
    if foreground == 0:
        raise UserError(f"the {name} has no foreground: no pixel is {', '.join(PALETTE)}")
    warnings = []
    want_white = (kind == "reference") != replace
    expected, other = ("white", "black") if want_white else ("black", "white")
    n_expected, n_other = (n_white, n_black) if want_white else (n_black, n_white)
    if n_other > n_expected:
        mode = "replacement" if replace else "animation"
        hint = "drop --replace" if replace else "pass --replace"
        warnings.append(f"the {name} looks like it is on {other}; {mode} mode expects it on {expected} ({hint}?)")
    return warnings + _off_palette(mask, name, expected)


def check_extra_mask(mask: torch.Tensor, number: int) -> list[str]:
    """Warnings for extra reference `number`'s colour mask (3, H, W), the same in both modes (upstream README,
    "Multi-Reference"). Two kinds of view: a background view is white over the visible background (black where
    something hides it) and has no identity colour; a character view is the identity's colour on black."""
    name = f"extra reference {number} mask"
    n_black, n_white, foreground = _colour_counts(mask)
    if foreground == 0:  # a background view
        if n_white == 0:
            return [f"the {name} is all black: a background view is white over the visible background, a character "
                    f"view its identity colour ({', '.join(PALETTE)}) on black"]
        return _off_palette(mask, name, "black")
    warnings = []
    if n_white > n_black:
        warnings.append(f"the {name} has identity colours on white; a character view is its colour on black (a "
                        "background view is white only, with no identity colour)")
    return warnings + _off_palette(mask, name, "black")


def frames_to_generate(total_frames: int) -> int:
    """Frames the segments cover for a driving video of `total_frames`: the next 4k+1 (the VAE's causal 4x
    stride needs it). The pipeline repeats the last driving frame up to it and drops those output frames, so the
    video has the driving video's frame count (upstream drops up to 3 trailing frames, or a whole short last
    segment)."""
    return total_frames + (-(total_frames - 1)) % TEMPORAL_STRIDE


def pad_frames(video: torch.Tensor, frames: int) -> torch.Tensor:
    """(C, T, H, W) -> (C, frames, H, W), the last frame repeated (no copy when nothing is missing)."""
    missing = frames - video.shape[1]
    if missing <= 0:
        return video
    return torch.cat([video, video[:, -1:].expand(-1, missing, -1, -1)], dim=1)


def segment_plan(total_frames: int, segment_len: int = SEGMENT_LEN, overlap: int = SEGMENT_OVERLAP) -> list[tuple[int, int]]:
    """Frame ranges [start, end) of the segments a video of `total_frames` is generated in.

    Each segment has 4k+1 frames. One segment when the video fits; otherwise segments of `segment_len` frames,
    each starting `overlap` frames before the previous one ended: those frames are the clean history
    (VAE-encoded from the previous segment's output) and are dropped from the output. The last segment takes
    what is left, so every frame is generated: it may reach up to 3 frames past the video
    (`frames_to_generate`), the pipeline pads the driving video there and drops them. Upstream instead drops a
    final segment that is shorter than `segment_len` (and up to 3 trailing frames).
    """
    if total_frames < 5:
        raise UserError(f"the driving video needs at least 5 frames, got {total_frames}")
    if segment_len < 5 or (segment_len - 1) % TEMPORAL_STRIDE:
        raise UserError(f"--segment-len must be 4k+1 and at least 5, got {segment_len}")
    if overlap < 1 or (overlap - 1) % TEMPORAL_STRIDE or overlap >= segment_len:
        raise UserError(f"--segment-overlap must be 4k+1 and below --segment-len, got {overlap}")
    total = frames_to_generate(total_frames)
    plan = [(0, min(total, segment_len))]
    while plan[-1][1] < total:
        start = plan[-1][1] - overlap
        plan.append((start, min(total, start + segment_len)))
    return plan


def history_mask(latent_frames: int, h: int, w: int, history_latents: int = 2) -> torch.Tensor:
    """(4, Tl, h, w): ones on the first `history_latents` latent frames (clean history), zeros elsewhere.

    `history_latents` is `latent_frames(overlap)`: 5 overlapping frames -> 2 latent frames.
    """
    mask = torch.zeros(4, latent_frames, h, w)
    mask[:, :history_latents] = 1
    return mask
