"""The weight formats SCAIL-2 users run today, each quantized the way its tool does it (for bench_formats.py).

Every format is a function (out, in) float weight -> the float32 weight the runtime computes with after
dequantizing (weight-only: every format here is compared as stored, whatever matmul kernel later uses it), plus
its stored bits per weight. Written in torch so the 14B synthetic DiT goes through on the GPU in seconds; each is
checked against the tool's own code or documented layout in tests/test_bench_formats.py. Sources read:
- ComfyUI `fp8_e4m3fn`: a plain cast of the bf16 weight (round to nearest, Comfy-Org's `*_fp8_e4m3fn` files).
- ComfyUI `fp8_scaled`: one float32 scale per tensor, amax / 448 (`scale_weight`).
- Comfy-Org `mxfp8` (comfy-kitchen): OCP MX blocks of 32 input values sharing a power-of-two (E8M0) scale
  2^ceil(log2(amax / 448)), values e4m3.
- Comfy-Org `int8_convrot` (comfy-kitchen `TensorWiseINT8Layout(convrot=True, per_channel=True)`): input columns
  rotated by a *regular* Hadamard matrix (Kronecker powers of a 4x4 one, normalized) in groups of 256 (falling back
  to 64, 16, 4 for narrower fan-ins), then per-row INT8 at amax / 127, round half to even, clamp [-128, 127].
- WanGP / optimum-quanto `qint8` weights: per output channel, scale = absmax / 127 kept in the weight's dtype
  (bf16), values round(w / scale) in that dtype.
- GGUF (the `gguf` package's Q8_0, llama.cpp's reference K-quants, which the package only dequantizes):
  Q8_0 blocks of 32 with an fp16 scale, rounding half away from zero; Q4_K / Q5_K super-blocks of 256 as 8 x 32
  with 6-bit scales and mins found by `make_qkx2_quants` (weights av|x| + |x|, 20 / 15 search steps); Q6_K as
  16 x 16 with int8 scales from `make_qx_quants` (x^2 weighted, 18 trial scales). The _K_M mixes: for Wan's
  tensor names city96's patched llama-quantize matches none of its `attn_v` / `ffn_down` rules, so every block
  Linear is Q4_K (Q5_K); for T5 (llama.cpp's own T5 names) `attn_v` and `ffn_down` (wo) get Q6_K in the layers
  `use_more_bits` picks. Fan-ins not a multiple of 256 fall back to F16, as city96's patch forces.
- bitsandbytes NF4 (transformers' BitsAndBytesConfig defaults: no double quantization): the flattened tensor in
  blocks of 64, float32 absmax each, values the nearest of the 16 NF4 code points, dequantized to bf16.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
QK_K = 256
ROWS = 2048  # rows per slice in `_rows` (bench_formats raises it on a large GPU: fewer kernel launches)

# bitsandbytes' NF4 code book (its `get_4bit_type("nf4")`, the QLoRA paper's table).
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)


def _rows(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Apply a row-independent quantizer in slices of rows so a 13824 x 5120 weight needs bounded temporaries."""
    @functools.wraps(fn)
    def wrapper(w: torch.Tensor) -> torch.Tensor:
        w = w.detach().to(torch.float32)
        rows = ROWS
        return torch.cat([fn(part) for part in w.split(rows)]) if w.shape[0] > rows else fn(w)
    return wrapper


def _f16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(torch.float32)


# ---------------------------------------------------------------- 8-bit floats


def fp8_cast(w: torch.Tensor) -> torch.Tensor:
    return w.detach().to(torch.bfloat16).to(FP8).to(torch.float32)


def fp8_scaled(w: torch.Tensor) -> torch.Tensor:
    w = w.detach().to(torch.float32)
    scale = w.abs().amax().clamp_min(1e-12) / FP8_MAX
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).to(torch.float32) * scale


