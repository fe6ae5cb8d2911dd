"""`QuantLinear`: an FP8/INT8 weight held as plain buffers, with three compute paths chosen from the device.

- "fp8": per-token FP8 activations (fused Triton quantization kernel) x per-channel FP8 weights through
  `torch._scaled_mm` with row-wise scales and the bias in the cuBLASLt epilogue (sm89+: Ada, Hopper, Blackwell).
- "int8": per-token INT8 activations (a tiled Triton kernel that also multiplies each channel by the weight's
  column factor and rotates every 64 channels by the Hadamard matrix on the tensor cores: the inverse of the
  weight's stored layout, see schemes.py) x per-channel INT8 weights in a Triton GEMM whose epilogue applies both
  scales and the bias, so the int32 result never goes to memory (Ampere and newer). The device measured that an
  unfused `torch._int_mm` + PyTorch epilogue is slower than bf16, hence the custom kernel.
- "dequant": weight-only, dequantize then matmul in the activation dtype (CPU, older GPUs, anything else).

The buffers are ordinary tensors (no subclasses) so a block streamer can keep them in pinned host memory and
copy them into preallocated GPU slots asynchronously. On a non-CUDA device the "fp8" and "int8" paths run their
reference math in fp32/fp64 (same activation quantization, exact integer accumulation): that is what the CPU
tests compare against the dequant path.
"""

from __future__ import annotations

import functools

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .schemes import (
    FP8_DTYPE,
    FP8_MAX,
    INT8_MAX,
    ROTATION_BLOCK,
    SMOOTHED_SCHEMES,
    STORAGE_DTYPE,
    QuantizeError,
    check_rotation_width,
    check_scheme,
    dequantize,
    hadamard,
    quantize_linear,
    rotate_columns,
)

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs do not have it.
    import triton
    import triton.language as tl
except ImportError:
    triton = None

COMPUTES: tuple[str, ...] = ("fp8", "int8", "dequant")
# FP8 matmul with fast accumulation: Hopper's cheaper accumulator, measured by benchmarks/bench_linear.py.
FP8_FAST_ACCUM = True
# Whether `torch._scaled_mm` accepts a bias with row-wise scales (cuBLASLt epilogue); learnt on first use.


def choose_compute(device: torch.device | str, scheme: str) -> str:
    """The fastest exact-enough path for `scheme` weights on `device` (see module docstring)."""
    device = torch.device(device)
    if device.type != "cuda":
        return "dequant"
    cap = torch.cuda.get_device_capability(device)
    if scheme == "fp8" and cap >= (8, 9) and triton is not None:
        return "fp8"
    if scheme == "int8" and cap >= (8, 0) and triton is not None:
        return "int8"
    return "dequant"


def _round_half_away(y: torch.Tensor) -> torch.Tensor:
    """Rounding used by the Triton kernel too (floor(|y| + 0.5) with the sign), so CPU reference == GPU."""
    return torch.sign(y) * torch.floor(y.abs() + 0.5)


