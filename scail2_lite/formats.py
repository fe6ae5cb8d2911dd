"""Every DiT checkpoint format SCAIL-2 users have: detect it, read it lazily in Wan names, check its keys.

Formats: the official SAT pickle (`model/1/fsdp2_rank_0000_checkpoint.pt`, or the SCAIL-2 folder), the
upstream `convert.py` safetensors ("wan"), WanGP's file ("wangp"), ComfyUI single files ("comfy", and
"comfy-fp8_scaled" whose raw fp8 tensors + `*.scale_weight` are exposed for `quantize` to dequantize),
sharded safetensors with an index ("sharded"), and our quantized folder ("quantized", read by `quantize`).
Tensors are produced one at a time so a 65 GB fp32 SAT file never sits in RAM twice.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import pickle
import re
import struct
import threading
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from .config import PRESETS, DiTConfig
from .errors import UserError

COMFY_PREFIX = "model.diffusion_model."
SAT_FILE = "fsdp2_rank_0000_checkpoint.pt"
FP8_MARKER = "scaled_fp8"
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool",
}


# ---------------------------------------------------------------- the Wan key contract


def wan_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Wan-named SCAIL-2 DiT and its shape (1307 tensors for the 14B model)."""
    d, f, p = config.dim, config.ffn_dim, tuple(config.patch_size)
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out: int, inp: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp), (out,)

    for name, cin in (("patch_embedding", config.in_dim), ("patch_embedding_pose", config.in_dim),
                      ("patch_embedding_mask", config.mask_dim)):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (d, cin, *p), (d,)
    linear("text_embedding.0", d, config.text_dim)
    linear("text_embedding.2", d, d)
    linear("time_embedding.0", d, config.freq_dim)
    linear("time_embedding.2", d, d)
    linear("time_projection.1", 6 * d, d)
    c = config.clip_dim
    shapes["img_emb.proj.0.weight"], shapes["img_emb.proj.0.bias"] = (c,), (c,)
    linear("img_emb.proj.1", c, c)
    linear("img_emb.proj.3", d, c)
    shapes["img_emb.proj.4.weight"], shapes["img_emb.proj.4.bias"] = (d,), (d,)
    for i in range(config.num_layers):
        b = f"blocks.{i}"
        shapes[f"{b}.modulation"] = (1, 6, d)
        for proj in "qkvo":
            linear(f"{b}.self_attn.{proj}", d, d)
        for proj in ("q", "k", "v", "o", "k_img", "v_img"):
            linear(f"{b}.cross_attn.{proj}", d, d)
        for norm in ("self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k",
                     "cross_attn.norm_k_img"):
            shapes[f"{b}.{norm}.weight"] = (d,)
        shapes[f"{b}.norm3.weight"], shapes[f"{b}.norm3.bias"] = (d,), (d,)
        linear(f"{b}.ffn.0", f, d)
        linear(f"{b}.ffn.2", d, f)
    shapes["head.modulation"] = (1, 2, d)
    linear("head.head", config.out_dim * math.prod(p), d)
    return shapes


def _names(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def key_problems(shapes: dict[str, tuple[int, ...]], config: DiTConfig) -> list[str]:
    """Missing, unexpected and mis-shaped keys against the config's contract, one short phrase each."""
    expected = wan_shapes(config)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if tuple(shapes[k]) != expected[k])
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys: {_names(unexpected)}")
    if wrong:
        shown = [f"{k} {tuple(shapes[k])} instead of {expected[k]}" for k in wrong]
        problems.append(f"{len(wrong)} keys with the wrong shape: {_names(shown, 3)}")
    return problems


def check_keys(shapes: dict[str, tuple[int, ...]], config: DiTConfig, source: Path | str) -> None:
    """Strict key check: raise one line naming what is missing, unexpected or mis-shaped."""
    problems = key_problems(shapes, config)
    if problems:
        raise UserError(f"{source} does not match the DiT config: {'; '.join(problems)}")


# ---------------------------------------------------------------- SAT -> Wan names

