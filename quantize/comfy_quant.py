"""ComfyUI's per-layer quantized single files (`comfy_quant`): Comfy-Org's `mxfp8` and `int8_convrot` repacks (and
the `float8_e4m3fn` layers of the same convention), read into our layouts; and written, for the synthetic maker.

The convention (ComfyUI `comfy/ops.py` mixed-precision ops, comfy-kitchen `tensor/mxfp8.py`, `tensor/int8.py`,
`float_utils.py`), per quantized Linear `<layer>`:
- `<layer>.comfy_quant`: uint8 bytes of a JSON object whose "format" names the layout (plus "convrot",
  "convrot_groupsize" for INT8); the file header may repeat it under `_quantization_metadata`.
- `<layer>.weight`: the quantized weight (out, in); `<layer>.weight_scale`: its scales; an optional
  `<layer>.input_scale` (static activation scale) that a dynamic-activation runtime does not use.
- "float8_e4m3fn": one float32 scale for the tensor: w = q * scale.
- "mxfp8": float8_e4m3fn q with one E8M0 exponent (a uint8, bias 127; 0 means a zero block) per 32 consecutive
  inputs of a row, stored swizzled in cuBLAS's block-scaling layout (128 x 4 tiles, see `swizzle`), rows padded to
  128 and blocks to 4: w = q * 2^(e - 127) blockwise. Weights are padded to multiples of 32 (none of Wan's are).
- "int8_tensorwise" with "convrot": per-row float32 scales (out, 1) of a weight rotated blockwise by ConvRot's
  regular Hadamard (Kronecker powers of a symmetric 4 x 4 with one -1 per row, normalized; groups of 256):
  w = (q * scale) @ H per group (H is symmetric and its own inverse).

Into our layouts: float8 per-tensor -> FP8 per-row scales repeating it (exact). mxfp8 -> FP8 with one power-of-two
scale per row, the largest block scale of the row: every block's values are multiplied by a power of two <= 1,
exact unless they fall below FP8's normal range (the error is measured and returned). int8_convrot -> our INT8
layout if its rotation matched ours, but it never does (ours: Sylvester Hadamard blocks of 64 with per-column
factors, schemes.py), so the weights are dequantized and quantized again (the added error is measured). Layers
outside the block Linears (which we keep in high precision) are dequantized.
"""

from __future__ import annotations

import functools
import json
from typing import Iterable, Iterator

import torch

from .schemes import (
    FP8_DTYPE,
    FP8_MAX,
    INT8_MAX,
    QuantizeError,
    dequantize,
    is_quantized_name,
    quantize_linear,
    relative_error,
)
from .store import PreQuantized

CONFIG_SUFFIX = ".comfy_quant"
SCALE_SUFFIX = ".weight_scale"
INPUT_SCALE_SUFFIX = ".input_scale"
METADATA_KEY = "_quantization_metadata"
MXFP8_BLOCK = 32
E8M0_BIAS = 127
CONVROT_GROUP = 256
# File-level name (what `inspect` shows after "comfy-") of each layer format, and the scheme each file maps to.
FILE_NAMES = {"float8_e4m3fn": "fp8", "mxfp8": "mxfp8", "int8_convrot": "int8_convrot"}
FILE_SCHEMES = {"fp8": "fp8", "mxfp8": "fp8", "int8_convrot": "int8"}


def parse_config(raw: torch.Tensor | bytes) -> dict:
    """A layer's `comfy_quant` JSON (uint8 tensor or bytes) as a dict with a "format"."""
    data = bytes(raw.to(torch.uint8).tolist()) if isinstance(raw, torch.Tensor) else raw
    try:
        conf = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QuantizeError(f"unreadable comfy_quant layer config ({e})") from None
    if not isinstance(conf, dict) or "format" not in conf:
        raise QuantizeError(f"comfy_quant layer config without a format: {conf!r}")
    return conf


def layer_format(conf: dict) -> str:
    """The layer's format as we name it: float8_e4m3fn, mxfp8 or int8_convrot (anything else is refused)."""
    fmt = conf["format"]
    if fmt == "int8_tensorwise" and conf.get("convrot"):
        return "int8_convrot"
    if fmt in ("float8_e4m3fn", "mxfp8"):
        return fmt
    detail = " without convrot" if fmt == "int8_tensorwise" else ""
    raise QuantizeError(f"ComfyUI quantization format {fmt!r}{detail} is not supported (supported: float8_e4m3fn, "
                        "mxfp8, int8_tensorwise with convrot); use the fp16 or fp8_scaled file")


