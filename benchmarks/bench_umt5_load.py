"""umT5 through the pipeline's loader, per text-encoder scheme: load time, GPU peak against the planner's text
phase, and the embedding cosine against bf16, with the rotated weights (the default) and plain ones.

Run on the GPU machine (~1 minute, ~12 GB of disk in the temp dir):
    python benchmarks/bench_umt5_load.py
Proof run on a CPU with a 4-layer, 256-wide encoder (seconds; no GPU figures):
    python benchmarks/bench_umt5_load.py --tiny
The full-size file is `synth`'s umT5 recipe drawn on the GPU and saved the way the download stores it (one
bf16 `.pth`, 11.4 GB); `encoders.load_text_encoder` then maps it, moves it block by block and quantizes each
block on arrival (`quantize.text_encoder.quantize_block`), and two prompts are encoded, as `generate` does.
Prints a markdown table; with $OUT set, also writes $OUT/umt5_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from scail2_lite.encoders import UMT5_FILE, _umt5, encode_text, load_text_encoder, umt5_config
from scail2_lite.offload.planner import ENCODER_ACTIVATIONS, umt5_bytes
from scail2_lite.quantize.text_encoder import quantize_block, text_encoder_backend
from scail2_lite.synth import umt5_tensors, write_tokenizer

GB = 1e9
PROMPTS = ["a woman dancing in a sunlit studio", "a man walks towards the camera, waving"]
VARIANTS = (("bf16", True), ("nf4", True), ("nf4", False), ("int8", True), ("int8", False))


def write_umt5(folder: Path, device: str, tiny: bool) -> int:
    """The synthetic umT5 file and tokenizer in `folder`; returns the parameter count."""
    cfg = (_umt5(vocab_size=1000, d_model=256, d_ff=512, num_heads=4, d_kv=64, num_layers=4) if tiny
           else umt5_config("full"))
    sd = {k: t.cpu() for k, t in umt5_tensors(cfg, 0, device).items()}
    torch.save(sd, folder / UMT5_FILE)
    write_tokenizer(folder, min(1000, cfg.vocab_size))
    return sum(t.numel() for t in sd.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a 4-layer encoder on the CPU: proves the logic")
    args = ap.parse_args()
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("the full run needs a CUDA GPU; use --tiny on a CPU")
    gpu = device == "cuda"
    work = Path(tempfile.mkdtemp(prefix="scail2-umt5-"))
    rows, records, ref = [], [], None
    try:
        params = write_umt5(work, device, args.tiny)
        print(f"umT5 file: {params / 1e9:.2f} B parameters, {(work / UMT5_FILE).stat().st_size / GB:.2f} GB",
              flush=True)
        for scheme, rotate in VARIANTS:
            if gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            quantize = None if scheme == "bf16" else (lambda block, s=scheme, r=rotate: quantize_block(block, s, r))
            start = time.perf_counter()
            tokenizer, model = load_text_encoder(work, device=device, quantize=quantize)
            if gpu:
                torch.cuda.synchronize()
            load_s = time.perf_counter() - start
            load_peak = torch.cuda.max_memory_allocated() / GB if gpu else float("nan")
            held = torch.cuda.memory_allocated() / GB if gpu else float("nan")
            out = torch.cat(encode_text(tokenizer, model, PROMPTS)).float()
            phase_peak = torch.cuda.max_memory_allocated() / GB if gpu else float("nan")
            ref = out if ref is None else ref
            cosine = float(F.cosine_similarity(ref, out, dim=-1).mean())
            planned = ((umt5_bytes(scheme) + ENCODER_ACTIVATIONS) / GB if gpu
                       else float("nan"))  # the planner models the full-size encoder on a GPU
            backend = text_encoder_backend(scheme, device)
            label = backend + (" rotated" if scheme != "bf16" and rotate else "")
            records.append({"scheme": scheme, "rotate": rotate, "backend": backend, "load_s": load_s,
                            "held_gb": held, "load_peak_gb": load_peak, "phase_peak_gb": phase_peak,
                            "planner_gb": planned, "token_mean_cosine": cosine})
            rows.append(f"| {label} | {load_s:.1f} | {held:.2f} | {load_peak:.2f} | {phase_peak:.2f} | "
                        f"{planned:.2f} | {cosine:.5f} |")
            print(rows[-1], flush=True)
            del model
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| umT5 | load s | GPU GB held | load peak GB | peak with encoding GB | planner's text phase GB | "
          "token-mean cosine vs bf16 |\n|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "umt5_load.json").write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