_SAT_RENAMES: list[tuple[re.Pattern, str]] = [
    (re.compile(p), r) for p, r in [
        (r"transformer\.layers\.(\d+)\.attention\.dense\.", r"blocks.\1.self_attn.o."),
        (r"transformer\.layers\.(\d+)\.cross_attention\.query\.", r"blocks.\1.cross_attn.q."),
        (r"transformer\.layers\.(\d+)\.cross_attention\.dense\.", r"blocks.\1.cross_attn.o."),
        (r"transformer\.layers\.(\d+)\.post_cross_attention_layernorm\.", r"blocks.\1.norm3."),
        (r"transformer\.layers\.(\d+)\.mlp\.dense_h_to_4h\.", r"blocks.\1.ffn.0."),
        (r"transformer\.layers\.(\d+)\.mlp\.dense_4h_to_h\.", r"blocks.\1.ffn.2."),
        (r"mixins\.adaln_layer\.adaLN_modulations\.(\d+)$", r"blocks.\1.modulation"),
        (r"mixins\.adaln_layer\.query_layernorm_list\.(\d+)\.", r"blocks.\1.self_attn.norm_q."),
        (r"mixins\.adaln_layer\.key_layernorm_list\.(\d+)\.", r"blocks.\1.self_attn.norm_k."),
        (r"mixins\.adaln_layer\.cross_query_layernorm_list\.(\d+)\.", r"blocks.\1.cross_attn.norm_q."),
        (r"mixins\.adaln_layer\.cross_key_layernorm_list\.(\d+)\.", r"blocks.\1.cross_attn.norm_k."),
        (r"mixins\.adaln_layer\.clip_feature_key_layernorm_list\.(\d+)\.", r"blocks.\1.cross_attn.norm_k_img."),
        (r"mixins\.final_layer\.adaLN_modulation$", r"head.modulation"),
        (r"mixins\.final_layer\.linear\.", r"head.head."),
        (r"mixins\.patch_embed\.proj\.", r"patch_embedding."),
        (r"mixins\.patch_embed\.proj_pose\.", r"patch_embedding_pose."),
        (r"mixins\.patch_embed\.proj_mask\.", r"patch_embedding_mask."),
        (r"time_embed\.(\d+)\.", r"time_embedding.\1."),
        (r"adaln_projection\.(\d+)\.", r"time_projection.\1."),
        (r"text_embedding\.(\d+)\.", r"text_embedding.\1."),
        (r"clip_proj\.proj\.(\d+)\.", r"img_emb.proj.\1."),
    ]
]
# Fused SAT tensors, split along dim 0 into these Wan projections.
_SAT_SPLITS: list[tuple[re.Pattern, str, tuple[str, ...]]] = [
    (re.compile(r"transformer\.layers\.(\d+)\.attention\.query_key_value\.(weight|bias)$"), "self_attn", ("q", "k", "v")),
    (re.compile(r"transformer\.layers\.(\d+)\.cross_attention\.key_value\.(weight|bias)$"), "cross_attn", ("k", "v")),
    (re.compile(r"mixins\.adaln_layer\.clip_feature_key_value_list\.(\d+)\.(weight|bias)$"), "cross_attn",
     ("k_img", "v_img")),
]
_WANGP_RENAMES = {"pose_patch_embedding.": "patch_embedding_pose.", "mask_patch_embedding.": "patch_embedding_mask."}


