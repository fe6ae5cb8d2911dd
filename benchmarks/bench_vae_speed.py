"""The VAE's encode and decode at the 704p run's shapes, each way of running the convolutions in a fresh process
(issue 23: the time outside the DiT steps).

Question: the fast 704p x 81 run spends 11.7 s decoding (9.1 s once cuDNN has searched its algorithms: the first
decode of a process pays the search) and 3.8 s encoding (no search). Which of cuDNN's search or its heuristics,
fp32 (TF32) or bf16, NCDHW or channels-last weights gives the shortest *first* encode and decode, the ones a run
pays? Each variant runs in its own process (cuDNN's search results live for the process), on the full-width Wan VAE
(random weights: time does not depend on the values):
  encode  the reference image (1 frame, 1280x704) and the pose video (81 frames, 640x352), as the pipeline does;
  decode  latents of the 1280x704 x 81 output in the 16 GiB card's tiling (`planner.decode_cut`), twice: the
          first pass and the steady one.
Per variant: seconds of each, peak allocated. The decode's output is compared with the first variant run's
(relative error), so a faster variant that changes the video shows it.

    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/bench_vae_speed.py      # GPU, about 3 minutes
    python benchmarks/bench_vae_speed.py --tiny                           # CPU proof, tiny VAE (no cuDNN)
    python benchmarks/bench_vae_speed.py --cpu --frames 1 --only 7,6,5   # CPU, full VAE, one frame: the seams
`--cpu` runs the full-width VAE at the real frame size on the CPU (no cuDNN: search and layout do nothing there), for
the error columns: untiled fp32 first, then the tiled fp32 (the seams' error) and the tiled bf16 decode.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fidelity import sync, table  # noqa: E402

GB = 1e9
CARD_GIB = 16


@dataclass(frozen=True)
class Variant:
    name: str
    search: bool  # cuDNN's algorithm search (torch.backends.cudnn.benchmark) around encode and decode
    bf16: bool  # autocast to bf16 (the decode's `compute_dtype`; the encode under the same autocast)
    channels_last: bool  # the VAE's weights in channels_last_3d (cuDNN's fastest layouts are NDHWC)
    untiled: bool = False  # decode the whole frame at once (against the tiled ones: the seams' error)


# The settings before issue 23's change first (encode: heuristics, decode: search, fp32, NCDHW). Shipped now: fp32,
# channels-last, heuristics for both (variant 6); bf16 (variant 5) is `--vae-dtype bf16`.
VARIANTS = (
    Variant("fp32 search", True, False, False),
    Variant("fp32 heuristics", False, False, False),
    Variant("fp32 channels-last search", True, False, True),
    Variant("bf16 search", True, True, False),
    Variant("bf16 channels-last search", True, True, True),
    Variant("bf16 channels-last heuristics", False, True, True),
    Variant("fp32 channels-last heuristics", False, False, True),
    Variant("fp32 channels-last heuristics untiled", False, False, True, untiled=True),
)


def _timed(device: torch.device, fn) -> float:
    sync(device.type)
    t = time.perf_counter()
    fn()
    sync(device.type)
    return time.perf_counter() - t


def child(variant: Variant, tiny: bool, device: torch.device, frames: int, out: Path) -> None:
    """One variant in this (fresh) process: encode once, decode twice (on the CPU, `--cpu`: decode once, no encode);
    results and the decoded video to `out`."""
    from diffusers import AutoencoderKLWan

    from scail2_lite.offload import planner
    from scail2_lite.offload.card import DeviceMemory, card_bytes
    from scail2_lite.vae import WanVAE, vae_config

    h, w = (64, 128) if tiny else (704, 1280)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoencoderKLWan(**vae_config("tiny" if tiny else "full")).eval()
    budget = DeviceMemory.card(card_bytes(CARD_GIB)).allocator_budget()
    run_frames = 9 if tiny else 81  # the tiles the run's decode gets, whatever --frames decodes here
    cut = planner.decode_cut(h, w, run_frames, budget, 256)
    vae = WanVAE(model, tile=None if variant.untiled else cut.tiling)
    if variant.channels_last:
        vae.to(device)  # the pipeline's move: channels-last convolution weights on CUDA
    vae.search = variant.search
    dtype = torch.bfloat16 if variant.bf16 else None
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 1, h, w, generator=g).to(device) * 2 - 1
    pose = torch.rand(1, 3, frames, h // 2, w // 2, generator=g).to(device) * 2 - 1
    z = torch.randn(1, 16, (frames - 1) // 4 + 1, h // 8, w // 8, generator=g).to(device)
    if device.type == "cuda":  # the context, cuBLAS and cuDNN loaded outside the timings, as a run's encoders do
        torch.nn.functional.conv3d(torch.ones(1, 1, 1, 1, 1, device=device), torch.ones(1, 1, 1, 1, 1, device=device))
        torch.cuda.reset_peak_memory_stats(device)

    def encode() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant.bf16):
            vae.encode(image)
            vae.encode(pose)

    decoded: list[torch.Tensor] = []

    def decode() -> None:
        decoded[:] = [group.cpu() for group in vae.decode_frames(z, dtype, cut.by_frame and not variant.untiled)]

    row = {**asdict(variant), "tiling": vae.tiling.describe(h, w) if vae.tiling else "untiled",
           "encode_s": _timed(device, encode) if tiny or device.type == "cuda" else None,  # --cpu: the decode's error
           "decode_first_s": _timed(device, decode)}
    row["decode_steady_s"] = _timed(device, decode) if device.type == "cuda" else row["decode_first_s"]
    if device.type == "cuda":
        row["peak_allocated"] = torch.cuda.max_memory_allocated(device)
    torch.save(torch.cat(decoded, dim=2), out.with_suffix(".pt"))
    out.write_text(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU proof run on the tiny VAE")
    ap.add_argument("--cpu", action="store_true", help="the full VAE on the CPU (for the error columns)")
    ap.add_argument("--frames", type=int, help="output frames, 4k+1 (default 81; --tiny 9)")
    ap.add_argument("--only", default="", help="comma list of variant indices (default: all)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(VARIANTS[args.child], args.tiny, torch.device("cpu" if args.tiny or args.cpu else "cuda"),
              args.frames or (9 if args.tiny else 81), args.out)
        return
    if not (args.tiny or args.cpu) and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (--tiny and --cpu run on the CPU)")
    if args.frames is not None and (args.frames < 1 or (args.frames - 1) % 4):
        raise SystemExit(f"--frames must be 4k+1, got {args.frames}")
    work = Path(os.environ["OUT"]) / "vae_speed" if os.environ.get("OUT") else Path(tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    picked = [int(i) for i in args.only.split(",")] if args.only else range(len(VARIANTS))
    rows, reference = [], None
    for i in picked:
        out = work / f"variant{i}.json"
        done = subprocess.run([sys.executable, __file__, "--child", str(i), "--out", str(out),
                               *(["--tiny"] if args.tiny else []), *(["--cpu"] if args.cpu else []),
                               *(["--frames", str(args.frames)] if args.frames else [])], capture_output=True, text=True)
        if done.returncode != 0:
            rows.append([VARIANTS[i].name, "-", "-", "-", "-", "-", "-", done.stderr.strip().splitlines()[-1][:120]])
            continue
        r = json.loads(out.read_text())
        video = torch.load(out.with_suffix(".pt"), weights_only=True).double()
        out.with_suffix(".pt").unlink()
        if reference is None:
            reference = video
        error = "-" if reference is None else f"{((video - reference).norm() / reference.norm()).item():.2e}"
        peak = r.get("peak_allocated")
        rows.append([r["name"], r["tiling"], "-" if r["encode_s"] is None else f"{r['encode_s']:.2f}",
                     f"{r['decode_first_s']:.2f}",
                     f"{r['decode_steady_s']:.2f}", "-" if peak is None else f"{peak / GB:.2f}", error, ""])
        print(f"{r['name']}: {r}, decode rel. error {error}", flush=True)
    print(table(["variant", "decode tiles", "encode s (first)", "decode s (first)", "decode s (steady)",
                 "peak alloc GB", f"decode rel. error vs {VARIANTS[picked[0]].name}", "error"], rows))


if __name__ == "__main__":
    main()
