"""Attention behind one function, so backends can be swapped without touching the model.

The backend is a per-run choice (the profile's, or `--attention`) that travels with the model's `Kernels` into every
call; nothing here remembers it. Backends:
  auto       per GPU architecture, AUTO_BY_ARCH's first candidate that builds and runs here, else sdpa (see
             `auto_backend`). Resolved from the machine alone, so every profile of a run computes the same numbers.
  sdpa       PyTorch scaled_dot_product_attention, PyTorch picks flash / cuDNN / memory-efficient per GPU
  flash, cudnn, efficient, math   the same with one SDPA kernel forced (`torch.nn.attention.sdpa_kernel`)
  sage       SageAttention's 8-bit QK^T kernels (optional extra `scail2-lite[sage]`, CUDA only, fp16/bf16) for
             self-attention; cross-attention (257 image / 512 text keys) stays on SDPA: sageattention 1.0.6 pads
             the keys to a multiple of its 64-key tile with zeros it does not mask, which adds phantom keys of
             score 0 to the softmax (63 of 320 for the image keys; 16 of 95,936 at 704p, negligible). It also
             subtracts the keys' mean from `k` in place (harmless to the softmax; k is a temporary here).
  fp8        cuDNN's FP8 flash attention (optional extra `scail2-lite[fp8-attention]`, FP8 GPUs) for
             self-attention, per-tensor scales chosen in `attention_fp8`; cross-attention stays on SDPA like sage.
  int8       our Triton kernel (`attention_int8`): INT8 QK^T, FP8 P.V on sm89+ / fp16 on sm80/86, for
             self-attention on Ampere and newer; cross-attention stays on SDPA like sage.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import attention_fp8, attention_int8
from .errors import UserError

_FORCED: dict[str, SDPBackend] = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
BACKENDS: tuple[str, ...] = ("auto", "sdpa", *_FORCED, "sage", "fp8", "int8")
QUANTIZED = ("sage", "fp8", "int8")  # 8-bit backends: self-attention only
CONVERTING = ("fp8", "int8")  # 8-bit backends that free each bf16 input once its copy exists (offload.planner)
# `auto` per GPU architecture (compute capability): candidates in order, the first whose kernel builds and runs here
# wins, anything else (or none usable) is sdpa. cuDNN has FP8 attention on Hopper and B200 only; on the H100 it is
# faster than ours (bench_attention, RESULTS.md 2026-12-06), so it leads there. B200 follows Hopper.
AUTO_BY_ARCH: dict[tuple[int, int], tuple[str, ...]] = {
    (8, 0): ("int8",),  # A100
    (8, 6): ("int8",),  # RTX 30xx, A40
    (8, 9): ("int8",),  # RTX 40xx, L40S
    (9, 0): ("fp8", "int8"),  # H100, H200
    (10, 0): ("fp8", "int8"),  # B200
    (12, 0): ("int8",),  # RTX 50xx
}
_KERNELS = {"fp8": attention_fp8, "int8": attention_int8}

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
        return auto_backend()
    if name == "sage":
        _load_sage()
    if name in _KERNELS:
        _KERNELS[name].check_available()
    return name


def _capability() -> tuple[int, int] | None:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def auto_backend() -> str:
    """What 'auto' runs on this machine: the first of AUTO_BY_ARCH's candidates for its GPU whose kernel builds and
    runs (each module's cached `usable`), else sdpa."""
    for name in AUTO_BY_ARCH.get(_capability(), ()):
        if _KERNELS[name].usable():
            return name
    return "sdpa"


def kernel_name(name: str) -> str:
    """One line naming the kernel that backend `name` ('auto' resolved) runs for self-attention here, for the
    run's notice."""
    name = resolve(name)
    if name == "int8":
        return f"int8: scail2-lite Triton kernel, {attention_int8.describe()}"
    if name == "fp8":
        return "fp8: cuDNN FP8 flash attention"
    if name == "sage":
        return "sage: SageAttention (sageattn)"
    if name in _FORCED:
        return f"{name}: PyTorch SDPA, {name} kernel forced"
    return "sdpa: PyTorch scaled_dot_product_attention"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Full (unmasked) attention with a resolved backend. q, k, v: (B, L, heads, head_dim) -> same shape."""
    return self_attention([q, k, v], backend)


def self_attention(qkv: list[torch.Tensor], backend: str = "sdpa", heads_group: object | None = None) -> torch.Tensor:
    """`attention(*qkv)` that takes q, k and v over (the list is emptied), so that a backend which converts them
    can free each one as soon as its copy exists: the fp8 backend then needs no more memory than SDPA.

    `heads_group`: under Ulysses, the process group whose ranks hold the other heads of this attention. Only fp8
    needs it (per-tensor scales, reduced over the group); every other backend is per head (sdpa; int8's and sage's
    scales are per block of tokens and head, their means per head and lane), so N ranks compute what one does."""
    quantized = backend in QUANTIZED and qkv[1].shape[1] >= QUANTIZED_MIN_KEYS
    if backend in QUANTIZED and not qkv[0].is_cuda:
        raise UserError(f"attention backend '{backend}' needs a CUDA GPU; use --attention sdpa")
    if quantized and backend == "fp8":
        return attention_fp8.fp8_attention(qkv, heads_group)
    if quantized and backend == "int8":
        return attention_int8.int8_attention(qkv)
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
