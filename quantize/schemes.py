"""Weight quantization schemes and the rule saying which Wan-named DiT tensors get quantized.

Per-output-channel symmetric scales: one float32 scale per row of a Linear weight (out, in), so an FP8 or INT8
matmul can apply it in the epilogue (`scale_b` of `torch._scaled_mm`, or a column scale after `torch._int_mm`).

INT8 weights are stored in a rotated basis (QuaRot's incoherence processing). A row's INT8 grid is set by its
largest entry, so heavy tails and a few input columns several times larger than the rest coarsen every row.
Two exact, invertible steps on the input columns fix most of that:
1. column factors c_j = +-2^k: the power of two is SmoothQuant's migration, from the weights' side
   (2^round(alpha log2(colmax_j / median)), alpha = 0.5, moves part of an outlier column's range into the
   activations; with the rotation, 0.25 and 0.5 trade places between weight draws, see RESULTS.md); the sign is
   a fixed random one, so no structured row lines up with the rotation below.
2. a Hadamard rotation of every 64 consecutive input columns (orthonormal, symmetric, its own inverse): each
   rotated entry mixes 64 weights, so rows look Gaussian whatever the tails, and an outlier column is spread
   over its group.
The stored weight is q = round(H(W / c) / scale), and the activation takes the inverse path: x -> H(x c) before
its per-token quantization (fused into that kernel). On the full-size synthetic DiT this cut the INT8 weight
error from 2.7% (factors alone) to 0.9%, below FP8's 2.5%, and the W8A8 forward error from 5.7% to under 2%
(RESULTS.md). FP8's error is relative to each value (a float grid), so neither step would change it: FP8 weights
are stored plain.
"""

from __future__ import annotations

import functools
import re

import torch
import torch.nn.functional as F

SCHEMES: tuple[str, ...] = ("fp8", "int8", "bf16")
QUANTIZED_SCHEMES: tuple[str, ...] = ("fp8", "int8")

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
INT8_MAX = 127.0  # symmetric: -128 is never produced, so negation is exact

STORAGE_DTYPE: dict[str, torch.dtype] = {"fp8": FP8_DTYPE, "int8": torch.int8}
SMOOTHED_SCHEMES: tuple[str, ...] = ("int8",)  # stored with column factors and the Hadamard rotation
SMOOTH_ALPHA = 0.5
ROTATION_BLOCK = 64  # divides every block Linear's fan-in (5120, 13824); 1/8 entries are exact in bf16

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


def column_factors(w: torch.Tensor, alpha: float = SMOOTH_ALPHA) -> torch.Tensor:
    """Per-input-column float32 factors c = sign * 2^k (k >= 0) of an (out, in) INT8 weight: 2^k brings outlier
    columns toward the median column's range when the columns are divided by c; the sign is the rotation's
    random sign, a fixed function of `in` (so quantizing twice writes the same bytes)."""
    colmax = w.detach().abs().amax(dim=0).to(torch.float32)  # exact in any float dtype, no float32 copy
    median = colmax.median()
    power = (torch.exp2((torch.log2((colmax / median).clamp_min(1.0)) * alpha).round_()) if median > 0
             else torch.ones_like(colmax))
    gen = torch.Generator().manual_seed(w.shape[1])
    signs = torch.randint(0, 2, (w.shape[1],), generator=gen).to(torch.float32).mul_(2.0).sub_(1.0)
    return power * signs.to(power.device)


def hadamard(n: int = ROTATION_BLOCK, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> torch.Tensor:
    """The orthonormal n x n Sylvester Hadamard matrix (n a power of two): symmetric and its own inverse. Made
    once per (n, dtype, device) and shared (read-only): the weight-only path rotates on every forward."""
    return _hadamard(n, dtype, torch.device(device if device is not None else "cpu"))


@functools.lru_cache(maxsize=None)
def _hadamard(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    h = torch.ones((1, 1), dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / h.shape[0] ** 0.5).to(dtype=dtype, device=device).contiguous()


def check_rotation_width(n: int) -> None:
    """INT8's rotation works on whole ROTATION_BLOCK-column groups."""
    if n % ROTATION_BLOCK:
        raise QuantizeError(f"int8 needs the input width to be a multiple of {ROTATION_BLOCK}, got {n}")


def rotate_columns(w: torch.Tensor) -> torch.Tensor:
    """(..., in) with each group of ROTATION_BLOCK consecutive columns multiplied by the Hadamard matrix, in
    `w`'s dtype; its own inverse. Used on INT8 weights (W / c) and on their activations (x c)."""
    n = w.shape[-1]
    check_rotation_width(n)
    groups = w.reshape(*w.shape[:-1], n // ROTATION_BLOCK, ROTATION_BLOCK)
    return (groups @ hadamard(ROTATION_BLOCK, w.dtype, w.device)).reshape(w.shape)


def rotated_layout(w: torch.Tensor, factors: torch.Tensor | None = None, rows: int = 1024) -> torch.Tensor:
    """H(w / factors) of an (out, in) weight: INT8's stored basis (see the module docstring), also the umT5
    weights' before 4/8-bit quantization. In `w`'s dtype, computed in float32 `rows` rows at a time, so a bf16
    4096 x 10240 weight needs under 100 MB of temporaries instead of two float32 copies."""
    out = torch.empty_like(w)
    for src, dst in zip(w.detach().split(rows), out.split(rows)):
        src = src.to(torch.float32)
        if factors is not None:
            src = src / factors.to(src.device)
        dst.copy_(rotate_columns(src))
    return out


def quantize_weight(w: torch.Tensor, scheme: str,
                    factors: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> (qweight in the scheme's storage dtype, float32 scale (out,)). FP8:
    w ~ q * scale[:, None]. INT8: w ~ H(q * scale[:, None]) * factors[None, :] (rotated, see the module
    docstring; `factors`, INT8's only, None means all ones)."""
    check_scheme(scheme, QUANTIZED_SCHEMES)
    if w.ndim != 2:
        raise QuantizeError(f"expected a 2-D Linear weight, got shape {tuple(w.shape)}")
    w32 = w.detach().to(torch.float32)
    if scheme in SMOOTHED_SCHEMES:
        w32 = rotated_layout(w32, factors)
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
    """A block Linear's weight as the runtime stores it: (qweight, scale, smooth), smooth (the column factors)
    None unless the scheme has them (INT8)."""
    factors = column_factors(w) if scheme in SMOOTHED_SCHEMES else None
    return (*quantize_weight(w, scheme, factors), factors)


def quantize_dequantize(w: torch.Tensor, scheme: str) -> torch.Tensor:
    """An (out, in) weight through `scheme` and back (float32): what quantizing a layer would cost, for layers kept
    in higher precision. INT8's rotation works on whole 64-column blocks, so a narrower fan-in is padded with zero
    columns here (no stored layer is padded: block Linears are 5120 or 13824 wide)."""
    pad = (-w.shape[1]) % ROTATION_BLOCK if scheme in SMOOTHED_SCHEMES else 0
    q, scale, factors = quantize_linear(F.pad(w.detach().to(torch.float32), (0, pad)), scheme)
    return dequantize(q, scale, smooth=factors)[:, :w.shape[1]]


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
               smooth: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of `quantize_weight` (per-row scale; for INT8 the rotation and the column factors `smooth`),
    computed in fp32 then cast."""
    w = q.to(torch.float32) * scale.to(torch.float32)[:, None]
    if q.dtype == torch.int8:
        w = rotate_columns(w)
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