@_rows
def mxfp8(w: torch.Tensor) -> torch.Tensor:
    blocks = w.reshape(w.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True).clamp_min(2.0 ** -126)
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)).clamp(-127, 127))
    return ((blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).to(torch.float32) * scale).reshape(w.shape)


# ---------------------------------------------------------------- 8-bit integers


@functools.lru_cache(maxsize=None)
def regular_hadamard(n: int, device: str = "cpu") -> torch.Tensor:
    """comfy-kitchen's ConvRot matrix: Kronecker powers of a symmetric 4x4 Hadamard block, / sqrt(n)."""
    h4 = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=torch.float32)
    h = h4
    while h.shape[0] < n:
        h = torch.kron(h, h4)
    if h.shape[0] != n:
        raise ValueError(f"regular Hadamard size must be a power of 4, got {n}")
    return (h / math.sqrt(n)).to(device)


def convrot_group(fan_in: int, group: int = 256) -> int | None:
    return next((g for g in (group, 64, 16, 4) if g <= fan_in and fan_in % g == 0), None)


@_rows
def int8_convrot(w: torch.Tensor) -> torch.Tensor:
    g = convrot_group(w.shape[1])
    h = regular_hadamard(g, str(w.device)) if g else None
    rot = (w.reshape(w.shape[0], -1, g) @ h.T).reshape(w.shape) if g else w
    scale = rot.abs().amax(1, keepdim=True).clamp_min(1e-30) / 127.0
    deq = (rot / scale).round().clamp(-128, 127) * scale
    return (deq.reshape(w.shape[0], -1, g) @ h.T).reshape(w.shape) if g else deq


def quanto_int8(w: torch.Tensor) -> torch.Tensor:
    """optimum-quanto qint8 weights (axis 0), in the weight's own dtype as quanto computes them (bf16)."""
    wb = w.detach().to(torch.bfloat16)
    scale = wb.abs().amax(1, keepdim=True) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(wb / scale).clamp(-128, 127)
    return (q * scale).to(torch.float32)


# ---------------------------------------------------------------- GGUF


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (half away from zero), as gguf's `np_roundf`."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


@_rows
def q8_0(w: torch.Tensor) -> torch.Tensor:
    if w.shape[1] % 32:
        return _f16(w)
    b = w.reshape(w.shape[0], -1, 32)
    d = b.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    return (_roundf(b * inv) * _f16(d)).reshape(w.shape)


def _make_qkx2(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float,
               nstep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's make_qkx2_quants on (..., n) groups at once -> (scale, the_min = -min), both (...)."""
    mn = x.amin(-1).clamp(max=0)
    mx = x.amax(-1)
    sum_w = weights.sum(-1)
    sum_x = (weights * x).sum(-1)
    flat = mx == mn
    span = torch.where(flat, torch.ones_like(mx), mx - mn)
    iscale = nmax / span
    scale = 1 / iscale
    L = torch.round(iscale[..., None] * (x - mn[..., None])).clamp(0, nmax)
    best = (weights * (scale[..., None] * L + mn[..., None] - x) ** 2).sum(-1)
    for i in range(nstep + 1):
        iscale = (rmin + rdelta * i + nmax) / span  # span stays max - (first) min, as in llama.cpp
        la = torch.round(iscale[..., None] * (x - mn[..., None])).clamp(0, nmax)
        sum_l = (weights * la).sum(-1)
        sum_l2 = (weights * la * la).sum(-1)
        sum_xl = (weights * la * x).sum(-1)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Dsafe = torch.where(ok, D, torch.ones_like(D))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Dsafe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Dsafe
        pos = this_min > 0
        this_scale = torch.where(pos, sum_xl / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)), this_scale)
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        err = (weights * (this_scale[..., None] * la + this_min[..., None] - x) ** 2).sum(-1)
        better = ok & (err < best)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -mn


