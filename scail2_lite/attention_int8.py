"""8-bit self-attention in our own Triton kernel: INT8 QK^T, FP8 (sm89+) or fp16 (sm80/86) P.V, fp32 softmax.

Why: cuDNN's FP8 attention exists on Hopper and B200 only; on Ampere, Ada and consumer Blackwell `auto` fell back to
bf16 SDPA, and self-attention is most of a 704p step. INT8 tensor cores run at twice the bf16 rate on every card from
sm80, FP8 too from sm89, so an 8-bit kernel is the lever there (issue 19). The algorithm:
  q, k   INT8 with one scale per block of Q_BLOCK queries / K_BLOCK keys and head (absmax / 127, rounded half away
         from zero). k first loses its mean over the tokens (per batch, head and lane): every score of a query row
         moves by the same q.mean, so the softmax is unchanged, and the channel offsets trained keys carry no longer
         eat the 8 bits. q's scale also carries 1/sqrt(head_dim) * log2(e), so the kernel's scores are already in
         exp2 units. The int8 products of one 128-lane dot sum to less than 2^24: exact in int32 and in float32.
  softmax  online (flash-attention), float32, exp2; the probabilities relative to the running row max lie in
         [0, 1] and are scaled by 448 before the cast, so e4m3 keeps them normal down to 3.5e-5.
  v      loses its per-channel mean too (each output row is a convex combination of v's rows, so the mean is added
         back exactly after the division by the row sum) and is scaled per channel so that its absmax maps to 448:
         e4m3 on sm89+, fp16 on sm80/86 (no FP8 tensor cores there). Each block's P.V product is a fresh dot added
         into the float32 accumulator, so Hopper's reduced-precision FP8 accumulation spans one block of keys only.
  tails  the quantized copies are padded to PAD tokens with zeros; scores of keys past the sequence are -inf (no
         phantom keys, unlike sageattention 1.0.6), rows past it are not stored.
Status (2026-12-06): Triton's interpreter runs these kernels bit-exact with the reference's quantization and within
1e-4 of its output (fp16 P.V; the interpreter mis-rounds e4m3); the kernel builds for sm80/86/89/90/120 with no
register spills; on the H100 (sm90, the split-QK form of `attention_int8_hopper`) it ran 1.21x cuDNN's bf16 SDPA at
704p within 0.013 of float32 per call on realistic inputs. There its q8/k8 differed from the reference's in about
one value in 12,000 by one INT8 step: the reference's `127 / amax` rounded twice (fixed since, not yet re-run on a GPU).
No consumer card has run it.
Memory: `int8_attention` takes q, k and v over and drops each once its 8-bit copy exists, so the peak (1 + 1 + 1 or 2
bytes per element of the copies, plus the bf16 output) stays under SDPA's (q, k, v and the output in bf16).

`attention_reference` is the same algorithm in plain PyTorch (same quantization, block sizes and rounding, the same
online loop over key blocks): what the CPU tests check the math with and what the kernel is compared against, in
Triton's interpreter on the CPU and on the device. `aot_build` compiles the kernel for any target in AOT_TARGETS
(sm80, sm86, sm89, sm90, sm120) without that GPU and reports its registers and shared memory.
"""

from __future__ import annotations

import functools
import math
import re
import subprocess
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from . import attention_int8_hopper
from .errors import UserError

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs do not have it.
    import triton
    import triton.language as tl
except ImportError:
    triton = None

Q_BLOCK = 128  # queries per INT8 scale (and head)
K_BLOCK = 64  # keys per INT8 scale (and head)
PAD = 128  # token padding of the quantized copies: a multiple of every block size
INT8_MAX = 127.0
FP8_MAX = 448.0  # v's per-channel absmax and the probabilities' 1.0 map here
LOG2E = 1.4426950408889634
HEAD_DIMS = (64, 128)
FP8 = torch.float8_e4m3fn
PROBE_TOKENS = 300  # `usable`'s test shape: a tail in every block size


