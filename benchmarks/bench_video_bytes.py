"""Does the mp4 writer give the same bytes for the same frames? (issue 23, CPU)

`media.VideoWriter` encodes the same uint8 frames `--encodes` times per frame size and x264 threading
(`media.H264.threads`), with `--busy` processes spinning beside it (a loaded CPU, as in CI or beside the decode), and
counts the distinct video bitstreams (the packets' bytes, not the container's). Smooth moving patterns (the tests'
`smooth_video`) at the small sizes, scikit-image's astronaut panning at the generation sizes.

    python benchmarks/bench_video_bytes.py --encodes 12 --busy 2
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

from bench_video_write import panning
from scail2_lite import media

SMALL = (64, 96, 112, 128, 160, 256)  # square, smooth pattern, 9 frames
LARGE = ((512, 896), (704, 1280))  # the generation sizes, panning picture, 9 frames


def smooth(frames: int, size: int) -> torch.Tensor:
    """(3, frames, size, size) on [-1, 1]: low-frequency waves moving every frame (tests/test_media.smooth_video)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return torch.stack([torch.stack([torch.sin(3 * xx + 0.3 * i), torch.cos(2 * yy - 0.2 * i), xx * yy])
                        for i in range(frames)], dim=1) * 0.8


def bitstream(path: Path) -> str:
    """A digest of the video packets' bytes (what x264 wrote; the container's own fields left out)."""
    with av.open(str(path)) as container:
        return hashlib.md5(b"".join(bytes(p) for p in container.demux(video=0))).hexdigest()


def distinct(frames: np.ndarray, threads: str, encodes: int, folder: Path) -> int:
    size = frames.shape[1:3]
    seen = set()
    for i in range(encodes):
        path = folder / f"{i}.mp4"
        with media.VideoWriter(path, 16, size, media.H264(threads=media.EncoderThreads(threads))) as writer:
            writer.write_rgb(frames)
        seen.add(bitstream(path))
    return len(seen)


def spin(stop_at: float) -> None:
    while time.monotonic() < stop_at:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encodes", type=int, default=12)
    ap.add_argument("--busy", type=int, default=2, help="processes spinning beside the encodes")
    ap.add_argument("--threads", nargs="+", choices=[t.value for t in media.EncoderThreads],
                    default=[t.value for t in media.EncoderThreads])
    args = ap.parse_args()
    cases = [(f"{s}x{s} smooth", media.to_uint8(smooth(9, s))) for s in SMALL]
    cases += [(f"{w}x{h} panning", media.to_uint8(panning(9, h, w))) for h, w in LARGE]
    spinners = [mp.get_context("spawn").Process(target=spin, args=(time.monotonic() + 3600,), daemon=True)
                for _ in range(args.busy)]
    for p in spinners:
        p.start()
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, frames in cases:
                counts = [distinct(frames, t, args.encodes, Path(tmp)) for t in args.threads]
                rows.append(f"| {name} | " + " | ".join(str(c) for c in counts) + " |")
                print(rows[-1], flush=True)
    finally:
        for p in spinners:
            p.terminate()
    print(f"\n{args.encodes} encodes each, {args.busy} busy processes beside; distinct video bitstreams\n"
          f"| frames (9) | " + " | ".join(f"x264 {t.lower()} threads" for t in args.threads) + " |\n|---|"
          + "---|" * len(args.threads) + "\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