def _qk_asym(w: torch.Tensor, nmax: int, rmin: float, nstep: int) -> tuple[torch.Tensor, ...]:
    """Q4_K (nmax 15) / Q5_K (nmax 31) of row-major super-blocks: -> (L ints, d_j, dm_j) with the value
    d_j * L - dm_j; d_j and dm_j are per 32-value sub-block (fp16 super-block scale x 6-bit sub-scale)."""
    x = w.reshape(-1, QK_K // 32, 32)
    av = (x * x).mean(-1, keepdim=True).sqrt()
    scales, mins = _make_qkx2(x, av + x.abs(), nmax, rmin, 0.1, nstep)
    max_scale = scales.amax(-1, keepdim=True)
    max_min = mins.amax(-1, keepdim=True)
    inv_s = torch.where(max_scale > 0, 63 / torch.where(max_scale > 0, max_scale, torch.ones_like(max_scale)),
                        torch.zeros_like(max_scale))
    inv_m = torch.where(max_min > 0, 63 / torch.where(max_min > 0, max_min, torch.ones_like(max_min)),
                        torch.zeros_like(max_min))
    ls = torch.round(inv_s * scales).clamp(max=63)
    lm = torch.round(inv_m * mins).clamp(max=63)
    d, dmin = _f16(max_scale / 63), _f16(max_min / 63)
    dj, dmj = d * ls, dmin * lm
    nz = dj != 0
    L = torch.round((x + dmj[..., None]) / torch.where(nz, dj, torch.ones_like(dj))[..., None]).clamp(0, nmax)
    L = torch.where(nz[..., None], L, torch.zeros_like(L))
    return L, dj, dmj, d, dmin, ls, lm


def _q6k(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Q6_K: -> (L in [-32, 31], d_j per 16 values, d, int8 sub-scales); value d_j * L."""
    x = w.reshape(-1, QK_K // 16, 16)
    nmax = 32
    ax = x.abs()
    idx = ax.argmax(-1, keepdim=True)
    mx = x.gather(-1, idx).squeeze(-1)
    tiny = ax.amax(-1) < 1e-15
    mx_safe = torch.where(tiny, torch.ones_like(mx), mx)
    wts = x * x

    def trial(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lq = torch.round(iscale[..., None] * x).clamp(-nmax, nmax - 1)
        return lq, (wts * x * lq).sum(-1), (wts * lq * lq).sum(-1)

    _, sumlx, suml2 = trial(-nmax / mx_safe)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)),
                        torch.zeros_like(sumlx))
    best = scale * sumlx
    for i in range(-9, 10):
        if i == 0:
            continue
        _, sumlx, suml2 = trial(-(nmax + 0.1 * i) / mx_safe)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2))
        scale = torch.where(better, new_scale, scale)
        best = torch.where(better, new_scale * sumlx, best)
    scales = torch.where(tiny, torch.zeros_like(scale), scale)
    sabs = scales.abs()
    pick = sabs.argmax(-1, keepdim=True)
    max_scale = scales.gather(-1, pick)
    zero = sabs.amax(-1, keepdim=True) < 1e-15
    iscale = -128.0 / torch.where(zero, torch.ones_like(max_scale), max_scale)
    d = torch.where(zero, torch.zeros_like(iscale), _f16(1 / iscale))
    sc = torch.round(iscale * scales).clamp(max=127)
    sc = torch.where(zero, torch.zeros_like(sc), sc)
    dj = d * sc
    nz = dj != 0
    L = torch.round(x / torch.where(nz, dj, torch.ones_like(dj))[..., None]).clamp(-32, 31)
    L = torch.where(nz[..., None], L, torch.zeros_like(L))
    return L, dj, d, sc


def _k_asym(w: torch.Tensor, nmax: int, rmin: float, nstep: int) -> torch.Tensor:
    """Q4_K / Q5_K round trip (codes 0..nmax with a scale and a min per sub-block; llama.cpp's search constants)."""
    if w.shape[1] % QK_K:
        return _f16(w)
    L, dj, dmj = _qk_asym(w, nmax, rmin, nstep)[:3]
    return (dj[..., None] * L - dmj[..., None]).reshape(w.shape)


@_rows
def q4_k(w: torch.Tensor) -> torch.Tensor:
    return _k_asym(w, 15, -1.0, 20)


@_rows
def q5_k(w: torch.Tensor) -> torch.Tensor:
    return _k_asym(w, 31, -0.5, 15)


@_rows
def q6_k(w: torch.Tensor) -> torch.Tensor:
    if w.shape[1] % QK_K:
        return _f16(w)
    L, dj = _q6k(w)[:2]
    return (dj[..., None] * L).reshape(w.shape)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers that get Q6_K for attn_v / ffn_down under Q4_K_M and Q5_K_M."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


# ---------------------------------------------------------------- bitsandbytes NF4


def nf4(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    flat = w.detach().to(torch.float32).reshape(-1)
    pad = (-flat.numel()) % blocksize
    blocks = F.pad(flat, (0, pad)).reshape(-1, blocksize)
    absmax = blocks.abs().amax(-1, keepdim=True)
    code = torch.tensor(NF4_CODE, device=w.device)
    mids = (code[1:] + code[:-1]) / 2
    out = torch.empty_like(blocks)
    for part, amax, dst in zip(blocks.split(1 << 20), absmax.split(1 << 20), out.split(1 << 20)):
        norm = part / torch.where(amax > 0, amax, torch.ones_like(amax))
        dst.copy_(code[torch.bucketize(norm, mids)] * amax)
    return out.reshape(-1)[:flat.numel()].reshape(w.shape).to(torch.bfloat16).to(torch.float32)


def nf4_code_indices(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(code index per value, absmax per block) of `nf4`: what bitsandbytes stores, for the test."""
    flat = w.detach().to(torch.float32).reshape(-1, blocksize)
    absmax = flat.abs().amax(-1, keepdim=True)
    code = torch.tensor(NF4_CODE)
    return torch.bucketize(flat / absmax, (code[1:] + code[:-1]) / 2), absmax.squeeze(-1)


# ---------------------------------------------------------------- the table of formats


@dataclass(frozen=True)
class Format:
    """A named weight format: its quantize -> dequantize function and its stored bits per weight of a
    (out, in) Linear (scales included)."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor] | None
    bits: Callable[[int, int], float]


def _b(per_weight: float, per_row: float = 0.0, per_col: float = 0.0, per_tensor: float = 0.0):
    return lambda o, i: per_weight + per_row / i + per_col / o + per_tensor / (o * i)


def _gguf_bits(block_bits: float, block: int, fallback: float = 16.0):
    return lambda o, i: block_bits / block if i % block == 0 else fallback


BITS_Q8_0, BITS_Q4_K, BITS_Q5_K, BITS_Q6_K = 34 * 8, 144 * 8, 176 * 8, 210 * 8  # bytes per block, in bits
PEER_FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("bf16", None, _b(16)),
    Format("comfy fp8_e4m3fn", fp8_cast, _b(8)),
    Format("comfy fp8_scaled", fp8_scaled, _b(8, per_tensor=32)),
    Format("comfy mxfp8", mxfp8, _b(8.25)),
    Format("comfy int8_convrot", int8_convrot, _b(8, per_row=32)),
    Format("quanto int8 (WanGP)", quanto_int8, _b(8, per_row=16)),
    Format("gguf Q8_0", q8_0, _gguf_bits(BITS_Q8_0, 32)),
    Format("gguf Q6_K", q6_k, _gguf_bits(BITS_Q6_K, QK_K)),
    Format("gguf Q5_K", q5_k, _gguf_bits(BITS_Q5_K, QK_K)),
    Format("gguf Q4_K", q4_k, _gguf_bits(BITS_Q4_K, QK_K)),
    Format("bnb nf4", nf4, _b(4.5)),
)}