def file_format(configs: Iterable[dict]) -> str:
    """The file's format name from its layers' configs: one layer format (e.g. "mxfp8"), or an error."""
    found = {layer_format(c) for c in configs}
    if len(found) != 1:
        raise QuantizeError(f"ComfyUI file mixes quantization formats {sorted(found)}; expected one")
    return FILE_NAMES[found.pop()]


# ---------------------------------------------------------------- MXFP8

def swizzle(exponents: torch.Tensor) -> torch.Tensor:
    """(rows, blocks) per-block scales -> cuBLAS's block-scaling layout, (pad128(rows), pad4(blocks)): 128 x 4
    tiles in row-major tile order, and inside a tile the entry of row r, column c at (r % 32) * 16 + (r // 32) * 4
    + c."""
    rows, blocks = exponents.shape
    nr, nc = -(-rows // 128), -(-blocks // 4)
    padded = exponents.new_zeros(nr * 128, nc * 4)
    padded[:rows, :blocks] = exponents
    tiles = padded.reshape(nr, 4, 32, nc, 4).permute(0, 3, 2, 1, 4)  # (tile row, tile col, r % 32, r // 32, c)
    return tiles.reshape(nr * 128, nc * 4).contiguous()


def unswizzle(stored: torch.Tensor, rows: int, blocks: int) -> torch.Tensor:
    """Inverse of `swizzle`: the (rows, blocks) scales from the stored layout."""
    nr, nc = -(-rows // 128), -(-blocks // 4)
    if stored.numel() != nr * 128 * nc * 4:
        raise QuantizeError(f"mxfp8 scales hold {stored.numel()} values; a ({rows}, {rows and blocks * MXFP8_BLOCK}) "
                            f"weight needs {nr * 128 * nc * 4}")
    tiles = stored.reshape(nr, nc, 32, 4, 4).permute(0, 3, 2, 1, 4)  # (tile row, r // 32, r % 32, tile col, c)
    return tiles.reshape(nr * 128, nc * 4)[:rows, :blocks]


def _block_scales(exponents: torch.Tensor) -> torch.Tensor:
    """E8M0 exponents (uint8) -> float32 scales, 0 for the zero-block code 0 (as ComfyUI decodes them)."""
    e = exponents.to(torch.int32)
    return torch.where(e == 0, 0.0, torch.exp2((e - E8M0_BIAS).to(torch.float32)))


def _mxfp8_parts(q: torch.Tensor, stored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q as float32 (rows, blocks, 32), block scales (rows, blocks)) of a (possibly padded) mxfp8 weight."""
    rows, cols = q.shape
    if cols % MXFP8_BLOCK:
        raise QuantizeError(f"mxfp8 weight of width {cols}: not a multiple of {MXFP8_BLOCK}")
    scales = _block_scales(unswizzle(stored.view(torch.uint8), rows, cols // MXFP8_BLOCK))
    return q.to(torch.float32).reshape(rows, cols // MXFP8_BLOCK, MXFP8_BLOCK), scales


def dequantize_mxfp8(q: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """An mxfp8 weight as float32."""
    values, scales = _mxfp8_parts(q, stored)
    return (values * scales[..., None]).reshape(q.shape)


def mxfp8_to_rowwise(q: torch.Tensor, stored: torch.Tensor, measure: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """(fp8 weight, per-row float32 scale, relative error vs the mxfp8 weight if `measure`) in our FP8 layout:
    each row's scale is its largest block scale, every block is multiplied by its power-of-two ratio to it."""
    values, scales = _mxfp8_parts(q, stored)
    row = scales.amax(dim=1)
    row = torch.where(row > 0, row, torch.ones_like(row))  # an all-zero row: scale 1, zeros stay zeros
    rowwise = (values * (scales / row[:, None])[..., None]).reshape(q.shape).to(FP8_DTYPE)
    if not measure:
        return rowwise, row, None
    exact = (values * scales[..., None]).reshape(q.shape)
    return rowwise, row, relative_error(exact, rowwise.to(torch.float32) * row[:, None])


def quantize_mxfp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, swizzled uint8 E8M0 scales) of an (out, in) weight, in=multiple of 32: each block's exponent
    is the smallest power of two that brings its largest value within FP8's 448 (ComfyUI's rounding up)."""
    rows, cols = w.shape
    if cols % MXFP8_BLOCK:
        raise QuantizeError(f"mxfp8 needs the input width to be a multiple of {MXFP8_BLOCK}, got {cols}")
    blocks = w.detach().to(torch.float32).reshape(rows, cols // MXFP8_BLOCK, MXFP8_BLOCK)
    amax = blocks.abs().amax(dim=-1)
    exp = torch.ceil(torch.log2((amax / FP8_MAX).clamp_min(2.0**-127))).to(torch.int32) + E8M0_BIAS
    exp = torch.where(amax > 0, exp.clamp(1, 254), torch.zeros_like(exp))
    scales = _block_scales(exp)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = (blocks / safe[..., None]).clamp(-FP8_MAX, FP8_MAX).reshape(rows, cols).to(FP8_DTYPE)
    return q, swizzle(exp.to(torch.uint8))


# ---------------------------------------------------------------- INT8 ConvRot

@functools.lru_cache(maxsize=None)
def regular_hadamard(n: int) -> torch.Tensor:
    """ConvRot's normalized regular Hadamard matrix of order n (a power of 4), float32: symmetric, orthogonal."""
    if n < 4 or n & (n - 1) or (n.bit_length() - 1) % 2:
        raise QuantizeError(f"ConvRot group size must be a power of 4, got {n}")
    h4 = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=torch.float64)
    h = h4
    while h.shape[0] < n:
        h = torch.kron(h, h4)
    return (h / n**0.5).to(torch.float32)


