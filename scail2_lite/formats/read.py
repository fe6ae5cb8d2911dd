"""Every DiT checkpoint format SCAIL-2 users have: detect it, read it lazily in Wan names, check its keys.

Formats: the official SAT pickle (`model/1/fsdp2_rank_0000_checkpoint.pt`, or the SCAIL-2 folder), the
upstream `convert.py` safetensors ("wan"), WanGP's file ("wangp"), ComfyUI single files ("comfy", and the
quantized ones: "comfy-fp8_scaled" (raw fp8 tensors + `*.scale_weight`), and the per-layer `comfy_quant`
convention, "comfy-mxfp8", "comfy-int8_convrot", "comfy-fp8", whose raw tensors + `*.weight_scale` +
`*.comfy_quant` are exposed for the loader and `quantize` to convert, see `quantize.comfy_quant`), sharded
safetensors with an index ("sharded"), and our quantized folder ("quantized", read by `quantize`).
Tensors are produced one at a time so a 65 GB fp32 SAT file never sits in RAM twice.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from ..config import PRESETS, DiTConfig
from ..errors import UserError
from .files import FilePages
from .keys import (
    AUX_SUFFIXES,
    COMFY_PREFIX,
    FP8_MARKER,
    SAFETENSORS_DTYPES,
    SAT_FILE,
    WANGP_RENAMES,
    key_problems,
    short_list,
    to_wan_names,
)
from .pickles import load_sat_pickle


def find_dit(path: str | Path) -> Path:
    """The DiT file inside a path: a file as is; a SCAIL-2 folder -> `model/<latest>/...pt`; else its index/single file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if path.is_file():
        return path
    if (path / "manifest.json").is_file():
        return path
    latest = path / "model" / "latest"
    if latest.is_file():
        sat = path / "model" / latest.read_text().strip() / SAT_FILE
        if not sat.is_file():
            raise UserError(f"{latest} points to iteration {latest.read_text().strip()!r} but {sat} is missing")
        return sat
    indexes = sorted(path.glob("*.safetensors.index.json"))
    singles = sorted(path.glob("*.safetensors"))
    if len(indexes) == 1:
        return indexes[0]
    if not indexes and len(singles) == 1:
        return singles[0]
    raise UserError(
        f"cannot tell which DiT checkpoint to use in {path}: expected model/latest (SCAIL-2 folder), "
        f"one *.safetensors.index.json or one *.safetensors (found {len(indexes)} indexes, {len(singles)} files)"
    )


@dataclass(frozen=True)
class _Entry:
    """One Wan-named tensor of a checkpoint, readable on demand."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    load: Callable[[], torch.Tensor]
    file: Path



def _pickle_entries(path: Path) -> Iterator[_Entry]:
    for src, tensor in load_sat_pickle(path).items():
        for name, shape, i, n in to_wan_names(src, tuple(tensor.shape)):
            load = (lambda t=tensor: t) if n == 1 else (lambda t=tensor, i=i, n=n: t.chunk(n, dim=0)[i])
            yield _Entry(name, shape, str(tensor.dtype).removeprefix("torch."), load, path)


def _safetensors_entries(path: Path) -> Iterator[_Entry]:
    try:
        handle = safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    with handle as f:
        for src in f.keys():
            sl = f.get_slice(src)
            shape, dtype = tuple(sl.get_shape()), SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype())
            for name, part_shape, i, n in to_wan_names(src, shape):

                def load(src: str = src, i: int = i, n: int = n) -> torch.Tensor:
                    # Read through the open handle: entries are loaded while this generator is suspended inside it.
                    t = f.get_tensor(src)
                    return t if n == 1 else t.chunk(n, dim=0)[i].clone()

                yield _Entry(name, part_shape, dtype, load, path)


def index_files(index: Path) -> list[Path]:
    """The shard files a `*.safetensors.index.json` lists, checked to exist."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{index} is not a safetensors index (no weight_map): {e}") from None
    files = [index.parent / f for f in dict.fromkeys(weight_map.values())]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise UserError(f"{index} lists {len(absent)} missing shard files: {short_list(absent)}")
    return files


