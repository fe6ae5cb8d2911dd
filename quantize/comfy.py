"""ComfyUI `fp8_scaled` single files: import as an already-FP8 source, export our FP8 DiT in that convention.

ComfyUI's convention (comfy/ops.py, comfy/model_detection.py): a Linear weight stored as float8_e4m3fn with a
per-tensor float32 `<layer>.scale_weight`, dequantized as `weight.to(dtype) * scale_weight`; an optional
`<layer>.scale_input` for static activation scales; and a `scaled_fp8` marker tensor whose dtype names the FP8
format. Keys may carry the `model.diffusion_model.` prefix.

A per-tensor scale is a per-channel scale with equal entries, so importing is exact (no requantization).
Exporting goes from per-channel to per-tensor scales, which costs precision on rows with a small range: the
added error is measured and returned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open

from .schemes import FP8_DTYPE, FP8_MAX, QuantizeError, dequantize, relative_error
from .store import PreQuantized, iter_quantized, read_manifest, save_tensors

MARKER = "scaled_fp8"
PREFIX = "model.diffusion_model."


def is_comfy_fp8_scaled(keys: Iterable[str]) -> bool:
    """True when the key list carries ComfyUI's `scaled_fp8` marker (with or without the model prefix)."""
    return any(k == MARKER or k == PREFIX + MARKER for k in keys)


def from_comfy_fp8(items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor | PreQuantized]]:
    """Turn a ComfyUI fp8_scaled (name, tensor) stream into our writer's input: FP8 weights with their per-tensor
    scale become `PreQuantized` per-channel weights (bit-exact), other tensors pass through, the marker and
    static input scales are dropped. Holds at most one weight or scale while waiting for its partner."""
    pending_w: dict[str, torch.Tensor] = {}
    pending_s: dict[str, torch.Tensor] = {}
    for key, t in items:
        name = key.removeprefix(PREFIX)
        if name == MARKER or name.endswith(".scale_input"):
            continue
        if name.endswith(".scale_weight"):
            layer = name.removesuffix(".scale_weight")
            if layer in pending_w:
                yield f"{layer}.weight", _prequantized(pending_w.pop(layer), t)
            else:
                pending_s[layer] = t
        elif t.dtype == FP8_DTYPE:
            layer = name.removesuffix(".weight")
            if layer in pending_s:
                yield name, _prequantized(t, pending_s.pop(layer))
            else:
                pending_w[layer] = t
        else:
            yield name, t
    if pending_w or pending_s:
        orphan = next(iter(pending_w or pending_s))
        raise QuantizeError(f"ComfyUI fp8_scaled file: {orphan!r} has a weight without scale_weight or vice versa")


def _prequantized(w: torch.Tensor, scale_weight: torch.Tensor) -> PreQuantized:
    if scale_weight.numel() != 1:
        raise QuantizeError(f"ComfyUI scale_weight with {scale_weight.numel()} values; only per-tensor is supported")
    scale = scale_weight.to(torch.float32).reshape(1).expand(w.shape[0]).clone()
    return PreQuantized(w, scale, "fp8")


def read_comfy_fp8(path: str | Path) -> Iterator[tuple[str, torch.Tensor | PreQuantized]]:
    """Lazily read a ComfyUI fp8_scaled safetensors file into writer input (see `from_comfy_fp8`)."""
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        if not is_comfy_fp8_scaled(keys):
            raise QuantizeError(f"{path} is not a ComfyUI fp8_scaled file (no {MARKER!r} marker)")
        yield from from_comfy_fp8((k, f.get_tensor(k)) for k in keys)


def to_comfy_tensors(items: Iterable[tuple[str, torch.Tensor]], manifest: dict) -> Iterator[tuple[str, torch.Tensor, float]]:
    """Our FP8 folder's tensors -> ComfyUI fp8_scaled tensors, with the added relative error per weight
    (per-tensor requantized vs our per-channel dequantized; 0 for passthrough tensors)."""
    tensors = manifest["dit"]["tensors"]
    scales = {e["scale"]: n for n, e in tensors.items() if e["scheme"] == "fp8"}
    waiting: dict[str, torch.Tensor] = {}
    for name, t in items:
        entry = tensors[name]
        partner = entry.get("scale") if entry["scheme"] == "fp8" else scales.get(name)
        if partner is None:
            yield name, t, 0.0
            continue
        if partner not in waiting:
            waiting[name] = t
            continue
        other = waiting.pop(partner)
        w, s = (t, other) if entry["scheme"] == "fp8" else (other, t)
        wname = name if entry["scheme"] == "fp8" else partner
        ours = dequantize(w, s)
        per_tensor = s.max().clamp_min(torch.finfo(torch.float32).tiny)
        w_comfy = (ours / per_tensor).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        err = relative_error(ours, w_comfy.to(torch.float32) * per_tensor)
        yield wname, w_comfy, err
        yield f"{wname.removesuffix('.weight')}.scale_weight", per_tensor.reshape(()).clone(), 0.0


def export_comfy(folder: str | Path, path: str | Path) -> dict[str, float]:
    """Write our FP8 folder as one ComfyUI fp8_scaled safetensors file (temporary name, then rename).

    Returns the added relative weight error per quantized layer. The whole file is assembled in memory
    (safetensors writes one file at once): ~17 GB for the 14B DiT in FP8."""
    manifest = read_manifest(folder)
    if manifest["dit"]["scheme"] != "fp8":
        raise QuantizeError(f"--export comfy needs an FP8 folder; {folder} is {manifest['dit']['scheme']}")
    out: dict[str, torch.Tensor] = {MARKER: torch.empty(0, dtype=FP8_DTYPE)}
    errors: dict[str, float] = {}
    for name, t, err in to_comfy_tensors(iter_quantized(folder), manifest):
        out[name] = t.contiguous()
        if t.dtype == FP8_DTYPE:
            errors[name] = err
    save_tensors(out, Path(path), {"format": "pt"})
    return errors
