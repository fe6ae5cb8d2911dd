"""umT5 through the pipeline's loader, per text-encoder scheme: load time, GPU peak against the planner's text
phase, and the embedding cosine against bf16, with the rotated weights (the default) and plain ones.

Run on the GPU machine (~1 minute, ~12 GB of disk in the temp dir):
    python benchmarks/bench_umt5_load.py
Proof run on a CPU with a 4-layer, 256-wide encoder (seconds; no GPU figures):
    python benchmarks/bench_umt5_load.py --tiny
The full-size file is `synth`'s umT5 recipe drawn on the GPU and saved the way the download stores it (one
bf16 `.pth`, 11.4 GB); `encoders.load_text_encoder` then maps it, moves it block by block and quantizes each
block on arrival (`quantize.text_encoder.quantize_block`), and two prompts are encoded, as `generate` does.
bf16 runs twice: resident (the reference) and streamed block by block through the GPU (the default text
encoder: it must equal the reference bit for bit at about one block of GPU memory).
Prints a markdown table; with $OUT set, also writes $OUT/umt5_load.json.

`--stored`: what storing the encoder quantized (`quantize --text-encoder nf4|int8`) buys against storing bf16 and
quantizing at every load: folder bytes, seconds to write the stored folder, and per load (each in its own process,
so its peak RSS is its own) seconds, peak RSS and the embeddings' bit identity with the load-time path. Sized to
run on a CPU: full-width blocks (d_model 4096, d_ff 10240; `--tiny`: 256), `--layers` of them, a `--vocab`-row
embedding:
    python benchmarks/bench_umt5_load.py --stored --layers 2 --vocab 32128
and the full umT5-XXL on a GPU (about 25 GB of disk in the temp dir):
    python benchmarks/bench_umt5_load.py --stored --layers 24 --vocab 256384 --device cuda
Prints a markdown table and the per-block bytes that scale the folder to the 24-block, 256k-vocabulary encoder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from scail2_lite.encoders import (
    UMT5_FILE,
    _umt5,
    encode_text,
    load_text_encoder,
    umt5_config,
    write_quantized_text_encoder,
)
from scail2_lite.offload.planner import ENCODER_ACTIVATIONS, umt5_bytes
from scail2_lite.quantize.text_encoder import quantize_block, text_encoder_backend
from scail2_lite.synth import umt5_tensors, write_tokenizer

GB = 1e9
PROMPTS = ["a woman dancing in a sunlit studio", "a man walks towards the camera, waving"]
# (scheme, rotated, streamed): bf16 resident is the reference; bf16 streamed is the default text encoder, which must
# equal it bit for bit at about one block of GPU memory.
VARIANTS = (("bf16", True, False), ("bf16", True, True), ("nf4", True, False), ("nf4", False, False),
            ("int8", True, False), ("int8", False, False))


def write_umt5(folder: Path, device: str, tiny: bool) -> int:
    """The synthetic umT5 file and tokenizer in `folder`; returns the parameter count."""
    cfg = (_umt5(vocab_size=1000, d_model=256, d_ff=512, num_heads=4, d_kv=64, num_layers=4) if tiny
           else umt5_config("full"))
    sd = {k: t.cpu() for k, t in umt5_tensors(cfg, 0, device).items()}
    torch.save(sd, folder / UMT5_FILE)
    write_tokenizer(folder, min(1000, cfg.vocab_size))
    return sum(t.numel() for t in sd.values())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def load_once(folder: Path, scheme: str, device: str, save: Path) -> None:
    """One load as the pipeline does it (stored files as they are; the bf16 file quantized at load for `scheme`)
    and two prompts encoded; prints a JSON line: seconds, RSS after the imports and peak RSS (VmHWM: getrusage's
    maxrss would carry the forking parent's peak across exec), embeddings saved to `save`."""
    base = _status_bytes("VmRSS")
    quantize = None if scheme == "bf16" else (lambda block: quantize_block(block, scheme))
    start = time.perf_counter()
    tokenizer, model = load_text_encoder(folder, device=device, quantize=quantize if (
        folder / UMT5_FILE).is_file() else None)
    load_s = time.perf_counter() - start
    out = encode_text(tokenizer, model, PROMPTS)
    torch.save([t.cpu() for t in out], save)
    gpu = torch.cuda.max_memory_allocated() if torch.device(device).type == "cuda" else 0
    print(json.dumps({"load_s": load_s, "base_rss": base, "peak_rss": _status_bytes("VmHWM"), "gpu_peak": gpu}))


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (Linux), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise SystemExit(f"no {field} in /proc/self/status (Linux only)")


def stored_main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="scail2-umt5-stored-"))
    try:
        src = work / "bf16"
        src.mkdir()
        width = (dict(d_model=256, d_ff=512, num_heads=4) if args.tiny
                 else dict(d_model=4096, d_ff=10240, num_heads=64))
        cfg = _umt5(vocab_size=args.vocab, d_kv=64, num_layers=args.layers, **width)
        sd = {k: t.cpu() for k, t in umt5_tensors(cfg, 0, args.device).items()}  # drawn where it is fast
        torch.save(sd, src / UMT5_FILE)
        write_tokenizer(src, min(1000, cfg.vocab_size))
        embed_bytes = sd["token_embedding.weight"].numel() * 2
        del sd
        sizes, write_s = {"bf16": folder_bytes(src)}, {}
        for scheme in ("nf4", "int8"):
            start = time.perf_counter()
            write_quantized_text_encoder(src, work / scheme, scheme, args.device)
            write_s[scheme] = time.perf_counter() - start
            sizes[scheme] = folder_bytes(work / scheme)
        print(f"{args.layers} full-width blocks, vocab {args.vocab} ({embed_bytes / GB:.2f} GB embedding) on "
              f"{args.device}; folder bytes: " + ", ".join(f"{k} {v / GB:.3f} GB" for k, v in sizes.items()),
              flush=True)
        rows, records, embeddings = [], [], {}
        for label, folder, scheme in (("bf16 file", src, "bf16"), ("nf4 quantized at load", src, "nf4"),
                                      ("nf4 stored", work / "nf4", "nf4"), ("int8 quantized at load", src, "int8"),
                                      ("int8 stored", work / "int8", "int8")):
            save = work / f"{label.replace(' ', '_')}.pt"
            res = subprocess.run([sys.executable, __file__, "--child", str(folder), scheme, args.device, str(save)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            embeddings[label] = torch.load(save)
            same = ""
            if label.endswith("stored"):
                at_load = embeddings[f"{scheme} quantized at load"]
                same = "yes" if all(torch.equal(a, b) for a, b in zip(at_load, embeddings[label])) else "NO"
            per_block = (sizes[scheme] - embed_bytes) / args.layers if label.endswith("stored") or scheme == "bf16" \
                else float("nan")
            records.append({"variant": label, **r, "bit_identical_to_load_time": same, "folder_bytes":
                            sizes[scheme] if label.endswith("stored") or scheme == "bf16" else sizes["bf16"],
                            "write_s": write_s.get(scheme) if label.endswith("stored") else None,
                            "per_block_bytes": per_block})
            rows.append(f"| {label} | {records[-1]['folder_bytes'] / GB:.3f} | {r['load_s']:.1f} | "
                        f"{r['peak_rss'] / GB:.2f} | {(r['peak_rss'] - r['base_rss']) / GB:.2f} | "
                        f"{r['gpu_peak'] / GB:.2f} | {same} |")
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| umT5 | folder GB | load s | peak RSS GB | RSS above imports GB | GPU peak GB | embeddings = load-time |"
          "\n|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("write s (quantize + store): " + ", ".join(f"{k} {v:.1f}" for k, v in write_s.items()))
    full = {k: (sizes[k] - embed_bytes) / args.layers * 24 + 256_384 * 4096 * 2 for k in sizes}
    print("scaled to 24 blocks + the 256k-row embedding: " + ", ".join(f"{k} {v / GB:.2f} GB" for k, v in full.items()))
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "umt5_stored.json").write_text(json.dumps(
            {"layers": args.layers, "vocab": args.vocab, "device": args.device, "records": records,
             "write_s": write_s, "folder_bytes": sizes, "scaled_full_bytes": full}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a 4-layer encoder on the CPU (with --stored: 256 wide): "
                    "proves the logic")
    ap.add_argument("--stored", action="store_true", help="stored quantized vs quantized at load (CPU-sized)")
    ap.add_argument("--layers", type=int, default=4, help="--stored: full-width blocks")
    ap.add_argument("--vocab", type=int, default=32128, help="--stored: embedding rows")
    ap.add_argument("--device", default="cpu", help="--stored: where blocks are quantized and loaded")
    ap.add_argument("--child", nargs=4, metavar=("FOLDER", "SCHEME", "DEVICE", "SAVE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        folder, scheme, device, save = args.child
        return load_once(Path(folder), scheme, device, Path(save))
    if args.stored:
        return stored_main(args)
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
        for scheme, rotate, stream in VARIANTS:
            if gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            quantize = None if scheme == "bf16" else (lambda block, s=scheme, r=rotate: quantize_block(block, s, r))
            start = time.perf_counter()
            tokenizer, model = load_text_encoder(work, device=device, quantize=quantize, stream=stream)
            if gpu:
                torch.cuda.synchronize()
            load_s = time.perf_counter() - start
            load_peak = torch.cuda.max_memory_allocated() / GB if gpu else float("nan")
            held = torch.cuda.memory_allocated() / GB if gpu else float("nan")
            start = time.perf_counter()
            out = torch.cat(encode_text(tokenizer, model, PROMPTS)).float()
            encode_s = time.perf_counter() - start  # .float() on the output synchronizes
            phase_peak = torch.cuda.max_memory_allocated() / GB if gpu else float("nan")
            ref = out if ref is None else ref
            cosine = float(F.cosine_similarity(ref, out, dim=-1).mean())
            planned = ((umt5_bytes(scheme) + ENCODER_ACTIVATIONS) / GB if gpu
                       else float("nan"))  # the planner models the full-size encoder on a GPU
            backend = text_encoder_backend(scheme, device)
            label = backend + (" rotated" if scheme != "bf16" and rotate else "") + (" streamed" if stream else "")
            records.append({"scheme": scheme, "rotate": rotate, "stream": stream, "backend": backend, "load_s": load_s,
                            "held_gb": held, "load_peak_gb": load_peak, "phase_peak_gb": phase_peak,
                            "planner_gb": planned, "token_mean_cosine": cosine, "encode_s": encode_s,
                            "equal_to_bf16": bool(torch.equal(ref, out))})
            rows.append(f"| {label} | {load_s:.1f} | {encode_s:.2f} | {held:.2f} | {load_peak:.2f} | {phase_peak:.2f} | "
                        f"{planned:.2f} | {cosine:.5f} | {'yes' if records[-1]['equal_to_bf16'] else 'no'} |")
            print(rows[-1], flush=True)
            del model
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| umT5 | load s | encode s | GPU GB held | load peak GB | peak with encoding GB | planner's text phase GB | "
          "token-mean cosine vs bf16 | equal to bf16 |\n|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "umt5_load.json").write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
