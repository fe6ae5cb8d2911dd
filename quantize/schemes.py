"""Weight quantization schemes and the rule saying which Wan-named DiT tensors get quantized.

Per-output-channel symmetric scales: one float32 scale per row of a Linear weight (out, in), so an FP8 or INT8
matmul can apply it in the epilogue (`scale_b` of `torch._scaled_mm`, or a column scale after `torch._int_mm`).

INT8 weights are also smoothed per input column (SmoothQuant's migration, from the weights' side): a row's INT8
grid is set by its largest entry, so a few input columns several times larger than the rest coarsen every row.
Column j is divided by a power of two s_j >= 1 before quantizing and the activation's channel j is multiplied by
s_j before its per-token quantization (exact in floating point). s_j = 2^round(alpha log2(colmax_j / median)),
alpha = 0.5 splits the range between weights and activations. On the full-size synthetic DiT (1% of columns 8x)
it cut the INT8 forward error from 8.1% to 5.7%; alpha 0.25 and 0.75 did worse with INT8 activations (RESULTS.md).
FP8's error is relative to each value (a float grid), so a power-of-two column scale leaves it unchanged: FP8
weights are not smoothed.
"""

from __future__ import annotations

import re

import torch

SCHEMES: tuple[str, ...] = ("fp8", "int8", "bf16")
QUANTIZED_SCHEMES: tuple[str, ...] = ("fp8", "int8")

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
INT8_MAX = 127.0  # symmetric: -128 is never produced, so negation is exact

STORAGE_DTYPE: dict[str, torch.dtype] = {"fp8": FP8_DTYPE, "int8": torch.int8}
SMOOTHED_SCHEMES: tuple[str, ...] = ("int8",)
SMOOTH_ALPHA = 0.5

# Every Linear weight inside the transformer blocks: 97% of the 14B parameters, all of the matmul time.
_QUANTIZED_LINEAR = re.compile(
    r"^blocks\.\d+\.(?:self_attn\.(?:q|k|v|o)|cross_attn\.(?:q|k|v|o|k_img|v_img)|ffn\.(?:0|2))\.weight$"
)


class QuantizeError(ValueError):
    """Bad input to the quantization library; the CLI shows the message as one line (exit 2)."""


def check_scheme(scheme: str, allowed: tuple[str, ...] = SCHEMES) -> str:
    if scheme not in allowed:
        raise QuantizeError(f"unknown scheme {scheme!r}; choose one of {', '.join(allowed)}")
    return scheme


def is_quantized_name(name: str) -> bool:
    """True for the Wan-named Linear weights that FP8/INT8 schemes quantize; everything else stays high precision."""
    return _QUANTIZED_LINEAR.match(name) is not None


def kept_dtype(name: str) -> torch.dtype:
    """Storage dtype of a tensor that is not quantized: modulation tables stay fp32 (they are added in fp32
    to the time embedding upstream), the rest bf16 like the upstream inference dtype."""
    return torch.float32 if name.endswith("modulation") else torch.bfloat16


def column_smoothing(w: torch.Tensor, alpha: float = SMOOTH_ALPHA) -> torch.Tensor:
    """Per-input-column float32 factors s (powers of two, >= 1) that bring the (out, in) weight's outlier columns
    toward the median column's range when the columns are divided by them."""
    colmax = w.detach().to(torch.float32).abs().amax(dim=0)
    median = colmax.median()
    if median <= 0:
        return torch.ones_like(colmax)
    return torch.exp2((torch.log2((colmax / median).clamp_min(1.0)) * alpha).round_())


def quantize_weight(w: torch.Tensor, scheme: str,
                    smooth: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> (qweight in the scheme's storage dtype, float32 scale (out,)) with
    w ~ q * scale[:, None] * smooth[None, :] (smooth: column factors, or None for none)."""
    check_scheme(scheme, QUANTIZED_SCHEMES)
    if w.ndim != 2:
        raise QuantizeError(f"expected a 2-D Linear weight, got shape {tuple(w.shape)}")
    w32 = w.detach().to(torch.float32)
    if smooth is not None:
        w32 = w32 / smooth.to(w32.device)
    amax = w32.abs().amax(dim=1)
    qmax = FP8_MAX if scheme == "fp8" else INT8_MAX
    # An all-zero row gets scale 1 so dequantization returns exact zeros instead of 0 * inf.
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    scaled = w32 / scale[:, None]
    if scheme == "fp8":
        q = scaled.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    else:
        q = scaled.round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_linear(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A block Linear's weight as the runtime stores it: (qweight, scale, smooth), smooth None unless the scheme
    is smoothed (INT8)."""
    smooth = column_smoothing(w) if scheme in SMOOTHED_SCHEMES else None
    return (*quantize_weight(w, scheme, smooth), smooth)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
               smooth: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of `quantize_weight` (per-row scale, per-column smoothing), computed in fp32 then cast."""
    w = q.to(torch.float32) * scale.to(torch.float32)[:, None]
    if smooth is not None:
        w = w * smooth.to(device=w.device, dtype=torch.float32)
    return w.to(dtype)


def relative_error(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """||approx - ref||_F / ||ref||_F (0 when both are zero). fp32 differences with an fp32 norm: the norm
    reduction accumulates pairwise, accurate to ~1e-6 relative, and fp64 copies made quantizing 3x slower."""
    ref32 = ref.detach().to(torch.float32)
    diff = approx.detach().to(torch.float32) - ref32
    denom = ref32.norm()
    return float(diff.norm() / denom) if denom > 0 else float(diff.norm())


def quantized_bytes(shape: tuple[int, ...], name: str, scheme: str) -> int:
    """On-disk bytes of one tensor under `scheme` (used for the disk-space estimate before writing)."""
    n = 1
    for d in shape:
        n *= int(d)
    if scheme in QUANTIZED_SCHEMES and is_quantized_name(name) and len(shape) == 2:
        return n + 4 * int(shape[0]) + (4 * int(shape[1]) if scheme in SMOOTHED_SCHEMES else 0)
    return n * (4 if kept_dtype(name) == torch.float32 else 2)
