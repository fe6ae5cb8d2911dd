"""The prepared folder: its `inputs.json` (what `generate --inputs` reads), and writing it all or nothing.

A new folder is built under a hidden sibling name and renamed into place at the end; a `--masks-only` re-run
builds its files in a hidden subfolder and moves each onto the file it replaces at the end. An error, Ctrl-C
or SIGTERM removes what was being built and nothing else: no half-written folder, no deleted input.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from ..outputs import interruptible, temporary_folder
from ..inputs import InputFiles
from .settings import Mode

INPUTS_FILE = "inputs.json"
FORMAT = "scail2-lite prepare"
VERSION = 1


@dataclass(frozen=True)
class ExtraInput:
    """An extra reference view as written: picture, its mask, and whether it shows a character or a background."""

    image: Path
    mask: Path
    kind: str  # "character" or "background"


@dataclass(frozen=True)
class PreparedInputs:
    """A prepared folder's inputs, as absolute paths (what `generate` takes)."""

    folder: Path
    mode: Mode
    image: Path
    mask_image: Path
    pose: Path
    mask_video: Path
    extra_references: tuple[ExtraInput, ...]
    frames: int
    fps: float
    record: dict  # the whole inputs.json, for what the fields above leave out

    @property
    def replace(self) -> bool:
        return self.mode is Mode.REPLACE


def read_inputs(folder: str | Path) -> PreparedInputs:
    """Read `folder/inputs.json`; every file it names must exist. Raises UserError saying what is wrong."""
    folder = Path(folder)
    path = folder / INPUTS_FILE
    if not path.is_file():
        raise UserError(f"{folder}: no {INPUTS_FILE} here; make the folder with `scail2-lite prepare -o {folder}`")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"not written by {FORMAT}")
        if data.get("version") != VERSION:
            raise ValueError(f"version {data.get('version')}, this scail2-lite reads version {VERSION}")
        files = data["files"]

        def existing(name: str) -> Path:
            p = folder / name
            if not p.exists():
                raise UserError(f"{path}: names {name}, which is missing from {folder}")
            return p

        extras = tuple(ExtraInput(existing(e["image"]), existing(e["mask"]), e["kind"])
                       for e in data.get("extra_references", []))
        return PreparedInputs(
            folder=folder, mode=Mode(data["mode"]), image=existing(files["reference"]),
            mask_image=existing(files["reference_mask"]), pose=existing(files["driving"]),
            mask_video=existing(files["driving_mask"]), extra_references=extras, frames=int(data["frames"]),
            fps=float(data["fps"]), record=data,
        )
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: cannot read it ({e})") from None


def generate_files(inputs: Path | None, image: Path | None, mask_image: Path | None, pose: Path | None,
                   mask_video: Path | None, replace: bool, extra_images: list[Path] = (),
                   extra_masks: list[Path] = ()) -> tuple[InputFiles, bool, list[str]]:
    """`generate`'s files and mode: from a prepared folder (`--inputs`), where a file flag given replaces
    its entry (extra references given replace the folder's list) and the mode is the folder's; without a folder
    all four flags are needed. Extra references (`--additional-ref-image` / `--additional-ref-mask`) pair by
    position. Returns the files, the replace flag, and notes for the user."""
    given = {"--image": image, "--mask-image": mask_image, "--pose": pose, "--mask-video": mask_video}
    if inputs is None:
        missing = [flag for flag, value in given.items() if value is None]
        if missing:
            raise UserError(f"give {', '.join(missing)} (or --inputs DIR, a folder made by `scail2-lite prepare`)")
        return InputFiles.with_extra_references(image, mask_image, pose, mask_video, extra_images,
                                                extra_masks), replace, []
    prepared = read_inputs(inputs)
    if replace and not prepared.replace:
        raise UserError(f"--inputs {inputs} was prepared for animation; prepare it with --mode replace "
                        "(its masks' backgrounds differ) or drop --replace")
    notes = []
    if not extra_images and not extra_masks:
        extra_images = [e.image for e in prepared.extra_references]
        extra_masks = [e.mask for e in prepared.extra_references]
    elif prepared.extra_references:
        notes.append(f"the extra references given replace the {len(prepared.extra_references)} of {inputs}")
    files = InputFiles.with_extra_references(image or prepared.image, mask_image or prepared.mask_image,
                                             pose or prepared.pose, mask_video or prepared.mask_video,
                                             extra_images, extra_masks)
    return files, prepared.replace, notes


def write_inputs(folder: Path, data: dict) -> None:
    (folder / INPUTS_FILE).write_text(json.dumps({"format": FORMAT, "version": VERSION, **data}, indent=1) + "\n")


def check_output(out: Path) -> None:
    """A new output folder must not exist yet, or be empty: so it can hold no input and no file of the user's
    is ever overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"-o {out}: already exists and is not an empty folder; choose a new folder "
                        "(or re-run the masks in a prepared folder with --masks-only)")
    if not out.parent.is_dir():
        raise UserError(f"-o {out}: folder {out.parent} does not exist")


@contextmanager
def new_folder(out: Path) -> Iterator[Path]:
    """Yield a hidden staging folder beside `out`; on success it becomes `out` (an empty `out` is replaced by
    the rename), on any error it is removed."""
    staging = temporary_folder(out)
    with interruptible():
        try:
            yield staging
            os.replace(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


@contextmanager
def replaced_files(folder: Path) -> Iterator[Path]:
    """Yield a hidden staging folder inside `folder`; on success each entry in it replaces the entry of the
    same name in `folder` (old entries are moved aside first, then deleted: they are prepare's own outputs),
    on any error the staging folder is removed and `folder` is untouched."""
    staging = Path(tempfile.mkdtemp(prefix=".prepare.", suffix=".partial", dir=folder))
    with interruptible():
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        retired = Path(tempfile.mkdtemp(prefix=".prepare.", suffix=".old", dir=folder))
        try:
            for entry in sorted(staging.iterdir()):
                target = folder / entry.name
                if target.exists():
                    os.replace(target, retired / entry.name)
                os.replace(entry, target)
        finally:
            shutil.rmtree(retired, ignore_errors=True)
            shutil.rmtree(staging, ignore_errors=True)
