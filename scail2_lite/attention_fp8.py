"""FP8 self-attention through cuDNN's FP8 flash-attention kernel (nvidia-cudnn-frontend, optional extra).

Why: at 704p self-attention is about three quarters of an FP8 block's time, and bf16 SDPA already runs at cuDNN's
bf16 speed; the FP8 kernel is the remaining lever (bench_attention.py measures it on the device).

The kernel's contract is per-tensor scaling, and this module picks the scales so that nothing can overflow:
  q, v   scaled so that their absmax maps to e4m3's 448.
  k      its mean over the tokens is subtracted first (per batch, head and lane). Softmax is unchanged by it (every
         score of a query row moves by the same q.mean), and it removes the channel offsets that would otherwise eat
         the e4m3 mantissa. Scaled by the bound |k| + |mean| of the smoothed tensor.
  P      the softmax probabilities, relative to the running row max, lie in [0, 1]: fixed scale 448.
  O      every output row is a convex combination of v's rows, so |O| <= absmax(v): O is written in FP8 with v's
         scale (on Hopper cuDNN writes FP8 outputs only) and dequantized to bf16 here.
Scales stay on the GPU (no host sync). Under Ulysses (distributed.py) each rank holds the whole sequence for 1/N of
the heads: the per-tensor maxima are then all-reduced (MAX, four floats) over the ranks that share the attention, so
every rank quantizes with the scales one process computes over all heads, and the numbers do not depend on N (the
token mean of k is per head already). `emulate` computes the same quantization in plain PyTorch on any device:
it is what the CPU tests check the scale logic with, and the device benchmark compares the kernel against it.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.distributed as dist

from .errors import UserError

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs do not have it.
    import triton
    import triton.language as tl
except ImportError:
    triton = None

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
PROBE_TOKENS = 4096  # `usable`'s test shape: one head of a short self-attention
_graphs: dict[tuple, Any] = {}
_handles: dict[int, Any] = {}


def _cudnn() -> Any:
    """Import cudnn-frontend on first use (after torch, whose libcudnn it binds to)."""
    try:
        import cudnn
    except (ImportError, OSError):
        raise UserError(
            "attention backend 'fp8' needs cuDNN's Python frontend: pip install 'scail2-lite[fp8-attention]'"
        ) from None
    return cudnn


def check_available() -> None:
    """Raise a UserError unless this process can run the FP8 kernel (CUDA GPU of compute capability 8.9+, frontend)."""
    if not torch.cuda.is_available():
        raise UserError("attention backend 'fp8' needs a CUDA GPU; use --attention sdpa")
    if torch.cuda.get_device_capability() < (8, 9):
        raise UserError("attention backend 'fp8' needs an FP8 GPU (Ada, Hopper or newer); use --attention sdpa")
    _cudnn()


@functools.cache
def usable() -> bool:
    """Whether the fp8 backend runs on this machine: `check_available` passes and cuDNN builds its kernel for a
    small self-attention shape (what `--attention auto` asks; cached for the process)."""
    try:
        check_available()
        _graph(torch.Size((1, PROBE_TOKENS, 1, 128)), PROBE_TOKENS, torch.device("cuda"))
    except UserError:
        return False
    return True


def scales(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           group: object | None = None) -> tuple[torch.Tensor, ...]:
    """(k's token mean (B, 1, H, D) float32, and the float32 quantization scales of q, smoothed k and v). With a
    process `group` whose ranks hold the other heads of the same attention, the maxima are those over all its heads
    (exact: a maximum does not depend on the order it is taken in)."""
    k_mean = k.mean(dim=1, keepdim=True, dtype=torch.float32)
    inf = float("inf")
    maxima = torch.stack([torch.linalg.vector_norm(q, inf).float(), torch.linalg.vector_norm(k, inf).float(),
                          torch.linalg.vector_norm(k_mean, inf), torch.linalg.vector_norm(v, inf).float()])
    if group is not None:
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
    q_max, k_max, k_mean_max, v_max = maxima
    bounds = (q_max, k_max + k_mean_max, v_max)
    return (k_mean, *(FP8_MAX / b.clamp_min(1e-12) for b in bounds))


def quantize_reference(x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor | None = None,
                       dtype: torch.dtype = FP8) -> torch.Tensor:
    """`(x - mean) * scale` in float32, saturated to e4m3's range when `dtype` is FP8, cast to `dtype`: plain
    PyTorch one token chunk at a time (bounded temporaries). `quantize`'s reference; the CPU path."""
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    chunk = max(1, (1 << 24) // max(1, x[0, 0].numel()))
    for s in range(0, x.shape[1], chunk):
        y = x[:, s : s + chunk].to(torch.float32, copy=True)
        if mean is not None:
            y -= mean
        y.mul_(scale)
        out[:, s : s + chunk] = y.clamp_(-FP8_MAX, FP8_MAX) if dtype == FP8 else y
    return out


if triton is not None:

    @triton.jit
    def _scale_cast_kernel(x_ptr, mean_ptr, scale_ptr, out_ptr, L, C, HAS_MEAN: tl.constexpr,
                           SATURATE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
        # One pass over x (B, L, C): subtract the per-(batch, channel) mean, scale, saturate, cast.
        rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        batch = tl.program_id(2).to(tl.int64)
        mask = (rows[:, None] < L) & (cols[None, :] < C)
        offs = batch * L * C + rows[:, None].to(tl.int64) * C + cols[None, :]
        y = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_MEAN:
            y -= tl.load(mean_ptr + batch * C + cols, mask=cols < C, other=0.0)[None, :]
        y = y * tl.load(scale_ptr)
        if SATURATE:
            y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def quantize(x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor | None = None,
             dtype: torch.dtype = FP8) -> torch.Tensor:
    """`quantize_reference` in one Triton pass on CUDA (the reference's chunks cost ~5 passes over float32)."""
    if triton is None or not x.is_cuda:
        return quantize_reference(x, scale, mean, dtype)
    x = x.contiguous()
    batch, length = x.shape[:2]
    channels = x[0, 0].numel()
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    grid = (triton.cdiv(length, 32), triton.cdiv(channels, 256), batch)
    _scale_cast_kernel[grid](x, mean if mean is not None else scale, scale.float().reshape(1), out, length, channels,
                             HAS_MEAN=mean is not None, SATURATE=dtype == FP8, BLOCK_L=32, BLOCK_C=256)
    return out


def emulate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: object | None = None) -> torch.Tensor:
    """The kernel's numerics in plain PyTorch (float32 math, e4m3 rounding where the kernel rounds): q, k, v, the
    probabilities relative to the row max, and the output. (B, L, H, D) -> (B, L, H, D) in q's dtype; `group` as
    in `scales`."""
    k_mean, sq, sk, sv = scales(q, k, v, group)
    q8, k8, v8 = quantize(q, sq).float(), quantize(k, sk, k_mean).float(), quantize(v, sv).float()
    s = torch.einsum("blhd,bmhd->bhlm", q8, k8) / (sq * sk * math.sqrt(q.shape[-1]))
    p = torch.exp(s - s.amax(-1, keepdim=True))
    p8 = (p * FP8_MAX).to(FP8).float()
    o = torch.einsum("bhlm,bmhd->blhd", p8, v8) / (FP8_MAX * p.sum(-1).transpose(1, 2).unsqueeze(-1))
    o8 = o.clamp(-FP8_MAX, FP8_MAX).to(FP8)  # o is already in v's scaled units
    return quantize(o8, 1 / sv, dtype=q.dtype)


def _handle(device: torch.device) -> Any:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _handles:
        with torch.cuda.device(index):
            _handles[index] = _cudnn().create_handle()
    return _handles[index]


def _graph(shape_q: torch.Size, length_kv: int, device: torch.device) -> tuple:
    """The cuDNN graph for this shape, built on first use; a shape or GPU cuDNN cannot run is a UserError."""
    key = (*shape_q, length_kv, device)
    if key not in _graphs:
        cudnn = _cudnn()
        try:
            _graphs[key] = _build(cudnn, shape_q, length_kv, device)
        except Exception as e:  # cudnn raises its own error types; the user needs one line and a way out
            why = (str(e).splitlines() or [type(e).__name__])[0][:160]
            raise UserError(f"cuDNN has no FP8 attention kernel for this GPU/shape ({why}); use --attention sdpa") \
                from None
    return _graphs[key]


def _build(cudnn: Any, shape_q: torch.Size, length_kv: int, device: torch.device) -> tuple:
    """FP8 q, k, v in (B, L, H, D) memory order, FP8 output, float32 scalars; inference (no softmax stats)."""
    batch, length, heads, head_dim = shape_q
    fp8, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=fp8, intermediate_data_type=f32, compute_data_type=f32, handle=_handle(device))

    def bshd(name: str, n: int) -> Any:
        return graph.tensor(name=name, dim=[batch, heads, n, head_dim], stride=[n * heads * head_dim, head_dim,
                            heads * head_dim, 1], data_type=fp8)

    q, k, v = bshd("q", length), bshd("k", length_kv), bshd("v", length_kv)
    scalar = {n: graph.tensor(name=n, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32)
              for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")}
    o, _, amax_s, amax_o = graph.sdpa_fp8(q=q, k=k, v=v, **scalar, is_inference=True,
                                          attn_scale=1 / math.sqrt(head_dim), use_causal_mask=False)
    o.set_output(True).set_dim([batch, heads, length, head_dim]).set_stride(
        [length * heads * head_dim, head_dim, heads * head_dim, 1]).set_data_type(fp8)
    for amax in (amax_s, amax_o):
        amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    workspace = torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device=device)
    return graph, (q, k, v, o, amax_s, amax_o), scalar, workspace


def fp8_attention(qkv: list[torch.Tensor], group: object | None = None) -> torch.Tensor:
    """Unmasked attention through cuDNN's FP8 kernel. qkv: [q, k, v], each (B, L, heads, head_dim) on CUDA; the
    list is emptied and each input is dropped once its e4m3 copy exists (the caller holding no other reference,
    the peak stays below SDPA's). `group`: the Ulysses ranks holding the other heads (`scales`). Returns
    (B, L, heads, head_dim) in q's dtype."""
    q = qkv[0]
    shape, dtype, device = q.shape, q.dtype, q.device
    graph, (tq, tk, tv, to, tamax_s, tamax_o), scalar, workspace = _graph(shape, qkv[1].shape[1], device)
    k_mean, sq, sk, sv = scales(*qkv, group)
    del q
    q8 = quantize(qkv.pop(0), sq)
    k8 = quantize(qkv.pop(0), sk, k_mean)
    v8 = quantize(qkv.pop(0), sv)
    one = torch.ones((), device=device)
    s_scale = torch.full((), FP8_MAX, device=device)
    out = torch.empty(shape, dtype=FP8, device=device)
    pack = {
        tq: q8, tk: k8, tv: v8, to: out,
        tamax_s: torch.empty((), device=device), tamax_o: torch.empty((), device=device),
        scalar["descale_q"]: one / sq, scalar["descale_k"]: one / sk, scalar["descale_v"]: one / sv,
        scalar["descale_s"]: one / s_scale, scalar["scale_s"]: s_scale, scalar["scale_o"]: sv,
    }
    cudnn = _cudnn()
    handle = _handle(device)
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(device).cuda_stream)
    graph.execute(pack, workspace, handle=handle)
    del pack, q8, k8, v8
    return quantize(out, one / sv, dtype=dtype)
