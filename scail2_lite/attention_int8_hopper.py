"""The int8 attention kernel's Hopper (sm90) form: the same algorithm and numbers as `attention_int8`'s portable
kernel, with Hopper's levers as compile-time options so one benchmark can time each (issue 19: the portable kernel ran
at 1.01x cuDNN bf16 SDPA on the H100; the target is 1.3x).

Options (`HopperOptions`):
  tma              q, k and v tiles through tensor descriptors (TMA bulk copies into shared memory, no address math
                   in the registers); the quantized copies are padded to whole tiles, so no copy leaves its tensor.
  warp_specialize  Triton's warp specialisation of the key loop (producer warps issue the loads, consumer warpgroups
                   run the dots and the softmax).
  magic_convert    the int32 scores become float32 by an integer add and a float subtract (0x4B400000: for
                   |x| < 2^22 the bits of 1.5 * 2^23 + x read as that float exactly; 128 * 127 * 127 < 2^22), both
                   full-rate instructions, instead of the conversion unit's I2F. Exact: the same floats.
  fold_448         the 448 that maps P's 1.0 onto e4m3's top is folded into the exponent (exp2(s - m + log2 448)) and
                   cancels in the final division by the row sum: one multiply less per score. Rounding order only.
  int_max          (block_n == K_BLOCK, one k scale per tile) the row max taken on the int32 scores, then one
                   multiply per row: bit for bit the same max (the scale is positive, rounding monotonic), one float
                   max per score less.
  fma_exp          exp2's argument as one FMA, f * scale - max: rounding order only.
  fma_magic        (block_n == K_BLOCK) the magic bits straight into that FMA, the 1.5 * 2^23 * scale offset moved
                   into the per-row addend: one float op per score before exp2, instead of two. The addend is
                   rounded once per row and key tile: every p of that tile moves by the same factor, about
                   1 + 0.5 * scale (a few 1e-4 at unit-norm inputs, far below e4m3's step, but more than rounding
                   order: measured by the sweep's "vs current" column).
  split_qk         (block_n == 2 * K_BLOCK) each 128-key tile as two 64-key QK dots, one k scale each, so the int32
                   row max applies, and one P.V product over the 128 keys (the float32 add into the accumulator once
                   per 128 keys, as today's kernel); magic_convert, fold_448 and fma_exp are implied, fma_magic is
                   taken from its flag.
  acc_in_dot       P.V accumulates into the running accumulator inside the dot (one fused wgmma) instead of a fresh
                   dot added in float32. On Hopper FP8 wgmma accumulates with reduced precision, so this spans all keys
                   rather than one block: a numerics change, timed and measured by the sweep, never a default unless
                   its accuracy row says it holds.
All options off is the portable kernel's arithmetic. Tails stay exact: keys past the sequence score -inf, rows past it
are not stored.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    triton = None

if TYPE_CHECKING:
    from .attention_int8 import KernelConfig, Quantized

if triton is not None:
    LOG2_FP8_MAX: tl.constexpr = tl.constexpr(math.log2(448.0))

    @triton.jit
    def _hopper_block(acc, l_i, m_i, q, k, v, ks_ptr, q_scale, start_n, k_len, offs_n, MASK: tl.constexpr,
                      BLOCK_N: tl.constexpr, K_BLOCK: tl.constexpr, MAGIC_CVT: tl.constexpr,
                      FOLD_448: tl.constexpr, ACC_IN_DOT: tl.constexpr, INT_MAX: tl.constexpr,
                      FMA_EXP: tl.constexpr, FMA_MAGIC: tl.constexpr):
        # k: (D, BLOCK_N) int8, v: (BLOCK_N, D) e4m3/fp16, both already loaded for keys start_n..
        qk = tl.dot(q, k, out_dtype=tl.int32)
        if BLOCK_N == K_BLOCK:
            scale = q_scale * tl.load(ks_ptr + start_n // K_BLOCK)
        else:
            tl.static_assert(not (INT_MAX or FMA_MAGIC), "int_max / fma_magic need block_n == K_BLOCK")
            scale = (q_scale * tl.load(ks_ptr + (start_n + offs_n) // K_BLOCK))[None, :]
        if MASK or not FMA_MAGIC:
            if MAGIC_CVT:
                f = (qk + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
            else:
                f = qk.to(tl.float32)
        if INT_MAX and not MASK:
            # scale > 0 and rounding is monotonic: max(round(f * scale)) == round(max(f) * scale), bit for bit
            m_new = tl.maximum(m_i, tl.max(qk, axis=1).to(tl.float32) * scale)
        else:
            s = f * scale
            if MASK:
                s = tl.where((start_n + offs_n)[None, :] < k_len, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        shift = m_new
        if FOLD_448:
            shift = m_new - LOG2_FP8_MAX  # p in [0, 448]
        if MASK:
            p = tl.exp2(s - shift[:, None])
        elif FMA_MAGIC:
            # one FMA per score on the magic bits: the addend 1.5 * 2^23 * scale + shift is rounded once per row
            bits = (qk + 0x4B400000).to(tl.float32, bitcast=True)
            p = tl.exp2(tl.fma(bits, scale, -(shift + 12582912.0 * scale)[:, None]))
        elif FMA_EXP:
            p = tl.exp2(tl.fma(f, scale, -shift[:, None]))
        else:
            if INT_MAX:
                s = f * scale
            p = tl.exp2(s - shift[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if FOLD_448:
            p8 = p.to(v.dtype)
        else:
            p8 = (p * 448.0).to(v.dtype)
        if ACC_IN_DOT:
            acc = tl.dot(p8, v, acc * alpha[:, None])
        else:
            acc = acc * alpha[:, None] + tl.dot(p8, v)
        return acc, l_i, m_new

    @triton.jit
    def _load_kv(k_src, v_src, bh, start_n, LPK, offs_n, offs_d, TMA: tl.constexpr, D: tl.constexpr):
        if TMA:
            k = k_src.load([bh * LPK + start_n, 0]).T  # (D, BLOCK_N): k^T
            v = v_src.load([bh * D, start_n]).T  # (BLOCK_N, D)
        else:
            k = tl.load(k_src + bh.to(tl.int64) * LPK * D + (start_n + offs_n)[None, :] * D + offs_d[:, None])
            v = tl.load(v_src + bh.to(tl.int64) * D * LPK + offs_d[None, :] * LPK + (start_n + offs_n)[:, None])
        return k, v

    @triton.jit
    def _split_half(qk, k_scale, shift, start, k_len, offs_h, MASK: tl.constexpr, FMA_MAGIC: tl.constexpr):
        # One 64-key half's probabilities (448 folded in) against the row's shift.
        bits = (qk + 0x4B400000).to(tl.float32, bitcast=True)
        if MASK:
            s = tl.where((start + offs_h)[None, :] < k_len, (bits - 12582912.0) * k_scale, float("-inf"))
            p = tl.exp2(s - shift[:, None])
        elif FMA_MAGIC:
            p = tl.exp2(tl.fma(bits, k_scale, -(shift + 12582912.0 * k_scale)[:, None]))
        else:
            p = tl.exp2(tl.fma(bits - 12582912.0, k_scale, -shift[:, None]))
        return p

    @triton.jit
    def _split_block(acc, l_i, m_i, q, k_src, v_src, bh, start_n, LPK, ks_ptr, q_scale, k_len, offs_h, offs_d,
                     MASK: tl.constexpr, TMA: tl.constexpr, D: tl.constexpr, K_BLOCK: tl.constexpr,
                     FMA_MAGIC: tl.constexpr):
        # 2 * K_BLOCK keys as two QK dots of one k scale each (int32 row max, magic int->float, FMA into exp2) and one
        # P.V product over both halves (a fresh dot per 2 * K_BLOCK keys, as the 128-key kernel).
        ka, va = _load_kv(k_src, v_src, bh, start_n, LPK, offs_h, offs_d, TMA, D)
        kb, vb = _load_kv(k_src, v_src, bh, start_n + K_BLOCK, LPK, offs_h, offs_d, TMA, D)
        qa = tl.dot(q, ka, out_dtype=tl.int32)
        qb = tl.dot(q, kb, out_dtype=tl.int32)
        sa = q_scale * tl.load(ks_ptr + start_n // K_BLOCK)
        sb = q_scale * tl.load(ks_ptr + start_n // K_BLOCK + 1)
        if MASK:
            ma = tl.where((start_n + offs_h)[None, :] < k_len, (qa + 0x4B400000).to(tl.float32, bitcast=True), 0.0)
            mb = tl.where((start_n + K_BLOCK + offs_h)[None, :] < k_len,
                          (qb + 0x4B400000).to(tl.float32, bitcast=True), 0.0)
            # masked lanes read 0.0, below every real magic float (>= 1.5 * 2^23 - 2^22)
            row_a = tl.max(ma, axis=1)
            row_b = tl.max(mb, axis=1)
            m_a = tl.where(row_a > 0, (row_a - 12582912.0) * sa, float("-inf"))
            m_b = tl.where(row_b > 0, (row_b - 12582912.0) * sb, float("-inf"))
            m_new = tl.maximum(m_i, tl.maximum(m_a, m_b))
        else:
            m_new = tl.maximum(m_i, tl.maximum(tl.max(qa, axis=1).to(tl.float32) * sa,
                                               tl.max(qb, axis=1).to(tl.float32) * sb))
        alpha = tl.exp2(m_i - m_new)
        shift = m_new - LOG2_FP8_MAX
        pa = _split_half(qa, sa, shift, start_n, k_len, offs_h, MASK, FMA_MAGIC)
        pb = _split_half(qb, sb, shift, start_n + K_BLOCK, k_len, offs_h, MASK, FMA_MAGIC)
        l_i = l_i * alpha + (tl.sum(pa, axis=1) + tl.sum(pb, axis=1))
        pv = tl.dot(pa.to(va.dtype), va)
        pv = tl.dot(pb.to(vb.dtype), vb, pv)
        acc = acc * alpha[:, None] + pv
        return acc, l_i, m_new

    @triton.jit
    def _step(acc, l_i, m_i, q, k_src, v_src, bh, start_n, LPK, ks_ptr, q_scale, k_len, offs_n, offs_d,
              MASK: tl.constexpr, TMA: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, K_BLOCK: tl.constexpr,
              MAGIC_CVT: tl.constexpr, FOLD_448: tl.constexpr, ACC_IN_DOT: tl.constexpr, INT_MAX: tl.constexpr,
              FMA_EXP: tl.constexpr, FMA_MAGIC: tl.constexpr, SPLIT_QK: tl.constexpr):
        # One tile of BLOCK_N keys from start_n, in the form the options ask for.
        if SPLIT_QK:
            tl.static_assert(BLOCK_N == 2 * K_BLOCK, "split_qk needs block_n == 2 * K_BLOCK")
            acc, l_i, m_i = _split_block(acc, l_i, m_i, q, k_src, v_src, bh, start_n, LPK, ks_ptr, q_scale, k_len,
                                         tl.arange(0, K_BLOCK), offs_d, MASK, TMA, D, K_BLOCK, FMA_MAGIC)
        else:  # (not an early return: Triton would still build the code after it)
            k, v = _load_kv(k_src, v_src, bh, start_n, LPK, offs_n, offs_d, TMA, D)
            acc, l_i, m_i = _hopper_block(acc, l_i, m_i, q, k, v, ks_ptr, q_scale, start_n, k_len, offs_n, MASK, BLOCK_N,
                                          K_BLOCK, MAGIC_CVT, FOLD_448, ACC_IN_DOT, INT_MAX, FMA_EXP, FMA_MAGIC)
        return acc, l_i, m_i

    @triton.jit
    def _attention_kernel_hopper(q_src, qs_ptr, k_src, ks_ptr, v_src, vs_ptr, vm_ptr, o_ptr, q_len, k_len, LPQ, LPK,
                                 H, stride_ob, stride_ol, stride_oh, D: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_N: tl.constexpr, Q_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr,
                                 TMA: tl.constexpr, WARP_SPEC: tl.constexpr, MAGIC_CVT: tl.constexpr,
                                 FOLD_448: tl.constexpr, ACC_IN_DOT: tl.constexpr, INT_MAX: tl.constexpr,
                                 FMA_EXP: tl.constexpr, FMA_MAGIC: tl.constexpr, SPLIT_QK: tl.constexpr):
        # One block of BLOCK_M queries of one (batch, head) against all keys, as the portable kernel.
        # q_src, k_src, v_src are tensor descriptors when TMA, else the int8/e4m3 pointers.
        start_m, bh = tl.program_id(0), tl.program_id(1)
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        if TMA:
            q = q_src.load([bh * LPQ + start_m * BLOCK_M, 0])
        else:
            q = tl.load(q_src + bh.to(tl.int64) * LPQ * D + offs_m[:, None] * D + offs_d[None, :])
        q_scale = tl.load(qs_ptr + bh * (LPQ // Q_BLOCK) + start_m * BLOCK_M // Q_BLOCK)
        ks_ptr += bh * (LPK // K_BLOCK)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        full_end = (k_len // BLOCK_N) * BLOCK_N
        if WARP_SPEC:  # only named when asked: the keyword is recent
            for start_n in tl.range(0, full_end, BLOCK_N, warp_specialize=True):
                acc, l_i, m_i = _step(acc, l_i, m_i, q, k_src, v_src, bh, start_n, LPK, ks_ptr, q_scale, k_len,
                                      offs_n, offs_d, False, TMA, D, BLOCK_N, K_BLOCK, MAGIC_CVT, FOLD_448, ACC_IN_DOT,
                                      INT_MAX, FMA_EXP, FMA_MAGIC, SPLIT_QK)
        else:
            for start_n in range(0, full_end, BLOCK_N):
                acc, l_i, m_i = _step(acc, l_i, m_i, q, k_src, v_src, bh, start_n, LPK, ks_ptr, q_scale, k_len,
                                      offs_n, offs_d, False, TMA, D, BLOCK_N, K_BLOCK, MAGIC_CVT, FOLD_448, ACC_IN_DOT,
                                      INT_MAX, FMA_EXP, FMA_MAGIC, SPLIT_QK)
        if full_end < k_len:
            acc, l_i, m_i = _step(acc, l_i, m_i, q, k_src, v_src, bh, full_end, LPK, ks_ptr, q_scale, k_len, offs_n,
                                  offs_d, True, TMA, D, BLOCK_N, K_BLOCK, MAGIC_CVT, FOLD_448, ACC_IN_DOT, INT_MAX,
                                  FMA_EXP, FMA_MAGIC, SPLIT_QK)
        b, h = bh // H, bh % H
        v_scale = tl.load(vs_ptr + bh * D + offs_d)
        if not (FOLD_448 or SPLIT_QK):
            v_scale = v_scale / 448.0
        v_mean = tl.load(vm_ptr + bh * D + offs_d)
        out = acc / l_i[:, None] * v_scale[None, :] + v_mean[None, :]
        dst = o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_ol
        tl.store(dst + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=offs_m[:, None] < q_len)


def _flags(config: KernelConfig) -> dict[str, bool]:
    o = config.hopper
    return {"TMA": o.tma, "WARP_SPEC": o.warp_specialize, "MAGIC_CVT": o.magic_convert, "FOLD_448": o.fold_448,
            "ACC_IN_DOT": o.acc_in_dot, "INT_MAX": o.int_max, "FMA_EXP": o.fma_exp, "FMA_MAGIC": o.fma_magic,
            "SPLIT_QK": o.split_qk}


def _sources(x: Quantized, config: KernelConfig) -> tuple:
    """The kernel's q, k, v arguments: 2-D tensor descriptors over the padded copies, or the tensors themselves."""
    if not config.hopper.tma:
        return x.q8, x.k8, x.v8
    dim = x.q8.shape[-1]
    q2, k2 = x.q8.reshape(-1, dim), x.k8.reshape(-1, dim)
    v2 = x.v8.reshape(-1, x.v8.shape[-1])
    keys = config.block_n // 2 if config.hopper.split_qk else config.block_n  # split: one tile per half
    return (TensorDescriptor.from_tensor(q2, [config.block_m, dim]), TensorDescriptor.from_tensor(k2, [keys, dim]),
            TensorDescriptor.from_tensor(v2, [dim, keys]))


