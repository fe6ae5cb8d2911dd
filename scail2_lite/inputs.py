"""The user's files, read, resized and validated into the tensors a generation starts from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from . import conditioning as cond
from . import media
from .config import DEFAULT_FPS
from .errors import UserError


@dataclass(frozen=True)
class InputFiles:
    """The four files a generation needs: the reference image and its colour-coded mask, the driving video and
    its per-frame mask video; plus any extra reference views as (image, mask) pairs (multi-reference, SPEC
    section 6: upstream's `--additional_ref_image` / `--additional_ref_mask_image`, in that order)."""

    image: Path
    mask_image: Path
    pose: Path
    mask_video: Path
    additional_refs: tuple[tuple[Path, Path], ...] = ()

    def __post_init__(self) -> None:
        for name in ("image", "mask_image", "pose", "mask_video"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        pairs = []
        for pair in self.additional_refs:
            if isinstance(pair, (str, Path)) or len(pair) != 2:
                raise UserError(f"additional_refs takes (image, mask) pairs, got {pair!r}")
            pairs.append((Path(pair[0]), Path(pair[1])))
        object.__setattr__(self, "additional_refs", tuple(pairs))

    @classmethod
    def with_extra_references(cls, image: Path, mask_image: Path, pose: Path, mask_video: Path,
                              extra_images: Sequence[Path], extra_masks: Sequence[Path]) -> "InputFiles":
        """The CLI's form: `--additional-ref-image` and `--additional-ref-mask` given separately, paired by
        position (both or neither, the same count)."""
        if len(extra_images) != len(extra_masks):
            raise UserError(f"{len(extra_images)} --additional-ref-image but {len(extra_masks)} "
                            "--additional-ref-mask: give one mask per extra image, in the same order")
        for path in (*extra_images, *extra_masks):
            if not Path(path).is_file():
                raise UserError(f"{path}: file not found")
        return cls(image, mask_image, pose, mask_video, tuple(zip(extra_images, extra_masks)))

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.image, self.mask_image, self.pose, self.mask_video, *(p for pair in self.additional_refs
                                                                           for p in pair))


@dataclass
class Inputs:
    """Everything a generation needs from the user's files, resized and validated (tensors in [-1, 1])."""

    image: torch.Tensor  # (3, H, W) reference, at output size
    ref_mask: torch.Tensor  # (3, H, W)
    pose: torch.Tensor  # (3, T, H/2, W/2) driving video at half size
    mask_video: torch.Tensor  # (3, T, H/2, W/2)
    fps: float
    warnings: list[str] = field(default_factory=list)
    additional_refs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (image, mask) (3, H, W)

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


def read_reference(image: Path, mask: Path, replace: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A reference view and its mask (primary or extra: the same path upstream), as read (not resized), any
    transparency composited on the mode's backgrounds."""
    bg = backgrounds(replace)
    picture, colours = media.read_image(image, bg["image"]), media.read_image(mask, bg["mask_image"])
    if picture.shape != colours.shape:
        raise UserError(
            f"the mask {mask} is {colours.shape[2]}x{colours.shape[1]} but the image {image} is "
            f"{picture.shape[2]}x{picture.shape[1]}: they must have the same size"
        )
    return picture, colours


def load_inputs(files: InputFiles, size: str | tuple[int, int] = "512p", frames: int | None = None,
                replace: bool = False) -> Inputs:
    """Read and resize the user's files as upstream's `generate.py` does (SPEC section 9): all four are resized
    bicubic (antialiased) to the full output size with a center crop (`media.resize_crop`), the videos as 8-bit
    frames; the driving video and its mask are then halved by a 2x2 average (`conditioning.half_res`, upstream's
    bilinear at scale 0.5). Masks keep the resized values: their colours are thresholded when compressed. A preset
    size (512p/704p) takes the reference image's orientation; a driving video of the other orientation is cropped
    to it (a warning says so). Extra references are read like the primary one. Paired files must agree: a
    mask of another size or frame count than its picture is an error."""
    image, mask_image, pose, mask_video = files.image, files.mask_image, files.pose, files.mask_video
    bg = backgrounds(replace)
    ref, ref_mask = read_reference(image, mask_image, replace)
    drive_hw = media.video_size(pose)
    mask_hw = media.video_size(mask_video)
    if mask_hw != drive_hw:
        raise UserError(f"the driving mask video is {mask_hw[1]}x{mask_hw[0]} but the driving video is "
                        f"{drive_hw[1]}x{drive_hw[0]}: they must have the same size")
    h, w = media.output_size(size, tuple(ref.shape[1:]))
    warnings = _orientation_warnings((h, w), tuple(ref.shape[1:]), drive_hw)
    warnings += [note for note in (_crop_note("reference image", ref.shape[1:], (h, w)),
                                   _crop_note("driving video", drive_hw, (h, w))) if note]
    driving, fps = media.read_video(pose, size=(h, w), max_frames=frames, per_frame=cond.half_res,
                                    background=bg["pose"])
    masks, _ = media.read_video(mask_video, size=(h, w), max_frames=frames, per_frame=cond.half_res,
                                background=bg["mask_video"])
    if driving.shape[1] != masks.shape[1]:
        raise UserError(
            f"the driving video has {driving.shape[1]} frames but the mask video has {masks.shape[1]}: "
            "they must have the same frame count"
        )
    if driving.shape[1] < 5:
        raise UserError(f"the driving video needs at least 5 frames, got {driving.shape[1]}")
    ref = media.resize_crop(ref, (h, w))
    ref_mask = media.resize_crop(ref_mask, (h, w))
    extras = [tuple(media.resize_crop(x, (h, w)) for x in read_reference(image, mask, replace))
              for image, mask in files.additional_refs]
    warnings += cond.check_mask(ref_mask, "reference", replace) + cond.check_mask(masks, "driving", replace)
    for number, (_, mask) in enumerate(extras, start=1):
        warnings += cond.check_extra_mask(mask, number)
    return Inputs(ref, ref_mask, driving, masks, fps or DEFAULT_FPS, warnings, extras)


def _orientation_warnings(out_hw: tuple[int, int], ref_hw: tuple[int, int], drive_hw: tuple[int, int]) -> list[str]:
    """Say when a picture is landscape and the output portrait (or the reverse): the center crop then cuts a
    large part of it away (a driving video's motion near its edges, or the reference's sides). A preset size
    follows the reference, so only an explicit size can cross the reference's orientation."""
    out = media.orientation(out_hw)
    warnings = []
    for what, hw, why in (("reference image", ref_hw, "the size was given explicitly"),
                          ("driving video", drive_hw, "oriented by the reference image, as upstream")):
        mine = media.orientation(hw)
        if {mine, out} == {"landscape", "portrait"}:
            cut = "sides" if mine == "landscape" else "top and bottom"
            warnings.append(f"the {what} is {mine} ({hw[1]}x{hw[0]}) but the output is {out} "
                            f"({out_hw[1]}x{out_hw[0]}, {why}): it is center-cropped to fit, its {cut} cut off")
    return warnings


CROP_NOTE_SHARE = 0.02  # H.264 and rounding to multiples of 32 shave a pixel or two: only real crops are said


def _crop_note(what: str, hw: tuple[int, ...], out_hw: tuple[int, int]) -> str | None:
    """A sentence when fitting a picture of `hw` to the output's aspect cuts a visible share of it."""
    (ih, iw), (oh, ow) = hw, out_hw
    if {media.orientation(hw), media.orientation(out_hw)} == {"landscape", "portrait"}:
        return None  # the orientation warning says it
    if iw * oh > ow * ih:  # wider than the output: the sides go
        kept, side = ow * ih / oh / iw, "left and right"
    else:
        kept, side = oh * iw / ow / ih, "top and bottom"
    if 1 - kept <= CROP_NOTE_SHARE:
        return None
    return (f"the {what} ({iw}x{ih}) has another aspect than the {ow}x{oh} output: {1 - kept:.0%} of it is cut "
            f"from the {side} (center crop)")
