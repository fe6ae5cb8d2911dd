"""The Wan2.1 causal video VAE as diffusers' `AutoencoderKLWan`, loaded from `Wan2.1_VAE.pth`.

diffusers' model is numerically Wan's; only the key converter, Wan's latent normalisation and a streaming,
optionally tiled decode are written here. The streaming decode drives diffusers' own causal cache (`feat_cache`) one
latent frame at a time, as `AutoencoderKLWan.decode` does internally, so it yields the same numbers while the caller
holds only one frame group at a time; `by_frame` runs the blocks past the last temporal upsampling one output frame
at a time (`_decode_chunk`): the same sums to fp32 rounding, one full-resolution frame's activations instead of four.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import CACHE_T, WanCausalConv3d, WanResample
from torch import Tensor

from .formats.assign import assign_state_dict
from .formats.pickles import load_pth
from .errors import UserError
from .vae_tiles import Tiling

VAE_FILE = "Wan2.1_VAE.pth"
_DIM_MULT = (1, 2, 4, 4)
_NUM_RES_BLOCKS = 2


def vae_config(scale: str) -> dict:
    """`AutoencoderKLWan` kwargs: Wan2.1 ("full", diffusers' defaults) or a narrow "tiny" with the same strides."""
    if scale == "full":
        base_dim = 96
    elif scale == "tiny":
        base_dim = 8
    else:
        raise UserError(f"unknown VAE scale {scale!r}; choose full or tiny")
    return _config(base_dim=base_dim, z_dim=16)


def _config(base_dim: int, z_dim: int) -> dict:
    return dict(
        base_dim=base_dim,
        z_dim=z_dim,
        dim_mult=list(_DIM_MULT),
        num_res_blocks=_NUM_RES_BLOCKS,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        dropout=0.0,
    )


def vae_config_from_state_dict(sd: Mapping[str, Tensor]) -> dict:
    """Width and latent channels from a Wan-named VAE state dict (the rest of the Wan2.1 layout is fixed)."""
    try:
        base_dim = sd["encoder.conv1.weight"].shape[0]
        z_dim = sd["conv2.weight"].shape[0]
    except KeyError as exc:
        raise UserError(f"not a Wan VAE state dict (no {exc.args[0]})") from None
    return _config(base_dim=base_dim, z_dim=z_dim)


# Wan's flat `downsamples` / `upsamples` lists vs diffusers' nested blocks. Encoder indices coincide (diffusers keeps
# a flat `down_blocks`); decoder level i holds 3 residual blocks then (except the last level) one upsampler.
_RES = {"residual.0.gamma": "norm1.gamma", "residual.2": "conv1", "residual.3.gamma": "norm2.gamma",
        "residual.6": "conv2", "shortcut": "conv_shortcut"}
_RES_INV = {v: k for k, v in _RES.items()}
_TOP = {"conv1": "quant_conv", "conv2": "post_quant_conv", "encoder.conv1": "encoder.conv_in",
        "decoder.conv1": "decoder.conv_in", "encoder.head.0": "encoder.norm_out", "encoder.head.2": "encoder.conv_out",
        "decoder.head.0": "decoder.norm_out", "decoder.head.2": "decoder.conv_out",
        "encoder.middle.0": "encoder.mid_block.resnets.0", "encoder.middle.1": "encoder.mid_block.attentions.0",
        "encoder.middle.2": "encoder.mid_block.resnets.1", "decoder.middle.0": "decoder.mid_block.resnets.0",
        "decoder.middle.1": "decoder.mid_block.attentions.0", "decoder.middle.2": "decoder.mid_block.resnets.1"}
_TOP_INV = {v: k for k, v in _TOP.items()}
_PER_LEVEL = _NUM_RES_BLOCKS + 2  # decoder: 3 residual blocks + 1 upsampler


def _map_residual(rest: str, table: dict[str, str]) -> str | None:
    """Rename the residual-block part of a key (`residual.2.weight` <-> `conv1.weight`); None if it is not one."""
    for src, dst in table.items():
        if rest == src or rest.startswith(src + "."):
            return dst + rest[len(src) :]
    return None


def _map_down(rest: str, table: dict[str, str]) -> str | None:
    """An encoder down block entry: a residual block (renamed) or a resample layer (same names on both sides)."""
    return _map_residual(rest, table) or (rest if rest.startswith(("resample.", "time_conv.")) else None)


def vae_wan_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Wan VAE names -> `AutoencoderKLWan` names. Tensors are shared, not copied."""
    out: dict[str, Tensor] = {}
    for key, t in sd.items():
        out[_wan_key_to_diffusers(key)] = t
    return out


def _wan_key_to_diffusers(key: str) -> str:
    prefix, _, leaf = key.rpartition(".")
    for src, dst in _TOP.items():
        if prefix == src:
            return f"{dst}.{leaf}"
        if prefix.startswith(src + "."):
            rest = prefix[len(src) + 1 :] + "." + leaf
            if src.endswith(("middle.0", "middle.2")):
                mapped = _map_residual(rest, _RES)
                if mapped is not None:
                    return f"{dst}.{mapped}"
            else:  # attention block: norm/to_qkv/proj keep their names
                return f"{dst}.{rest}"
    if m := re.fullmatch(r"encoder\.downsamples\.(\d+)\.(.+)", key):
        if (mapped := _map_down(m.group(2), _RES)) is not None:
            return f"encoder.down_blocks.{m.group(1)}.{mapped}"
    if m := re.fullmatch(r"decoder\.upsamples\.(\d+)\.(.+)", key):
        level, pos = divmod(int(m.group(1)), _PER_LEVEL)
        if pos < _NUM_RES_BLOCKS + 1 and (mapped := _map_residual(m.group(2), _RES)) is not None:
            return f"decoder.up_blocks.{level}.resnets.{pos}.{mapped}"
        if pos == _NUM_RES_BLOCKS + 1 and m.group(2).startswith(("resample.", "time_conv.")):
            return f"decoder.up_blocks.{level}.upsamplers.0.{m.group(2)}"
    raise UserError(f"unexpected key in Wan VAE checkpoint: {key}")


def vae_diffusers_to_wan(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of `vae_wan_to_diffusers` (writes Wan-format VAE files, e.g. the synthetic ones)."""
    return {_diffusers_key_to_wan(k): t for k, t in sd.items()}


def _diffusers_key_to_wan(key: str) -> str:
    prefix, _, leaf = key.rpartition(".")
    for dst, src in _TOP_INV.items():
        if prefix == dst:
            return f"{src}.{leaf}"
        if prefix.startswith(dst + "."):
            rest = prefix[len(dst) + 1 :] + "." + leaf
            if "resnets" in dst:
                mapped = _map_residual(rest, _RES_INV)
                if mapped is not None:
                    return f"{src}.{mapped}"
            else:
                return f"{src}.{rest}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", key):
        if (mapped := _map_down(m.group(2), _RES_INV)) is not None:
            return f"encoder.downsamples.{m.group(1)}.{mapped}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        if (mapped := _map_residual(m.group(3), _RES_INV)) is not None:
            return f"decoder.upsamples.{int(m.group(1)) * _PER_LEVEL + int(m.group(2))}.{mapped}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.upsamples.{int(m.group(1)) * _PER_LEVEL + _NUM_RES_BLOCKS + 1}.{m.group(2)}"
    raise UserError(f"unexpected key in AutoencoderKLWan state dict: {key}")


