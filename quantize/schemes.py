"""Weight quantization schemes and the rule saying which Wan-named DiT tensors get quantized.

Per-output-channel symmetric scales: one float32 scale per row of a Linear weight (out, in), so an FP8 or INT8
matmul can apply it in the epilogue (`scale_b` of `torch._scaled_mm`, or a column scale after `torch._int_mm`).
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


def quantize_weight(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> (qweight in the scheme's storage dtype, float32 scale (out,)) with w ~ q * scale[:, None]."""
    check_scheme(scheme, QUANTIZED_SCHEMES)
    if w.ndim != 2:
        raise QuantizeError(f"expected a 2-D Linear weight, got shape {tuple(w.shape)}")
    w32 = w.detach().to(torch.float32)
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


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_weight` (per-row scale), computed in fp32 then cast."""
    return (q.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


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
        return n + 4 * int(shape[0])
    return n * (4 if kept_dtype(name) == torch.float32 else 2)
