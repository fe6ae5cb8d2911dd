"""`prepare` itself: from a photo and a video to a folder `generate --inputs` runs from.

Phases: the reference (its people, left to right, one identity each), the first driving frame (its people,
left to right; pairing with the reference, or the person to replace), the optional reframing, the extra
references, then the driving video frame by frame (segment, track, smooth, clean, paint, write), and the
preview sheet. All inputs are read and the segmenter loaded before anything is written.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..errors import UserError
from . import masks as mk
from .folder import (
    PreparedInputs,
    check_output,
    new_folder,
    read_inputs,
    replaced_files,
    write_inputs,
)
from .footage import (
    BackgroundWriter,
    DrivingCopy,
    EvenSample,
    Video,
    prefetched,
    read_picture,
    write_png,
)
from .framing import Framing, fit_reference
from .palette import BLACK, IDENTITIES, RGB, WHITE, backgrounds, identity_rgb
from .preview import CHARACTER_BOX, TARGET_BOX, THUMB_HEIGHT, Panel, preview_sheet
from .segmenter import Segmenter, open_segmenter
from .settings import ExtraReference, Mode, PrepareSettings
from .tracking import IdentityTracker

Progress = Callable[[str, int, "int | None"], None]  # phase, done, total (None: unknown)

MIN_FRAMES = 5
PREVIEW_FRAMES = 8
REFERENCE = "ref.png"
REFERENCE_MASK = "ref_mask.png"
DRIVING_MASK = "driving_mask"
PREVIEW = "preview.png"


@dataclass(frozen=True)
class _Sources:
    image: Path
    video: Video
    extras: tuple[ExtraReference, ...]
    record: dict  # where the pictures came from, kept in inputs.json


def _sources(settings: PrepareSettings) -> _Sources:
    if not settings.masks_only:
        video = Video.open(settings.video, settings.frames)
        check_output(settings.out)
        record = {"image": str(Path(settings.image).resolve()), "video": str(video.path.resolve()),
                  "frames_asked": settings.frames}
        return _Sources(Path(settings.image), video, settings.extra_references, record)
    previous = read_inputs(settings.out)
    extras = tuple(ExtraReference(e.image, int(r.get("identity", 1)))
                   for e, r in zip(previous.extra_references, previous.record.get("extra_references", [])))
    return _Sources(previous.image, Video.open(previous.pose), extras, previous.record.get("sources", {}))


def _count_error(where: str, found: int, wanted: int, flag: str) -> UserError:
    if found == 0:
        return UserError(f"{where}: no person found (the whole character should be visible; for animals or "
                         "drawn characters use --segmenter sam3 --prompt-object)")
    people = "person" if found == 1 else "people"
    return UserError(f"{where}: found {found} {people} but {flag} is {wanted}; pass {flag} {found} "
                     "or crop the picture")


def _left_to_right(people: list[np.ndarray]) -> list[np.ndarray]:
    return sorted(people, key=mk.box_center_x)


def _union_box(people: list[np.ndarray]) -> mk.Box:
    boxes = [mk.box(p) for p in people]
    return min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)


def _nearest(reference: list[np.ndarray], candidates: list[np.ndarray]) -> int:
    """The driving person most like the reference's placement (upstream's --matchnearest): highest overlap
    with the reference mask stretched to the frame, else the closest horizontal centre."""
    union = np.any(reference, axis=0).astype(np.uint8) * 255
    h, w = candidates[0].shape
    stretched = np.asarray(Image.fromarray(union).resize((w, h), Image.NEAREST)) > 127
    overlaps = [mk.iou(stretched, c) for c in candidates]
    if max(overlaps) > 0:
        return int(np.argmax(overlaps))
    center = mk.box_center_x(stretched)
    return int(np.argmin([abs(mk.box_center_x(c) - center) for c in candidates]))


def _colour_mask(size: tuple[int, int], people: list[np.ndarray], colours: list[int], background: RGB) -> Image.Image:
    layers = [(identity_rgb(c), m, m.astype(np.float32)) for m, c in zip(people, colours)]
    return mk.paint(size, layers, background)


def _thumb(picture: np.ndarray | Image.Image, resample: int) -> np.ndarray:
    """A preview-sized RGB copy (masks shrink nearest-neighbour, so their colours stay pure)."""
    if isinstance(picture, np.ndarray):
        picture = Image.fromarray(picture)
    size = (max(1, round(picture.width * THUMB_HEIGHT / picture.height)), THUMB_HEIGHT)
    return np.asarray(picture.resize(size, resample).convert("RGB"))


def _extra_masks(segmenter: Segmenter, extras: tuple[ExtraReference, ...], pictures: list[np.ndarray]
                 ) -> list[tuple[Image.Image, str, list[tuple[int, RGB]]]]:
    """Per extra view: (colour mask, kind, numbered people). Characters are painted from their identity on,
    left to right, on black; a view with nobody in it is a background reference, all white."""
    out = []
    for extra, picture in zip(extras, pictures):
        size = picture.shape[:2]
        people = _left_to_right(mk.people_in_image(segmenter.image(picture, len(IDENTITIES)), size))
        if not people:
            out.append((mk.paint(size, [], WHITE), "background", []))
            continue
        colours = [extra.identity - 1 + k for k in range(len(people))]
        if colours[-1] >= len(IDENTITIES):
            raise UserError(f"{extra.path}: {len(people)} people from identity {extra.identity} on need more than "
                            f"the {len(IDENTITIES)} palette colours")
        mask = _colour_mask(size, people, colours, BLACK)
        out.append((mask, "character", [(c + 1, identity_rgb(c)) for c in colours]))
    return out


def prepare(settings: PrepareSettings, progress: Progress | None = None) -> PreparedInputs:
    """Write the prepared folder `settings.out` (or, with `masks_only`, its masks again) and return it."""
    report: Progress = progress or (lambda phase, done, total: None)
    src = _sources(settings)
    reference = read_picture(src.image)
    extra_pictures = [read_picture(e.path) for e in src.extras]
    segmenter = open_segmenter(settings)
    try:
        staging = replaced_files(settings.out) if settings.masks_only else new_folder(settings.out)
        with staging as stage:
            _prepare_into(stage, settings, src, reference, extra_pictures, segmenter, report)
    finally:
        segmenter.close()
    return read_inputs(settings.out)


def _prepare_into(stage: Path, settings: PrepareSettings, src: _Sources, reference: np.ndarray,
                  extra_pictures: list[np.ndarray], segmenter: Segmenter, report: Progress) -> None:
    replace = settings.mode is Mode.REPLACE
    ref_bg, drive_bg = backgrounds(replace)

    report("reference", 0, 1)
    ref_people = _left_to_right(mk.people_in_image(segmenter.image(reference, settings.people + 1),
                                                   reference.shape[:2]))
    if len(ref_people) != settings.people:
        raise _count_error(str(src.image), len(ref_people), settings.people, "--people")

    copy = None if settings.masks_only else DrivingCopy(src.video, stage)
    frames = prefetched(src.video.frames())
    first = next(frames, None)
    if first is None:
        raise UserError(f"{src.video.path}: video has no frames")
    if copy is not None:
        first = copy.crop(first)
    size = first.shape[:2]
    most = len(IDENTITIES) if replace else settings.people + 1
    drive_people = _left_to_right(mk.people_in_image(segmenter.image(first, most), size))
    pairing = _pairing(settings, ref_people, drive_people, f"{src.video.path} (first frame)")
    report("reference", 1, 1)

    framing: Framing | None = None
    if settings.fits_reference:
        character = _union_box(ref_people)
        target = _union_box([p for p, c in zip(drive_people, pairing) if c is not None])
        reference, ref_people, framing = fit_reference(reference, ref_people, character, target, size,
                                                       BLACK if replace else None)
    ref_colours = list(range(len(ref_people)))
    ref_mask = _colour_mask(reference.shape[:2], ref_people, ref_colours, ref_bg)
    if not settings.masks_only:
        write_png(stage / REFERENCE, reference)
    write_png(stage / REFERENCE_MASK, ref_mask)

    extras = _extra_masks(segmenter, src.extras, extra_pictures)
    extra_record = []
    for i, ((mask, kind, _), extra) in enumerate(zip(extras, src.extras), start=1):
        if not settings.masks_only:
            write_png(stage / f"extra_{i}.png", extra_pictures[i - 1])
        write_png(stage / f"extra_{i}_mask.png", mask)
        extra_record.append({"image": f"extra_{i}.png", "mask": f"extra_{i}_mask.png", "kind": kind,
                             "identity": extra.identity, "source": str(Path(extra.path).resolve())})

    count, first_boxes, sample = _driving_masks(stage / DRIVING_MASK, src.video, copy, first, frames, drive_people,
                                                pairing, segmenter, drive_bg, report)
    if count < MIN_FRAMES:
        raise UserError(f"{src.video.path}: {count} frames; SCAIL-2 needs at least {MIN_FRAMES}")

    report("preview", 0, 1)
    identities = [{"number": c + 1, "colour": IDENTITIES[c][0], "rgb": list(identity_rgb(c)),
                   "reference_box": list(mk.box(ref_people[c])), "driving_person": k + 1,
                   "driving_box_first_frame": list(first_boxes[c]) if c in first_boxes else None}
                  for k, c in enumerate(pairing) if c is not None]
    driving_name = (copy.path if copy is not None else src.video.path).name
    write_inputs(stage, {
        "mode": settings.mode.value, "people": settings.people, "segmenter": segmenter.name,
        "prompt_object": settings.prompt_object,
        "files": {"reference": REFERENCE, "reference_mask": REFERENCE_MASK, "driving": driving_name,
                  "driving_mask": DRIVING_MASK, "preview": PREVIEW},
        "extra_references": extra_record, "frames": count, "fps": src.video.fps, "size": list(size),
        "backgrounds": {"reference_mask": "black" if replace else "white",
                        "driving_mask": "white" if replace else "black"},
        "identities": identities,
        "framing": None if framing is None else {"scale": framing.scale, "offset": list(framing.offset),
                                                 "canvas": list(framing.canvas),
                                                 "character_box": list(framing.character),
                                                 "target_box": list(framing.target)},
        "sources": src.record,
    })
    _write_preview(stage / PREVIEW, settings, segmenter.name, src, reference, ref_mask, framing, sample, extras,
                   extra_pictures, count)
    report("preview", 1, 1)


def _pairing(settings: PrepareSettings, ref_people: list[np.ndarray], drive_people: list[np.ndarray],
             where: str) -> list[int | None]:
    """For each driving person (left to right in the first frame), the reference identity painted on them, or
    None (replacement: everyone but the person replaced)."""
    if settings.mode is Mode.REPLACE:
        if not drive_people:
            raise _count_error(where, 0, 1, "--people")
        chosen = (settings.replace_person - 1 if settings.replace_person is not None
                  else _nearest(ref_people, drive_people))
        if chosen >= len(drive_people):
            raise UserError(f"--replace-person {settings.replace_person}: the first frame shows "
                            f"{len(drive_people)} {'person' if len(drive_people) == 1 else 'people'}")
        return [0 if k == chosen else None for k in range(len(drive_people))]
    if len(drive_people) != settings.people:
        raise _count_error(where, len(drive_people), settings.people, "--people")
    return [k - 1 for k in settings.order or range(1, settings.people + 1)]


def _driving_masks(folder: Path, video: Video, copy: DrivingCopy | None, first: np.ndarray, frames,
                   drive_people: list[np.ndarray], pairing: list[int | None], segmenter: Segmenter,
                   background: RGB, report: Progress) -> tuple[int, dict[int, mk.Box], EvenSample]:
    """Segment, track, smooth, paint and write every frame (and copy the driving video along). Returns the
    frame count, each identity's box in frame 0, and the frames kept for the preview."""
    size = first.shape[:2]
    tracker = IdentityTracker(drive_people, first)
    session = segmenter.video(len(drive_people))
    smoother = mk.TemporalSmoother()
    folder.mkdir()
    sample = EvenSample(PREVIEW_FRAMES)
    first_boxes: dict[int, mk.Box] = {}
    count = 0
    with copy if copy is not None else nullcontext(), BackgroundWriter() as pngs:
        for i, frame in enumerate(_chain(first, frames)):
            if copy is not None:
                frame = copy.crop(frame)
            found = tracker.update(session.detect(frame), frame)
            layers = smoother.step({pairing[k]: soft for k, soft in found.items() if pairing[k] is not None})
            work = smoother.size or size
            painted = mk.paint(work, [(identity_rgb(c), m, s) for c, (m, s) in layers.items()], background)
            if work != size:  # nearest-neighbour: colours stay pure
                painted = painted.resize((size[1], size[0]), Image.NEAREST)
            pngs.write(folder / f"{i:05d}.png", painted)
            if copy is not None:
                copy.add(frame)
            if i == 0:
                index = np.asarray(painted)
                first_boxes = {c: mk.box(index == k) for k, c in enumerate(layers, start=1)}
            sample.offer(i, lambda f=frame, m=painted: (_thumb(f, Image.BILINEAR), _thumb(m, Image.NEAREST)))
            count = i + 1
            report("driving video", count, video.count)
    return count, first_boxes, sample


