"""What reading the user's four files costs a run (`inputs.load_inputs`, the pipeline's "inputs" phase; issue 23).

A driving video of scikit-image's astronaut panning over `--frames` frames at `--size` (H.264, as a user's clip),
its mask video (a blue box on black), a reference picture and its mask (a blue box on white), written once; then
`load_inputs` reads them `--repeats` times at that size: decode, resize, the 2x2 halving of both videos
(`conditioning.half_res`), and the masks' checks (`conditioning.check_mask`). Then the driving mask's 28 channels
(`conditioning.driving_mask_channels`, most of a segment's "conditions" phase) from what was read. CPU only.

    python benchmarks/bench_inputs.py --frames 81 --size 704p --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench_video_write import panning
from scail2_lite import media
from scail2_lite.conditioning import driving_mask_channels
from scail2_lite.config import SIZES
from scail2_lite.inputs import InputFiles, load_inputs

BLUE, WHITE = (0, 0, 255), (255, 255, 255)


def write_inputs(folder: Path, frames: int, h: int, w: int) -> InputFiles:
    video = panning(frames, h, w)
    media.write_video(folder / "pose.mp4", video, fps=16)
    box = (slice(h // 7, h * 6 // 7), slice(w // 4, w * 3 // 4))
    mask = torch.full_like(video, -1.0)
    mask[2, :, box[0], box[1]] = 1.0  # blue on black
    media.write_video(folder / "mask.mp4", mask, fps=16)
    Image.fromarray(media.to_uint8(video[:, :1])[0]).save(folder / "ref.png")
    ref_mask = np.full((h, w, 3), WHITE, np.uint8)
    ref_mask[box] = BLUE
    Image.fromarray(ref_mask).save(folder / "ref_mask.png")
    return InputFiles(folder / "ref.png", folder / "ref_mask.png", folder / "pose.mp4", folder / "mask.mp4")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--size", default="704p", choices=sorted(SIZES))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    h, w = SIZES[args.size]
    with tempfile.TemporaryDirectory() as tmp:
        files = write_inputs(Path(tmp), args.frames, h, w)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            inputs = load_inputs(files, size=args.size)
            times.append(time.perf_counter() - t)
    assert inputs.frames == args.frames and not inputs.warnings, inputs.warnings
    channels = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        driving_mask_channels(inputs.mask_video)
        channels.append(time.perf_counter() - t)
    rows = [("reading the inputs (`load_inputs`)", times), ("driving mask channels (`compress_mask`)", channels)]
    print(f"{w}x{h} x {args.frames} frames, {os.cpu_count()} CPUs\n| part | s (median) | runs |\n|---|---|---|\n"
          + "\n".join(f"| {name} | {statistics.median(ts):.2f} | {', '.join(f'{x:.2f}' for x in ts)} |"
                      for name, ts in rows))

if __name__ == "__main__":
    main()
