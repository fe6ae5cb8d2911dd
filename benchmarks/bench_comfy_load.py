"""Loading Comfy-Org's 8-bit SCAIL-2 repacks: what converting one 14B block to our layouts costs, CPU vs GPU.

Question (issue 18, deliverable 6): `load_dit` reads `mxfp8` and `int8_convrot` single files directly, converting
each block Linear as it arrives: mxfp8 -> our per-row FP8 (exact up to values pushed below e4m3's normal range),
int8_convrot -> our INT8 (ConvRot's rotation is not ours: dequantize, then quantize again). How long does that take
per block on the CPU and on the GPU (`from_comfy_quant` uses the GPU when there is one), extrapolated to the 40
blocks, and what error does it add? Weights: the synthetic full-size block (`scail2_lite.synth`), written in each
convention by the synth tool's writer.
Run: `python benchmarks/bench_comfy_load.py` (about two minutes; CPU only without a GPU). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch

from scail2_lite.config import DiTConfig
from scail2_lite.formats import wan_shapes
from scail2_lite.quantize.comfy_quant import comfy_quant_tensors, from_comfy_quant
from scail2_lite.quantize.schemes import is_quantized_name
from scail2_lite.synth import synth_tensor

SCHEME = {"mxfp8": "fp8", "int8_convrot": "int8"}


def block_files(quant: str, layers: int) -> list[tuple[str, torch.Tensor]]:
    """Block 0's Linears in `quant`'s convention, as the file's tensor stream yields them."""
    shapes = wan_shapes(DiTConfig())
    items: list[tuple[str, torch.Tensor]] = []
    for name in [n for n in shapes if n.startswith("blocks.0.") and is_quantized_name(n)][:layers]:
        items += comfy_quant_tensors(name, synth_tensor(name, shapes[name], 0), quant).items()
    return items


def convert_seconds(items: list, quant: str, device: str, measure: bool) -> tuple[float, list]:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = list(from_comfy_quant(items, SCHEME[quant], measure=measure, device=device))
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12, help="block Linears to convert (12 = the whole block)")
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"CPU threads {torch.get_num_threads()}, GPU {gpu}, torch {torch.__version__}; one 14B block "
          f"({args.layers} Linears), synthetic weights\n")
    print("| file | device | s per block | x 40 blocks (s) | added error mean | added error max |")
    print("|---|---|---|---|---|---|")
    for quant in ("mxfp8", "int8_convrot"):
        items = block_files(quant, args.layers)
        for device in devices:
            convert_seconds(items, quant, device, False)  # warm-up (kernels, caches)
            seconds, _ = convert_seconds(items, quant, device, False)
            _, measured = convert_seconds(items, quant, device, True)
            errors = [item.error for _, item in measured if hasattr(item, "error")]
            print(f"| {quant} | {device} | {seconds:.2f} | {seconds * 40:.0f} | {sum(errors) / len(errors):.2e} "
                  f"| {max(errors):.2e} |")


if __name__ == "__main__":
    main()