def quantize_rows_reference(x: torch.Tensor, compute: str, gelu: bool = False,
                            factors: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (row) symmetric activation quantization in eager PyTorch: (q (M, K), scale (M, 1) float32), of
    tanh-GELU(x) (computed in float32) when `gelu`. With the INT8 weight's column `factors`, the activations take
    that layout's inverse path first: times the factors, rounded to bf16 (as the kernel's bf16 tensor-core product
    does; exact for bf16 activations, the factors being powers of two), rotated per 64 channels.

    The reference for the fused Triton kernel; too slow on the GPU (several passes over the activations)."""
    x32 = x.to(torch.float32)
    if gelu:
        x32 = F.gelu(x32, approximate="tanh")
    if factors is not None:
        x32 = rotate_columns((x32 * factors).to(torch.bfloat16).to(torch.float32))
    qmax = FP8_MAX if compute == "fp8" else INT8_MAX
    scale = x32.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
    y = x32 / scale
    if compute == "fp8":
        return y.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale
    return _round_half_away(y).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


if triton is not None:

    @triton.jit
    def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, QMAX: tl.constexpr, IS_INT: tl.constexpr,
                           GELU: tl.constexpr, BLOCK: tl.constexpr):
        # One program per token: read the row once, (tanh-GELU,) absmax, scale, cast, write (one pass).
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < K
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        if GELU:
            x = _tanh_gelu(x)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / QMAX
        _store_quantized(q_ptr + row * stride_q + offs, x / scale, mask, IS_INT, QMAX)
        tl.store(s_ptr + row, scale)

    @triton.jit
    def _tanh_gelu(x):
        # 0.5 x (1 + tanh(u)), tanh(u) = 1 - 2 / (exp(2u) + 1)
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))

    @triton.jit
    def _store_quantized(ptrs, y, mask, IS_INT: tl.constexpr, QMAX: tl.constexpr):
        if IS_INT:
            y = tl.where(y >= 0, tl.floor(y + 0.5), -tl.floor(-y + 0.5))
        y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
        tl.store(ptrs, y.to(ptrs.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotated_tile(x_ptr, factors_ptr, h, rows, k0, M, stride_x, GELU: tl.constexpr, RB: tl.constexpr):
        # (BM, RB) activations at column k0 -> (tanh-GELU,) times the column factors, rounded to bf16, times the
        # Hadamard matrix on the tensor cores; fp32 result, and the rows' mask.
        cols = k0 + tl.arange(0, RB)
        mask = rows[:, None] < M
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if GELU:
            x = _tanh_gelu(x)
        x = x * tl.load(factors_ptr + cols)[None, :]
        return tl.dot(x.to(tl.bfloat16), h), mask

    @triton.autotune(  # tokens per program; the columns go RB (one rotation block) at a time
        configs=[triton.Config({"BM": bm}, num_warps=w, num_stages=st)
                 for bm, w in ((64, 4), (128, 4), (128, 8), (256, 8)) for st in (2, 3)],
        key=["K", "GELU"],
    )
    @triton.jit
    def _quant_rows_rotated_kernel(x_ptr, q_ptr, s_ptr, factors_ptr, h_ptr, M, K, stride_x, stride_q,
                                   QMAX: tl.constexpr, IS_INT: tl.constexpr, GELU: tl.constexpr, BM: tl.constexpr,
                                   RB: tl.constexpr):
        # BM tokens per program, K in RB-column blocks, twice: the first pass finds each row's absmax of the
        # rotated values, the second recomputes them (a (BM, RB) x (RB, RB) product is cheap) and writes.
        rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
        hr = tl.arange(0, RB)
        h = tl.load(h_ptr + hr[:, None] * RB + hr[None, :])
        amax = tl.zeros((BM,), dtype=tl.float32)
        for k0 in tl.range(0, K, RB):
            y, _ = _rotated_tile(x_ptr, factors_ptr, h, rows, k0, M, stride_x, GELU, RB)
            amax = tl.maximum(amax, tl.max(tl.abs(y), axis=1))
        scale = tl.maximum(amax, 1e-12) / QMAX
        for k0 in tl.range(0, K, RB):
            y, mask = _rotated_tile(x_ptr, factors_ptr, h, rows, k0, M, stride_x, GELU, RB)
            cols = k0 + tl.arange(0, RB)
            _store_quantized(q_ptr + rows[:, None] * stride_q + cols[None, :], y / scale[:, None], mask, IS_INT,
                             QMAX)
        tl.store(s_ptr + rows, scale, mask=rows < M)

    @triton.autotune(
        configs=[
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=3, num_warps=8),
            triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=3, num_warps=8),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=4, num_warps=8),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
            triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=4, num_warps=8),
            triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=4, num_warps=8),
        ],
        key=["M", "N", "K"],
    )
    @triton.jit
    def _int8_mm_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr, M, N, K,
                        stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # C = (A_int8 @ B_int8 -> int32) * sa[m] * sb[n] + bias[n], stored in C's dtype: the epilogue is fused.
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        group = GROUP_M * num_pid_n
        first_m = (pid // group) * GROUP_M
        size_m = min(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + ((pid % group) % size_m)
        pid_n = (pid % group) // size_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = offs_m % M
        rn = offs_n % N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rm[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + rn[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        sa = tl.load(sa_ptr + rm)
        sb = tl.load(sb_ptr + rn)
        c = acc.to(tl.float32) * sa[:, None] * sb[None, :]
        if HAS_BIAS:
            c += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, c.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def quantize_rows(x: torch.Tensor, compute: str, gelu: bool = False,
                  factors: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token activation quantization (of tanh-GELU(x) when `gelu`; in the INT8 weight's layout when its column
    `factors` are given: times them, then rotated per 64 channels), one Triton kernel on CUDA (reference math
    elsewhere)."""
    if triton is None or not x.is_cuda:
        return quantize_rows_reference(x, compute, gelu, factors)
    x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=FP8_DTYPE if compute == "fp8" else torch.int8, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    qmax = FP8_MAX if compute == "fp8" else INT8_MAX
    if factors is None:
        block = triton.next_power_of_2(k)
        _quant_rows_kernel[(m,)](x, q, scale, k, x.stride(0), q.stride(0), QMAX=qmax, IS_INT=compute == "int8",
                                 GELU=gelu, BLOCK=block, num_warps=16 if block >= 8192 else 8)
        return q, scale
    check_rotation_width(k)
    grid = lambda meta: (triton.cdiv(m, meta["BM"]),)  # noqa: E731
    # the +-1/8 entries of the Hadamard matrix are exact in bf16
    _quant_rows_rotated_kernel[grid](x, q, scale, factors, hadamard(ROTATION_BLOCK, torch.bfloat16, x.device), m,
                                     k, x.stride(0), q.stride(0), QMAX=qmax, IS_INT=compute == "int8", GELU=gelu,
                                     RB=ROTATION_BLOCK)
    return q, scale


