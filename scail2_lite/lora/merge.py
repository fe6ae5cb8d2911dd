"""Adding mapped LoRAs to weights: full-precision state dicts and models, 8-bit weights (dequantize, add,
requantize), or a low-rank side path beside a quantized Linear.

All math is fp32 (deltas summed over LoRAs, added, cast back once): upstream forms `up @ down` in the LoRA's dtype
before the cast, which rounds once more; the fp32 sum is the exact value both approximate.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .mapping import LoRA, LoraUpdate


def summed_delta(
    updates: list[tuple[LoraUpdate, float]], shape: torch.Size, device: torch.device | str | None = None
) -> torch.Tensor:
    """Sum of strength * delta over several LoRAs' updates of one parameter, in fp32."""
    total = torch.zeros(shape, dtype=torch.float32, device=device)
    for u, s in updates:
        total.add_(u.delta(shape, device), alpha=s)
    return total


def merge_tensor(name: str, tensor: torch.Tensor, index: dict[str, list[tuple[LoraUpdate, float]]]) -> torch.Tensor:
    """`tensor` with every LoRA update for `name` added in fp32, cast back; unchanged when nothing targets it.

    For streaming writers (`quantize --lora`): build `index` once with `lora_index(loras)`.
    """
    ups = index.get(name)
    if not ups:
        return tensor
    merged = tensor.to(torch.float32) + summed_delta(ups, tensor.shape, tensor.device)
    return merged.to(tensor.dtype)


def lora_index(loras: Iterable[tuple[LoRA, float]]) -> dict[str, list[tuple[LoraUpdate, float]]]:
    """Updates of several (LoRA, strength) pairs grouped by target parameter name."""
    out: dict[str, list[tuple[LoraUpdate, float]]] = defaultdict(list)
    for lora, strength in loras:
        for u in lora.updates:
            out[u.target].append((u, strength))
    return dict(out)


def _check_targets(index: dict[str, list], names: Iterable[str], where: str) -> None:
    missing = sorted(set(index) - set(names))
    if missing:
        raise UserError(f"LoRA targets {missing[0]} (and {len(missing) - 1} more) but {where} has no such tensor")


def merge_into_state_dict(state: dict[str, torch.Tensor], loras: list[tuple[LoRA, float]]) -> dict[str, torch.Tensor]:
    """Add the LoRAs to a full-precision state dict in place (fp32 accumulate, cast back) and return it."""
    index = lora_index(loras)
    _check_targets(index, state, "the state dict")
    for name in index:
        state[name] = merge_tensor(name, state[name], index)
    return state


@torch.no_grad()
def merge_into_model(model: nn.Module, loras: list[tuple[LoRA, float]]) -> nn.Module:
    """Add the LoRAs to an unquantized (bf16/fp32) model's parameters in place."""
    params = dict(model.named_parameters())
    index = lora_index(loras)
    _check_targets(index, params, "the model")
    for name in index:
        p = params[name]
        p.copy_(merge_tensor(name, p.data, index))
    return model


# ---------------------------------------------------------------- 8-bit weights: requantized merge or side path

_QUANT_SCHEME_OF_DTYPE = {torch.int8: "int8", torch.float8_e4m3fn: "fp8"}


