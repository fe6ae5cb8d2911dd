"""Attention behind one function, so backends can be swapped without touching the model.

The backend is process-global (`set_backend`, or `use_backend` for a scope) because profiles and `--attention`
choose it once per run while the model keeps calling `attention(q, k, v)`. Backends:
  sdpa       PyTorch scaled_dot_product_attention, PyTorch picks flash / cuDNN / memory-efficient per GPU (default)
  flash, cudnn, efficient, math   the same with one SDPA kernel forced (`torch.nn.attention.sdpa_kernel`)
  sage       SageAttention's 8-bit QK^T kernels (optional extra `scail2-lite[sage]`, CUDA only, fp16/bf16)
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import UserError

_FORCED: dict[str, SDPBackend] = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
BACKENDS: tuple[str, ...] = ("sdpa", *_FORCED, "sage")

_backend = "sdpa"
_sage: Callable | None = None


def _load_sage() -> Callable:
    """Import sageattention on first use, so the package stays optional."""
    global _sage
    if _sage is None:
        try:
            from sageattention import sageattn
        except ImportError:
            raise UserError(
                "attention backend 'sage' needs the sageattention package: pip install 'scail2-lite[sage]'"
            ) from None
        _sage = sageattn
    return _sage


def check_backend(name: str) -> str:
    """Validate a backend name (and that its package is importable); returns it."""
    if name not in BACKENDS:
        raise UserError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "sage":
        _load_sage()
    return name


def set_backend(name: str) -> None:
    """Make `name` the backend every later `attention` call uses."""
    global _backend
    _backend = check_backend(name)


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Use `name` inside the block, then restore the previous backend."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (unmasked) attention. q, k, v: (B, L, heads, head_dim) -> (B, L, heads, head_dim)."""
    if _backend == "sage":
        if not q.is_cuda:
            raise UserError("attention backend 'sage' needs a CUDA GPU; use --attention sdpa")
        return _load_sage()(q, k, v, tensor_layout="NHD", is_causal=False)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if _backend == "sdpa":
        out = F.scaled_dot_product_attention(qt, kt, vt)
    else:
        with sdpa_kernel([_FORCED[_backend]]):
            out = F.scaled_dot_product_attention(qt, kt, vt)
    return out.transpose(1, 2)
