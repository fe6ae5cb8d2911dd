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


def load_inputs(files: InputFiles, size: str | tuple[int, int] = "512p", frames: int | None = None,
                replace: bool = False) -> Inputs:
    """Read and resize the user's files. Rules (SPEC section 4): aspect-preserving resize then center crop;
    reference bicubic at output size, its mask nearest (colours stay pure); driving video and its mask area-
    resized to half the output size. A preset size (512p/704p) follows the driving video's orientation."""
    image, mask_image, pose, mask_video = files.image, files.mask_image, files.pose, files.mask_video
    ref = media.read_image(image)
    ref_mask = media.read_image(mask_image)
    if ref.shape != ref_mask.shape:
        raise UserError(
            f"the reference mask is {ref_mask.shape[2]}x{ref_mask.shape[1]} but the image is "
            f"{ref.shape[2]}x{ref.shape[1]}: they must have the same size"
        )
    drive_hw = media.video_size(pose)
    h, w = media.output_size(size, drive_hw)
    half = (h // 2, w // 2)
    driving, fps = media.read_video(pose, size=half, mode="area", max_frames=frames)
    masks, _ = media.read_video(mask_video, size=half, mode="nearest", max_frames=frames)
    if driving.shape[1] != masks.shape[1]:
        raise UserError(
            f"the driving video has {driving.shape[1]} frames but the mask video has {masks.shape[1]}: "
            "they must have the same frame count"
        )
    if driving.shape[1] < 5:
        raise UserError(f"the driving video needs at least 5 frames, got {driving.shape[1]}")
    ref = media.resize_crop(ref, (h, w), "bicubic")
    ref_mask = media.resize_crop(ref_mask, (h, w), "nearest")
    warnings = cond.check_mask(ref_mask, "reference", replace) + cond.check_mask(masks, "driving", replace)
    return Inputs(ref, ref_mask, driving, masks, fps or DEFAULT_FPS, warnings)