def merge_quantized(
    qweight: torch.Tensor, scale: torch.Tensor, delta: torch.Tensor, smooth: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(int8|fp8 weight, per-row fp32 scale, int8's column factors) + fp32 delta -> requantized weight with new
    per-row scales and column factors (same scheme and stored layout, int8 rotated; factors None for fp8)."""
    from ..quantize.schemes import dequantize, quantize_linear

    scheme = _QUANT_SCHEME_OF_DTYPE.get(qweight.dtype)
    if scheme is None:
        raise ValueError(f"merge_quantized: {qweight.dtype} is not a quantized storage dtype")
    return quantize_linear(dequantize(qweight, scale, smooth=smooth).add_(delta.to(qweight.device)), scheme)


def merge_block(
    block_state: dict[str, torch.Tensor],
    index: dict[str, list[tuple[LoraUpdate, float]]],
    prefix: str = "",
) -> dict[str, torch.Tensor]:
    """A block's tensors with the LoRAs merged, for a streamer that merges as blocks arrive.

    `block_state` keys are relative to `prefix` (e.g. prefix "blocks.7.", key "self_attn.q.weight"). Quantized
    weights (int8/fp8 storage) are dequantized, merged in fp32 and requantized with fresh per-row scales and
    column factors (QuantLinear's `<layer>.scale` and `<layer>.smooth`); other tensors are merged in fp32 and
    cast back. Returns a new dict (inputs untouched).
    """
    out = dict(block_state)
    for key, t in block_state.items():
        ups = index.get(prefix + key)
        if not ups:
            continue
        if t.dtype in _QUANT_SCHEME_OF_DTYPE:
            layer = key.removesuffix("weight")
            q, scale, smooth = merge_quantized(t, block_state[layer + "scale"], summed_delta(ups, t.shape, t.device),
                                               block_state.get(layer + "smooth"))
            out[key], out[layer + "scale"] = q, scale
            if smooth is not None:
                out[layer + "smooth"] = smooth
        else:
            out[key] = merge_tensor(prefix + key, t, index)
    return out


class LoraSidePath(nn.Module):
    """`base(x) + (x @ down.T) @ up.T`: a LoRA beside a (quantized) linear, leaving its weights untouched.

    Several LoRAs are stacked along the rank dimension with their scale * strength folded into `up`, so the side
    path costs two thin matmuls whatever the number of LoRAs. `set_factors` swaps them per streamed block.
    """

    def __init__(self, base: nn.Module, down: torch.Tensor, up: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("down", down, persistent=False)
        self.register_buffer("up", up, persistent=False)

    def set_factors(self, down: torch.Tensor, up: torch.Tensor) -> None:
        self.down, self.up = down, up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if getattr(self.base, "input_gelu", False):  # the FFN's GELU was folded into the quantized base
            x = F.gelu(x, approximate="tanh")
        side = (x.to(self.down.dtype) @ self.down.T) @ self.up.T
        return y + side.to(y.dtype)


def side_factors(
    updates: list[tuple[LoraUpdate, float]],
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the low-rank updates of one Linear into (down (R, in), up (out, R)), scale * strength folded into up."""
    downs = [u.down.to(device=device, dtype=torch.float32) for u, _ in updates]
    ups = [u.up.to(device=device, dtype=torch.float32) * (u.scale * s) for u, s in updates]
    return torch.cat(downs).to(dtype), torch.cat(ups, dim=1).to(dtype)


@torch.no_grad()
def apply_side_path(
    module: nn.Module,
    index: dict[str, list[tuple[LoraUpdate, float]]],
    prefix: str = "",
    dtype: torch.dtype = torch.bfloat16,
) -> nn.Module:
    """Wrap every Linear-like child of `module` (named `prefix` + child) that a low-rank update targets in a
    `LoraSidePath`; full deltas (`diff`, biases, norms, modulation) are merged into unquantized parameters directly.
    A full delta on a quantized weight has no side path: merge that file with `merge_block` or `quantize --lora`.
    """
    children = dict(module.named_modules())
    params = {**dict(module.named_parameters()), **dict(module.named_buffers())}  # QuantLinear: buffers
    for target, ups in index.items():
        if not target.startswith(prefix):
            continue
        rel = target[len(prefix) :]
        low_rank = [(u, s) for u, s in ups if u.diff is None]
        full = [(u, s) for u, s in ups if u.diff is not None]
        if full:
            if rel not in params or params[rel].dtype in _QUANT_SCHEME_OF_DTYPE:
                raise UserError(f"LoRA full delta for {target} needs a merge into the weights (use quantize --lora)")
            params[rel].add_(summed_delta(full, params[rel].shape, params[rel].device).to(params[rel].dtype))
        if low_rank:
            mod_name = rel.removesuffix(".weight")
            child = children.get(mod_name)
            if child is None or not rel.endswith(".weight"):
                raise UserError(f"LoRA low-rank update for {target}: the model has no such layer here")
            down, up = side_factors(low_rank, dtype, child.weight.device)
            parent_name, _, attr = mod_name.rpartition(".")
            parent = children[parent_name] if parent_name else module
            setattr(parent, attr, LoraSidePath(child, down, up))
    return module