def build_vae(sd_wan: Mapping[str, Tensor]) -> AutoencoderKLWan:
    """An `AutoencoderKLWan` built on the meta device and filled with the given Wan tensors in place."""
    with torch.device("meta"):
        model = AutoencoderKLWan(**vae_config_from_state_dict(sd_wan))
    assign_state_dict(model, vae_wan_to_diffusers(sd_wan), "VAE")
    return model.eval()


class WanVAE:
    """Wan's VAE interface on diffusers' model: [-1,1] video <-> normalised latents, optional spatial tiling.

    `tile` (a `vae_tiles.Tiling`, or a square tile in pixels with `tile_stride`): a frame larger than the tile in
    either axis is processed in overlapping tiles blended linearly over `tile - stride` pixels (diffusers' scheme).
    Tiling changes the numbers slightly near seams; untiled is bit-identical to diffusers' and Wan's decode.
    """

    def __init__(self, model: AutoencoderKLWan, tile: int | Tiling | None = None,
                 tile_stride: int | None = None) -> None:
        self.model = model
        # cuDNN's algorithm search around encode and decode (`_convolutions`): off, its heuristics choose. A run
        # meets each convolution shape for the first time in its first decode, and the search costs more there than
        # it saves in the segments that follow, unless there are many (RESULTS.md, issue 23)
        self.search = False
        p = next(model.parameters())
        self.mean = torch.tensor(model.config.latents_mean, dtype=torch.float32, device=p.device).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(model.config.latents_std, dtype=torch.float32, device=p.device).view(1, -1, 1, 1, 1)
        self._decoder_convs = sum(isinstance(mod, WanCausalConv3d) for mod in model.decoder.modules())
        # Up blocks up to the last temporal upsampling take a latent frame's chunk whole; those after it (and the
        # head) mix nothing across frames but their causal convolutions, so they take one frame at a time
        self._by_frame_from = 1 + max(
            (i for i, block in enumerate(model.decoder.up_blocks)
             if any(isinstance(r, WanResample) and r.mode == "upsample3d" for r in block.upsamplers or ())),
            default=-1)
        self.set_tiling(tile, tile_stride)

    def set_tiling(self, tile: int | Tiling | None, tile_stride: int | None = None) -> None:
        """Turn spatial tiling on (a `Tiling`, or square tiles of `tile` pixels with a stride of 3/4 of it unless
        given) or off (`tile=None`)."""
        if tile is None:
            self.tiling = None
            self.model.disable_tiling()
            return
        tiling = tile if isinstance(tile, Tiling) else Tiling.square(tile, tile_stride)
        self.tiling = tiling
        self.model.enable_tiling(
            tile_sample_min_height=tiling.height, tile_sample_min_width=tiling.width,
            tile_sample_stride_height=tiling.stride_h, tile_sample_stride_width=tiling.stride_w,
        )

    def to(self, device: str | torch.device) -> "WanVAE":
        """Move the model and its normalisation statistics (the pipeline parks the VAE on CPU during DiT steps).
        On CUDA the convolution weights take the channels-last layout (NDHWC, cuDNN's fastest; the activations
        follow it): encode and decode ran faster on the H100 (RESULTS.md, issue 23)."""
        self.model.to(device)
        if torch.device(device).type == "cuda":
            for param in self.model.parameters():
                if param.ndim == 5:
                    param.data = param.data.contiguous(memory_format=torch.channels_last_3d)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    @property
    def _param(self) -> Tensor:
        return next(self.model.parameters())

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """(B,3,T,H,W) in [-1,1] -> (B,16,1+(T-1)//4,H/8,W/8) normalised latents (posterior mean, as Wan)."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise UserError(f"VAE expects video shaped (B, 3, T, H, W); got {tuple(video.shape)}")
        if video.shape[-1] % 8 or video.shape[-2] % 8:
            raise UserError(f"VAE input height and width must be multiples of 8; got {tuple(video.shape[-2:])}")
        p = self._param
        with _convolutions(p.device, None, self.search):
            mu = self.model.encode(video.to(p.device, p.dtype)).latent_dist.mode().float()
        return (mu - self.mean) / self.std

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents (B,16,Tl,h,w) -> video (B,3,1+4(Tl-1),8h,8w) in [-1,1]."""
        return torch.cat(list(self.decode_frames(latents)), dim=2)

    @torch.no_grad()
    def decode_frames(self, latents: Tensor, compute_dtype: torch.dtype | None = None,
                      by_frame: bool = False) -> Iterator[Tensor]:
        """Decode one latent frame at a time: yields (B,3,1,H,W) first, then (B,3,4,H,W) groups, in [-1,1].

        `compute_dtype` (bf16 on CUDA) runs the decoder's convolutions in that precision under autocast, its causal
        cache too (half the memory); normalisation statistics stay fp32. `by_frame`: see `_decode_chunk` (the
        planner's choice: it lets a larger tile fit, at some speed).

        Untiled, frames stream out as they are decoded (one causal cache). Tiled, each tile is decoded over the
        whole clip before the next (its own causal cache, as diffusers' `tiled_decode`), its frames parked in
        RAM, and the last tile's groups are blended with the parked ones as they come: the GPU holds one tile's
        cache instead of a full frame's (at 704p the full-frame fp32 cache alone exceeds a 16 GB card), and the
        caller gets frames (to encode the mp4 behind) while the last tile decodes. Groups are on the VAE's device
        (the parked tiles come back for the blend, one group at a time).
        """
        m, p = self.model, self._param
        z = (latents.float() * self.std + self.mean).to(p.device, p.dtype)
        _, _, frames, h, w = z.shape
        tiles = self._latent_tiles(h, w)
        parked: list[list[Tensor]] = []
        for n, (i, j, th, tw) in enumerate(tiles):
            last = n == len(tiles) - 1
            cache = [None] * self._decoder_convs
            with _convolutions(p.device, compute_dtype, self.search):
                x = m.post_quant_conv(z[:, :, :, i : i + th, j : j + tw])
            groups = []
            for k in range(frames):
                with _convolutions(p.device, compute_dtype, self.search):
                    group = self._decode_chunk(x[:, :, k : k + 1], cache, k == 0, by_frame).float()
                if len(tiles) == 1:
                    yield group.clamp(-1.0, 1.0)
                elif last:  # blended where it was decoded: the host thread only queues the work
                    group = self._blend([tile[k].to(group.device) for tile in parked] + [group], tiles, h, w)
                    yield group.clamp(-1.0, 1.0)
                else:
                    groups.append(group.cpu())
            parked.append(groups)
            del cache, x

    def _decode_chunk(self, x: Tensor, cache: list, first_chunk: bool, by_frame: bool) -> Tensor:
        """One latent frame (after `post_quant_conv`) through the decoder: `WanDecoder3d.forward` as is, or, with
        `by_frame`, with the blocks after the last temporal upsampling run one output frame at a time. Those mix
        frames only in their causal convolutions, which see the same frames through the cache (the previous ones'
        last two), so every output frame is the same sum. The GPU then holds one full-resolution frame's
        activations beside the caches instead of four (14,600 against 19,500 B per output pixel), but each frame
        copies its convolutions' cached frames again: slower per pixel (planner.VAE_DECODE_BY_FRAME_COST)."""
        if not by_frame:
            return self.model.decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=first_chunk)
        d, idx = self.model.decoder, [0]
        x = _cached_conv(d.conv_in, x, cache, idx)
        x = d.mid_block(x, feat_cache=cache, feat_idx=idx)
        for block in d.up_blocks[: self._by_frame_from]:
            x = block(x, feat_cache=cache, feat_idx=idx, first_chunk=first_chunk)
        start, frames = idx[0], []
        for t in range(x.shape[2]):
            idx[0] = start
            y = x[:, :, t : t + 1]
            for block in d.up_blocks[self._by_frame_from :]:
                y = block(y, feat_cache=cache, feat_idx=idx, first_chunk=first_chunk)
            frames.append(_cached_conv(d.conv_out, d.nonlinearity(d.norm_out(y)), cache, idx))
        return torch.cat(frames, dim=2)

    def _latent_tiles(self, h: int, w: int) -> list[tuple[int, int, int, int]]:
        """(row, col, height, width) latent windows in diffusers' order; one window when tiling is off or not needed."""
        return [(0, 0, h, w)] if self.tiling is None else self.tiling.windows(h, w)

    def _blend(self, decoded: list[Tensor], tiles: list[tuple[int, int, int, int]], h: int, w: int) -> Tensor:
        """Blend overlapping decoded tiles exactly as `AutoencoderKLWan.tiled_decode` does."""
        r, t = self.model.spatial_compression_ratio, self.tiling
        sh, sw = t.stride_h, t.stride_w
        bh, bw = t.height - sh, t.width - sw
        cols = len({j for _, j, _, _ in tiles})
        rows = [decoded[i : i + cols] for i in range(0, len(decoded), cols)]
        result = []
        for i, row in enumerate(rows):
            parts = []
            for j, tile in enumerate(row):
                if i > 0:
                    tile = blend_edge(rows[i - 1][j], tile, bh, dim=-2)
                if j > 0:
                    tile = blend_edge(row[j - 1], tile, bw, dim=-1)
                row[j] = tile
                parts.append(tile[:, :, :, :sh, :sw])
            result.append(torch.cat(parts, dim=-1))
        return torch.cat(result, dim=3)[:, :, :, : h * r, : w * r]