def to_wan_names(name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], int, int]]:
    """Map one source key to Wan keys: [(wan_name, shape, split_index, n_splits)]; SAT fused tensors split."""
    name = name.removeprefix(COMFY_PREFIX)
    for pattern, attn, parts in _SAT_SPLITS:
        m = pattern.match(name)
        if m:
            if shape[0] % len(parts):
                raise UserError(f"SAT tensor {name} has {shape[0]} rows, not divisible into {'/'.join(parts)}")
            part_shape = (shape[0] // len(parts), *shape[1:])
            return [(f"blocks.{m[1]}.{attn}.{p}.{m[2]}", part_shape, i, len(parts)) for i, p in enumerate(parts)]
    for pattern, repl in _SAT_RENAMES:
        if pattern.match(name):
            return [(pattern.sub(repl, name, count=1), shape, 0, 1)]
    for old, new in _WANGP_RENAMES.items():
        if name.startswith(old):
            return [(new + name[len(old):], shape, 0, 1)]
    return [(name, shape, 0, 1)]


# ---------------------------------------------------------------- locating and detecting


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


def _numpy_globals() -> list:
    """The only globals a SAT pickle may name: NumPy's array reconstruction, under both module spellings."""
    from numpy._core.multiarray import _reconstruct

    allowed: list = [np.ndarray, np.dtype, (_reconstruct, "numpy.core.multiarray._reconstruct"),
                     (_reconstruct, "numpy._core.multiarray._reconstruct")]
    allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType") and n != "ObjectDType"]
    return allowed


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Open a SAT pickle memory-mapped with weights_only: tensors stay on disk until read."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} refused: the pickle asks for something other than tensors ({first})") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable torch checkpoint (truncated or old format?): {first}") from None
    sd = obj.get("module", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path} is not a state dict (expected {{'module': {{name: tensor}}}} or {{name: tensor}})")
    return sd


def _pickle_entries(path: Path) -> Iterator[_Entry]:
    for src, tensor in _load_pickle(path).items():
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
            shape, dtype = tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype())
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
        raise UserError(f"{index} lists {len(absent)} missing shard files: {_names(absent)}")
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
    from .quantize.schemes import QuantizeError
    from .quantize.store import read_manifest

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


def detect_format(path: str | Path) -> str:
    """One of: sat, wan, wangp, comfy, comfy-fp8_scaled, sharded, quantized."""
    path = find_dit(path)
    if path.is_dir():
        return "quantized"
    if path.name.endswith(".safetensors.index.json"):
        return "sharded"
    if path.suffix == ".safetensors":
        keys = _safetensors_keys(path)
        if FP8_MARKER in keys or any(k.endswith(".scale_weight") for k in keys):
            return "comfy-fp8_scaled"
        if any(k.startswith(COMFY_PREFIX) for k in keys):
            return "comfy"
        if any(k.startswith(tuple(_WANGP_RENAMES)) for k in keys):
            return "wangp"
        if any(k.startswith(("transformer.layers.", "mixins.")) for k in keys):
            return "sat"
        return "wan"
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return "sat"
    raise UserError(f"{path}: unknown checkpoint type (expected .pt, .safetensors or .safetensors.index.json)")


# ---------------------------------------------------------------- reading


class FilePages:
    """Hands the pages of memory-mapped weights files back to the page cache once their tensors are on the GPU.

    A `.pth` loaded with mmap, or a mapped quantized shard, is a private, never-written mapping: every page read
    while copying to the GPU would stay in the process's resident set until the last view is freed (9 GB for
    umT5, 6-17 GB for resident DiT blocks). MADV_DONTNEED on an unwritten private file mapping only forgets pages:
    a later read faults them back in from the page cache, unchanged. Linux only; elsewhere `drop` does nothing."""

    def __init__(self, paths: list[str | Path]) -> None:
        self.ranges: list[tuple[int, int]] = []
        self._madvise = getattr(ctypes.CDLL(None), "madvise", None) if os.name == "posix" and paths else None
        if self._madvise is None:
            return
        try:
            maps = Path("/proc/self/maps").read_text().splitlines()
        except OSError:
            return
        real = {os.path.realpath(p) for p in paths}
        for line in maps:
            fields = line.split(None, 5)
            if len(fields) == 6 and fields[5] in real and fields[1].startswith("r") and fields[1][3] == "p":
                start, end = (int(x, 16) for x in fields[0].split("-"))
                self.ranges.append((start, end))

    def drop(self) -> None:
        """Forget every page of the files' mappings (as they were at construction) from the resident set."""
        if self._madvise is None:
            return
        for start, end in self.ranges:
            self._madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


