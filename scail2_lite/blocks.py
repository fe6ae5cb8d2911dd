"""The DiT's layers: fp32-island norms, self- and cross-attention, the block, the head, the CLIP projection.

Numerics follow upstream's mixed precision (see `model.py`). A block runs `Kernels` it is given; it holds no run
settings of its own, so one model serves runs with different backends and chunk sizes side by side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .attention import attention, self_attention
from .rope import apply_rope

CLIP_TOKENS = 257  # CLIP ViT-H/14 at 224px: 1 class token + 16x16 patches


class TokenSplit(Protocol):
    """The packed sequence split across processes (`distributed.Ulysses`): the blocks run on this process's share
    of the tokens and only self-attention sees them all. The model calls it and knows nothing of ranks."""

    def scatter(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """This process's share of `t` along its token axis `dim`."""

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The shares of every process, (B, share, C) -> (B, L, C)."""

    def self_attention(self, qkv: list[torch.Tensor], backend: str) -> torch.Tensor:
        """`attention.self_attention` for q, k, v holding this process's tokens."""


@dataclass(frozen=True)
class Kernels:
    """How the blocks compute, chosen per run (the memory plan's, or the user's) and passed into every forward.

    `attention`: a resolved backend name (`attention.resolve`). `attn_chunk` / `ffn_chunk` (0 = one shot): tokens per
    chunk of the per-token work around the attentions (norm1 and modulation, q/k/v with RMSNorm and RoPE, norm3 and
    the cross-attention) and of norm2 + modulation + FFN. Every chunked op is per token: chunking changes no number.
    `split`: the token split across processes (None: this process holds every token).
    """

    attention: str = "sdpa"
    attn_chunk: int = 0
    ffn_chunk: int = 0
    split: TokenSplit | None = None

    def self_attention(self, qkv: list[torch.Tensor]) -> torch.Tensor:
        """Self-attention of the block's q, k, v (taken over), through the token split when there is one."""
        if self.split is None:
            return self_attention(qkv, self.attention)
        return self.split.self_attention(qkv, self.attention)


def linear_fp32(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Run a Linear in float32 whatever its storage dtype (upstream runs these under fp32 autocast)."""
    bias = None if linear.bias is None else linear.bias.float()
    return F.linear(x.float(), linear.weight.float(), bias)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32; returns float32 (callers cast where upstream does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm over the full feature dim, computed in float32; returns float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()


def _normed(
    norm: LayerNorm32, x: torch.Tensor, dtype: torch.dtype, chunk: int, shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """`norm(x)`, then `* (1 + scale) + shift` if given, in float32, written to a `dtype` buffer token chunk by
    token chunk (one Triton pass per chunk on CUDA)."""
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    for s in range(0, x.shape[1], chunk):
        if fused.available(x):
            fused.layer_norm(x[:, s : s + chunk], norm, out[:, s : s + chunk], scale, shift)
        elif scale is None:
            out[:, s : s + chunk] = norm(x[:, s : s + chunk])
        else:
            out[:, s : s + chunk] = norm(x[:, s : s + chunk]).mul_(1 + scale).add_(shift)
    return out


class SelfAttention(nn.Module):
    """Full self-attention over the packed sequence; q/k RMSNorm over the full dim, then 3-segment RoPE.

    `forward` makes the rotated q, k and v; the block runs the attention and `o` itself so that each big activation
    is freed as soon as the next one exists.
    """

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def _rotated(
        self, proj: nn.Module, norm: RMSNorm, h: torch.Tensor, freqs: tuple[torch.Tensor, torch.Tensor], chunk: int
    ) -> torch.Tensor:
        """proj -> norm -> RoPE, token chunk by token chunk so the float32 temporaries stay chunk-sized."""
        batch, length, _ = h.shape
        cos, sin = freqs
        out = torch.empty(batch, length, self.num_heads, h.shape[-1] // self.num_heads, dtype=h.dtype, device=h.device)
        for s in range(0, length, chunk):
            y = proj(h[:, s : s + chunk])
            if fused.available(y):
                fused.rms_norm_rope(y, norm.weight, norm.eps, cos[s : s + chunk], sin[s : s + chunk],
                                    out[:, s : s + chunk])
            else:
                out[:, s : s + chunk] = apply_rope(norm(y).unflatten(-1, (self.num_heads, -1)), cos[s : s + chunk],
                                                   sin[s : s + chunk])
        return out

    def forward(
        self, h: torch.Tensor, freqs: tuple[torch.Tensor, torch.Tensor], chunk: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h (B, L, dim) in compute dtype -> rotated q, k and v, each (B, L, heads, head_dim) in compute dtype.

        h is consumed: v is projected into h's own storage, chunk by chunk (each chunk of h is read by the Linear
        before its output overwrites it), so h, q, k and v never coexist. Chunked, an FP8/INT8 Linear also never
        holds an 8-bit copy of all of h."""
        q = self._rotated(self.q, self.norm_q, h, freqs, chunk)
        k = self._rotated(self.k, self.norm_k, h, freqs, chunk)
        v = h.unflatten(-1, (self.num_heads, -1))
        for s in range(0, h.shape[1], chunk):
            v[:, s : s + chunk] = self.v(h[:, s : s + chunk]).unflatten(-1, (self.num_heads, -1))
        return q, k, v


class I2VCrossAttention(nn.Module):
    """Cross-attention to `[image tokens (img_len) | text tokens]`: two attentions sharing q, summed, then `o`.

    Queries are independent, so `forward` may be called on token chunks with `kv` computed once per block call.
    """

    def __init__(self, dim: int, num_heads: int, eps: float, img_len: int = CLIP_TOKENS) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.img_len = img_len
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.k_img = nn.Linear(dim, dim)
        self.v_img = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        self.norm_k_img = RMSNorm(dim, eps)

    def kv(self, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """context (B, img_len + text_len, dim) -> (k, v, k_img, v_img), each (B, N, heads, head_dim)."""
        dtype = context.dtype
        heads = (self.num_heads, -1)
        img, text = context[:, : self.img_len], context[:, self.img_len :]
        return (
            self.norm_k(self.k(text)).to(dtype).unflatten(-1, heads),
            self.v(text).unflatten(-1, heads),
            self.norm_k_img(self.k_img(img)).to(dtype).unflatten(-1, heads),
            self.v_img(img).unflatten(-1, heads),
        )

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, ...], backend: str) -> torch.Tensor:
        """x (B, L, dim) in compute dtype, kv from `kv(context)` -> (B, L, dim) in compute dtype."""
        k, v, k_img, v_img = kv
        q = self.norm_q(self.q(x)).to(x.dtype).unflatten(-1, (self.num_heads, -1))
        out = attention(q, k, v, backend).flatten(2)
        out += attention(q, k_img, v_img, backend).flatten(2)
        return self.o(out)