def _rotate_groups(w: torch.Tensor, group: int) -> torch.Tensor:
    """(out, in) float32 with every `group` consecutive columns multiplied by the regular Hadamard matrix."""
    out_f, in_f = w.shape
    if in_f % group:
        raise QuantizeError(f"ConvRot group size {group} does not divide the input width {in_f}")
    return (w.reshape(out_f, in_f // group, group) @ regular_hadamard(group).to(w.device)).reshape(out_f, in_f)


def dequantize_int8_convrot(q: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """An int8_convrot weight as float32: per-row (or per-tensor) scale, then the rotation back."""
    s = scale.to(torch.float32).reshape(-1, 1) if scale.numel() > 1 else scale.to(torch.float32).reshape(())
    return _rotate_groups(q.to(torch.float32) * s, group)


def quantize_int8_convrot(w: torch.Tensor, group: int = CONVROT_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 per-row scale (out, 1)) in ConvRot's layout: rotate, then round each row to 127."""
    rotated = _rotate_groups(w.detach().to(torch.float32), group)
    scale = (rotated.abs().amax(dim=1, keepdim=True) / INT8_MAX).clamp_min(1e-30)
    return (rotated / scale).round_().clamp_(-128, 127).to(torch.int8), scale


# ---------------------------------------------------------------- reading a file's tensor stream

def _convert(name: str, layer: dict[str, torch.Tensor], conf: dict, scheme: str,
             measure: bool) -> torch.Tensor | PreQuantized:
    """One quantized layer's weight, in our layout when `scheme` is its natural one (a block Linear), else
    dequantized to float32; `measure`: record the error the conversion added."""
    fmt = layer_format(conf)
    q, scale = layer["weight"], layer["weight_scale"]
    block_linear = is_quantized_name(name)
    if fmt == "float8_e4m3fn":
        if scale.numel() != 1:
            raise QuantizeError(f"{name}: float8_e4m3fn with {scale.numel()} scales; only per-tensor is supported")
        row = scale.to(torch.float32).reshape(1).expand(q.shape[0]).clone()
        return PreQuantized(q, row, "fp8", error=0.0) if block_linear and scheme == "fp8" else dequantize(q, row)
    if fmt == "mxfp8":
        if block_linear and scheme == "fp8":
            rowwise, row, err = mxfp8_to_rowwise(q, scale, measure)
            return PreQuantized(rowwise, row, "fp8", error=err)
        return dequantize_mxfp8(q, scale)
    w = dequantize_int8_convrot(q, scale, int(conf.get("convrot_groupsize", CONVROT_GROUP)))
    if block_linear and scheme == "int8":
        ours, s, smooth = quantize_linear(w, "int8")
        err = relative_error(w, dequantize(ours, s, smooth=smooth)) if measure else None
        return PreQuantized(ours, s, "int8", smooth=smooth, error=err)
    return w


def _to_cpu(item: torch.Tensor | PreQuantized) -> torch.Tensor | PreQuantized:
    if isinstance(item, torch.Tensor):
        return item.cpu()
    smooth = None if item.smooth is None else item.smooth.cpu()
    return PreQuantized(item.qweight.cpu(), item.scale.cpu(), item.scheme, smooth, item.error)


def from_comfy_quant(items: Iterable[tuple[str, torch.Tensor]], scheme: str, measure: bool = False,
                     device: torch.device | str | None = None) -> Iterator[tuple[str, torch.Tensor | PreQuantized]]:
    """A comfy_quant file's (Wan name, tensor) stream -> our writer's/loader's input. Block Linears whose format maps
    onto `scheme` (fp8: float8_e4m3fn and mxfp8; int8: int8_convrot) become `PreQuantized` in our layout, with the
    error the conversion added when `measure` (a third of the conversion's time: for `quantize`'s report, not for
    loading); every other quantized layer is dequantized to float32; input scales are dropped. Holds only the
    parts of the layer in flight (a file's tensors of one layer are stored together). The conversions compute on
    `device` (default: the GPU when there is one; an int8_convrot layer takes seconds on a CPU) and their results
    come back to the CPU."""
    work = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in items:
        if name.endswith(INPUT_SCALE_SUFFIX):
            continue
        for suffix, part in ((CONFIG_SUFFIX, "config"), (SCALE_SUFFIX, "weight_scale"), (".weight", "weight")):
            if name.endswith(suffix) and (part != "weight" or t.dtype in (torch.int8, FP8_DTYPE)):
                layer = name.removesuffix(suffix)
                parts = pending.setdefault(layer, {})
                parts[part] = t
                if len(parts) == 3:
                    del pending[layer]
                    conf = parse_config(parts["config"])
                    on_device = {k: v.to(work) for k, v in parts.items() if k != "config"}
                    yield f"{layer}.weight", _to_cpu(_convert(f"{layer}.weight", on_device, conf, scheme, measure))
                break
        else:
            yield name, t
    if pending:
        layer, parts = next(iter(pending.items()))
        missing = {"config", "weight_scale", "weight"} - set(parts)
        raise QuantizeError(f"ComfyUI quantized file: layer {layer!r} lacks its {', '.join(sorted(missing))}")


# ---------------------------------------------------------------- writing (the synthetic maker)

def convrot_group(in_features: int) -> int:
    """ConvRot's group for a layer: 256 (every SCAIL-2 14B Linear), else the largest power of 4 dividing the width
    (the tiny synthetic model's 64- and 128-wide layers)."""
    group = CONVROT_GROUP
    while group > 4 and in_features % group:
        group //= 4
    return group


def layer_config(file_fmt: str, in_features: int) -> dict:
    """The comfy_quant config Comfy-Org's `file_fmt` repack (mxfp8 or int8_convrot) gives a quantized layer."""
    if file_fmt == "mxfp8":
        return {"format": "mxfp8"}
    if file_fmt == "int8_convrot":
        return {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": convrot_group(in_features),
                "per_row": True}
    raise QuantizeError(f"cannot write ComfyUI format {file_fmt!r}; choose mxfp8 or int8_convrot")


def _config_tensor(file_fmt: str, in_features: int) -> torch.Tensor:
    return torch.tensor(list(json.dumps(layer_config(file_fmt, in_features)).encode("utf-8")), dtype=torch.uint8)


def comfy_quant_layout(name: str, shape: tuple[int, int], file_fmt: str) -> dict[str, tuple[tuple[int, ...],
                                                                                         torch.dtype]]:
    """Key -> (shape, dtype) of the tensors `comfy_quant_tensors` writes for the (out, in) Linear weight `name`."""
    layer, (rows, cols) = name.removesuffix(".weight"), shape
    if file_fmt == "mxfp8":
        weight, scale = FP8_DTYPE, ((-(-rows // 128) * 128, -(-cols // (MXFP8_BLOCK * 4)) * 4), torch.uint8)
    else:
        weight, scale = torch.int8, ((rows, 1), torch.float32)
    return {name: ((rows, cols), weight), layer + SCALE_SUFFIX: scale,
            layer + CONFIG_SUFFIX: (tuple(_config_tensor(file_fmt, cols).shape), torch.uint8)}


def comfy_quant_tensors(name: str, w: torch.Tensor, file_fmt: str) -> dict[str, torch.Tensor]:
    """The tensors ComfyUI stores for the Linear weight `name` (`<layer>.weight`) in `file_fmt` (mxfp8 or
    int8_convrot): weight, weight_scale and the comfy_quant config, in `comfy_quant_layout`'s order."""
    layer = name.removesuffix(".weight")
    config = _config_tensor(file_fmt, w.shape[1])
    q, scale = quantize_mxfp8(w) if file_fmt == "mxfp8" else quantize_int8_convrot(w, convrot_group(w.shape[1]))
    return {name: q, layer + SCALE_SUFFIX: scale, layer + CONFIG_SUFFIX: config}


def quantization_metadata(layers: dict[str, dict]) -> str:
    """The `_quantization_metadata` header entry ComfyUI writes beside the per-layer configs."""
    return json.dumps({"format_version": "1.0", "layers": layers})
