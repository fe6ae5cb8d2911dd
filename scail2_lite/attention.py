"""Attention behind one function, so backends can be swapped without touching the model.

The backend is a per-run choice (the profile's, or `--attention`) that travels with the model's `Kernels` into every
call; nothing here remembers it. Backends:
  auto       fp8 where it can run (a CUDA GPU with FP8, the optional package, a kernel for the GPU), else sdpa.
             Resolved once per process from the machine alone, so every profile of a run computes the same numbers.
  sdpa       PyTorch scaled_dot_product_attention, PyTorch picks flash / cuDNN / memory-efficient per GPU
  flash, cudnn, efficient, math   the same with one SDPA kernel forced (`torch.nn.attention.sdpa_kernel`)
  sage       SageAttention's 8-bit QK^T kernels (optional extra `scail2-lite[sage]`, CUDA only, fp16/bf16) for
             self-attention; cross-attention (257 image / 512 text keys) stays on SDPA: sageattention 1.0.6 pads
             the keys to a multiple of its 64-key tile with zeros it does not mask, which adds phantom keys of
             score 0 to the softmax (63 of 320 for the image keys; 16 of 95,936 at 704p, negligible). It also
             subtracts the keys' mean from `k` in place (harmless to the softmax; k is a temporary here).
  fp8        cuDNN's FP8 flash attention (optional extra `scail2-lite[fp8-attention]`, FP8 GPUs) for
             self-attention, per-tensor scales chosen in `attention_fp8`; cross-attention stays on SDPA like sage.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import attention_fp8
from .errors import UserError

_FORCED: dict[str, SDPBackend] = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
BACKENDS: tuple[str, ...] = ("auto", "sdpa", *_FORCED, "sage", "fp8")
QUANTIZED = ("sage", "fp8")  # 8-bit backends: self-attention only

QUANTIZED_MIN_KEYS = 4096  # shorter key sequences (the cross-attentions) go to SDPA under a quantized backend


@functools.cache
def _load_sage() -> Callable:
    """Import sageattention on first use, so the package stays optional."""
    try:
        from sageattention import sageattn
    except ImportError:
        raise UserError(
            "attention backend 'sage' needs the sageattention package: pip install 'scail2-lite[sage]'"
        ) from None
    return sageattn


def resolve(name: str) -> str:
    """Validate a backend name (and that its package is importable); 'auto' becomes the backend it means here."""
    if name not in BACKENDS:
        raise UserError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "fp8" if attention_fp8.usable() else "sdpa"
    if name == "sage":
        _load_sage()
    if name == "fp8":
        attention_fp8.check_available()
    return name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Full (unmasked) attention with a resolved backend. q, k, v: (B, L, heads, head_dim) -> same shape."""
    return self_attention([q, k, v], backend)


def self_attention(qkv: list[torch.Tensor], backend: str = "sdpa") -> torch.Tensor:
    """`attention(*qkv)` that takes q, k and v over (the list is emptied), so that a backend which converts them
    can free each one as soon as its copy exists: the fp8 backend then needs no more memory than SDPA."""
    quantized = backend in QUANTIZED and qkv[1].shape[1] >= QUANTIZED_MIN_KEYS
    if backend in QUANTIZED and not qkv[0].is_cuda:
        raise UserError(f"attention backend '{backend}' needs a CUDA GPU; use --attention sdpa")
    if quantized and backend == "fp8":
        return attention_fp8.fp8_attention(qkv)
    q, k, v = qkv
    qkv.clear()
    if quantized:
        return _load_sage()(q, k, v, tensor_layout="NHD", is_causal=False)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if backend == "sdpa" or backend in QUANTIZED:
        out = F.scaled_dot_product_attention(qt, kt, vt)
    else:
        with sdpa_kernel([_FORCED[backend]]):
            out = F.scaled_dot_product_attention(qt, kt, vt)
    return out.transpose(1, 2)
