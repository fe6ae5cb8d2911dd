"""The quantized folder: a streaming writer (bounded RAM, atomic rename) and its readers.

Layout of a folder written by `write_quantized`:
    manifest.json              format + version, scheme/dtype/shape/file of every tensor, source fingerprints,
                               model config, tool version, text-encoder scheme, merged LoRAs
    dit-00001.safetensors ...  shards of about `shard_bytes` each: quantized Linear weights (`<layer>.weight`
                               fp8/int8 + `<layer>.scale` float32 per output channel, and for int8
                               `<layer>.smooth` float32 per input column; int8 weights are stored rotated,
                               see schemes.py), everything else bf16 (fp32 for
                               modulation tables)
    <copied files>             VAE, CLIP, tokenizer, umT5 (the bf16 file, or a folder of it stored quantized:
                               text_encoder.py), under the names the caller chose
The folder is built under a hidden temporary name and renamed at the end; `manifest.json` is written last, so
an interrupted run never leaves a folder that `is_quantized_folder` accepts.

Format versions: 2 added the int8 column smoothing, 3 the int8 rotation (and signed column factors). Folders of
versions 1 and 2 still load when they hold no int8 layers (their fp8 layers are stored the same way); their int8
layers must be quantized again.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .schemes import (
    FP8_DTYPE,
    QUANTIZED_SCHEMES,
    SMOOTHED_SCHEMES,
    QuantizeError,
    check_scheme,
    dequantize,
    is_quantized_name,
    kept_dtype,
    quantize_dequantize,
    quantize_linear,
    quantized_bytes,
    relative_error,
)

FORMAT_NAME = "scail2-lite-quantized"
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
SHARD_BYTES = 2 * 1024**3
_FINGERPRINT_CHUNK = 1024**2
_DTYPE_NAMES = {torch.float8_e4m3fn: "float8_e4m3fn", torch.int8: "int8", torch.bfloat16: "bfloat16",
                torch.float32: "float32", torch.float16: "float16"}


@dataclass(frozen=True)
class PreQuantized:
    """A weight that arrives already quantized per output channel in our layout (e.g. from a ComfyUI fp8_scaled
    file): int8 ones with their column factors `smooth`; `error` is what converting the source file's own layout
    into ours added (relative, measured), None when unknown."""

    qweight: torch.Tensor
    scale: torch.Tensor
    scheme: str
    smooth: torch.Tensor | None = None
    error: float | None = None

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scale, smooth=self.smooth)


@dataclass
class WriteResult:
    """What the writer measured on the way: the manifest, the per-layer weight error of each quantized tensor,
    and for the 2-D tensors it kept in high precision the error they would have had if quantized (the evidence
    that keeping them is right) with their share of the bytes."""

    folder: Path
    manifest: dict
    weight_errors: dict[str, float] = field(default_factory=dict)
    kept_if_quantized: dict[str, dict[str, float]] = field(default_factory=dict)


def tool_version() -> str:
    try:
        return metadata.version("scail2-lite")
    except metadata.PackageNotFoundError:
        return "unknown"


def fingerprint(path: str | Path) -> dict:
    """Cheap identity of a source file: size + sha256 of its first and last MiB. Hashing all 65 GB of the DiT
    would take minutes at disk speed for no practical gain in telling checkpoints apart."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(_FINGERPRINT_CHUNK))
        if size > _FINGERPRINT_CHUNK:
            f.seek(max(size - _FINGERPRINT_CHUNK, _FINGERPRINT_CHUNK))
            h.update(f.read(_FINGERPRINT_CHUNK))
    return {"name": path.name, "size": size, "sha256_head_tail": h.hexdigest()}


def is_quantized_folder(path: str | Path) -> bool:
    """True for a folder (or its manifest.json) written by this library."""
    path = Path(path)
    manifest = path / MANIFEST if path.is_dir() else path
    if manifest.name != MANIFEST or not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format") == FORMAT_NAME
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def estimate_output_bytes(shapes: Mapping[str, Sequence[int]], scheme: str,
                          layer_schemes: Mapping[str, str] | None = None) -> int:
    """Bytes the DiT shards will take under `scheme` (without the copied files); `layer_schemes` as in
    `write_quantized`."""
    check_scheme(scheme)
    layer_schemes = layer_schemes or {}
    return sum(quantized_bytes(tuple(s), n, layer_schemes.get(n, scheme)) for n, s in shapes.items())