def blend_edge(a: Tensor, b: Tensor, extent: int, dim: int) -> Tensor:
    """diffusers' `blend_v` (dim -2) and `blend_h` (dim -1) in one step instead of a loop over the rows or columns:
    `b`'s first `extent` of them (in place) fade in from `a`'s last ones. The same fp32 weights and products, so the
    same bits; on the GPU a few launches instead of four per row or column."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent <= 0:
        return b
    shape = [1] * b.dim()
    shape[dim] = extent
    ramp = [x / extent for x in range(extent)]
    fade_in = torch.tensor(ramp, dtype=b.dtype, device=b.device).view(shape)
    fade_out = torch.tensor([1 - x for x in ramp], dtype=b.dtype, device=b.device).view(shape)
    head = b.narrow(dim, 0, extent)
    head.copy_(a.narrow(dim, a.shape[dim] - extent, extent) * fade_out + head * fade_in)
    return b


def _cached_conv(conv: WanCausalConv3d, x: Tensor, cache: list, idx: list[int]) -> Tensor:
    """A causal convolution outside a residual block (the decoder's first and last) with its cache, as
    `WanDecoder3d.forward` runs them: the conv sees the cached frames before `x`, then keeps `x`'s last two."""
    i = idx[0]
    keep = x[:, :, -CACHE_T:].clone()
    if keep.shape[2] < CACHE_T and cache[i] is not None:
        keep = torch.cat([cache[i][:, :, -1:].to(keep.device), keep], dim=2)
    out = conv(x, cache[i])
    cache[i] = keep
    idx[0] += 1
    return out


@contextmanager
def _convolutions(device: torch.device, dtype: torch.dtype | None, search: bool) -> Iterator[None]:
    """Autocast to `dtype` (None: as the weights) and, on CUDA, cuDNN with its algorithm search on or off (off:
    its heuristics' first choice); held only around the VAE's own calls, so nothing else in the process runs under
    these switches."""
    if device.type != "cuda":
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            yield
        return
    with torch.backends.cudnn.flags(enabled=True, benchmark=search, deterministic=False,
                                    allow_tf32=torch.backends.cudnn.allow_tf32):
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            yield


def load_vae(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    tile: int | Tiling | None = None,
    tile_stride: int | None = None,
) -> WanVAE:
    """The Wan2.1 VAE from `Wan2.1_VAE.pth` (fp32 upstream), wrapped with Wan's normalisation and optional tiling."""
    model = build_vae(load_pth(path)).to(device)
    if next(model.parameters()).dtype != dtype:  # diffusers warns on any dtype `.to()`, so only cast when needed
        model = model.to(dtype=dtype)
    return WanVAE(model, tile=tile, tile_stride=tile_stride)
