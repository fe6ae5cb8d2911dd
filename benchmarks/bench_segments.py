"""Multi-segment generation on the GPU under several profiles: identical latents, one streamer per run (issue 6).

Question: with the DiT placed per segment (released for each VAE decode, the streamer suspended and resumed, its
pinned buffer or the mapped shards reused), does every profile give bit-identical latents for every segment, as
the CPU tests show on the tiny model? Uses the full 14B FP8 folder of `bench_pipeline.py` stages 1-2 (made here if
`--workdir` lacks it) at a small frame size (256x256, 17 frames in 3 segments of 9 with 5 frames of history), so
the run is about loading and placement, not compute. Prints a markdown table.

Run on the GPU machine: `python benchmarks/bench_segments.py --profiles resident,16gb,lowram` (~3 minutes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _workdir import fp8_folder  # noqa: E402

from scail2_lite import GenerationSettings, InputFiles, Pipeline  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profiles", default="resident,16gb,lowram")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/scail2_bench_pipeline"))
    ap.add_argument("--device", default="cuda", help="cpu runs the same code on a `bench_pipeline.py --tiny` folder")
    args = ap.parse_args()
    model, files = fp8_folder(args.workdir, tiny=args.device == "cpu")
    settings = GenerationSettings(size=(256, 256), frames=17, steps=2, seed=1, segment_len=9, segment_overlap=5)
    rows, reference = [], None
    for profile in args.profiles.split(","):
        latents: list[torch.Tensor] = []
        t = time.perf_counter()
        pipe = Pipeline.from_pretrained(model, device=args.device, profile=profile)
        result = pipe(InputFiles(**files), settings=settings, keep_frames=False,
                      on_latents=lambda k, z: latents.append(z))
        seconds = time.perf_counter() - t
        reference = reference or latents
        same = len(latents) == len(reference) and all(torch.equal(a, b) for a, b in zip(latents, reference))
        rows.append(f"| {profile} | {result.settings.get('resident_blocks', '-')} | {len(latents)} | {result.settings.get('streamers_built', 0)} "
                    f"| {'yes' if same else 'NO'} | {seconds:.0f} |")
        del pipe
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    where = torch.cuda.get_device_name() if args.device != "cpu" else "CPU (tiny model)"
    print(f"\n{where}, torch {torch.__version__}: FP8 folder, 256x256, 17 frames = 3 segments, "
          "2 steps with CFG; latents compared with the first profile's, segment by segment\n")
    print("| profile | resident blocks | segments | streamers built | latents identical | s |\n|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