def folder_bytes(expected_shapes: Mapping[str, Sequence[int]], scheme: str,
                 copy_files: Mapping[str, str | Path] | None, out: str | Path,
                 layer_schemes: Mapping[str, str] | None = None) -> int:
    """Disk bytes a quantized folder at `out` takes: the DiT shards, plus the copied files that cannot be
    hard-linked (those on another filesystem than `out`'s)."""
    probe = Path(out).absolute()
    while not probe.exists():
        probe = probe.parent
    device = probe.stat().st_dev
    copies = sum(p.stat().st_size for p in _walk_files(copy_files or {}) if p.stat().st_dev != device)
    return estimate_output_bytes(expected_shapes, scheme, layer_schemes) + copies


def check_disk_space(out: str | Path, needed: int) -> None:
    """Refuse before writing anything when the output's filesystem has less than `needed` bytes + 5% free."""
    probe = Path(out).absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed * 1.05:
        unit, size = ("GB", 1e9) if needed >= 1e8 else ("MB", 1e6)
        raise QuantizeError(f"not enough disk space at {probe}: need {needed * 1.05 / size:.1f} {unit}, "
                            f"{free / size:.1f} {unit} free")


def _dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def place(src: Path, dest: Path) -> None:
    """Hard-link when possible (same filesystem, no extra disk), else copy; directories recursively."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dest, copy_function=lambda s, d: place(Path(s), Path(d)))
        return
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)



def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file through a temporary name (never half a file at `path`), readable as any new file
    is under the process's umask: safetensors creates 0600 files, which another user, or a container running as
    another uid, could not read."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

class _ShardWriter:
    """Accumulates tensors and flushes a safetensors shard whenever `limit` bytes are buffered."""

    def __init__(self, folder: Path, limit: int) -> None:
        self.folder, self.limit = folder, limit
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.files: list[str] = []
        self.where: dict[str, str] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.buffer[name] = tensor.contiguous()
        self.buffered += tensor.numel() * tensor.element_size()
        self.where[name] = f"dit-{len(self.files) + 1:05d}.safetensors"
        if self.buffered >= self.limit:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        fname = f"dit-{len(self.files) + 1:05d}.safetensors"
        save_tensors(self.buffer, self.folder / fname, {"format": FORMAT_NAME})
        self.files.append(fname)
        self.buffer, self.buffered = {}, 0


def write_quantized(
    tensors: Iterable[tuple[str, torch.Tensor | PreQuantized]],
    out: str | Path,
    scheme: str,
    *,
    config: Mapping,
    sources: Sequence[str | Path] = (),
    expected_shapes: Mapping[str, Sequence[int]] | None = None,
    copy_files: Mapping[str, str | Path] | None = None,
    text_encoder: Mapping | None = None,
    loras: Sequence[Mapping] = (),
    force: bool = False,
    progress: Callable[[int], None] | None = None,
    shard_bytes: int = SHARD_BYTES,
    layer_schemes: Mapping[str, str] | None = None,
) -> WriteResult:
    """Stream Wan-named DiT tensors into a quantized folder at `out`; one tensor in flight at a time.

    `expected_shapes` (name -> shape, e.g. from the format reader's index) enables the disk-space check before
    anything is written and the missing/unexpected/shape checks. `copy_files` maps a path inside the folder to a
    source file or directory (VAE, CLIP, tokenizer, umT5) so the folder is self-contained. `progress` receives
    the source bytes consumed by each tensor. `loras`: records of the LoRAs merged into the stream (name,
    fingerprint, strength, match report) for the manifest. `layer_schemes` (weight name -> fp8, int8 or bf16)
    overrides `scheme` for some block Linears (mixed precision, `mixed.py`). Peak RAM ~ `shard_bytes` + a few copies of the largest
    tensor."""
    check_scheme(scheme)
    layer_schemes = dict(layer_schemes or {})
    for name, s in layer_schemes.items():
        check_scheme(s)
        if not is_quantized_name(name):
            raise QuantizeError(f"{name!r} is not a block Linear weight; only those can take another scheme")
    out = Path(out)
    if out.exists() and not force and not _empty_folder(out):
        raise QuantizeError(f"output {out} already exists; pass --force to replace it")
    if expected_shapes is not None:
        check_disk_space(out.parent, folder_bytes(expected_shapes, scheme, copy_files, out.parent, layer_schemes))
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        result = _write_into(tmp, tensors, scheme, expected_shapes, progress, shard_bytes, layer_schemes)
        for rel, src in (copy_files or {}).items():
            place(Path(src), tmp / rel)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "tool": "scail2-lite",
            "tool_version": tool_version(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "dit": result.manifest,
            "config": dict(config),
            "sources": [fingerprint(p) for p in sources],
            "files": sorted(str(rel) for rel in (copy_files or {})),
            "text_encoder": dict(text_encoder) if text_encoder is not None else None,
            "loras": [dict(lo) for lo in loras],
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.folder, result.manifest = out, manifest
    return result


def _walk_files(copy_files: Mapping[str, str | Path]) -> Iterator[Path]:
    for src in copy_files.values():
        src = Path(src)
        if not src.exists():
            raise QuantizeError(f"file to copy into the quantized folder not found: {src}")
        yield from (p for p in src.rglob("*") if p.is_file()) if src.is_dir() else (src,)


def _empty_folder(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _replace(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an existing `out` (only reached with force, or an empty folder) is moved aside
    first, then deleted."""
    if _empty_folder(out):
        out.rmdir()
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        tmp.rename(out)


def _write_into(folder: Path, tensors: Iterable[tuple[str, torch.Tensor | PreQuantized]], scheme: str,
                expected: Mapping[str, Sequence[int]] | None, progress: Callable[[int], None] | None,
                shard_bytes: int, layer_schemes: Mapping[str, str]) -> WriteResult:
    shards = _ShardWriter(folder, shard_bytes)
    entries: dict[str, dict] = {}
    result = WriteResult(folder, {})
    main = scheme
    for name, item in tensors:
        scheme = layer_schemes.get(name, main)
        quantizing = scheme in QUANTIZED_SCHEMES
        q: torch.Tensor | None = None
        s: torch.Tensor | None = None
        smooth: torch.Tensor | None = None
        if name in entries:
            raise QuantizeError(f"tensor {name!r} appears twice in the source")
        if expected is not None:
            if name not in expected:
                raise QuantizeError(f"unexpected tensor {name!r} in the source (not a SCAIL-2 DiT key)")
        if isinstance(item, PreQuantized):
            src_bytes = item.qweight.numel() * item.qweight.element_size()
            shape = tuple(item.qweight.shape)
            passes = scheme not in SMOOTHED_SCHEMES or item.smooth is not None
            if item.scheme == scheme and is_quantized_name(name) and passes:
                q, s, smooth, tensor = item.qweight, item.scale.to(torch.float32), item.smooth, None
                if item.error is not None:
                    result.weight_errors[name] = item.error
            else:  # another scheme asked for: go back to floats and requantize (error measured vs that float)
                tensor = item.dequantized()
        else:
            tensor, src_bytes, shape = item, item.numel() * item.element_size(), tuple(item.shape)
            if tensor.dtype in (torch.int8, FP8_DTYPE):
                raise QuantizeError(f"source tensor {name!r} is already quantized ({_dtype_name(tensor.dtype)}); "
                                    "quantize from the original bf16/fp32 checkpoint")
        if expected is not None and tuple(expected[name]) != shape:
            raise QuantizeError(f"tensor {name!r} has shape {list(shape)}, expected {list(expected[name])}")
        if quantizing and is_quantized_name(name):
            if q is None:
                q, s, smooth = quantize_linear(tensor, scheme)
                result.weight_errors[name] = relative_error(tensor, dequantize(q, s, smooth=smooth))
            layer = name.removesuffix(".weight")
            shards.add(name, q)
            entries[name] = {"scheme": scheme, "dtype": _dtype_name(q.dtype), "shape": list(q.shape),
                             "scale": f"{layer}.scale"}
            for key, t in (("scale", s), ("smooth", smooth)):
                if t is not None:
                    shards.add(f"{layer}.{key}", t)
                    entries[name][key] = f"{layer}.{key}"
                    entries[f"{layer}.{key}"] = {"scheme": "fp32", "dtype": "float32", "shape": list(t.shape)}
        else:
            dtype = torch.bfloat16 if is_quantized_name(name) else kept_dtype(name)
            kept = tensor.to(dtype)
            if is_quantized_name(name):  # --dit bf16: the cast is the only loss, report it like a quantization
                result.weight_errors[name] = relative_error(tensor, kept)
            elif main in QUANTIZED_SCHEMES and tensor.ndim == 2 and tensor.is_floating_point():
                result.kept_if_quantized[name] = {"error": relative_error(tensor, quantize_dequantize(tensor, main)),
                                                  "bytes": float(src_bytes)}
            shards.add(name, kept)
            entries[name] = {"scheme": "fp32" if dtype == torch.float32 else "bf16", "dtype": _dtype_name(dtype),
                             "shape": list(kept.shape)}
        del tensor, item
        if progress is not None:
            progress(src_bytes)
    shards.flush()
    if expected is not None:
        missing = [n for n in expected if n not in entries]
        if missing:
            raise QuantizeError(f"source is missing {len(missing)} DiT tensors, e.g. {missing[0]!r}")
    for name in entries:
        entries[name]["file"] = shards.where[name]
    result.manifest = {"scheme": main, "files": shards.files, "tensors": entries,
                       "kept": {n: entries[n]["scheme"] for n in layer_schemes if n in entries}}
    return result


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a quantized folder, checked for format and version."""
    folder = Path(folder)
    if not is_quantized_folder(folder):
        raise QuantizeError(f"{folder} is not a scail2-lite quantized folder (no valid {MANIFEST})")
    manifest = json.loads((folder / MANIFEST).read_text())
    version = manifest.get("format_version")
    if version not in (1, 2, FORMAT_VERSION):
        raise QuantizeError(f"{folder}: quantized format version {version} is not supported by this version "
                            f"(expects {FORMAT_VERSION}); quantize again")
    if version < FORMAT_VERSION and "int8" in linear_schemes(manifest).values():
        raise QuantizeError(f"{folder}: int8 folder from format version {version}, before int8 weights were stored "
                            "rotated; quantize again")
    try:
        files, tensors = manifest["dit"]["files"], manifest["dit"]["tensors"]
        unknown = sorted({e["scheme"] for e in tensors.values()} - {*QUANTIZED_SCHEMES, "bf16", "fp32"})
    except (KeyError, TypeError, AttributeError) as e:
        raise QuantizeError(f"{folder}/{MANIFEST} is damaged (no {e}); quantize again") from None
    if unknown:
        raise QuantizeError(f"{folder}/{MANIFEST} names scheme(s) {', '.join(map(str, unknown))} that this version "
                            f"does not know ({', '.join(QUANTIZED_SCHEMES)}, bf16, fp32); quantize again")
    for fname in files:
        if not (folder / fname).is_file():
            raise QuantizeError(f"{folder} is incomplete: {fname} is missing")
    return manifest


def iter_quantized(folder: str | Path, device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Lazily yield (name, tensor) of the DiT shards, one tensor at a time (memory-mapped reads)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for fname in manifest["dit"]["files"]:
        try:
            handle = safe_open(str(folder / fname), framework="pt", device=str(device))
        except (SafetensorError, OSError) as e:
            raise QuantizeError(f"{folder / fname} is not a readable safetensors file (truncated or corrupt?): "
                                f"{e}") from None
        with handle as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_quantized(folder: str | Path, device: str | torch.device = "cpu") -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, state dict of plain tensors) ready for `load_state_dict` on a model after `swap_linears`."""
    return read_manifest(folder), dict(iter_quantized(folder, device))


def linear_schemes(manifest: Mapping) -> dict[str, str]:
    """Module name -> weight scheme for every quantized Linear, the argument of `swap_linears`."""
    return {name.removesuffix(".weight"): e["scheme"] for name, e in manifest["dit"]["tensors"].items()
            if e["scheme"] in QUANTIZED_SCHEMES}