def attend(x: Quantized, out: torch.Tensor, config: KernelConfig, q_block: int, k_block: int) -> torch.Tensor:
    """`attention_int8.attend` for a config with Hopper options (validated there)."""
    batch, heads, _, dim = x.q8.shape
    q_src, k_src, v_src = _sources(x, config)
    grid = (triton.cdiv(x.q_len, config.block_m), batch * heads)
    _attention_kernel_hopper[grid](
        q_src, x.q_scale, k_src, x.k_scale, v_src, x.v_scale, x.v_mean, out, x.q_len, x.k_len, x.q8.shape[2],
        x.k8.shape[2], heads, out.stride(0), out.stride(1), out.stride(2), D=dim, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, Q_BLOCK=q_block, K_BLOCK=k_block, num_warps=config.num_warps,
        num_stages=config.num_stages, **_flags(config))
    return out


def aot_source(config: KernelConfig, head_dim: int, pv_type: str, constexprs: dict[str, int]) -> tuple:
    """(kernel, signature, constexprs) for `attention_int8.aot_build`: descriptors typed by their tile shapes."""
    signature = {"q_src": "*i8", "qs_ptr": "*fp32", "k_src": "*i8", "ks_ptr": "*fp32", "v_src": f"*{pv_type}",
                 "vs_ptr": "*fp32", "vm_ptr": "*fp32", "o_ptr": "*bf16"}
    if config.hopper.tma:
        keys = config.block_n // 2 if config.hopper.split_qk else config.block_n
        signature.update(q_src=f"tensordesc<i8[{config.block_m}, {head_dim}]>",
                         k_src=f"tensordesc<i8[{keys}, {head_dim}]>", v_src=f"tensordesc<{pv_type}[{head_dim}, {keys}]>")
    signature.update(dict.fromkeys(("q_len", "k_len", "LPQ", "LPK", "H", "stride_ob", "stride_ol", "stride_oh"),
                                   "i32"))
    return _attention_kernel_hopper, signature, {**constexprs, **_flags(config)}
