"""What `prepare` was asked to do: modes, segmenter choice, and one frozen settings object, checked once."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ..errors import UserError
from .palette import IDENTITIES


class Mode(str, Enum):
    """Animation moves the reference character; replacement puts it in place of a person of the video."""

    ANIMATE = "animate"
    REPLACE = "replace"


class SegmenterName(str, Enum):
    AUTO = "auto"
    MEDIAPIPE = "mediapipe"
    SAM3 = "sam3"


@dataclass(frozen=True)
class ExtraReference:
    """An extra view (`--additional-ref-image PATH[:K]`): people in it are painted from identity K (1-based)
    on, left to right; a picture with nobody in it is a background reference (white mask)."""

    path: Path
    identity: int = 1

    @classmethod
    def parse(cls, arg: str) -> "ExtraReference":
        """`PATH` or `PATH:K`; a path that exists as given wins over the `:K` reading (like `--lora`)."""
        head, sep, tail = arg.rpartition(":")
        if sep and tail.isdigit() and not Path(arg).exists():
            return cls(Path(head), int(tail))
        return cls(Path(arg))


@dataclass(frozen=True)
class PrepareSettings:
    """Everything one `prepare` run needs. `image`/`video` may be None only with `masks_only` (the folder's own
    copies are segmented again). `fit_reference` None means the mode's default (on for replacement)."""

    out: Path
    image: Path | None = None
    video: Path | None = None
    mode: Mode = Mode.ANIMATE
    people: int = 1
    segmenter: SegmenterName = SegmenterName.AUTO
    sam3: Path | None = None
    prompt_object: str = "person"
    extra_references: tuple[ExtraReference, ...] = ()
    frames: int | None = None
    order: tuple[int, ...] | None = None
    replace_person: int | None = None
    fit_reference: bool | None = None
    masks_only: bool = False

    def __post_init__(self) -> None:
        most = len(IDENTITIES)
        if not 1 <= self.people <= most:
            raise UserError(f"--people must be 1 to {most} (one palette colour each), got {self.people}")
        if self.masks_only:
            if self.image is not None or self.video is not None or self.extra_references or self.frames:
                raise UserError("--masks-only segments the -o folder's own pictures again: drop --image, --video, "
                                "--additional-ref-image and --frames")
        elif self.image is None or self.video is None:
            raise UserError("give --image and --video (only --masks-only re-reads them from the -o folder)")
        if self.frames is not None and self.frames < 5:
            raise UserError(f"--frames must be at least 5, got {self.frames}")
        if self.order is not None and sorted(self.order) != list(range(1, self.people + 1)):
            wanted = ",".join(str(k) for k in range(1, self.people + 1))
            raise UserError(f"--order must list each of the {self.people} people once (e.g. {wanted}), "
                            f"got {','.join(map(str, self.order))}")
        if self.mode is Mode.REPLACE:
            if self.people != 1:
                raise UserError("replacement mode puts one character into the video: use --people 1")
            if self.order is not None:
                raise UserError("--order pairs people in animation mode; in replacement mode use --replace-person")
        elif self.replace_person is not None:
            raise UserError("--replace-person needs --mode replace")
        if self.replace_person is not None and not 1 <= self.replace_person <= most:
            raise UserError(f"--replace-person counts people left to right from 1, got {self.replace_person}")
        if self.masks_only and self.fit_reference:
            raise UserError("--masks-only keeps the folder's reference as it is: drop --fit-reference")
        if self.segmenter is SegmenterName.MEDIAPIPE and self.prompt_object != "person":
            raise UserError("mediapipe finds people only; use --segmenter sam3 --sam3 PATH for "
                            f"{self.prompt_object!r}")
        for extra in self.extra_references:
            if not 1 <= extra.identity <= most:
                raise UserError(f"{extra.path}: identity {extra.identity} is not 1 to {most}")

    @property
    def fits_reference(self) -> bool:
        """Whether the reference is reframed: as asked, else by mode (replacement's default), never on re-runs."""
        if self.masks_only:
            return False
        return self.mode is Mode.REPLACE if self.fit_reference is None else self.fit_reference
