"""SCAIL-2 DiT (Wan2.1-I2V-14B fine-tune) in plain PyTorch, with Wan parameter names.

Numerics follow upstream's mixed precision: Linears and convs run in the model's dtype (whatever `.to()` made it);
modulation, norms, time embedding, head and RoPE run in float32 (the "fp32 islands"); the residual stream is
float32 from the first block on. Parameters may be stored in any dtype; islands upcast them on the fly.

Block streaming contract: `SCAIL2Model.blocks` is an `nn.ModuleList` of `SCAIL2Block`; each forward calls every
block exactly once, in order, as `x = block(x, e0, context, freqs)` and touches no block parameter elsewhere, so a
forward pre-hook per block may move its weights in and a forward hook may move them out. Within a block, `ffn` runs
last and reads only its own weights: the one-slot streamer copies the next block's other weights in meanwhile.
`SCAIL2Block.STREAM_UNITS` names the submodules holding the big weights in the order the block runs them: each
unit's weights are read only from the first call of one of its modules until the next unit's first call (the
layer streamer's contract), or until the module named beside it returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .attention import attention, self_attention
from .config import DiTConfig
from .errors import UserError
from .rope import apply_rope, rope_freqs

CLIP_TOKENS = 257  # CLIP ViT-H/14 at 224px: 1 class token + 16x16 patches
LATENT_CHANNELS = 16


def _linear_fp32(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
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
        v is projected chunk by chunk too: an FP8/INT8 Linear then never holds an 8-bit copy of all of h."""
        q = self._rotated(self.q, self.norm_q, h, freqs, chunk)
        k = self._rotated(self.k, self.norm_k, h, freqs, chunk)
        v = torch.empty_like(k)
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

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """x (B, L, dim) in compute dtype, kv from `kv(context)` -> (B, L, dim) in compute dtype."""
        k, v, k_img, v_img = kv
        q = self.norm_q(self.q(x)).to(x.dtype).unflatten(-1, (self.num_heads, -1))
        out = attention(q, k, v).flatten(2)
        out += attention(q, k_img, v_img).flatten(2)
        return self.o(out)


