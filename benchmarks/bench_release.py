"""What a full garbage collection costs a run (issue 23).

Until 2026-12-07 (eighth) every release of GPU memory (`placement.release_cached_memory`: after umT5, after CLIP,
after each VAE use, after each segment's steps) began with `gc.collect()`. A full collection walks every object the
process tracks, and a run's process tracks the imports (torch, transformers, diffusers, PyAV) and the models'
modules. This loads a checkpoint (the cached tiny demo one unless `--folder`), runs one generation of it so that
everything a run imports is imported, then counts the tracked objects and times full collections, and what each
found. On the tiny checkpoint the objects are the imports'; a real checkpoint adds its modules.

    python benchmarks/bench_release.py --collections 5
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

from scail2_lite.inputs import InputFiles
from scail2_lite.pipeline import Pipeline
from scail2_lite.settings import GenerationSettings
from scail2_lite.synth import cached_demo_folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folder", type=Path, help="a checkpoint folder with inputs/ (default: the demo's)")
    ap.add_argument("--collections", type=int, default=5)
    args = ap.parse_args()
    folder = args.folder or cached_demo_folder()
    inputs = folder / "inputs"
    files = InputFiles(inputs / "ref.png", inputs / "ref_mask.png", inputs / "driving.mp4",
                       inputs / "driving_mask.mp4")
    pipe = Pipeline.from_pretrained(folder)
    with tempfile.TemporaryDirectory() as tmp:
        pipe(files, "a person dancing", settings=GenerationSettings(size=(128, 128), steps=2),
             output=Path(tmp) / "out.mp4")
    times, found = [], []
    for _ in range(args.collections):
        t = time.perf_counter()
        found.append(gc.collect())
        times.append(time.perf_counter() - t)
    print(f"| tracked objects | full collections | s each (median) | s each (runs) | unreachable found |\n"
          f"|---|---|---|---|---|\n| {len(gc.get_objects())} | {len(times)} | {statistics.median(times):.3f} | "
          f"{', '.join(f'{x:.3f}' for x in times)} | {', '.join(map(str, found))} |")


if __name__ == "__main__":
    main()
