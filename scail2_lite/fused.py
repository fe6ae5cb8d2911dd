"""Triton kernels for the DiT block's per-token float32 islands (CUDA; model.py runs the PyTorch math elsewhere).

Why: the islands (LayerNorm + modulation before self-attention and the FFN, the affine norm before cross-attention,
q/k RMSNorm + RoPE) are each several PyTorch passes over float32 copies of the whole sequence; at 704p they cost
more than the FP8 Linears. Each kernel reads its input once and writes the bf16 result once, with the same float32
formulas as the PyTorch path (only the reductions' order differs, so a bf16 output differs from PyTorch's in about
one element in 10^5, by one bf16 step; bench_attention.py measures it on the device).
"""

from __future__ import annotations

import torch
from torch import nn

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs do not have it.
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def available(x: torch.Tensor) -> bool:
    """Whether the kernels run for x (a CUDA tensor, Triton installed)."""
    return triton is not None and x.is_cuda


if triton is not None:

    @triton.jit
    def _layer_norm_kernel(x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, out_ptr, x_batch, x_token, out_batch,
                           out_token, scale_batch, shift_batch, eps, DIM: tl.constexpr, AFFINE: tl.constexpr,
                           MODULATE: tl.constexpr, BLOCK: tl.constexpr):
        # One token row per program: LayerNorm in float32, then weight/bias and/or `* (1 + scale) + shift`.
        token, batch = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < DIM
        x = tl.load(x_ptr + batch * x_batch + token * x_token + cols, mask=inside, other=0.0).to(tl.float32)
        centred = tl.where(inside, x - tl.sum(x, axis=0) / DIM, 0.0)
        y = centred * tl.rsqrt(tl.sum(centred * centred, axis=0) / DIM + eps)
        if AFFINE:
            y = y * tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
            y = y + tl.load(b_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        if MODULATE:
            y = y * (1 + tl.load(scale_ptr + batch * scale_batch + cols, mask=inside, other=0.0))
            y = y + tl.load(shift_ptr + batch * shift_batch + cols, mask=inside, other=0.0)
        tl.store(out_ptr + batch * out_batch + token * out_token + cols, y.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _rms_norm_rope_kernel(y_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, y_batch, y_token, out_batch, out_token, eps,
                              DIM: tl.constexpr, HALF_HEAD: tl.constexpr, BLOCK: tl.constexpr):
        # One token row per program: float32 RMSNorm over the whole row, weight, then each head's lane pairs
        # (2i, 2i+1) rotated by the token's (cos_i, sin_i).
        token, batch = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
        pairs = tl.arange(0, BLOCK)
        inside = (pairs < DIM // 2)[:, None]
        offs = pairs[:, None] * 2 + tl.arange(0, 2)[None, :]
        y = tl.load(y_ptr + batch * y_batch + token * y_token + offs, mask=inside, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(tl.sum(y * y, axis=1), axis=0) / DIM + eps)
        y = y * rstd * tl.load(w_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        a, b = tl.split(y)
        lane = token * HALF_HEAD + pairs % HALF_HEAD
        cos = tl.load(cos_ptr + lane, mask=pairs < DIM // 2, other=0.0)
        sin = tl.load(sin_ptr + lane, mask=pairs < DIM // 2, other=0.0)
        out = tl.join(a * cos - b * sin, a * sin + b * cos)
        tl.store(out_ptr + batch * out_batch + token * out_token + offs, out.to(out_ptr.dtype.element_ty), mask=inside)


def _warps(dim: int) -> int:
    return 16 if dim >= 4096 else 4


def _check_rows(*tensors: torch.Tensor) -> None:
    if any(t.stride(-1) != 1 for t in tensors):
        raise ValueError("the fused kernels need unit stride along the features")


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm, out: torch.Tensor, scale: torch.Tensor | None = None,
               shift: torch.Tensor | None = None) -> None:
    """Write `norm(x)` in float32, then `* (1 + scale) + shift` if given, into `out` (its dtype), in one pass.

    x, out: (B, T, dim); scale, shift: (B, 1, dim) float32, as `model._normed` takes them."""
    batch, length, dim = x.shape
    modulate = scale is not None
    scale = scale if modulate else x
    shift = shift if modulate else x
    affine = norm.weight is not None
    _check_rows(x, out, scale, shift)
    _layer_norm_kernel[(length, batch)](
        x, norm.weight if affine else x, norm.bias if affine else x, scale, shift, out, x.stride(0), x.stride(1),
        out.stride(0), out.stride(1), scale.stride(0), shift.stride(0), norm.eps, DIM=dim, AFFINE=affine,
        MODULATE=modulate, BLOCK=triton.next_power_of_2(dim), num_warps=_warps(dim))


def rms_norm_rope(y: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                  out: torch.Tensor) -> None:
    """Write `apply_rope(RMSNorm(y) * weight)` into `out` in one pass.

    y: (B, T, dim); out: (B, T, heads, head_dim) with each token's heads contiguous; cos, sin: (T, head_dim/2)."""
    batch, length, dim = y.shape
    if not out[0, 0].is_contiguous():
        raise ValueError("rms_norm_rope needs each token's heads contiguous in out")
    _check_rows(y)
    _rms_norm_rope_kernel[(length, batch)](
        y, weight, cos.float().contiguous(), sin.float().contiguous(), out, y.stride(0), y.stride(1), out.stride(0),
        out.stride(1), eps, DIM=dim, HALF_HEAD=out.shape[-1] // 2, BLOCK=triton.next_power_of_2(dim // 2),
        num_warps=_warps(dim))
