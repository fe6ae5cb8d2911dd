"""What writing the mp4 costs a run, and how much of it the write-behind hides (issue 23). CPU only.

A run's frames arrive from the VAE decode in groups of 4 (the first alone), float32 on [-1, 1]; the pipeline turns
each into 8 bits (`media.to_uint8`) and hands it to `write_behind.WriteBehind`, whose worker encodes it (PyAV,
libx264 crf 17 `medium`, `media.VideoWriter`). This measures, on a real picture panning over `--frames` frames at
`--size` (scikit-image's astronaut or `--image`, so H.264 sees natural content; `--content noise`: uniform noise,
what a synthetic checkpoint's decode looks like to the encoder, several times the bits and the encoding time):
1. the conversion to 8 bits per group, the shipped in-place form against the out-of-place form it replaced;
2. a decode simulated as `--decode-s` seconds of waiting per group (a CUDA synchronisation releases the GIL as
   `time.sleep` does), with the frames written in line (each group encoded before the next is decoded: the old
   pipeline) and behind it (the shipped one): seconds end to end and what the decode waited for the writer.
3. the same decode in `--tiles` tiles, written behind: each tile is decoded over the whole clip before the next, so
   the frames can only come during the last tile (the shipped decode blends and hands them over as that tile
   decodes them) or, as before 2026-12-07 (sixth), all at once at the end.

    python benchmarks/bench_video_write.py --frames 81 --size 704p --decode-s 0.48 --tiles 3 --repeats 2 \
        --threads SLICE FRAME
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
import torch.nn.functional as F

from scail2_lite import media
from scail2_lite.config import SIZES
from scail2_lite.write_behind import WriteBehind


def picture(path: Path | None) -> np.ndarray:
    """(H, W, 3) uint8: the image at `path`, else scikit-image's astronaut."""
    if path is not None:
        return media.to_uint8(media.read_image(path)[:, None])[0]
    from skimage import data

    return data.astronaut()


