"""`scail2-lite prepare` on a CPU: time for 81 frames at 512x896 (target <= 5 s) and mask quality against truth.

Footage: the astronaut photo composited onto the coffee photo as the reference, and Grace Hopper swaying and
zooming over the panning rocket photo as the driving video (`scail2_lite.prepare.composite`: truth known).
Measures, each the median of `--repeat` runs:
- the command as a user runs it (`scail2-lite prepare ...` in a fresh process: Python, torch and mediapipe
  imports included),
- `prepare()` in a warm process, split into setup (reading, models, reference, first frame), the driving
  frames, and the preview,
and the masks' IoU with the truth (reference; driving frames, mean and minimum).
Run: `python benchmarks/bench_prepare.py` (needs the `prepare` and `test` extras). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from scail2_lite import media
from scail2_lite.prepare import PrepareSettings, composite
from scail2_lite.prepare.footage import frame_files
from scail2_lite.prepare.run import prepare

BLUE = np.array([0, 0, 255], dtype=np.uint8)


def blue(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return (np.asarray(img.convert("RGB")) == BLUE).all(axis=-1)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def timed_run(image: Path, video: Path, out: Path) -> dict[str, float]:
    """One in-process run; phase boundaries from the progress callback."""
    marks: dict[str, float] = {}

    def progress(phase: str, done: int, total: int | None) -> None:
        now = time.perf_counter()
        marks.setdefault(f"{phase} start", now)
        marks[f"{phase} end"] = now

    start = time.perf_counter()
    prepare(PrepareSettings(out=out, image=image, video=video), progress=progress)
    end = time.perf_counter()
    return {"setup": marks["driving video start"] - start,
            "driving": marks["driving video end"] - marks["driving video start"],
            "preview": end - marks["driving video end"], "total": end - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_prepare."))
    try:
        reference, ref_truth = composite.reference("astronaut")
        Image.fromarray(reference).save(work / "ref.png")
        footage = composite.dancing("grace_hopper", (512, 896), args.frames)
        video = torch.from_numpy(footage.frames).permute(3, 0, 1, 2).float().div(127.5).sub(1)
        media.write_video(work / "driving.mp4", video, fps=16)
        image, drive = work / "ref.png", work / "driving.mp4"

        command = [sys.executable, "-m", "scail2_lite.cli", "prepare", "--image", str(image), "--video", str(drive)]
        cli = []
        for k in range(args.repeat):
            start = time.perf_counter()
            subprocess.run([*command, "-o", str(work / f"cli{k}")], check=True, capture_output=True)
            cli.append(time.perf_counter() - start)
        warm = [timed_run(image, drive, work / f"warm{k}") for k in range(args.repeat + 1)][1:]

        out = work / "warm1"
        ref_iou = iou(blue(out / "ref_mask.png"), ref_truth)
        driving = [iou(blue(p), t[0]) for p, t in zip(frame_files(out / "driving_mask"), footage.truth)]
        med = {key: statistics.median(run[key] for run in warm) for key in warm[0]}
        print("| frames | size | command (fresh process) | warm total | setup | driving frames | per frame | "
              "preview | IoU reference | IoU driving mean / min |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        print(f"| {args.frames} | 512x896 | {statistics.median(cli):.2f} s | {med['total']:.2f} s | "
              f"{med['setup']:.2f} s | {med['driving']:.2f} s | {1000 * med['driving'] / args.frames:.1f} ms | "
              f"{med['preview']:.2f} s | {ref_iou:.3f} | {np.mean(driving):.3f} / {min(driving):.3f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
