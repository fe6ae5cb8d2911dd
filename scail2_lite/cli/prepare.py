"""The `scail2-lite prepare` command: options -> PrepareSettings, a progress bar per phase, a closing summary."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from ..errors import UserError
from ..prepare.settings import ExtraReference, Mode, PrepareSettings, SegmenterName
from . import app, console, user_errors


def _enum(kind, value: str, flag: str):
    try:
        return kind(value)
    except ValueError:
        raise UserError(f"{flag} must be one of {', '.join(k.value for k in kind)}, got {value!r}") from None


def _order(value: Optional[str]) -> Optional[tuple[int, ...]]:
    if value is None:
        return None
    try:
        return tuple(int(part) for part in value.replace(" ", "").split(","))
    except ValueError:
        raise UserError(f"--order takes person numbers separated by commas (e.g. 2,1), got {value!r}") from None


@app.command("prepare")
@user_errors
def prepare_command(
    image: Optional[Path] = typer.Option(None, "--image", help="photo of the character (the reference)"),
    video: Optional[Path] = typer.Option(None, "--video", help="driving video (mp4/webm/mov/gif or a folder of "
                                         "frames)"),
    out: Path = typer.Option(..., "-o", "--out", help="folder to write (new, or empty)"),
    mode: Optional[str] = typer.Option(None, "--mode", help="animate (the reference moves like the video) or "
                                       "replace (the reference takes a person's place) [default: animate]"),
    people: Optional[int] = typer.Option(None, "--people", help="characters in the reference, and people in the "
                                         "video to animate [default: 1]"),
    segmenter: str = typer.Option("auto", "--segmenter", help="auto (sam3 when --sam3 is given, else mediapipe), "
                                  "mediapipe or sam3"),
    sam3: Optional[Path] = typer.Option(None, "--sam3", help="SAM3 weights folder (transformers format, "
                                        "facebook/sam3)"),
    prompt_object: str = typer.Option("person", "--prompt-object", help="what SAM3 looks for (e.g. 'dog', "
                                      "'cartoon character')"),
    additional_ref_image: list[str] = typer.Option([], "--additional-ref-image", help="extra view of a character "
                                                   "(PATH, or PATH:K for identity K) or of the background (no "
                                                   "person in it); repeatable"),
    frames: Optional[int] = typer.Option(None, "--frames", help="use the first N frames (cut to 4k+1), at the "
                                         "video's frame rate"),
    order: Optional[str] = typer.Option(None, "--order", help="pairing, e.g. 2,1: the leftmost driving person "
                                        "is animated by reference character 2 [default: left to right]"),
    replace_person: Optional[int] = typer.Option(None, "--replace-person", help="replace mode: the K-th person "
                                                 "from the left in the first frame [default: the one placed like "
                                                 "the reference]"),
    fit_reference: Optional[bool] = typer.Option(None, "--fit-reference/--no-fit-reference", help="scale and pad "
                                                 "the reference so the character matches the driving person's "
                                                 "size and place [default: on in replace mode]"),
    masks_only: bool = typer.Option(False, "--masks-only", help="segment a prepared -o folder again (its own "
                                    "pictures; other options may change)"),
) -> None:
    """Make SCAIL-2's inputs from a photo and a video: reference and driving masks, inputs.json, a preview sheet."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    from ..prepare.folder import read_inputs
    from ..prepare.run import prepare

    previous = read_inputs(out).record if masks_only else {}
    settings = PrepareSettings(
        out=out, image=image, video=video,
        mode=_enum(Mode, mode or previous.get("mode", "animate"), "--mode"),
        people=people if people is not None else int(previous.get("people", 1)),
        segmenter=_enum(SegmenterName, segmenter, "--segmenter"), sam3=sam3, prompt_object=prompt_object,
        extra_references=tuple(ExtraReference.parse(a) for a in additional_ref_image), frames=frames,
        order=_order(order), replace_person=replace_person, fit_reference=fit_reference, masks_only=masks_only,
    )
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        tasks: dict[str, int] = {}

        def report(phase: str, done: int, total: int | None) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done, total=total)

        result = prepare(settings, progress=report)
    record = result.record
    for ident in record["identities"]:
        console.print(f"person {ident['number']}: [bold]{ident['colour']}[/bold] (driving person "
                      f"{ident['driving_person']} from the left)", highlight=False)
    console.print(f"wrote {result.folder}: {result.frames} frames at {result.fps:g} fps; check "
                  f"{result.folder / record['files']['preview']}", highlight=False, markup=False)
    console.print(f"next: scail2-lite generate MODEL --inputs {result.folder} --prompt \"...\"", highlight=False,
                  markup=False)