def int8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """(M, K) int8 x (N, K) int8 with fused per-row/per-column scales and bias -> (M, N) out_dtype (CUDA)."""
    m, k = xq.shape
    n = wq.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _int8_mm_kernel[grid](xq, wq, out, x_scale, w_scale, bias if bias is not None else w_scale, m, n, k,
                          xq.stride(0), xq.stride(1), wq.stride(1), wq.stride(0), out.stride(0), out.stride(1),
                          HAS_BIAS=bias is not None)
    return out


@functools.cache
def _scaled_mm_takes_bias(device: torch.device) -> bool:
    """Whether this torch build has cuBLASLt's bias epilogue with row-wise FP8 scales (else the bias is added
    after the product). A property of the machine, probed once per device on a 16x16 product."""
    x = torch.zeros(16, 16, device=device).to(torch.float8_e4m3fn)
    ones = torch.ones(16, 1, device=device)
    try:
        torch._scaled_mm(x, x.t(), scale_a=ones, scale_b=ones.view(1, -1),
                         bias=torch.zeros(16, device=device, dtype=torch.bfloat16), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


def fp8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None, fast_accum: bool = FP8_FAST_ACCUM) -> torch.Tensor:
    """(M, K) fp8 x (N, K) fp8 with row-wise scales and bias in the cuBLASLt epilogue -> (M, N) bf16 (CUDA)."""
    m = xq.shape[0]
    pad = (-m) % 16  # cuBLASLt FP8 wants 16-aligned dimensions; only tiny M (e.g. 769 context tokens) pays this
    if pad:
        xq = torch.cat([xq, xq.new_zeros((pad, xq.shape[1]))])
        x_scale = torch.cat([x_scale, x_scale.new_ones((pad, 1))])
    fused_bias = bias is not None and _scaled_mm_takes_bias(xq.device)
    out = torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1),
                           bias=bias.to(torch.bfloat16) if fused_bias else None,
                           out_dtype=torch.bfloat16, use_fast_accum=fast_accum)
    if bias is not None and not fused_bias:
        out = out + bias.to(torch.bfloat16)
    return out[:m] if pad else out


def _reference_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                      bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """What the fp8/int8 kernels compute, in fp64 (exact for the int8 products) on any device."""
    acc = xq.to(torch.float64) @ wq.to(torch.float64).t()
    out = acc * x_scale.to(torch.float64) * w_scale.to(torch.float64).view(1, -1)
    if bias is not None:
        out = out + bias.to(torch.float64)
    return out.to(out_dtype)


