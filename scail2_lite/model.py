"""SCAIL-2 DiT (Wan2.1-I2V-14B fine-tune) in plain PyTorch, with Wan parameter names.

Numerics follow upstream's mixed precision: Linears and convs run in the model's dtype (whatever `.to()` made it);
modulation, norms, time embedding, head and RoPE run in float32 (the "fp32 islands"); the residual stream is
float32 from the first block on. Parameters may be stored in any dtype; islands upcast them on the fly.

Block streaming contract: `SCAIL2Model.blocks` is an `nn.ModuleList` of `SCAIL2Block`; each forward calls every
block exactly once, in order, as `x = block(x, e0, context, freqs, kernels)` and touches no block parameter elsewhere, so a
forward pre-hook per block may move its weights in and a forward hook may move them out. Within a block, `ffn` runs
last and reads only its own weights: the one-slot streamer copies the next block's other weights in meanwhile.
`SCAIL2Block.STREAM_UNITS` names the submodules holding the big weights in the order the block runs them: each
unit's weights are read only from the first call of one of its modules until the next unit's first call (the
layer streamer's contract), or until the module named beside it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import CLIP_TOKENS, Head, Kernels, MLPProj, SCAIL2Block, linear_fp32
from .config import DiTConfig
from .errors import UserError
from .rope import rope_freqs

LATENT_CHANNELS = 16


@dataclass(frozen=True)
class Conditions:
    """What the DiT is conditioned on in one segment (batch B; x is (B, 16, T, H, W) latents):

    pose_latents (B, 16, T, H/2, W/2); driving_masks (B, 28, T, H/2, W/2); ref_latents (B, 16, 1, H, W);
    ref_masks (B, 28, 1+T, H, W); history_mask None or (B, 4, T, H, W), ones on latent frames with clean history;
    replace: replacement mode (changes RoPE of the pose tokens)."""

    pose_latents: torch.Tensor
    driving_masks: torch.Tensor
    ref_latents: torch.Tensor
    ref_masks: torch.Tensor
    replace: bool = False
    history_mask: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "Conditions":
        """Every tensor on `device` in `dtype` (the DiT's compute dtype)."""
        moved = {f.name: getattr(self, f.name).to(device, dtype) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)

    def check(self, x: torch.Tensor, config: DiTConfig) -> None:
        """One clear line for the shape mistakes a caller can make (they otherwise surface deep in a conv)."""
        if x.ndim != 5 or x.shape[1] != LATENT_CHANNELS:
            raise UserError(f"x must be (B, {LATENT_CHANNELS}, T, H, W), got {tuple(x.shape)}")
        batch, _, frames, height, width = x.shape
        pt, ph, pw = config.patch_size
        if frames % pt or height % (2 * ph) or width % (2 * pw):
            raise UserError(f"latent size {frames}x{height}x{width} must be divisible by {pt}x{2 * ph}x{2 * pw}")
        expected = {
            "pose_latents": (batch, LATENT_CHANNELS, frames, height // 2, width // 2),
            "driving_masks": (batch, config.mask_dim, frames, height // 2, width // 2),
            "ref_latents": (batch, LATENT_CHANNELS, 1, height, width),
            "ref_masks": (batch, config.mask_dim, 1 + frames, height, width),
            "history_mask": (batch, config.in_dim - LATENT_CHANNELS, frames, height, width),
        }
        for name, shape in expected.items():
            tensor = getattr(self, name)
            if tensor is not None and tuple(tensor.shape) != shape:
                raise UserError(f"{name} must be {shape} for x {tuple(x.shape)}, got {tuple(tensor.shape)}")


@dataclass
class Embedded:
    """Everything the block loop and the head need, computed once per forward by `SCAIL2Model.embed`."""

    x: torch.Tensor  # (B, L, dim) float32 residual stream, L = ref + video + pose tokens
    e: torch.Tensor  # (B, dim) float32 time embedding (for the head)
    e0: torch.Tensor  # (B, 6, dim) float32 time projection (for the blocks)
    freqs: tuple[torch.Tensor, torch.Tensor]  # RoPE cos, sin: (L, head_dim/2) float32
    grid: tuple[int, int, int]  # video patch grid (f, h, w)


class BlockCache(Protocol):
    """What `forward_with_context` needs of a step cache (stepcache.StepCache): given this forward's embeddings and
    the block stack as a thunk, return the stack's output, computed or reused."""

    def run_blocks(self, emb: Embedded, run: Callable[[], torch.Tensor]) -> torch.Tensor: ...


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
        e = linear_fp32(self.time_embedding[2], self.time_embedding[1](linear_fp32(self.time_embedding[0], sinusoid)))
        e0 = linear_fp32(self.time_projection[1], self.time_projection[0](e))
        return e, e0.unflatten(1, (6, self.config.dim))

    def embed(self, x: torch.Tensor, t: torch.Tensor, cond: Conditions) -> Embedded:
        """Patchify the conditions into the packed token sequence `[ref | video | pose]`, plus time and RoPE."""
        cond.check(x, self.config)
        if t.shape != (x.shape[0],):
            raise UserError(f"t must be ({x.shape[0]},), got {tuple(t.shape)}")
        dtype = self.dtype
        batch, _, frames, height, width = x.shape
        extra = self.config.in_dim - LATENT_CHANNELS
        history_mask = cond.history_mask
        if history_mask is None:
            history_mask = x.new_zeros(batch, extra, frames, height, width)
        ref_latents, pose_latents = cond.ref_latents, cond.pose_latents
        ones_ref = ref_latents.new_ones(batch, extra, *ref_latents.shape[2:])
        ones_pose = pose_latents.new_ones(batch, extra, *pose_latents.shape[2:])
        video = torch.cat(
            [torch.cat([ref_latents, ones_ref], dim=1), torch.cat([x, history_mask.to(x.dtype)], dim=1)], dim=2
        )
        video = self.patch_embedding(video.to(dtype)) + self.patch_embedding_mask(cond.ref_masks.to(dtype))
        pose = torch.cat([pose_latents, ones_pose], dim=1).to(dtype)
        pose = self.patch_embedding_pose(pose) + self.patch_embedding_mask(cond.driving_masks.to(dtype))
        grid = (video.shape[2] - 1, video.shape[3], video.shape[4])
        tokens = torch.cat([video.flatten(2), pose.flatten(2)], dim=2).transpose(1, 2)
        # .to() returns a float32 model's transposed view as it is: the fused kernels need unit feature stride
        tokens = tokens.to(torch.float32).contiguous()
        e, e0 = self.embed_time(t)
        return Embedded(tokens, e, e0, self._rope(grid, cond.replace, tokens.device), grid)

    def _rope(
        self, grid: tuple[int, int, int], replace_flag: bool, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (grid, bool(replace_flag), device)
        if self._freqs_cache is None or self._freqs_cache[0] != key:
            self._freqs_cache = (key, rope_freqs(self.config.head_dim, grid, replace_flag, device=device))
        return self._freqs_cache[1]

    # ---- blocks and head --------------------------------------------------------------------------------------

    def run_blocks(self, emb: Embedded, context: torch.Tensor, kernels: Kernels) -> torch.Tensor:
        """The block loop; each block called once, in order, as `block(x, e0, context, freqs, kernels)`."""
        x = emb.x
        for block in self.blocks:
            x = block(x, emb.e0, context, emb.freqs, kernels)
        return x

    def unembed(self, x: torch.Tensor, e: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Head on the video tokens only (ref skipped, pose dropped), unpatchified to (B, out_dim, T, H, W) float32."""
        f, h, w = grid
        pt, ph, pw = self.config.patch_size
        video = x[:, h * w : h * w + f * h * w]
        out = self.head(video, e).view(x.shape[0], f, h, w, pt, ph, pw, self.config.out_dim)
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], self.config.out_dim, f * pt, h * ph, w * pw)

    # ---- forward ----------------------------------------------------------------------------------------------

    def forward_with_context(self, x: torch.Tensor, t: torch.Tensor, context_emb: torch.Tensor, cond: Conditions,
                             kernels: Kernels = Kernels(), cache: BlockCache | None = None) -> torch.Tensor:
        """`forward` with the context already embedded by `embed_context` (cached across sampling steps). With a
        step `cache`, the block stack may be replaced by its cached residual (stepcache.py)."""
        emb = self.embed(x, t, cond)
        if cache is None:
            out = self.run_blocks(emb, context_emb, kernels)
        else:
            out = cache.run_blocks(emb, lambda: self.run_blocks(emb, context_emb, kernels))
        return self.unembed(out, emb.e, emb.grid)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, clip_fea: torch.Tensor,
                cond: Conditions, kernels: Kernels = Kernels()) -> torch.Tensor:
        """Predict the flow for x (B, 16, T, H, W); returns (B, 16, T, H, W) in float32, like upstream.

        t (B,) timesteps on the 0..1000 scale; context (B, <= text_len, text_dim); clip_fea (B, 257, clip_dim).
        """
        return self.forward_with_context(x, t, self.embed_context(context, clip_fea), cond, kernels)
