"""The preview sheet: the reference with its mask over it, a grid of driving frames with theirs, each person
numbered in their colour, and (when the reference was reframed) the character's and the driving person's
boxes. One PNG, to check the masks before spending GPU time on them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .masks import Box, box
from .palette import RGB

REFERENCE_HEIGHT = 360
THUMB_HEIGHT = 172
EXTRA_HEIGHT = 120
COLUMNS = 4
MARGIN = 10
TEXT = (20, 20, 20)
SHEET = (238, 238, 238)
CHARACTER_BOX = (255, 255, 255)
TARGET_BOX = (255, 140, 0)


@dataclass(frozen=True)
class Panel:
    """A picture, its colour mask (same size), a caption, and the people to number: (index, colour)."""

    picture: np.ndarray
    mask: np.ndarray
    caption: str
    people: tuple[tuple[int, RGB], ...]
    boxes: tuple[tuple[Box, RGB], ...] = field(default=())


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _overlay(panel: Panel, height: int) -> Image.Image:
    """The picture with each person tinted half-way to their colour and outlined in it, at `height`."""
    pic = panel.picture.astype(np.float32)
    mask = panel.mask
    out = pic.copy()
    for _, colour in panel.people:
        on = (mask == np.array(colour, dtype=np.uint8)).all(axis=-1)
        out[on] = 0.5 * pic[on] + 0.5 * np.array(colour, dtype=np.float32)
        edge = on & ~(np.roll(on, 1, 0) & np.roll(on, -1, 0) & np.roll(on, 1, 1) & np.roll(on, -1, 1))
        out[edge] = colour
    h, w = mask.shape[:2]
    scale = height / h
    image = Image.fromarray(out.round().astype(np.uint8)).resize((max(1, round(w * scale)), height), Image.BILINEAR)
    draw = ImageDraw.Draw(image)
    font = _font(max(11, height // 14))
    for index, colour in panel.people:
        b = box((mask == np.array(colour, dtype=np.uint8)).all(axis=-1))
        if b is None:
            continue
        x, y = (b[0] + b[2]) / 2 * scale, b[1] * scale
        label = str(index)
        tw, th = draw.textbbox((0, 0), label, font=font)[2:]
        x0 = max(0, x - tw / 2 - 4)
        y0 = y - th - 8 if y > th + 8 else y + 2  # above the person's box, inside it when at the top
        draw.rectangle([x0, y0, x0 + tw + 8, y0 + th + 6], fill=colour)
        ink = (0, 0, 0) if sum(colour) > 400 else (255, 255, 255)
        draw.text((x0 + 4, y0 + 2), label, fill=ink, font=font)
    for b, colour in panel.boxes:
        draw.rectangle([b[0] * scale, b[1] * scale, b[2] * scale - 1, b[3] * scale - 1], outline=colour, width=3)
    return image


def _captioned(image: Image.Image, caption: str, font) -> Image.Image:
    draw = ImageDraw.Draw(image)
    tw, th = draw.textbbox((0, 0), caption, font=font)[2:]
    out = Image.new("RGB", (image.width, image.height + th + 8), SHEET)
    out.paste(image, (0, 0))
    ImageDraw.Draw(out).text((2, image.height + 3), caption, fill=TEXT, font=font)
    return out


def preview_sheet(title: str, reference: Panel, frames: list[Panel], extras: list[Panel],
                  legend: list[tuple[RGB, str]]) -> Image.Image:
    """Lay the sheet out: title and legend on top, the reference (and extra references under it) on the left,
    the driving frames in a grid of COLUMNS on the right."""
    font = _font(14)
    ref = _captioned(_overlay(reference, REFERENCE_HEIGHT), reference.caption, font)
    extra_imgs = [_captioned(_overlay(p, EXTRA_HEIGHT), p.caption, font) for p in extras]
    thumbs = [_captioned(_overlay(p, THUMB_HEIGHT), p.caption, font) for p in frames]
    rows = [thumbs[i:i + COLUMNS] for i in range(0, len(thumbs), COLUMNS)]
    grid_w = max((sum(t.width for t in row) + MARGIN * (len(row) - 1) for row in rows), default=0)
    grid_h = sum(max(t.height for t in row) for row in rows) + MARGIN * max(0, len(rows) - 1)
    extras_h = sum(e.height + MARGIN for e in extra_imgs)
    left_w = max([ref.width] + [e.width for e in extra_imgs])
    head = 56
    width = MARGIN * 3 + left_w + grid_w
    height = head + MARGIN + max(ref.height + extras_h, grid_h) + MARGIN
    sheet = Image.new("RGB", (width, height), SHEET)
    draw = ImageDraw.Draw(sheet)
    draw.text((MARGIN, 8), title, fill=TEXT, font=_font(17))
    x = MARGIN
    for colour, text in legend:
        draw.rectangle([x, 34, x + 16, 50], fill=colour, outline=TEXT)
        draw.text((x + 22, 34), text, fill=TEXT, font=font)
        x += 30 + round(draw.textlength(text, font=font))
    sheet.paste(ref, (MARGIN, head + MARGIN))
    y = head + MARGIN + ref.height + MARGIN
    for e in extra_imgs:
        sheet.paste(e, (MARGIN, y))
        y += e.height + MARGIN
    y = head + MARGIN
    for row in rows:
        x = MARGIN * 2 + left_w
        for t in row:
            sheet.paste(t, (x, y))
            x += t.width + MARGIN
        y += max(t.height for t in row) + MARGIN
    return sheet