@dataclass(frozen=True)
class KernelConfig:
    """Tile and launch parameters of the attention kernel (fixed per architecture: no autotuning, so the same
    machine always computes the same numbers). block_m must divide Q_BLOCK, block_n be a multiple of K_BLOCK.
    `split_qk`: the sm90 form of the kernel (`attention_int8_hopper`: QK^T as 64-key products, block_n == 4 or 2
    * K_BLOCK)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    split_qk: bool = False

    def label(self) -> str:
        tiles = f"{self.block_m}x{self.block_n}/{self.num_warps}w/{self.num_stages}s"
        return f"{tiles} split_qk" if self.split_qk else tiles


# Per compute capability (major * 10 + minor). sm90's is the fastest of `tune_int8_attention.py`'s candidates on the
# H100 (RESULTS.md, 2026-12-06 and 12-07): two warpgroups (8 warps), the layout Triton's wgmma needs, QK^T as 64-key
# products (`split_qk`), four per 256-key tile, so the row max, the accumulator's rescale and the row sum run once per
# 256 keys (P is quantized against that wider max: the error against float32 is unchanged); 3 stages (2 lost).
# The others are untimed (no such GPU here): they come from the ahead-of-time builds (`aot_table`): no spills, and on
# the ~100 KB shared-memory cards (sm86/89/120) 2 stages, 32-41 KB per CTA, so two CTAs fit an SM; sm100 follows
# Hopper's first guess. Architectures missing here fall back to DEFAULT_CONFIG.
CONFIGS: dict[int, KernelConfig] = {
    80: KernelConfig(128, 64, 4, 3),
    86: KernelConfig(128, 64, 4, 2),
    89: KernelConfig(128, 64, 4, 2),
    90: KernelConfig(128, 256, 8, 3, split_qk=True),
    100: KernelConfig(128, 64, 8, 3),
    120: KernelConfig(128, 64, 4, 2),
}
DEFAULT_CONFIG = KernelConfig(128, 64, 4, 2)
AOT_TARGETS = (80, 86, 89, 90, 120)
# Largest shared memory one CTA may use, per architecture (CUDA programming guide, compute capabilities table).
MAX_SHARED = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}


class Quantized(NamedTuple):
    """The kernel's inputs. q8, k8: (B, H, Lpad, D) int8; q_scale, k_scale: (B, H, Lpad / block) float32 (q's
    includes 1/sqrt(D) * log2 e); v8: (B, H, D, Lpad) e4m3 or fp16, tokens contiguous (FP8 tensor cores want the
    reduction dimension contiguous in both operands); v_scale, v_mean: (B, H, D) float32."""

    q8: torch.Tensor
    q_scale: torch.Tensor
    k8: torch.Tensor
    k_scale: torch.Tensor
    v8: torch.Tensor
    v_scale: torch.Tensor
    v_mean: torch.Tensor
    q_len: int
    k_len: int


def capability_number(device: torch.device | None = None) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def pv_dtype(capability: int) -> torch.dtype:
    """e4m3 where the GPU has FP8 tensor cores (sm89+), else fp16."""
    return FP8 if capability >= 89 else torch.float16


def describe(device: torch.device | None = None) -> str:
    """What the kernel computes on this GPU, e.g. 'INT8 QK^T + FP8 P.V, sm89, 128x64 tiles'."""
    capability = capability_number(device)
    config = kernel_config(capability)
    pv = "FP8" if pv_dtype(capability) == FP8 else "fp16"
    split = ", split 64-key QK^T" if config.split_qk else ""
    return f"INT8 QK^T + {pv} P.V, sm{capability}, {config.block_m}x{config.block_n} tiles{split}"


def kernel_config(capability: int) -> KernelConfig:
    return CONFIGS.get(capability, DEFAULT_CONFIG)


def padded(length: int) -> int:
    return -(-length // PAD) * PAD


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """UserError unless q, k, v are (B, L, heads, head_dim) with a supported head dim and matching k/v."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise UserError(f"int8 attention needs q, k, v of shape (B, L, heads, head_dim) with v like k; got "
                        f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise UserError(f"int8 attention: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, heads or "
                        "head_dim")
    if q.shape[-1] not in HEAD_DIMS:
        raise UserError(f"int8 attention supports head_dim {' or '.join(map(str, HEAD_DIMS))}, got {q.shape[-1]}")
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise UserError("int8 attention needs at least one query and one key")