class SCAIL2Block(nn.Module):
    """One DiT block: modulated self-attention, cross-attention, modulated FFN on a float32 residual stream.

    How it runs is the caller's `Kernels` (attention backend, token chunks); the block keeps no run settings.
    """

    # Layer streaming units (module docstring): v is done when `self_attn` returns, right before the attention (the
    # activation peak)
    STREAM_UNITS = (("self_attn.q", None), ("self_attn.k", None), ("self_attn.v", "self_attn"), ("self_attn.o", None),
                    ("cross_attn", None), ("ffn", None))

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.norm1 = LayerNorm32(dim, eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, num_heads, eps)
        self.norm3 = LayerNorm32(dim, eps, elementwise_affine=True)
        self.cross_attn = I2VCrossAttention(dim, num_heads, eps)
        self.norm2 = LayerNorm32(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor, freqs: tuple[torch.Tensor, torch.Tensor],
        kernels: Kernels,
    ) -> torch.Tensor:
        """Update the residual stream in place and return it.

        x: (B, L, dim) float32. e0: (B, 6, dim) float32 time projection. context: (B, img_len + text_len, dim) in the
        compute dtype (which is taken from it). freqs: RoPE (cos, sin), each (L, head_dim/2) float32.
        """
        dtype = context.dtype
        length = x.shape[1]
        m0, m1, m2, m3, m4, m5 = (self.modulation.float() + e0).chunk(6, dim=1)
        attn_chunk = kernels.attn_chunk or length

        # q, k, v are handed over, not held here: a converting backend frees each once it has its copy
        qkv = list(self.self_attn(_normed(self.norm1, x, dtype, attn_chunk, m0, m1), freqs, attn_chunk))
        y = kernels.self_attention(qkv).flatten(2)
        x.addcmul_(self.self_attn.o(y), m2)
        del y

        kv = self.cross_attn.kv(context)
        for s in range(0, length, attn_chunk):
            xs = x[:, s : s + attn_chunk]
            xs.add_(self.cross_attn(_normed(self.norm3, xs, dtype, attn_chunk), kv, kernels.attention))

        ffn_chunk = kernels.ffn_chunk or length
        for s in range(0, length, ffn_chunk):
            xs = x[:, s : s + ffn_chunk]
            xs.addcmul_(self.ffn(_normed(self.norm2, xs, dtype, ffn_chunk, m3, m4)), m5)
        return x


class Head(nn.Module):
    """Final modulated norm and Linear dim -> out_dim * prod(patch), in float32 like upstream."""

    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float) -> None:
        super().__init__()
        self.norm = LayerNorm32(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_dim * math.prod(patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x (B, L, dim), e (B, dim) float32 -> (B, L, out_dim * prod(patch)) float32. Chunk 0 shift, chunk 1 scale."""
        shift, scale = (self.modulation.float() + e.unsqueeze(1)).chunk(2, dim=1)
        return linear_fp32(self.head, self.norm(x).mul_(1 + scale).add_(shift))


class MLPProj(nn.Module):
    """CLIP tokens -> model dim: LayerNorm, Linear, exact GELU, Linear, LayerNorm (eps 1e-5)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            LayerNorm32(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim), LayerNorm32(out_dim)
        )

    def forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x (B, N, in_dim) -> (B, N, out_dim) in `dtype` (norms in float32, Linears in `dtype`)."""
        ln0, fc1, act, fc2, ln4 = self.proj
        h = fc2(act(fc1(ln0(x).to(dtype))))
        return ln4(h).to(dtype)
