"""What a process's first DiT forward pays once: Triton's compiles (cold cache: the first run on a machine) and the
per-process set-up (cuDNN's FP8 attention graph, kernel launch caches), on one full-width FP8 block at 704p.

Question (issue 23): the first of four 704p steps ran ~3.5 s longer than the others. Each case is a fresh process
on one Triton cache directory: `cold` starts it empty (a machine's first run), `warm` reuses it (every later run).
In each, the cuDNN graph for the 704p self-attention shape is built and timed first, then the block's forward runs
three times. The first forward minus the third is the block's one-time cost beyond the graph; a step runs 40 blocks,
but the compiles and the graph are paid once per process (every block has the same shapes).

    PYTHONPATH=$PWD python benchmarks/bench_first_call.py            # on the GPU (~1 minute)
    python benchmarks/bench_first_call.py --tiny                     # CPU proof: the tiny block, sdpa, 64x64 x 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


def child(backend: str, tiny: bool) -> dict:
    from scail2_lite import attention_fp8, synth
    from scail2_lite.blocks import CLIP_TOKENS, Kernels, SCAIL2Block
    from scail2_lite.config import SIZES
    from scail2_lite.offload.planner import tokens
    from scail2_lite.quantize.linear import swap_linears
    from scail2_lite.rope import rope_freqs

    config = synth.dit_config("tiny" if tiny else "full")
    height, width, frames = (64, 64, 5) if tiny else (*SIZES["704p"], 81)
    grid = ((frames - 1) // 4 + 1, height // 16, width // 16)
    length = tokens(config, height, width, frames)
    device = torch.device("cpu" if tiny else "cuda")
    t = time.perf_counter()
    torch.zeros(1, device=device)
    context_s = time.perf_counter() - t
    with torch.device(device):
        block = SCAIL2Block(config.dim, config.ffn_dim, config.num_heads, config.eps).to(torch.bfloat16)
    linears = {n: "fp8" for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    swap_linears(block, linears)
    graph_s = None
    if backend == "fp8":
        t = time.perf_counter()
        attention_fp8._graph(torch.Size((1, length, config.num_heads, config.head_dim)), length, device)
        torch.cuda.synchronize()
        graph_s = time.perf_counter() - t
    x = torch.randn(1, length, config.dim, device=device)
    e0 = torch.randn(1, 6, config.dim, device=device)
    context = torch.randn(1, CLIP_TOKENS + config.text_len, config.dim, device=device, dtype=torch.bfloat16)
    freqs = rope_freqs(config.head_dim, grid, False, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    kernels = Kernels(backend, 8192, 8192)
    forwards = []
    with torch.no_grad():
        for _ in range(3):
            sync()
            t = time.perf_counter()
            block(x, e0, context, freqs, kernels)
            sync()
            forwards.append(time.perf_counter() - t)
    return {"tokens": length, "context_s": context_s, "graph_s": graph_s, "forward_s": forwards}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="fp8,sdpa")
    ap.add_argument("--tiny", action="store_true", help="CPU proof run: the tiny block, sdpa only")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tiny)))
        return
    if args.tiny:
        args.backends = "sdpa"
    elif not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --tiny on a CPU)")
    print(f"{torch.cuda.get_device_name() if not args.tiny else 'cpu'}, torch {torch.__version__}")
    print("| attention | Triton cache | CUDA init s | cuDNN graph s | forward 1 s | forward 2 s | forward 3 s "
          "| one-time (1 - 3) s | cache files |\n|---|---|---|---|---|---|---|---|---|")
    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory() as cache:
            for state in ("cold", "warm"):
                env = {**os.environ, "TRITON_CACHE_DIR": cache}
                cmd = [sys.executable, __file__, "--child", backend, *(["--tiny"] if args.tiny else [])]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode:
                    print(f"| {backend} | {state} | failed: {done.stderr.strip().splitlines()[-1:]} |")
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                fw = r["forward_s"]
                files = sum(len(names) for _, _, names in os.walk(cache))
                graph = "-" if r["graph_s"] is None else f"{r['graph_s']:.2f}"
                print(f"| {backend} | {state} | {r['context_s']:.2f} | {graph} | {fw[0]:.3f} | {fw[1]:.3f} | "
                      f"{fw[2]:.3f} | {fw[0] - fw[2]:.2f} | {files} |", flush=True)


if __name__ == "__main__":
    main()