def _smoothing(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """k's token mean, v's token mean, and v's per-channel quantization multiplier and scale, each (B, H, D)
    float32. Reductions over the tokens only (no full-size temporary); shared by the kernel and the reference, so
    both quantize with the same numbers. |v - mean| <= max(max - mean, mean - min) per channel, exactly."""
    k_mean = k.mean(dim=1, dtype=torch.float32)
    v_mean = v.mean(dim=1, dtype=torch.float32)
    v_min, v_max = torch.aminmax(v, dim=1)
    amax = torch.maximum(v_max.float() - v_mean, v_mean - v_min.float()).clamp_min_(1e-30)
    return k_mean, v_mean, FP8_MAX / amax, amax / FP8_MAX


def _q_multiplier(head_dim: int) -> float:
    return LOG2E / math.sqrt(head_dim)


def _round_int8(y: torch.Tensor) -> torch.Tensor:
    """Round half away from zero (the kernel's `where(y >= 0, y + .5, y - .5)` then truncation)."""
    return torch.where(y >= 0, y + 0.5, y - 0.5).trunc_().to(torch.int8)


def _quantize_blocks_reference(x: torch.Tensor, block: int, mean: torch.Tensor | None,
                               multiplier: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, L, H, D) -> ((B, H, Lpad, D) int8, (B, H, Lpad / block) float32 scales), per block of tokens and head."""
    batch, length, heads, dim = x.shape
    y = torch.zeros(batch, heads, padded(length), dim, dtype=torch.float32, device=x.device)
    y[:, :, :length] = x.transpose(1, 2).float() - (mean.unsqueeze(2) if mean is not None else 0)
    tiles = y.unflatten(2, (-1, block))  # (B, H, blocks, block, D)
    amax = tiles.abs().amax(dim=(-2, -1))
    safe = amax.clamp_min(1e-30)
    # Tensor by tensor, never with a Python number: torch computes `number / x` as `x.reciprocal() * number`, and on
    # CUDA `x / number` as `x * (1 / number)`; both round differently from the kernel's correctly rounded division
    # (one INT8 step on about one value in 12,000 on the H100).
    int8_max = safe.new_tensor(INT8_MAX)
    q8 = _round_int8(tiles * (int8_max / safe)[..., None, None]).flatten(2, 3)
    return q8, (safe / int8_max) * safe.new_tensor(multiplier)


def quantize_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pv: torch.dtype) -> Quantized:
    """The kernel's quantization in PyTorch (float32 math in the kernel's order; `quantize` must match it bit for
    bit, e4m3 ties aside in Triton's interpreter, which rounds them away from zero)."""
    check_shapes(q, k, v)
    k_mean, v_mean, v_inv, v_scale = _smoothing(k, v)
    q8, q_scale = _quantize_blocks_reference(q, Q_BLOCK, None, _q_multiplier(q.shape[-1]))
    k8, k_scale = _quantize_blocks_reference(k, K_BLOCK, k_mean, 1.0)
    batch, length, heads, dim = v.shape
    y = (v.transpose(1, 2).float() - v_mean.unsqueeze(2)) * v_inv.unsqueeze(2)
    v8 = torch.zeros(batch, heads, dim, padded(length), dtype=pv, device=v.device)
    v8[..., :length] = y.clamp_(-FP8_MAX, FP8_MAX).transpose(2, 3).to(pv)
    return Quantized(q8, q_scale, k8, k_scale, v8, v_scale, v_mean, q.shape[1], length)


def attend_reference(x: Quantized, block_n: int, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The kernel's loop over blocks of `block_n` keys in PyTorch, all query rows at once: exact integer scores
    scaled per (query block, key block), online softmax in float32 with exp2, P scaled by 448 and cast to v8's
    dtype, a float32 P.V product per key block. Returns (B, Lq, H, D) in `out_dtype`."""
    qf = x.q8[:, :, : x.q_len].float()
    q_scale = x.q_scale.repeat_interleave(Q_BLOCK, dim=2)[:, :, : x.q_len, None]
    rows = qf.shape[:3]
    m = torch.full(rows, -math.inf, device=qf.device)
    l = torch.zeros(rows, device=qf.device)
    acc = torch.zeros(qf.shape, device=qf.device)
    for start in range(0, x.k_len, block_n):
        end = min(start + block_n, x.k_len)
        k_scale = x.k_scale.repeat_interleave(K_BLOCK, dim=2)[:, :, None, start:end]
        s = (qf @ x.k8[:, :, start:end].float().transpose(2, 3)) * (q_scale * k_scale)
        m_new = torch.maximum(m, s.amax(-1))
        alpha = torch.exp2(m - m_new)
        p = torch.exp2(s - m_new[..., None])
        l = l * alpha + p.sum(-1)
        pv = (p * FP8_MAX).to(x.v8.dtype).float() @ x.v8[..., start:end].float().transpose(2, 3)
        acc = acc * alpha[..., None] + pv
        m = m_new
    out = acc / l[..., None] * (x.v_scale / FP8_MAX).unsqueeze(2) + x.v_mean.unsqueeze(2)
    return out.transpose(1, 2).to(out_dtype)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pv: torch.dtype = FP8,
                        block_n: int = CONFIGS[90].block_n) -> torch.Tensor:
    """The whole algorithm in PyTorch on any device: (B, Lq, H, D), (B, Lk, H, D) x 2 -> (B, Lq, H, D) bf16."""
    return attend_reference(quantize_reference(q, k, v, pv), block_n)


if triton is not None:

    @triton.jit
    def _token_block(x_ptr, L, H, stride_b, stride_l, stride_h, BLOCK: tl.constexpr, D: tl.constexpr):
        # The program's block of BLOCK tokens of one (batch, head) of x (B, L, H, D), as float32 with zeros past L;
        # with its rows, lanes, the rows-inside mask, the block index and batch * H + head.
        blk, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = blk * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, D)
        inside = rows[:, None] < L
        src = x_ptr + b.to(tl.int64) * stride_b + h * stride_h + rows[:, None].to(tl.int64) * stride_l + cols[None, :]
        return tl.load(src, mask=inside, other=0.0).to(tl.float32), rows, cols, inside, blk, b * H + h

    @triton.jit
    def _quantize_qk_kernel(x_ptr, mean_ptr, out_ptr, scale_ptr, L, LP, H, stride_b, stride_l, stride_h,
                            multiplier, HAS_MEAN: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr):
        # One block of tokens of one head: subtract the mean, absmax, round to INT8, write (B, H, Lpad, D)
        # and the block's scale. Rows past L are written as zeros.
        y, rows, cols, inside, blk, bh = _token_block(x_ptr, L, H, stride_b, stride_l, stride_h, BLOCK, D)
        if HAS_MEAN:
            y = y - tl.load(mean_ptr + bh * D + cols)[None, :]
        y = tl.where(inside, y, 0.0)
        amax = tl.maximum(tl.max(tl.max(tl.abs(y), axis=1), axis=0), 1e-30)
        # div_rn: Triton's `/` on float32 is the GPU's approximate division (div.full); the reference's and the
        # interpreter's round correctly
        y = y * tl.div_rn(127.0, amax)
        q = tl.where(y >= 0, y + 0.5, y - 0.5).to(tl.int8)
        dst = out_ptr + bh.to(tl.int64) * LP * D + rows[:, None] * D + cols[None, :]
        tl.store(dst, q)
        tl.store(scale_ptr + bh * (LP // BLOCK) + blk, tl.div_rn(amax, 127.0) * multiplier)

    @triton.jit
    def _quantize_v_kernel(x_ptr, mean_ptr, inv_ptr, out_ptr, L, LP, H, stride_b, stride_l, stride_h,
                           BLOCK: tl.constexpr, D: tl.constexpr):
        # One block of tokens of one head: (v - mean) * 448 / amax per channel, saturated, cast, written transposed
        # to (B, H, D, Lpad). Rows past L are written as zeros.
        y, rows, cols, inside, _, bh = _token_block(x_ptr, L, H, stride_b, stride_l, stride_h, BLOCK, D)
        y = (y - tl.load(mean_ptr + bh * D + cols)[None, :]) * tl.load(inv_ptr + bh * D + cols)[None, :]
        y = tl.where(inside, tl.minimum(tl.maximum(y, -448.0), 448.0), 0.0)
        dst = out_ptr + bh.to(tl.int64) * D * LP + cols[None, :] * LP + rows[:, None]
        tl.store(dst, y.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _attend_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, ks_ptr, q_scale, start_n, k_len, offs_n,
                      MASK: tl.constexpr, BLOCK_N: tl.constexpr, K_BLOCK: tl.constexpr):
        # One block of keys (k_ptrs, v_ptrs already at start_n): exact INT8 scores, scaled into exp2 units, online
        # softmax, the block's P.V as a fresh dot added into the float32 accumulator.
        qk = tl.dot(q, tl.load(k_ptrs), out_dtype=tl.int32)
        if BLOCK_N == K_BLOCK:
            scale = q_scale * tl.load(ks_ptr + start_n // K_BLOCK)
            s = qk.to(tl.float32) * scale
        else:
            scale = q_scale * tl.load(ks_ptr + (start_n + offs_n) // K_BLOCK)
            s = qk.to(tl.float32) * scale[None, :]
        if MASK:
            s = tl.where((start_n + offs_n)[None, :] < k_len, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptrs)
        acc = acc * alpha[:, None] + tl.dot((p * 448.0).to(v.dtype), v)
        return acc, l_i, m_new

    @triton.jit
    def _attention_kernel(q_ptr, qs_ptr, k_ptr, ks_ptr, v_ptr, vs_ptr, vm_ptr, o_ptr, q_len, k_len, LPQ, LPK, H,
                          stride_ob, stride_ol, stride_oh, D: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, Q_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr):
        # One block of BLOCK_M queries of one (batch, head) against all keys; full key blocks unmasked, the tail
        # block masked; output rows past q_len are not stored.
        start_m, bh = tl.program_id(0), tl.program_id(1)
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        q = tl.load(q_ptr + bh.to(tl.int64) * LPQ * D + offs_m[:, None] * D + offs_d[None, :])
        q_scale = tl.load(qs_ptr + bh * (LPQ // Q_BLOCK) + start_m * BLOCK_M // Q_BLOCK)
        k_ptrs = k_ptr + bh.to(tl.int64) * LPK * D + offs_n[None, :] * D + offs_d[:, None]  # (D, BLOCK_N): k^T
        v_ptrs = v_ptr + bh.to(tl.int64) * D * LPK + offs_d[None, :] * LPK + offs_n[:, None]  # (BLOCK_N, D)
        ks_ptr += bh * (LPK // K_BLOCK)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        full_end = (k_len // BLOCK_N) * BLOCK_N
        for start_n in range(0, full_end, BLOCK_N):
            acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_ptrs + start_n * D, v_ptrs + start_n, ks_ptr, q_scale,
                                          start_n, k_len, offs_n, False, BLOCK_N, K_BLOCK)
        if full_end < k_len:
            acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_ptrs + full_end * D, v_ptrs + full_end, ks_ptr,
                                          q_scale, full_end, k_len, offs_n, True, BLOCK_N, K_BLOCK)
        b, h = bh // H, bh % H
        v_scale = tl.load(vs_ptr + bh * D + offs_d) / 448.0
        v_mean = tl.load(vm_ptr + bh * D + offs_d)
        out = acc / l_i[:, None] * v_scale[None, :] + v_mean[None, :]
        dst = o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_ol
        tl.store(dst + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=offs_m[:, None] < q_len)


def _kernel(config: KernelConfig) -> Any:
    """The Triton kernel `config` runs: the portable one or sm90's split-QK form (same arguments and constexprs)."""
    return attention_int8_hopper._attention_kernel_split_qk if config.split_qk else _attention_kernel


def check_available(device: torch.device | None = None) -> None:
    """UserError unless this process can run the kernel: Triton, a CUDA GPU of compute capability 8.0+."""
    if triton is None:
        raise UserError("attention backend 'int8' needs Triton (it ships with CUDA builds of PyTorch)")
    if not torch.cuda.is_available():
        raise UserError("attention backend 'int8' needs a CUDA GPU; use --attention sdpa")
    if torch.cuda.get_device_capability(device) < (8, 0):
        raise UserError("attention backend 'int8' needs an Ampere or newer GPU (INT8 tensor cores); use "
                        "--attention sdpa")


def quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pv: torch.dtype) -> Quantized:
    """`quantize_reference` in three Triton passes (plus `_smoothing`'s reductions). Bit-exact with it on a GPU;
    used by `int8_attention`, which frees each input in between (this form keeps all three, for the checks)."""
    check_shapes(q, k, v)
    k_mean, v_mean, v_inv, v_scale = _smoothing(k, v)
    q8, q_scale = _quantize_qk(q, None, Q_BLOCK, _q_multiplier(q.shape[-1]))
    k8, k_scale = _quantize_qk(k, k_mean, K_BLOCK, 1.0)
    return Quantized(q8, q_scale, k8, k_scale, _quantize_v(v, v_mean, v_inv, pv), v_scale, v_mean, q.shape[1],
                     k.shape[1])


def _quantize_qk(x: torch.Tensor, mean: torch.Tensor | None, block: int,
                 multiplier: float) -> tuple[torch.Tensor, torch.Tensor]:
    batch, length, heads, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    lp = padded(length)
    out = torch.empty(batch, heads, lp, dim, dtype=torch.int8, device=x.device)
    scale = torch.empty(batch, heads, lp // block, dtype=torch.float32, device=x.device)
    # FMA contraction off: y * (127 / amax) + 0.5 must round like the reference's two operations
    _quantize_qk_kernel[(lp // block, heads, batch)](
        x, mean if mean is not None else scale, out, scale, length, lp, heads, x.stride(0), x.stride(1), x.stride(2),
        multiplier, HAS_MEAN=mean is not None, BLOCK=block, D=dim, num_warps=4, enable_fp_fusion=False)
    return out, scale


def _quantize_v(v: torch.Tensor, mean: torch.Tensor, inv: torch.Tensor, pv: torch.dtype) -> torch.Tensor:
    batch, length, heads, dim = v.shape
    if v.stride(-1) != 1:
        v = v.contiguous()
    lp = padded(length)
    out = torch.empty(batch, heads, dim, lp, dtype=pv, device=v.device)
    _quantize_v_kernel[(lp // K_BLOCK, heads, batch)](
        v, mean, inv, out, length, lp, heads, v.stride(0), v.stride(1), v.stride(2), BLOCK=K_BLOCK, D=dim,
        num_warps=4, enable_fp_fusion=False)
    return out


def attend(x: Quantized, out: torch.Tensor, config: KernelConfig) -> torch.Tensor:
    """Run the attention kernel on quantized inputs into `out` (B, Lq, H, D), any float dtype and strides with
    unit stride along D."""
    batch, heads, _, dim = x.q8.shape
    if Q_BLOCK % config.block_m or config.block_n % K_BLOCK or (PAD % config.block_n and not config.split_qk):
        raise ValueError(f"{config}: block_m must divide {Q_BLOCK}, block_n be a multiple of {K_BLOCK} dividing {PAD}")
    if config.split_qk and config.block_n not in (2 * K_BLOCK, 4 * K_BLOCK):
        raise ValueError(f"{config}: split_qk needs block_n == {2 * K_BLOCK} or {4 * K_BLOCK}")
    grid = (triton.cdiv(x.q_len, config.block_m), batch * heads)
    _kernel(config)[grid](
        x.q8, x.q_scale, x.k8, x.k_scale, x.v8, x.v_scale, x.v_mean, out, x.q_len, x.k_len, x.q8.shape[2],
        x.k8.shape[2], heads, out.stride(0), out.stride(1), out.stride(2), D=dim, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, Q_BLOCK=Q_BLOCK, K_BLOCK=K_BLOCK, num_warps=config.num_warps,
        num_stages=config.num_stages)
    return out


def int8_attention(qkv: list[torch.Tensor], config: KernelConfig | None = None) -> torch.Tensor:
    """Unmasked attention through the kernel. qkv: [q, k, v], each (B, L, heads, head_dim) on CUDA; the list is
    emptied and each input is dropped once its 8-bit copy exists (the caller holding no other reference, the peak
    stays below SDPA's). Returns (B, Lq, heads, head_dim) in q's dtype. `config` overrides the architecture's."""
    check_shapes(*qkv)
    shape, dtype, device, k_len = qkv[0].shape, qkv[0].dtype, qkv[0].device, qkv[1].shape[1]
    capability = capability_number(device)
    k_mean, v_mean, v_inv, v_scale = _smoothing(qkv[1], qkv[2])
    q8, q_scale = _quantize_qk(qkv.pop(0), None, Q_BLOCK, _q_multiplier(shape[-1]))
    k8, k_scale = _quantize_qk(qkv.pop(0), k_mean, K_BLOCK, 1.0)
    v8 = _quantize_v(qkv.pop(0), v_mean, v_inv, pv_dtype(capability))
    x = Quantized(q8, q_scale, k8, k_scale, v8, v_scale, v_mean, shape[1], k_len)
    return attend(x, torch.empty(shape, dtype=dtype, device=device), config or kernel_config(capability))


@functools.cache
def usable() -> bool:
    """Whether the kernel compiles and runs on this machine's GPU (`check_available`, then one small call): what
    `--attention auto` asks. Cached for the process."""
    try:
        check_available()
        g = torch.Generator(device="cuda").manual_seed(0)
        qkv = [torch.randn(1, PROBE_TOKENS, 2, 128, generator=g, device="cuda", dtype=torch.bfloat16)
               for _ in range(3)]
        out = int8_attention(qkv)
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 - any failure to build or run means SDPA; `--attention int8` shows the error
        return False
    return bool(torch.isfinite(out).all())


def _aot_signature(pv: torch.dtype) -> dict[str, str]:
    pointers = {"q_ptr": "*i8", "qs_ptr": "*fp32", "k_ptr": "*i8", "ks_ptr": "*fp32",
                "v_ptr": "*fp8e4nv" if pv == FP8 else "*fp16", "vs_ptr": "*fp32", "vm_ptr": "*fp32", "o_ptr": "*bf16"}
    ints = dict.fromkeys(("q_len", "k_len", "LPQ", "LPK", "H", "stride_ob", "stride_ol", "stride_oh"), "i32")
    return {**pointers, **ints}


def aot_build(capability: int, head_dim: int = 128, config: KernelConfig | None = None) -> dict[str, Any]:
    """Compile the attention kernel for sm`capability` without that GPU (or any GPU): Triton's front end, LLVM and
    the ptxas it ships. Returns the target, the P.V dtype, the launch config, the cubin's size, its registers and
    spills per thread (from the cubin, via the cuobjdump Triton ships) and its shared memory per CTA. Pointers and
    the padded lengths are marked 16-divisible, as the runtime specialises them at the model's shapes."""
    import os
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    config = config or kernel_config(capability)
    pv = pv_dtype(capability)
    signature = _aot_signature(pv)
    constexprs = {"D": head_dim, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "Q_BLOCK": Q_BLOCK,
                  "K_BLOCK": K_BLOCK}
    names = list(signature)
    aligned = [n for n in names if n.endswith("_ptr")] + ["LPQ", "LPK", "stride_ob", "stride_ol"]
    source = ASTSource(fn=_kernel(config), signature={**signature, **dict.fromkeys(constexprs, "constexpr")},
                       constexprs=constexprs, attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    cubin = compiled.asm["cubin"]
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    registers = re.search(r"REG:(\d+)", usage)
    spills = re.search(r"LOCAL:(\d+)", usage)
    return {"target": f"sm{capability}", "pv": "e4m3" if pv == FP8 else "fp16", "head_dim": head_dim,
            "config": f"{config.block_m}x{config.block_n}, {config.num_warps} warps, {config.num_stages} stages"
                      + (", split_qk" if config.split_qk else ""),
            "cubin_bytes": len(cubin), "registers": int(registers.group(1)) if registers else None,
            "local_bytes": int(spills.group(1)) if spills else None, "shared_bytes": compiled.metadata.shared,
            "max_shared_bytes": MAX_SHARED.get(capability)}


def aot_table(capabilities: tuple[int, ...] = AOT_TARGETS, head_dims: tuple[int, ...] = (128,)) -> list[dict]:
    """`aot_build` for each target and head dim; a target that fails to build gets an "error" row."""
    rows = []
    for capability in capabilities:
        for head_dim in head_dims:
            try:
                rows.append(aot_build(capability, head_dim))
            except Exception as e:  # noqa: BLE001 - one line per failing target, the others still build
                rows.append({"target": f"sm{capability}", "head_dim": head_dim,
                             "error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"})
    return rows