class WeightFiles:
    """Where every tensor of some safetensors files lies (headers only: no tensor data is read up front).

    Two ways to get a tensor without an in-RAM copy in this process: `read_into` reads its bytes straight into a
    caller's buffer (a pinned host buffer or staging slot: the page cache is used, the process's resident set does
    not grow), and `view` maps it zero-copy (pages are read when touched). The block streamer uses the first, the
    loader the second for blocks that only the streamer will read. Keys are the files' own names.
    """

    def __init__(self, paths: list[Path] | list[str]) -> None:
        self.paths = [Path(p) for p in paths]
        self.index: dict[str, tuple[int, int, int, torch.dtype, tuple[int, ...]]] = {}
        self._maps: dict[int, mmap.mmap] = {}
        self._handles: dict[int, object] = {}
        self._lock = threading.Lock()
        for i, path in enumerate(self.paths):
            try:
                with open(path, "rb") as f:
                    (header_len,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(header_len))
            except (OSError, ValueError, struct.error) as e:
                raise UserError(f"{path}: cannot read the safetensors header ({e})") from None
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                dtype = getattr(torch, _SAFETENSORS_DTYPES.get(info["dtype"], ""), None)
                if not isinstance(dtype, torch.dtype):
                    raise UserError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
                begin, end = info["data_offsets"]
                self.index[key] = (i, 8 + header_len + begin, end - begin, dtype, tuple(info["shape"]))

    def check(self, key: str, dtype: torch.dtype, shape: tuple[int, ...], what: str) -> None:
        """Raise a UserError unless `key` exists with this dtype and shape (`what` names the model tensor)."""
        if key not in self.index:
            raise UserError(f"{self._where()}: tensor {key} (for {what}) is missing")
        _, _, _, have_dtype, have_shape = self.index[key]
        if have_dtype != dtype or have_shape != tuple(shape):
            raise UserError(f"{self._where()}: tensor {key} is {have_dtype} {list(have_shape)}, "
                            f"the model expects {dtype} {list(shape)}")

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Read `key`'s bytes into the contiguous CPU uint8 tensor `out` (exactly its size)."""
        i, offset, n, _, _ = self.index[key]
        if n == 0:
            return
        with self._lock:
            f = self._handles.get(i)
            if f is None:
                f = self._handles[i] = open(self.paths[i], "rb", buffering=0)
            f.seek(offset)
            buf = memoryview(out.numpy()).cast("B")
            got = 0
            while got < n:
                k = f.readinto(buf[got:n])
                if not k:
                    raise UserError(f"{self.paths[i]}: file ended inside tensor {key} (truncated?)")
                got += k

    def view(self, key: str) -> torch.Tensor:
        """`key` as a typed tensor over a private, copy-on-write mapping of its file (no read until touched)."""
        i, offset, n, dtype, shape = self.index[key]
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        mm = self._maps.get(i)
        if mm is None:
            with open(self.paths[i], "rb") as f:
                # ACCESS_COPY: writable as torch.frombuffer wants, never written, so pages stay the page cache's.
                mm = self._maps[i] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return torch.frombuffer(mm, dtype=torch.uint8, count=n, offset=offset).view(dtype).view(shape)

    def close(self) -> None:
        """Close the read handles (mapped views stay valid: each keeps its mapping alive)."""
        for f in self._handles.values():
            f.close()
        self._handles.clear()
        self._maps.clear()

    def _where(self) -> str:
        return ", ".join(str(p) for p in self.paths)



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
    """Wan name -> shape without reading tensor data."""
    return {e.name: e.shape for e in _entries(Path(path)) if e.name != FP8_MARKER}


def describe(path: str | Path) -> dict:
    """What `inspect` shows: format, file, counts, dtypes, config and key problems (nothing is loaded)."""
    path = Path(path)
    fmt = detect_format(path)
    entries = [e for e in _entries(path) if e.name != FP8_MARKER]
    scales = [e for e in entries if e.name.endswith((".scale_weight", ".scale_input", ".scale", ".smooth"))]
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
