"""The int8 attention kernel's sm90 form: QK^T as 64-key products, four per 256-key tile (issue 19).

Same algorithm and quantized inputs as `attention_int8`'s portable kernel; `KernelConfig.split_qk` picks this form
(block_n == 4 * K_BLOCK, sm90's default, or 2 * K_BLOCK). Whole 256-key tiles first, then whole 128-key tiles and
the masked tail in the 128-key form (the copies are padded to 128 keys only). Per tile:
  QK dots      one per 64-key part, so each product has one k scale: the row max is taken on the int32 scores and
               scaled once per row (bit for bit the same max: the scale is positive, rounding monotonic).
  one rescale  the row max, the accumulator's rescale and the row sum once per tile: per 256 keys instead of 128.
               P is quantized against that running max, so 256- and 128-key tiles differ by more than rounding.
  magic int->float  the int32 scores become float32 by an integer add and a float subtract (0x4B400000: for
               |x| < 2^22 the bits of 1.5 * 2^23 + x read as that float exactly; 128 * 127 * 127 < 2^22), both
               full-rate instructions, instead of the conversion unit's I2F. Exact: the same floats.
  448 folded   the 448 that maps P's 1.0 onto e4m3's top goes into the exponent (exp2(s - m + log2 448)) and cancels
               in the final division by the row sum: one multiply per score less.
  one FMA      exp2's argument as f * scale - shift.
  P.V          the parts' products chained into one fresh dot added into the float32 accumulator once per tile.
Beyond that, only float rounding order differs from the portable kernel. Tails stay exact: keys past the sequence
score -inf, rows past it are not stored. Options that lost on the H100 (TMA descriptors, warp specialisation,
accumulation inside the P.V dot, the next tile's QK^T issued before this tile's softmax, exponentials two per
instruction in half precision, 256-key tiles at 2 stages, ...) are gone; RESULTS.md (2026-12-06, 12-07) has their
figures.
"""

from __future__ import annotations

