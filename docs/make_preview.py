"""How `docs/prepare_preview.png` (the README's picture) was made: `prepare` on the two-person composites
(Grace Hopper and the astronaut crossing paths, `scail2_lite.prepare.composite`), its preview sheet reduced to
a 96-colour palette to keep the file small. Run: `python docs/make_preview.py` (the `prepare` and `test` extras).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from PIL import Image

from scail2_lite import media
from scail2_lite.prepare import PrepareSettings, composite
from scail2_lite.prepare.run import prepare

HERE = Path(__file__).resolve().parent


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        Image.fromarray(composite.pair()[0]).save(work / "pair.png")
        frames = torch.from_numpy(composite.crossing().frames).permute(3, 0, 1, 2).float().div(127.5).sub(1)
        media.write_video(work / "crossing.mp4", frames, fps=16)
        prepared = prepare(PrepareSettings(out=work / "out", image=work / "pair.png", video=work / "crossing.mp4",
                                           people=2))
        with Image.open(prepared.folder / "preview.png") as sheet:
            small = sheet.convert("RGB").quantize(96, method=Image.Quantize.MEDIANCUT)
            small.save(HERE / "prepare_preview.png", optimize=True)
    print(f"wrote {HERE / 'prepare_preview.png'} ({(HERE / 'prepare_preview.png').stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