class SCAIL2Block(nn.Module):
    """One DiT block: modulated self-attention, cross-attention, modulated FFN on a float32 residual stream.

    Activation memory knobs (None = one shot): `ffn_chunk_size` runs norm2, modulation and the FFN over token
    chunks; `attn_chunk_size` does the same for the per-token work around the attentions (norm1 and modulation,
    the q/k/v projections with q/k RMSNorm and RoPE, norm3 and the whole cross-attention). Every chunked op is per
    token, so chunking changes no number.
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
        self.ffn_chunk_size: int | None = None
        self.attn_chunk_size: int | None = None

    def forward(
        self, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor, freqs: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """Update the residual stream in place and return it.

        x: (B, L, dim) float32. e0: (B, 6, dim) float32 time projection. context: (B, img_len + text_len, dim) in the
        compute dtype (which is taken from it). freqs: RoPE (cos, sin), each (L, head_dim/2) float32.
        """
        dtype = context.dtype
        length = x.shape[1]
        m0, m1, m2, m3, m4, m5 = (self.modulation.float() + e0).chunk(6, dim=1)
        attn_chunk = self.attn_chunk_size or length

        # q, k, v are handed over, not held here: a converting backend frees each once it has its copy
        qkv = list(self.self_attn(_normed(self.norm1, x, dtype, attn_chunk, m0, m1), freqs, attn_chunk))
        y = self_attention(qkv).flatten(2)
        x.addcmul_(self.self_attn.o(y), m2)
        del y

        kv = self.cross_attn.kv(context)
        for s in range(0, length, attn_chunk):
            xs = x[:, s : s + attn_chunk]
            xs.add_(self.cross_attn(_normed(self.norm3, xs, dtype, attn_chunk), kv))

        ffn_chunk = self.ffn_chunk_size or length
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
        return _linear_fp32(self.head, self.norm(x).mul_(1 + scale).add_(shift))


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


@dataclass
class Embedded:
    """Everything the block loop and the head need, computed once per forward by `SCAIL2Model.embed`."""

    x: torch.Tensor  # (B, L, dim) float32 residual stream, L = ref + video + pose tokens
    e: torch.Tensor  # (B, dim) float32 time embedding (for the head)
    e0: torch.Tensor  # (B, 6, dim) float32 time projection (for the blocks)
    freqs: tuple[torch.Tensor, torch.Tensor]  # RoPE cos, sin: (L, head_dim/2) float32
    grid: tuple[int, int, int]  # video patch grid (f, h, w)


class SCAIL2Model(nn.Module):
    """The SCAIL-2 DiT. `state_dict()` keys are the Wan names (1307 tensors for the 14B config)."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        c = config
        self.config = config
        self.patch_embedding = nn.Conv3d(c.in_dim, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.patch_embedding_pose = nn.Conv3d(c.in_dim, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.patch_embedding_mask = nn.Conv3d(c.mask_dim, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(c.text_dim, c.dim), nn.GELU(approximate="tanh"), nn.Linear(c.dim, c.dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, 6 * c.dim))
        self.blocks = nn.ModuleList(
            SCAIL2Block(c.dim, c.ffn_dim, c.num_heads, c.eps) for _ in range(c.num_layers)
        )
        self.head = Head(c.dim, c.out_dim, c.patch_size, c.eps)
        self.img_emb = MLPProj(c.clip_dim, c.dim)
        # RoPE tables of the last geometry: rebuilding them costs ~0.4 s of CPU per forward at 704p.
        self._freqs_cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the Linears and convs (the patch embedding is never quantized)."""
        return self.patch_embedding.weight.dtype

    # ---- embeddings -------------------------------------------------------------------------------------------

    def embed_context(self, context: torch.Tensor, clip_fea: torch.Tensor) -> torch.Tensor:
        """Cross-attention context `[clip 257 | text text_len]` (B, 257 + text_len, dim) in the compute dtype.

        Depends only on the prompt and the reference image: the pipeline may compute it once per segment and pass it
        to `forward_with_context`. Text is zero-padded to text_len here (the same as any zero padding by the caller).
        """
        c = self.config
        if context.ndim != 3 or context.shape[-1] != c.text_dim or context.shape[1] > c.text_len:
            raise UserError(f"text context must be (B, <= {c.text_len}, {c.text_dim}), got {tuple(context.shape)}")
        if clip_fea.shape[1:] != (CLIP_TOKENS, c.clip_dim) or clip_fea.shape[0] != context.shape[0]:
            raise UserError(f"clip features must be (B, {CLIP_TOKENS}, {c.clip_dim}), got {tuple(clip_fea.shape)}")
        dtype = self.dtype
        text = F.pad(context.to(dtype), (0, 0, 0, c.text_len - context.shape[1]))
        return torch.cat([self.img_emb(clip_fea, dtype), self.text_embedding(text)], dim=1)

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t (B,) on the 0..1000 scale -> e (B, dim), e0 (B, 6, dim), both float32."""
        half = self.config.freq_dim // 2
        pos = t.to(torch.float64).reshape(-1)
        angles = torch.outer(pos, 10000.0 ** (-torch.arange(half, dtype=torch.float64, device=t.device) / half))
        sinusoid = torch.cat([angles.cos(), angles.sin()], dim=1).float()
        e = _linear_fp32(self.time_embedding[2], self.time_embedding[1](_linear_fp32(self.time_embedding[0], sinusoid)))
        e0 = _linear_fp32(self.time_projection[1], self.time_projection[0](e))
        return e, e0.unflatten(1, (6, self.config.dim))

    def embed(
        self,
        x: torch.Tensor,
        pose_latents: torch.Tensor,
        driving_masks: torch.Tensor,
        ref_latents: torch.Tensor,
        ref_masks: torch.Tensor,
        t: torch.Tensor,
        replace_flag: bool,
        history_mask: torch.Tensor | None = None,
    ) -> Embedded:
        """Patchify the conditions into the packed token sequence `[ref | video | pose]`, plus time and RoPE."""
        self._check_shapes(x, pose_latents, driving_masks, ref_latents, ref_masks, t, history_mask)
        dtype = self.dtype
        batch, _, frames, height, width = x.shape
        extra = self.config.in_dim - LATENT_CHANNELS
        if history_mask is None:
            history_mask = x.new_zeros(batch, extra, frames, height, width)
        ones_ref = ref_latents.new_ones(batch, extra, *ref_latents.shape[2:])
        ones_pose = pose_latents.new_ones(batch, extra, *pose_latents.shape[2:])
        video = torch.cat(
            [torch.cat([ref_latents, ones_ref], dim=1), torch.cat([x, history_mask.to(x.dtype)], dim=1)], dim=2
        )
        video = self.patch_embedding(video.to(dtype)) + self.patch_embedding_mask(ref_masks.to(dtype))
        pose = torch.cat([pose_latents, ones_pose], dim=1).to(dtype)
        pose = self.patch_embedding_pose(pose) + self.patch_embedding_mask(driving_masks.to(dtype))
        grid = (video.shape[2] - 1, video.shape[3], video.shape[4])
        tokens = torch.cat([video.flatten(2), pose.flatten(2)], dim=2).transpose(1, 2)
        # .to() returns a float32 model's transposed view as it is: the fused kernels need unit feature stride
        tokens = tokens.to(torch.float32).contiguous()
        e, e0 = self.embed_time(t)
        return Embedded(tokens, e, e0, self._rope(grid, replace_flag, tokens.device), grid)

    def _rope(
        self, grid: tuple[int, int, int], replace_flag: bool, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (grid, bool(replace_flag), device)
        if self._freqs_cache is None or self._freqs_cache[0] != key:
            self._freqs_cache = (key, rope_freqs(self.config.head_dim, grid, replace_flag, device=device))
        return self._freqs_cache[1]

    def _check_shapes(
        self,
        x: torch.Tensor,
        pose_latents: torch.Tensor,
        driving_masks: torch.Tensor,
        ref_latents: torch.Tensor,
        ref_masks: torch.Tensor,
        t: torch.Tensor,
        history_mask: torch.Tensor | None,
    ) -> None:
        """One clear line for the shape mistakes a caller can make (they otherwise surface deep in a conv)."""
        if x.ndim != 5 or x.shape[1] != LATENT_CHANNELS:
            raise UserError(f"x must be (B, {LATENT_CHANNELS}, T, H, W), got {tuple(x.shape)}")
        batch, _, frames, height, width = x.shape
        pt, ph, pw = self.config.patch_size
        if frames % pt or height % (2 * ph) or width % (2 * pw):
            raise UserError(f"latent size {frames}x{height}x{width} must be divisible by {pt}x{2 * ph}x{2 * pw}")
        extra = self.config.in_dim - LATENT_CHANNELS
        mask_dim = self.config.mask_dim
        expected = {
            "pose_latents": (pose_latents, (batch, LATENT_CHANNELS, frames, height // 2, width // 2)),
            "driving_masks": (driving_masks, (batch, mask_dim, frames, height // 2, width // 2)),
            "ref_latents": (ref_latents, (batch, LATENT_CHANNELS, 1, height, width)),
            "ref_masks": (ref_masks, (batch, mask_dim, 1 + frames, height, width)),
        }
        if history_mask is not None:
            expected["history_mask"] = (history_mask, (batch, extra, frames, height, width))
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                raise UserError(f"{name} must be {shape} for x {tuple(x.shape)}, got {tuple(tensor.shape)}")
        if t.shape != (batch,):
            raise UserError(f"t must be ({batch},), got {tuple(t.shape)}")

    # ---- blocks and head --------------------------------------------------------------------------------------

    def run_blocks(self, emb: Embedded, context: torch.Tensor) -> torch.Tensor:
        """The block loop; each block called once, in order, as `block(x, e0, context, freqs)`."""
        x = emb.x
        for block in self.blocks:
            x = block(x, emb.e0, context, emb.freqs)
        return x

    def unembed(self, x: torch.Tensor, e: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Head on the video tokens only (ref skipped, pose dropped), unpatchified to (B, out_dim, T, H, W) float32."""
        f, h, w = grid
        pt, ph, pw = self.config.patch_size
        video = x[:, h * w : h * w + f * h * w]
        out = self.head(video, e).view(x.shape[0], f, h, w, pt, ph, pw, self.config.out_dim)
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], self.config.out_dim, f * pt, h * ph, w * pw)

    # ---- forward ----------------------------------------------------------------------------------------------

    def forward_with_context(
        self,
        x: torch.Tensor,
        pose_latents: torch.Tensor,
        driving_masks: torch.Tensor,
        ref_latents: torch.Tensor,
        ref_masks: torch.Tensor,
        t: torch.Tensor,
        context_emb: torch.Tensor,
        replace_flag: bool,
        history_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`forward` with the context already embedded by `embed_context` (cached across sampling steps)."""
        emb = self.embed(x, pose_latents, driving_masks, ref_latents, ref_masks, t, replace_flag, history_mask)
        return self.unembed(self.run_blocks(emb, context_emb), emb.e, emb.grid)

    def forward(
        self,
        x: torch.Tensor,
        pose_latents: torch.Tensor,
        driving_masks: torch.Tensor,
        ref_latents: torch.Tensor,
        ref_masks: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        clip_fea: torch.Tensor,
        replace_flag: bool,
        history_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow for x (B, 16, T, H, W); returns (B, 16, T, H, W) in float32, like upstream.

        pose_latents (B, 16, T, H/2, W/2); driving_masks (B, 28, T, H/2, W/2); ref_latents (B, 16, 1, H, W);
        ref_masks (B, 28, 1+T, H, W); t (B,) timesteps on the 0..1000 scale; context (B, <= text_len, text_dim);
        clip_fea (B, 257, clip_dim); history_mask None or (B, 4, T, H, W), ones on latent frames with clean history.
        """
        context_emb = self.embed_context(context, clip_fea)
        return self.forward_with_context(
            x, pose_latents, driving_masks, ref_latents, ref_masks, t, context_emb, replace_flag, history_mask
        )