def noise(frames: int, h: int, w: int) -> torch.Tensor:
    """(3, frames, h, w) uniform on [-1, 1], seeded."""
    return torch.rand(3, frames, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1


def panning(frames: int, h: int, w: int, rgb: np.ndarray | None = None) -> torch.Tensor:
    """(3, frames, h, w) on [-1, 1]: `rgb` (the astronaut by default), scaled past the frame and panned one pixel per
    frame."""
    rgb = picture(None) if rgb is None else rgb
    img = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float()[None] / 127.5 - 1
    img = F.interpolate(img, size=(h + frames, w + frames), mode="bilinear", align_corners=False)[0]
    return torch.stack([img[:, i // 2: i // 2 + h, i: i + w] for i in range(frames)], dim=1).contiguous()


def groups(video: torch.Tensor) -> list[torch.Tensor]:
    """The decode's groups: the first frame alone, then 4 at a time."""
    return [video[:, :1], *video[:, 1:].split(4, dim=1)]


def out_of_place(frames: torch.Tensor) -> np.ndarray:
    """The conversion before 2026-12-07 (every step a new tensor), kept here as the comparison."""
    x = frames.detach().float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    return np.ascontiguousarray(x.permute(1, 2, 3, 0).cpu().numpy())


def conversion(parts: list[torch.Tensor], repeats: int) -> str:
    rows = []
    for name, fn in (("out of place (before)", out_of_place), ("in place (`media.to_uint8`)", media.to_uint8)):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            for g in parts:
                fn(g)
            times.append(time.perf_counter() - t)
        rows.append(f"| {name} | {statistics.median(times):.2f} | {', '.join(f'{x:.2f}' for x in times)} |")
    assert all(np.array_equal(out_of_place(g), media.to_uint8(g)) for g in parts[:3])
    return "| conversion to 8 bits, all groups | s (median) | runs |\n|---|---|---|\n" + "\n".join(rows)


def run(parts: list[torch.Tensor], size: tuple[int, int], decode_s: float, behind: bool, folder: Path,
        tiles: int = 1, at_end: bool = False, h264: media.H264 = media.H264()) -> dict:
    """One simulated decode + write, as the pipeline does it; seconds end to end and the writer's figures. Tiled
    (`tiles` > 1), the first tiles take their share of the decode before any frame comes; then the last tile's
    groups come one by one, or (`at_end`) all at once when it is done."""
    t = time.perf_counter()
    waits = [decode_s] * len(parts)
    if tiles > 1:
        share = decode_s * len(parts) * (tiles - 1) / tiles
        waits = [share + decode_s * len(parts) / tiles] + [0.0] * (len(parts) - 1) if at_end else \
            [share + decode_s / tiles] + [decode_s / tiles] * (len(parts) - 1)
    with media.VideoWriter(folder / "out.mp4", 16, size, h264) as writer:
        if behind:
            with WriteBehind(writer.write_rgb, depth=len(parts)) as writes:
                for g, wait in zip(parts, waits):
                    time.sleep(wait)
                    writes.put(media.to_uint8(g))
                writes.finish()
            writer.close()
            return {"s": time.perf_counter() - t, "writer s": writes.seconds, "waited s": writes.waited,
                    "bytes": (folder / "out.mp4").stat().st_size}
        for g, wait in zip(parts, waits):
            time.sleep(wait)
            writer.write_rgb(media.to_uint8(g))
        writer.close()
    return {"s": time.perf_counter() - t, "writer s": None, "waited s": None,
            "bytes": (folder / "out.mp4").stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--size", default="704p", choices=sorted(SIZES))
    ap.add_argument("--decode-s", type=float, default=0.48, help="simulated decode seconds per group")
    ap.add_argument("--tiles", type=int, default=3, help="tiles of the simulated tiled decode (the 16 GiB card's "
                    "three strips at 704p)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--content", choices=("picture", "noise"), default="picture",
                    help="a picture panning (natural content) or uniform noise (a synthetic checkpoint's output)")
    ap.add_argument("--image", type=Path, help="the picture (default: scikit-image's astronaut)")
    ap.add_argument("--threads", nargs="+", choices=[t.value for t in media.EncoderThreads], default=["SLICE"],
                    help="x264's threading (`media.H264.threads`): each case runs under each")
    args = ap.parse_args()
    h, w = SIZES[args.size]
    video = noise(args.frames, h, w) if args.content == "noise" else panning(args.frames, h, w, picture(args.image))
    parts = groups(video)
    print(f"{args.frames} frames at {w}x{h} ({args.content}), {len(parts)} groups, torch threads "
          f"{torch.get_num_threads()}, CPUs {os.cpu_count()}\n")
    print(conversion(parts, args.repeats) + "\n")
    decode = args.decode_s * len(parts)
    cases = (("untiled, in line (before)", False, 1, False), ("untiled, behind (shipped)", True, 1, False),
             (f"{args.tiles} tiles, behind, frames at the end (before)", True, args.tiles, True),
             (f"{args.tiles} tiles, behind, the last tile streamed (shipped)", True, args.tiles, False))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for threads in args.threads:
            h264 = media.H264(threads=media.EncoderThreads(threads))
            for name, behind, tiles, at_end in cases:
                runs = [run(parts, (h, w), args.decode_s, behind, Path(tmp), tiles, at_end, h264)
                        for _ in range(args.repeats)]
                best = min(runs, key=lambda r: r["s"])
                writer_s, waited = ("-", "-") if not behind else (f"{best['writer s']:.2f}", f"{best['waited s']:.2f}")
                mbit = best["bytes"] * 8 / (args.frames / 16) / 1e6
                rows.append(f"| {name} | {threads.lower()} | {best['s']:.2f} | {best['s'] - decode:.2f} | {writer_s} | "
                            f"{waited} | {mbit:.1f} |")
                print(rows[-1], flush=True)
    print(f"\nsimulated decode {decode:.1f} s\n| decode, frames written | x264 threads | s end to end (best) | "
          "over the decode s | writer's own s | decode waited s | Mbit/s at 16 fps |\n|---|---|---|---|---|---|---|\n"
          + "\n".join(rows))

if __name__ == "__main__":
    main()
