"""Per-Linear speed of the DiT's matmuls: bf16 vs FP8 vs INT8 (fused per-token activation quantization).

Question: do `QuantLinear`'s fp8/int8 paths beat bf16 `F.linear` at the real token counts?
Targets on the H100 at 704p: FP8 >= 1.35x, INT8 >= 1.2x bf16 (issue 5).
Shapes: the block Linears with the video token count as M (self-attention q/k/v/o and cross-attention q/o are
5120->5120, ffn.0 5120->13824, ffn.2 13824->5120); "block" sums one block's worth (6x square + ffn.0 + ffn.2).
Errors are relative Frobenius vs the bf16 output (which itself carries bf16 weight rounding).

Run from the repository root on a CUDA machine (needs only torch + triton): `python benchmarks/bench_linear.py`.
Prints a markdown table.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `quantize` imports torch/triton only

from quantize.linear import QuantLinear, fp8_matmul, quantize_rows  # noqa: E402

TOKENS = {"512p": 48_832, "704p": 95_920}
SHAPES = {"attn 5120->5120": (5120, 5120), "ffn.0 5120->13824": (5120, 13824), "ffn.2 13824->5120": (13824, 5120)}
PER_BLOCK = {"attn 5120->5120": 6, "ffn.0 5120->13824": 1, "ffn.2 13824->5120": 1}


def time_ms(fn, iters: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):  # the first calls also run Triton's autotuning
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def attempt(fn):
    """Run one variant; a failure becomes a short message in its table cell instead of ending the run."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - reported in the table, the other variants still run
        print(f"<!-- {type(e).__name__}: {str(e)[:300]} -->", flush=True)
        return f"ERR {type(e).__name__}"


def fmt(v, digits: int = 2) -> str:
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def ratio(base: float, t) -> str:
    return f"{base / t:.2f}" if isinstance(t, float) else "-"


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    r = ref.float()
    return float((out.float() - r).norm() / r.norm())


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    dev = torch.device("cuda")
    cap = torch.cuda.get_device_capability(dev)
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name(dev)} (sm{cap[0]}{cap[1]}), torch {torch.__version__}\n")
    print("| size | shape | tokens | bf16 ms | bf16 TFLOP/s | fp8 ms | fp8 x | fp8 (no fast acc) x | fp8 act-quant ms "
          "| int8 act-quant ms | int8 ms | int8 x | fp8 err | int8 err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size, m in TOKENS.items():
        block = {"bf16": 0.0, "fp8": 0.0, "int8": 0.0}
        for label, (k, n) in SHAPES.items():
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            lin = torch.nn.Linear(k, n, device=dev, dtype=torch.bfloat16)
            torch.nn.init.normal_(lin.weight, std=k**-0.5)
            fp8 = QuantLinear.from_linear(lin, "fp8", compute="fp8")
            int8 = QuantLinear.from_linear(lin, "int8", compute="int8")
            with torch.no_grad():
                ref = F.linear(x, lin.weight, lin.bias)
                e_fp8, e_int8 = attempt(lambda: rel_err(ref, fp8(x))), attempt(lambda: rel_err(ref, int8(x)))
                del ref
                t_bf16 = time_ms(lambda: F.linear(x, lin.weight, lin.bias))
                t_fp8 = attempt(lambda: time_ms(lambda: fp8(x)))
                t_int8 = attempt(lambda: time_ms(lambda: int8(x)))
                t_quant = attempt(lambda: time_ms(lambda: quantize_rows(x, "fp8")))
                t_quant8 = attempt(lambda: time_ms(lambda: quantize_rows(x, "int8", factors=int8.smooth)))
                t_fp8_slow = attempt(lambda: time_ms(lambda: fp8_matmul(
                    *quantize_rows(x, "fp8"), fp8.weight, fp8.scale, fp8.bias, fast_accum=False)))
            tflops = 2 * m * k * n / t_bf16 / 1e9
            print(f"| {size} | {label} | {m} | {t_bf16:.2f} | {tflops:.0f} | {fmt(t_fp8)} | {ratio(t_bf16, t_fp8)} | "
                  f"{ratio(t_bf16, t_fp8_slow)} | {fmt(t_quant)} | {fmt(t_quant8)} | {fmt(t_int8)} | "
                  f"{ratio(t_bf16, t_int8)} | "
                  f"{fmt(e_fp8, 4)} | {fmt(e_int8, 4)} |", flush=True)
            for key, t in (("bf16", t_bf16), ("fp8", t_fp8), ("int8", t_int8)):
                block[key] += PER_BLOCK[label] * t if isinstance(t, float) else float("nan")
            del x, lin, fp8, int8
            torch.cuda.empty_cache()
        print(f"| {size} | **block (6 attn + 2 ffn)** | {m} | {block['bf16']:.2f} | | {block['fp8']:.2f} | "
              f"**{block['bf16'] / block['fp8']:.2f}** | | | | {block['int8']:.2f} | "
              f"**{block['bf16'] / block['int8']:.2f}** | | |", flush=True)
    print("\ntargets at 704p: fp8 x >= 1.35, int8 x >= 1.2")


if __name__ == "__main__":
    main()
