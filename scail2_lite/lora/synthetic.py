"""Synthetic LoRA state dicts in every layout `keys` reads (the synthetic checkpoint maker and the tests use them)."""

from __future__ import annotations

import math

import torch

from ..errors import UserError
from .keys import BLOCK_LINEARS, LAYOUTS, SAT_LORA_LINEARS, LoraLayout, file_key

# Layouts whose files carry `.alpha` (the others fold alpha into the matrices, or have none: upstream's files).
_ALPHA_LAYOUTS = ("kohya", "comfy")
# Layouts that can spell full patches on norms and the modulation (`.diff`, `diff_m`).
_PATCH_LAYOUTS = ("kohya", "comfy", "wan")
I2V_IN_CHANNELS = 36  # Wan2.1-I2V's patch embedding: 16 noise + 4 mask + 16 image-latent channels


def make_synthetic_lora(
    model_shapes: dict[str, torch.Size],
    fmt: LoraLayout,
    rank: int = 4,
    seed: int = 0,
    targets: tuple[str, ...] | None = None,
    include_diffs: bool = False,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor]:
    """A LoRA state dict for the model of `model_shapes`, laid out as real files of `fmt` are.

    `targets` are block-relative Linear names (`self_attn.q`) or top-level ones (`head.head`, `patch_embedding`);
    by default every block Linear (SCAIL-2's own ten for "sat"). Every layout encodes the same effective deltas for
    a given seed and targets (kohya/comfy carry alpha = rank / 2; the others have no alpha, so that 0.5 is folded
    into up, exactly). `include_diffs` adds full deltas the way LightX2V files do: biases of the targeted layers in
    every layout (`diff_b`, or PEFT's `lora_B.bias`), and for kohya/comfy/wan also `norm3` weight+bias, q/k RMSNorm
    weights and the block modulation (`diff_m`)."""
    if fmt not in LAYOUTS:
        raise UserError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(LAYOUTS)}")
    targets = targets or (SAT_LORA_LINEARS if fmt == "sat" else BLOCK_LINEARS)
    g = torch.Generator().manual_seed(seed)
    alpha_in_file = fmt in _ALPHA_LAYOUTS
    out: dict[str, torch.Tensor] = {}

    def rand(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    blocks = sorted({int(k.split(".")[1]) for k in model_shapes if k.startswith("blocks.")})
    modules = [f"blocks.{b}.{t}" for b in blocks for t in targets] + list(targets)
    modules = [m for m in modules if f"{m}.weight" in model_shapes]
    if not modules:
        raise UserError(f"make_synthetic_lora: none of the targets {targets} is in the model")
    for m in modules:
        shape = model_shapes[f"{m}.weight"]
        fan_in = math.prod(shape[1:])
        down = rand(rank, *shape[1:], std=fan_in**-0.5)
        up = rand(shape[0], rank, *([1] * (len(shape) - 2)), std=rank**-0.5)
        out[file_key(m, fmt, "down")] = down.to(dtype)
        if alpha_in_file:
            out[file_key(m, fmt, "up")] = up.to(dtype)
            out[file_key(m, fmt, "alpha")] = torch.tensor(rank / 2, dtype=dtype)
        else:
            out[file_key(m, fmt, "up")] = (up.to(dtype) * 0.5).to(dtype)
        if include_diffs and f"{m}.bias" in model_shapes:
            out[file_key(m, fmt, "diff_b")] = rand(*model_shapes[f"{m}.bias"], std=0.02).to(dtype)
    if include_diffs and fmt in _PATCH_LAYOUTS:
        for b in blocks:
            for norm in ("norm3", "self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_k_img"):
                m = f"blocks.{b}.{norm}"
                out[file_key(m, fmt, "diff")] = rand(*model_shapes[f"{m}.weight"], std=0.02).to(dtype)
                if f"{m}.bias" in model_shapes:
                    out[file_key(m, fmt, "diff_b")] = rand(*model_shapes[f"{m}.bias"], std=0.02).to(dtype)
            modulation = rand(*model_shapes[f"blocks.{b}.modulation"], std=0.02)
            out[file_key(f"blocks.{b}", fmt, "diff_m")] = modulation.to(dtype)
    return out


def make_lightx2v_lora(model_shapes: dict[str, torch.Size], rank: int = 4, seed: int = 0,
                       dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The LightX2V step/CFG-distill LoRA as people have it (Wan2.1-I2V-14B-480p, ComfyUI names, no alpha): low-rank
    pairs on every block Linear with their `diff_b`, full `.diff` patches on the norms, `blocks.N.diff_m`, and a
    `patch_embedding` weight patch with Wan-I2V's 36 input channels (SCAIL-2's conv has 20) plus its `diff_b`."""
    out = make_synthetic_lora(model_shapes, "wan", rank=rank, seed=seed, include_diffs=True, dtype=dtype)
    weight = model_shapes["patch_embedding.weight"]
    g = torch.Generator().manual_seed(seed + 1)
    i2v = (weight[0], I2V_IN_CHANNELS, *weight[2:])
    out[file_key("patch_embedding", "wan", "diff")] = (torch.randn(*i2v, generator=g) * 0.02).to(dtype)
    out[file_key("patch_embedding", "wan", "diff_b")] = (torch.randn(weight[0], generator=g) * 0.02).to(dtype)
    return out