class QuantLinear(nn.Module):
    """Linear layer with an FP8 or INT8 (out, in) weight and float32 per-output-channel scale, as plain buffers;
    INT8 layers also hold their float32 per-input-column `smooth` factors, and their weight is stored rotated
    (schemes.py), so their input is rotated too.

    `input_gelu` (set by `swap_linears` when it folds the tanh GELU in front of it) applies that GELU to the input
    first; the fp8/int8 paths do it inside the activation quantization, which saves a pass over the FFN's widest
    activation."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scheme: str = "fp8",
                 compute: str | None = None, device: torch.device | str | None = None,
                 bias_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        check_scheme(scheme, ("fp8", "int8"))
        if scheme in SMOOTHED_SCHEMES:
            check_rotation_width(in_features)
        if compute is not None:
            check_compute(compute, scheme)
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.compute = scheme, compute
        self.input_gelu = False
        self.register_buffer("weight", torch.empty((out_features, in_features), dtype=STORAGE_DTYPE[scheme],
                                                   device=device))
        self.register_buffer("scale", torch.empty((out_features,), dtype=torch.float32, device=device))
        smoothed = scheme in SMOOTHED_SCHEMES
        self.register_buffer("smooth", torch.ones((in_features,), dtype=torch.float32, device=device)
                             if smoothed else None)
        self.register_buffer("bias", torch.empty((out_features,), dtype=bias_dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, compute: str | None = None) -> "QuantLinear":
        """Quantize an existing nn.Linear (bias kept in its dtype, at least bf16 precision)."""
        has_bias = linear.bias is not None
        q = cls(linear.in_features, linear.out_features, has_bias, scheme, compute, device=linear.weight.device,
                bias_dtype=linear.bias.dtype if has_bias else torch.bfloat16)
        qw, scale, smooth = quantize_linear(linear.weight, scheme)
        q.weight.copy_(qw)
        q.scale.copy_(scale)
        if smooth is not None:
            q.smooth.copy_(smooth)
        if has_bias:
            q.bias.copy_(linear.bias.detach())
        return q

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.scheme}, compute={self.compute or 'auto'}" + (", input_gelu" if self.input_gelu else ""))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = self.compute or choose_compute(x.device, self.scheme)
        if compute == "dequant":
            if self.input_gelu:
                x = F.gelu(x, approximate="tanh")
            w = dequantize(self.weight, self.scale, x.dtype, self.smooth)
            return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        xq, xs = quantize_rows(x2, compute, self.input_gelu, self.smooth)
        if not x.is_cuda:
            out = _reference_matmul(xq, xs, self.weight, self.scale, self.bias, x.dtype)
        elif compute == "fp8":
            out = fp8_matmul(xq, xs, self.weight, self.scale, self.bias).to(x.dtype)
        else:
            out = int8_matmul(xq, xs, self.weight, self.scale, self.bias, x.dtype)
        return out.reshape(*lead, self.out_features)


def check_compute(compute: str, scheme: str) -> str:
    """A compute path must match the weight scheme: fp8 weights run "fp8" or "dequant", int8 "int8" or "dequant"."""
    if compute not in COMPUTES:
        raise QuantizeError(f"unknown compute path {compute!r}; choose one of auto, {', '.join(COMPUTES)}")
    if compute != "dequant" and compute != scheme:
        raise QuantizeError(f"compute path {compute!r} cannot run {scheme} weights; use {scheme} or dequant")
    return compute


def swap_linears(module: nn.Module, names_to_scheme: Mapping[str, str], compute: str | None = None) -> nn.Module:
    """Replace the named nn.Linear submodules by QuantLinear, in place; returns `module`.

    A Linear on the meta device (model built empty before loading) gets empty meta buffers to be filled by
    `load_state_dict(..., assign=True)`; a Linear with real weights is quantized from them. A forced `compute`
    applies to the layers it can run (its own scheme's, or all for "dequant"); in a mixed-precision model the
    others keep their automatic path."""
    for name, scheme in names_to_scheme.items():
        layer_compute = compute if compute in (None, "dequant", scheme) else None
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        linear = getattr(parent, child, None)
        if not isinstance(linear, nn.Linear):
            raise QuantizeError(f"{name!r} is not an nn.Linear in this model (found {type(linear).__name__})")
        if linear.weight.is_meta:
            has_bias = linear.bias is not None
            new = QuantLinear(linear.in_features, linear.out_features, has_bias, scheme, layer_compute,
                              device="meta", bias_dtype=torch.bfloat16)
        else:
            new = QuantLinear.from_linear(linear, scheme, layer_compute)
        setattr(parent, child, new)
    _fold_gelus(module)
    return module


def _fold_gelus(module: nn.Module) -> None:
    """Fold each tanh GELU that feeds a QuantLinear inside an nn.Sequential (the DiT FFN) into that QuantLinear's
    input; the GELU's slot becomes an Identity, so parameter names do not change."""
    for seq in module.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(len(seq) - 1):
            gelu, linear = seq[i], seq[i + 1]
            if isinstance(gelu, nn.GELU) and gelu.approximate == "tanh" and isinstance(linear, QuantLinear):
                linear.input_gelu = True
                seq[i] = nn.Identity()
