"""Activation memory and time of one 14B SCAIL-2 block (bf16, CUDA) at the real token counts, with and without chunking.

Question: how much VRAM does one block need beyond its weights and the residual stream, and what do
`Kernels.ffn_chunk` / `attn_chunk` buy? The planner's memory model takes these figures.
Run: `python benchmarks/dit_block.py` (one GPU, ~1 minute). Prints a markdown table.
"""

from __future__ import annotations

import time

import torch

from scail2_lite.config import SIZES, DiTConfig
from scail2_lite.blocks import CLIP_TOKENS, Kernels, SCAIL2Block
from scail2_lite.rope import rope_freqs

GIB = 1024**3


def patch_grid(size: str, frames: int = 81) -> tuple[int, int, int]:
    height, width = SIZES[size]
    return (frames - 1) // 4 + 1, height // 16, width // 16


def measure(block: SCAIL2Block, grid: tuple[int, int, int], batch: int, chunk: int | None) -> tuple[int, float, float]:
    """-> (tokens, peak activation GiB above weights + inputs, ms per block forward)."""
    config = DiTConfig()
    f, h, w = grid
    length = h * w + f * h * w + f * (h // 2) * (w // 2)
    device = torch.device("cuda")
    x = torch.randn(batch, length, config.dim, device=device)
    e0 = torch.randn(batch, 6, config.dim, device=device)
    context = torch.randn(batch, CLIP_TOKENS + config.text_len, config.dim, device=device, dtype=torch.bfloat16)
    freqs = rope_freqs(config.head_dim, grid, False, device=device)
    kernels = Kernels("sdpa", chunk or 0, chunk or 0)
    with torch.no_grad():
        block(x, e0, context, freqs, kernels)  # warm-up (kernels, allocator)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        runs = 3
        for _ in range(runs):
            block(x, e0, context, freqs, kernels)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / runs * 1000
    peak = (torch.cuda.max_memory_allocated() - base) / GIB
    del x, e0, context, freqs
    torch.cuda.empty_cache()
    return length, peak, ms


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    config = DiTConfig()
    with torch.device("cuda"):
        block = SCAIL2Block(config.dim, config.ffn_dim, config.num_heads, config.eps).to(torch.bfloat16)
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; block weights "
          f"{sum(p.numel() * p.element_size() for p in block.parameters()) / GIB:.2f} GiB bf16\n")
    print("| size | batch | tokens | chunk | residual fp32 GiB | peak activations GiB | ms / block |")
    print("|---|---|---|---|---|---|---|")
    for size in SIZES:
        for batch in (1, 2):
            for chunk in (None, 16384, 4096):
                length, peak, ms = measure(block, patch_grid(size), batch, chunk)
                residual = batch * length * config.dim * 4 / GIB
                print(f"| {size} | {batch} | {length} | {chunk or 'none'} | {residual:.2f} | {peak:.2f} | {ms:.0f} |")


if __name__ == "__main__":
    main()