def _entries(path: Path) -> Iterator[_Entry]:
    fmt = detect_format(path)
    path = find_dit(path)
    if fmt == "quantized":  # our folder: Wan-named safetensors shards listed in the manifest (+ `.scale` tensors)
        for shard in _quantized_manifest(path)["dit"]["files"]:
            yield from _safetensors_entries(path / shard)
    elif fmt == "sharded":
        for shard in index_files(path):
            yield from _safetensors_entries(shard)
    elif path.suffix == ".safetensors":
        yield from _safetensors_entries(path)
    else:
        yield from _pickle_entries(path)


def _quantized_manifest(folder: Path) -> dict:
    """Our quantized folder's manifest (quantize.store owns the format; here only its shard list and config)."""
    from ..quantize.schemes import QuantizeError
    from ..quantize.store import read_manifest

    try:
        return read_manifest(folder)
    except QuantizeError as e:
        raise UserError(str(e)) from None


def _safetensors_keys(path: Path) -> list[str]:
    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def _comfy_quant_format(path: Path, keys: list[str]) -> str:
    """comfy-<format> of a file in ComfyUI's per-layer comfy_quant convention (reads the small config tensors)."""
    from ..quantize.comfy_quant import CONFIG_SUFFIX, file_format, parse_config
    from ..quantize.schemes import QuantizeError

    try:
        with safe_open(path, framework="pt") as f:
            return "comfy-" + file_format(parse_config(f.get_tensor(k)) for k in keys if k.endswith(CONFIG_SUFFIX))
    except QuantizeError as e:
        raise UserError(f"{path}: {e}") from None


def detect_format(path: str | Path) -> str:
    """One of: sat, wan, wangp, comfy, comfy-fp8_scaled, comfy-fp8, comfy-mxfp8, comfy-int8_convrot, sharded,
    quantized."""
    path = find_dit(path)
    if path.is_dir():
        return "quantized"
    if path.name.endswith(".safetensors.index.json"):
        return "sharded"
    if path.suffix == ".safetensors":
        keys = _safetensors_keys(path)
        if FP8_MARKER in keys or any(k.endswith(".scale_weight") for k in keys):
            return "comfy-fp8_scaled"
        if any(k.endswith(".comfy_quant") for k in keys):
            return _comfy_quant_format(path, keys)
        if any(k.startswith(COMFY_PREFIX) for k in keys):
            return "comfy"
        if any(k.startswith(tuple(WANGP_RENAMES)) for k in keys):
            return "wangp"
        if any(k.startswith(("transformer.layers.", "mixins.")) for k in keys):
            return "sat"
        return "wan"
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return "sat"
    raise UserError(f"{path}: unknown checkpoint type (expected .pt, .safetensors or .safetensors.index.json)")


# ---------------------------------------------------------------- reading


# How many bytes `iter_tensors` yields between two hand-backs of the files' pages.
RELEASE_BYTES = 256 * 2**20


