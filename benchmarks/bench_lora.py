"""LoRA on an already-quantized 14B block: merge per block (dequantize, add, requantize) or a low-rank side path?

Question (issue 8, deliverable 2): at generation time on a quantized folder, the streamer can either merge each
block's LoRA into its FP8/INT8 weights as the block arrives, or run the LoRA as two thin matmuls beside the
quantized matmul. Both cost GPU time on the compute stream; this measures how much, per block and per forward,
against the block's own compute time at the real token counts (81 frames, CFG batch 1).
Run: `python benchmarks/bench_lora.py` (one GPU, about a minute). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy

import torch

from scail2_lite.config import SIZES, DiTConfig
from scail2_lite.lora import (
    BLOCK_LINEARS,
    apply_side_path,
    load_lora_state,
    lora_index,
    make_synthetic_lora,
    merge_block,
    merge_tensor,
)
from scail2_lite.model import CLIP_TOKENS, SCAIL2Block
from scail2_lite.quantize.linear import choose_compute, swap_linears
from scail2_lite.rope import rope_freqs

PREFIX = "blocks.0."


def cuda_ms(fn, runs: int = 3) -> float:
    """Mean wall time of `fn()` in ms on the current stream, after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(runs):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / runs


def block_inputs(size: str, config: DiTConfig) -> tuple:
    height, width = SIZES[size]
    grid = ((81 - 1) // 4 + 1, height // 16, width // 16)
    f, h, w = grid
    length = h * w + f * h * w + f * (h // 2) * (w // 2)
    x = torch.randn(1, length, config.dim, device="cuda")
    e0 = torch.randn(1, 6, config.dim, device="cuda")
    context = torch.randn(1, CLIP_TOKENS + config.text_len, config.dim, device="cuda", dtype=torch.bfloat16)
    return length, (x, e0, context, rope_freqs(config.head_dim, grid, False, device="cuda"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheme", choices=("fp8", "int8"), default="fp8")
    parser.add_argument("--rank", type=int, default=64, help="LightX2V's step-distillation LoRA is rank 64")
    parser.add_argument("--sizes", nargs="+", default=["512p", "704p"], choices=list(SIZES))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    config = DiTConfig()
    torch.manual_seed(0)
    with torch.device("cuda"):
        dense = SCAIL2Block(config.dim, config.ffn_dim, config.num_heads, config.eps).to(torch.bfloat16)
    shapes = {PREFIX + k: v.shape for k, v in dense.state_dict().items()}
    raw = make_synthetic_lora(shapes, "comfy", rank=args.rank, seed=0, include_diffs=True)
    # LoRA tensors resident on the GPU, as a streamer would keep them (rank 64: ~15 MB per block in bf16)
    index = lora_index([(load_lora_state(raw, shapes, "synthetic", full_patches=True).to("cuda"), 1.0)])

    quant = copy.deepcopy(dense)
    swap_linears(quant, dict.fromkeys(BLOCK_LINEARS, args.scheme))
    compute = choose_compute("cuda", args.scheme)
    side = copy.deepcopy(quant)
    apply_side_path(side, index, prefix=PREFIX)
    qstate = quant.state_dict()

    merge_requant = cuda_ms(lambda: merge_block(qstate, index, PREFIX))
    dense_state = dense.state_dict()
    merge_dense = cuda_ms(lambda: [merge_tensor(PREFIX + k, v, index) for k, v in dense_state.items()])

    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; one 14B block, {args.scheme} weights "
          f"(compute path {compute}), LoRA rank {args.rank} on its {len(BLOCK_LINEARS)} Linears + LightX2V-style "
          "diffs; batch 1, 81 frames\n")
    print("| size | tokens | block fwd ms | + side path ms | side path overhead | dequant-add-requant merge ms "
          "| merge / block fwd | bf16 merge ms (reference) |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        length, inputs = block_inputs(size, config)
        with torch.no_grad():
            base_ms = cuda_ms(lambda: quant(inputs[0].clone(), *inputs[1:]))
            side_ms = cuda_ms(lambda: side(inputs[0].clone(), *inputs[1:]))
        print(f"| {size} | {length} | {base_ms:.1f} | {side_ms:.1f} | {(side_ms - base_ms) / base_ms:+.1%} "
              f"| {merge_requant:.1f} | {merge_requant / base_ms:.1%} | {merge_dense:.1f} |")
        inputs = None  # freed before the next size (the lambdas above already ran)
        torch.cuda.empty_cache()
    print("\nPer step the side path costs its overhead on every block forward (x CFG branches); the merge costs "
          "once per block load (every step when blocks stream, unless merged blocks are cached).")


if __name__ == "__main__":
    main()
