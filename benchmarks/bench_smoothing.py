"""INT8 column factors: forward error against the smoothing exponent alpha (issue 5; one GPU call, ~2 min).

The full 14B synthetic geometry (weights drawn on the GPU, 512x896 x 33 frames, t=700) in bf16 is the
reference. The block Linears are then quantized to INT8 (stored layout: column factors
`column_factors(w, alpha)`, then the 64-column rotation) for each alpha (alpha 0 = signs only, no smoothing) and
run through the real QuantLinear paths: "int8" (per-token INT8 activations, Triton
GEMM) and "dequant" (weight-only). FP8 W8A8 is the row to compare with. This is the measurement behind
`schemes.SMOOTH_ALPHA`.
Run: `PYTHONPATH=$PWD python benchmarks/bench_smoothing.py` (needs CUDA). Prints a markdown table.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _synthfull import device_dit  # noqa: E402
from bench_fidelity import Sizes, dit_inputs, forward, log, set_compute, table  # noqa: E402

from scail2_lite.config import PRESETS  # noqa: E402
from scail2_lite.formats import wan_shapes  # noqa: E402
from scail2_lite.quantize.linear import QuantLinear, swap_linears  # noqa: E402
from scail2_lite.quantize.report import compare  # noqa: E402
from scail2_lite.quantize.schemes import SMOOTH_ALPHA, column_factors, is_quantized_name, quantize_weight  # noqa: E402

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


@torch.no_grad()
def main() -> None:
    config = PRESETS["scail2-14b"]
    model = device_dit(config, 0, "cuda")
    names = [n.removesuffix(".weight") for n in wan_shapes(config) if is_quantized_name(n)]
    weights = {n: model.get_submodule(n).weight.data for n in names}  # the bf16 weights outlive the swap
    inputs = dit_inputs(Sizes(False, "cuda", 33, 512, 896, 64, 0, 0, None, ()), "cuda")
    ref, secs = forward(model, inputs, "cuda", repeat=2)
    log(f"bf16 reference forward {secs:.2f} s")
    rows = []

    def measure(label: str, alpha: str, compute: str) -> None:
        set_compute(model, compute)
        out, secs = forward(model, inputs, "cuda", repeat=2)
        c = compare(ref, out)
        rows.append([label, compute, alpha, f"{c['rel_error']:.4f}", f"{c['cosine']:.5f}", f"{secs:.2f}"])
        log(" | ".join(rows[-1]))

    swap_linears(model, {n: "int8" for n in names})
    for alpha in ALPHAS:
        for n in names:
            lin, w = model.get_submodule(n), weights[n]
            factors = column_factors(w, alpha)
            lin.weight, lin.scale = quantize_weight(w, "int8", factors)
            lin.smooth = factors
        label = f"{alpha}" + (" (default)" if alpha == SMOOTH_ALPHA else "")
        for compute in ("int8", "dequant"):
            measure("int8", label, compute)
    for n in names:  # FP8 from the same bf16 weights, for comparison
        old = model.get_submodule(n)
        lin = nn.Linear(old.in_features, old.out_features, device="meta")
        lin.weight, lin.bias = nn.Parameter(weights[n], requires_grad=False), nn.Parameter(old.bias)
        new = QuantLinear.from_linear(lin, "fp8")
        new.input_gelu = old.input_gelu
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    for compute in ("fp8", "dequant"):
        measure("fp8", "-", compute)
    print(table(["weights", "compute", "smoothing alpha", "forward rel. error vs bf16", "cosine", "forward s"], rows),
          flush=True)


if __name__ == "__main__":
    main()