def iter_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(Wan name, tensor) one at a time, read lazily (mmap / safe_open). fp8_scaled files also yield their
    `*.scale_weight` tensors raw (the `scaled_fp8` marker is dropped) for `quantize` to dequantize.

    Every `RELEASE_BYTES` the pages read so far are handed back (`FilePages`): a mapping stays alive as long as
    one view of it does (the 65 GB SAT pickle for the whole read, a shard while a tensor of it waits in the
    quantizer's output buffer), and without this every page read through it stays in the resident set. Tensors
    are still valid afterwards (a read faults their pages back in), as long as nobody wrote into them."""
    files: set[Path] = set()
    since = 0
    for e in _entries(Path(path)):
        if e.name == FP8_MARKER:
            continue
        tensor = e.load()
        yield e.name, tensor
        files.add(e.file)
        since += tensor.numel() * tensor.element_size()
        if since >= RELEASE_BYTES:
            FilePages(sorted(files)).drop()
            since = 0


def read_state_dict(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The whole checkpoint in Wan names, each tensor cast to `dtype` as it is read (one copy in RAM)."""
    out = {}
    for name, t in iter_tensors(path):
        out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def _config_candidates(path: Path) -> list[Path]:
    root = Path(path)
    places = [root] if root.is_dir() else [root.parent]
    dit = find_dit(path)
    if dit.name == SAT_FILE and dit.parent.parent.name == "model":
        places.append(dit.parents[2])  # SCAIL-2 folder root
    return [p / "config.json" for p in places]


def infer_config(shapes: dict[str, tuple[int, ...]]) -> DiTConfig | None:
    """A config from tensor shapes when they determine it (num_heads from a matching preset or head_dim 128)."""
    try:
        pe, pm = shapes["patch_embedding.weight"], shapes["patch_embedding_mask.weight"]
        dim, patch = pe[0], tuple(pe[2:])
        fields = dict(
            dim=dim, in_dim=pe[1], patch_size=patch, mask_dim=pm[1], ffn_dim=shapes["blocks.0.ffn.0.weight"][0],
            freq_dim=shapes["time_embedding.0.weight"][1], text_dim=shapes["text_embedding.0.weight"][1],
            num_layers=sum(1 for k in shapes if re.fullmatch(r"blocks\.\d+\.modulation", k)),
            out_dim=shapes["head.head.weight"][0] // math.prod(patch), clip_dim=shapes["img_emb.proj.0.weight"][0],
        )
    except (KeyError, IndexError):
        return None
    for preset in PRESETS.values():
        if all(getattr(preset, k) == v for k, v in fields.items() if k not in ("num_layers", "clip_dim")):
            return DiTConfig(**{**preset.to_dict(), **fields, "num_heads": preset.num_heads, "patch_size": patch})
    if dim % 128 == 0:
        return DiTConfig(**fields, num_heads=dim // 128)
    return None


def read_config(path: str | Path, shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[DiTConfig, str]:
    """(config, where it came from): a quantized folder's manifest, config.json beside the checkpoint or in the
    SCAIL-2 root, else shapes, else 14B."""
    if detect_format(path) == "quantized":
        return DiTConfig.from_dict(_quantized_manifest(find_dit(path))["config"]), "manifest.json"
    for candidate in _config_candidates(Path(path)):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"{candidate} is not valid JSON: {e}") from None
            if isinstance(data, dict) and "dim" in data:
                return DiTConfig.from_dict(data), str(candidate)
    inferred = infer_config(shapes) if shapes is not None else None
    if inferred is not None:
        return inferred, "tensor shapes"
    return PRESETS["scail2-14b"], "14B preset (no config.json)"


def read_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Wan name -> shape without reading tensor data (model tensors only: scales and quantization configs beside
    8-bit weights are left out)."""
    return {e.name: e.shape for e in _entries(Path(path)) if e.name != FP8_MARKER and not e.name.endswith(AUX_SUFFIXES)}


def describe(path: str | Path) -> dict:
    """What `inspect` shows: format, file, counts, dtypes, config and key problems (nothing is loaded)."""
    path = Path(path)
    fmt = detect_format(path)
    entries = [e for e in _entries(path) if e.name != FP8_MARKER]
    scales = [e for e in entries if e.name.endswith(AUX_SUFFIXES)]
    tensors = [e for e in entries if e not in scales]
    shapes = {e.name: e.shape for e in tensors}
    config, config_source = read_config(path, shapes)
    return {
        "format": fmt,
        "file": str(find_dit(path)),
        "tensors": len(tensors),
        "scale_tensors": len(scales),
        "parameters": sum(math.prod(e.shape) for e in tensors),
        "dtypes": dict(Counter(e.dtype for e in tensors).most_common()),
        "config": config.to_dict(),
        "config_source": config_source,
        "problems": key_problems(shapes, config),
    }
