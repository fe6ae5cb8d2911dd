"""The user's files, read, resized and validated into the tensors a generation starts from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import conditioning as cond
from . import media
from .config import DEFAULT_FPS
from .errors import UserError


@dataclass(frozen=True)
class InputFiles:
    """The four files a generation needs: the reference image and its colour-coded mask, the driving video and
    its per-frame mask video."""

    image: Path
    mask_image: Path
    pose: Path
    mask_video: Path

    def __post_init__(self) -> None:
        for name in ("image", "mask_image", "pose", "mask_video"):
            object.__setattr__(self, name, Path(getattr(self, name)))

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.image, self.mask_image, self.pose, self.mask_video)


@dataclass
class Inputs:
    """Everything a generation needs from the user's files, resized and validated (tensors in [-1, 1])."""

    image: torch.Tensor  # (3, H, W) reference, at output size
    ref_mask: torch.Tensor  # (3, H, W)
    pose: torch.Tensor  # (3, T, H/2, W/2) driving video at half size
    mask_video: torch.Tensor  # (3, T, H/2, W/2)
    fps: float
    warnings: list[str] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.image.shape[-2:])  # type: ignore[return-value]

    @property
    def frames(self) -> int:
        return self.pose.shape[1]


WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def backgrounds(replace: bool) -> dict[str, tuple[int, int, int]]:
    """What shows through transparent pixels of each input, per mode: the masks' backgrounds are the ones the
    model reads as 'no character' (animation: reference mask on white, driving mask on black; replacement: the
    reverse); the reference picture sits on white in animation (the colour of its mask's background) and on
    black in replacement (where the pipeline paints its background black anyway); driving frames on black."""
    return {"image": BLACK if replace else WHITE, "mask_image": BLACK if replace else WHITE,
            "pose": BLACK, "mask_video": WHITE if replace else BLACK}


def load_inputs(files: InputFiles, size: str | tuple[int, int] = "512p", frames: int | None = None,
                replace: bool = False) -> Inputs:
    """Read and resize the user's files. Rules (SPEC section 4): aspect-preserving resize then center crop;
    reference bicubic at output size, its mask nearest (colours stay pure); driving video and its mask area-
    resized to half the output size. A preset size (512p/704p) follows the driving video's orientation.
    Paired files must agree: a mask of another size or frame count than its picture is an error; a reference
    whose aspect differs from the output's is cropped, and a warning says how much."""
    image, mask_image, pose, mask_video = files.image, files.mask_image, files.pose, files.mask_video
    bg = backgrounds(replace)
    ref = media.read_image(image, bg["image"])
    ref_mask = media.read_image(mask_image, bg["mask_image"])
    if ref.shape != ref_mask.shape:
        raise UserError(
            f"the reference mask is {ref_mask.shape[2]}x{ref_mask.shape[1]} but the image is "
            f"{ref.shape[2]}x{ref.shape[1]}: they must have the same size"
        )
    drive_hw = media.video_size(pose)
    mask_hw = media.video_size(mask_video)
    if mask_hw != drive_hw:
        raise UserError(f"the driving mask video is {mask_hw[1]}x{mask_hw[0]} but the driving video is "
                        f"{drive_hw[1]}x{drive_hw[0]}: they must have the same size")
    h, w = media.output_size(size, drive_hw)
    half = (h // 2, w // 2)
    driving, fps = media.read_video(pose, size=half, mode="area", max_frames=frames, background=bg["pose"])
    masks, _ = media.read_video(mask_video, size=half, mode="nearest", max_frames=frames,
                                background=bg["mask_video"])
    if driving.shape[1] != masks.shape[1]:
        raise UserError(
            f"the driving video has {driving.shape[1]} frames but the mask video has {masks.shape[1]}: "
            "they must have the same frame count"
        )
    if driving.shape[1] < 5:
        raise UserError(f"the driving video needs at least 5 frames, got {driving.shape[1]}")
    warnings = [note for note in (_crop_note("reference image", ref.shape[1:], (h, w)),
                                  _crop_note("driving video", drive_hw, (h, w))) if note]
    ref = media.resize_crop(ref, (h, w), "bicubic")
    ref_mask = media.resize_crop(ref_mask, (h, w), "nearest")
    warnings += cond.check_mask(ref_mask, "reference", replace) + cond.check_mask(masks, "driving", replace)
    return Inputs(ref, ref_mask, driving, masks, fps or DEFAULT_FPS, warnings)


CROP_NOTE_SHARE = 0.02  # H.264 and rounding to multiples of 32 shave a pixel or two: only real crops are said


def _crop_note(what: str, hw: tuple[int, ...], out_hw: tuple[int, int]) -> str | None:
    """A sentence when fitting a picture of `hw` to the output's aspect cuts a visible share of it."""
    (ih, iw), (oh, ow) = hw, out_hw
    if iw * oh > ow * ih:  # wider than the output: the sides go
        kept, side = ow * ih / oh / iw, "left and right"
    else:
        kept, side = oh * iw / ow / ih, "top and bottom"
    if 1 - kept <= CROP_NOTE_SHARE:
        return None
    return (f"the {what} ({iw}x{ih}) has another aspect than the {ow}x{oh} output: {1 - kept:.0%} of it is cut "
            f"from the {side} (center crop)")
