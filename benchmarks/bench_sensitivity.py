"""Where the DiT's quantization error comes from, on the full 14B synthetic geometry (one GPU call, ~4 min).

Questions: (1) how sensitive is the synthetic model itself (bf16 vs fp32 forward)? (2) which block Linears
contribute most of the FP8/INT8 forward error (weight-only quantize -> dequantize, one layer kind at a time)?
(3) what forward error does a given per-weight error cause, whatever the format (every block Linear weight
times 1 + eps n, n ~ N(0, 1))? (4) umT5 NF4/INT8 cosine with T5-style query init (the synthetic recipe folds
1/sqrt(d_kv) into q, as T5 does).
Run: `PYTHONPATH=$PWD python benchmarks/bench_sensitivity.py` (needs CUDA). Prints markdown tables.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _synthfull import device_dit  # noqa: E402
from bench_fidelity import Sizes, dit_inputs, forward, log, table, with_noise  # noqa: E402

from scail2_lite.config import PRESETS  # noqa: E402
from scail2_lite.quantize.schemes import dequantize, quantize_linear  # noqa: E402
from scail2_lite.quantize.report import compare  # noqa: E402

KINDS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
         "cross_attn.v", "cross_attn.k_img", "cross_attn.v_img", "cross_attn.o", "ffn.0", "ffn.2")
NOISE = {"noise 1.0%": 0.010, "noise 1.5%": 0.015, "noise 2.5%": 0.025}  # 2.5%: e4m3's rounding error


def perturbed(w: torch.Tensor, how: str) -> torch.Tensor:
    """`w` through a scheme's quantize -> dequantize, or times 1 + eps n for the noise rows."""
    if how in NOISE:
        return with_noise(w, NOISE[how])
    q, scale, smooth = quantize_linear(w, how)
    return dequantize(q, scale, w.dtype, smooth)


@torch.no_grad()
def main() -> None:
    config = PRESETS["scail2-14b"]
    model = device_dit(config, 0, "cuda")
    log(f"synthetic 14B DiT on the GPU ({torch.cuda.memory_allocated() / 1e9:.1f} GB)")
    sz = Sizes(False, "cuda", 33, 512, 896, 64, 0, 0, None, ())
    inputs = dit_inputs(sz, "cuda")
    ref, secs = forward(model, inputs, "cuda", repeat=2)
    log(f"bf16 reference forward {secs:.2f} s")
    rows = []
    torch.manual_seed(0)
    for how in ("fp8", "int8", *NOISE):
        for kind in (*KINDS, "all") if how not in NOISE else ("all",):
            names = [f"blocks.{i}.{k}" for i in range(config.num_layers) for k in (KINDS if kind == "all" else (kind,))]
            saved = {n: model.get_submodule(n).weight.detach().to("cpu", copy=True) for n in names}
            werr = []
            for n in names:
                w = model.get_submodule(n).weight
                approx = perturbed(w.data, how)
                werr.append(float((approx.float() - w.float()).norm() / w.float().norm()))
                w.data.copy_(approx)
            out, _ = forward(model, inputs, "cuda")
            c = compare(ref, out)
            rows.append([how, kind, f"{sum(werr) / len(werr):.4f}", f"{c['rel_error']:.4f}", f"{c['cosine']:.5f}"])
            for n, w in saved.items():
                model.get_submodule(n).weight.data.copy_(w)
        log(f"{how} done")
    print(table(["weights", "quantized layers (all 40 blocks)", "mean weight rel. error", "forward rel. error",
                 "cosine"], rows), flush=True)
    model.float()
    inputs32 = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    out32, _ = forward(model, inputs32, "cuda")
    c = compare(out32, ref)
    print(f"\nbf16 model vs the same weights in fp32: forward rel. error {c['rel_error']:.4f}, cosine "
          f"{c['cosine']:.5f} (the synthetic model's own sensitivity)\n", flush=True)
    del model
    torch.cuda.empty_cache()
    from bench_fidelity import UMT5_HEADER, Results, umt5_stage

    sz8 = Sizes(False, "cuda", 33, 512, 896, 64, 0, 0, 8, (24, 77, 160, 512))
    umt5_rows = umt5_stage(sz8, Results(None))
    print(table(["umT5 (8 of 24 layers, full width)", *UMT5_HEADER[1:]], umt5_rows), flush=True)
    log("done")


if __name__ == "__main__":
    main()