def _chain(first: np.ndarray, rest):
    yield first
    yield from rest


def _write_preview(path: Path, settings: PrepareSettings, segmenter: str, src: _Sources, reference: np.ndarray,
                   ref_mask: Image.Image, framing: Framing | None, sample: EvenSample, extras: list,
                   extra_pictures: list[np.ndarray], count: int) -> None:
    replace = settings.mode is Mode.REPLACE
    people = tuple((c + 1, identity_rgb(c)) for c in range(settings.people))
    boxes = () if framing is None else ((framing.character, CHARACTER_BOX), (framing.target, TARGET_BOX))
    ref_bg, drive_bg = ("black", "white") if replace else ("white", "black")
    ref_panel = Panel(reference, np.asarray(ref_mask.convert("RGB")), f"reference (mask on {ref_bg})", people, boxes)
    frames = [Panel(pic, mask, f"frame {i}", people) for i, (pic, mask) in sample.pick(PREVIEW_FRAMES)]
    extra_panels = [Panel(pic, np.asarray(mask.convert("RGB")), f"extra {i} ({kind})", numbered)
                    for i, ((mask, kind, numbered), pic) in enumerate(zip(extras, extra_pictures), start=1)]
    legend = [(colour, f"{n} {IDENTITIES[n - 1][0]}") for n, colour in people]
    if framing is not None:
        legend += [(CHARACTER_BOX, "character box"), (TARGET_BOX, "driving person's box")]
    title = (f"{settings.mode.value}: reference mask on {ref_bg}, driving mask on {drive_bg}; {count} frames at "
             f"{src.video.fps:g} fps; {segmenter}")
    preview_sheet(title, ref_panel, frames, extra_panels, legend).save(path, format="PNG")