import math

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    LOG2_FP8_MAX: tl.constexpr = tl.constexpr(math.log2(448.0))

    @triton.jit
    def _load_kv(k_ptr, v_ptr, bh, start_n, LPK, offs_n, offs_d, D: tl.constexpr):
        k = tl.load(k_ptr + bh.to(tl.int64) * LPK * D + (start_n + offs_n)[None, :] * D + offs_d[:, None])  # k^T
        v = tl.load(v_ptr + bh.to(tl.int64) * D * LPK + offs_d[None, :] * LPK + (start_n + offs_n)[:, None])
        return k, v

    @triton.jit
    def _split_half(qk, k_scale, shift, start, k_len, offs_h, MASK: tl.constexpr):
        # One 64-key half's probabilities (448 folded in) against the row's shift.
        bits = (qk + 0x4B400000).to(tl.float32, bitcast=True)
        if MASK:
            s = tl.where((start + offs_h)[None, :] < k_len, (bits - 12582912.0) * k_scale, float("-inf"))
            p = tl.exp2(s - shift[:, None])
        else:
            p = tl.exp2(tl.fma(bits - 12582912.0, k_scale, -shift[:, None]))
        return p

    @triton.jit
    def _split_block(acc, l_i, m_i, q, k_ptr, v_ptr, bh, start_n, LPK, ks_ptr, q_scale, k_len, offs_d,
                     MASK: tl.constexpr, D: tl.constexpr, K_BLOCK: tl.constexpr):
        # 2 * K_BLOCK keys from start_n: two QK dots of one k scale each and one P.V product over both halves.
        # (offs_h made here, per tile: hoisted out of the key loop it changes the sm90 code at head dim 128)
        offs_h = tl.arange(0, K_BLOCK)
        ka, va = _load_kv(k_ptr, v_ptr, bh, start_n, LPK, offs_h, offs_d, D)
        kb, vb = _load_kv(k_ptr, v_ptr, bh, start_n + K_BLOCK, LPK, offs_h, offs_d, D)
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
        pa = _split_half(qa, sa, shift, start_n, k_len, offs_h, MASK)
        pb = _split_half(qb, sb, shift, start_n + K_BLOCK, k_len, offs_h, MASK)
        l_i = l_i * alpha + (tl.sum(pa, axis=1) + tl.sum(pb, axis=1))
        pv = tl.dot(pa.to(va.dtype), va)
        pv = tl.dot(pb.to(vb.dtype), vb, pv)
        acc = acc * alpha[:, None] + pv
        return acc, l_i, m_new

    @triton.jit
    def _part_max(qk, k_scale):
        # One whole 64-key part's row max of the scaled scores, taken on the int32 scores (the scale is positive).
        return tl.max(qk, axis=1).to(tl.float32) * k_scale

    @triton.jit
    def _split_block4(acc, l_i, m_i, q, k_ptr, v_ptr, bh, start_n, LPK, ks_ptr, q_scale, k_len, offs_d,
                      D: tl.constexpr, K_BLOCK: tl.constexpr):
        # 4 * K_BLOCK keys from start_n, none past the sequence: four QK dots of one k scale each, one row max,
        # rescale and row sum per 256 keys instead of per 128.
        offs_h = tl.arange(0, K_BLOCK)
        ka, va = _load_kv(k_ptr, v_ptr, bh, start_n, LPK, offs_h, offs_d, D)
        kb, vb = _load_kv(k_ptr, v_ptr, bh, start_n + K_BLOCK, LPK, offs_h, offs_d, D)
        kc, vc = _load_kv(k_ptr, v_ptr, bh, start_n + 2 * K_BLOCK, LPK, offs_h, offs_d, D)
        kd, vd = _load_kv(k_ptr, v_ptr, bh, start_n + 3 * K_BLOCK, LPK, offs_h, offs_d, D)
        qa = tl.dot(q, ka, out_dtype=tl.int32)
        qb = tl.dot(q, kb, out_dtype=tl.int32)
        qc = tl.dot(q, kc, out_dtype=tl.int32)
        qd = tl.dot(q, kd, out_dtype=tl.int32)
        first = start_n // K_BLOCK
        sa = q_scale * tl.load(ks_ptr + first)
        sb = q_scale * tl.load(ks_ptr + first + 1)
        sc = q_scale * tl.load(ks_ptr + first + 2)
        sd = q_scale * tl.load(ks_ptr + first + 3)
        m_ab = tl.maximum(_part_max(qa, sa), _part_max(qb, sb))
        m_cd = tl.maximum(_part_max(qc, sc), _part_max(qd, sd))
        m_new = tl.maximum(m_i, tl.maximum(m_ab, m_cd))
        alpha = tl.exp2(m_i - m_new)
        shift = m_new - LOG2_FP8_MAX
        pa = _split_half(qa, sa, shift, start_n, k_len, offs_h, False)
        pb = _split_half(qb, sb, shift, start_n, k_len, offs_h, False)
        pc = _split_half(qc, sc, shift, start_n, k_len, offs_h, False)
        pd = _split_half(qd, sd, shift, start_n, k_len, offs_h, False)
        l_i = l_i * alpha + ((tl.sum(pa, axis=1) + tl.sum(pb, axis=1)) + (tl.sum(pc, axis=1) + tl.sum(pd, axis=1)))
        pv = tl.dot(pa.to(va.dtype), va)
        pv = tl.dot(pb.to(vb.dtype), vb, pv)
        pv = tl.dot(pc.to(vc.dtype), vc, pv)
        pv = tl.dot(pd.to(vd.dtype), vd, pv)
        acc = acc * alpha[:, None] + pv
        return acc, l_i, m_new

    @triton.jit
    def _attention_kernel_split_qk(q_ptr, qs_ptr, k_ptr, ks_ptr, v_ptr, vs_ptr, vm_ptr, o_ptr, q_len, k_len, LPQ,
                                   LPK, H, stride_ob, stride_ol, stride_oh, D: tl.constexpr, BLOCK_M: tl.constexpr,
                                   BLOCK_N: tl.constexpr, Q_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr):
        # One block of BLOCK_M queries of one (batch, head) against all keys, as the portable kernel (same arguments).
        tl.static_assert(BLOCK_N == 2 * K_BLOCK or BLOCK_N == 4 * K_BLOCK,
                         "split_qk needs block_n == 2 * K_BLOCK or 4 * K_BLOCK")
        start_m, bh = tl.program_id(0), tl.program_id(1)
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        q = tl.load(q_ptr + bh.to(tl.int64) * LPQ * D + offs_m[:, None] * D + offs_d[None, :])
        q_scale = tl.load(qs_ptr + bh * (LPQ // Q_BLOCK) + start_m * BLOCK_M // Q_BLOCK)
        ks_ptr += bh * (LPK // K_BLOCK)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        if BLOCK_N == 4 * K_BLOCK:
            # 256-key tiles while whole ones remain, then the 128-key form (the copies are padded to 128 keys only)
            wide_end = (k_len // BLOCK_N) * BLOCK_N
            for start_n in range(0, wide_end, BLOCK_N):
                acc, l_i, m_i = _split_block4(acc, l_i, m_i, q, k_ptr, v_ptr, bh, start_n, LPK, ks_ptr, q_scale,
                                              k_len, offs_d, D, K_BLOCK)
            full_end = (k_len // (2 * K_BLOCK)) * (2 * K_BLOCK)
            for start_n in range(wide_end, full_end, 2 * K_BLOCK):
                acc, l_i, m_i = _split_block(acc, l_i, m_i, q, k_ptr, v_ptr, bh, start_n, LPK, ks_ptr, q_scale,
                                             k_len, offs_d, False, D, K_BLOCK)
        else:
            full_end = (k_len // BLOCK_N) * BLOCK_N
            for start_n in range(0, full_end, BLOCK_N):
                acc, l_i, m_i = _split_block(acc, l_i, m_i, q, k_ptr, v_ptr, bh, start_n, LPK, ks_ptr, q_scale,
                                             k_len, offs_d, False, D, K_BLOCK)
        if full_end < k_len:
            acc, l_i, m_i = _split_block(acc, l_i, m_i, q, k_ptr, v_ptr, bh, full_end, LPK, ks_ptr, q_scale, k_len,
                                         offs_d, True, D, K_BLOCK)
        b, h = bh // H, bh % H
        v_scale = tl.load(vs_ptr + bh * D + offs_d)  # no / 448: folded into the probabilities' exponent
        v_mean = tl.load(vm_ptr + bh * D + offs_d)
        out = acc / l_i[:, None] * v_scale[None, :] + v_mean[None, :]
        dst = o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_ol
        tl.store(dst + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=offs_m[:, None] < q_len)
