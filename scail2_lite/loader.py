"""`load_dit`: a checkpoint of any format -> a ready `SCAIL2Model`, holding one copy of the weights in RAM.

Where `formats` (reading files) and `quantize` (quantized layers) meet: a quantized folder or a ComfyUI 8-bit file
(fp8_scaled, fp8, mxfp8 -> FP8; int8_convrot -> INT8, requantized into our rotation) gets `QuantLinear` layers
swapped in where the weights are 8-bit; LoRAs are merged here too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import torch

from . import formats
from .config import DiTConfig
from .errors import UserError
from .quantize.schemes import QuantizeError, is_quantized_name
from .quantize.store import PreQuantized, iter_quantized, linear_schemes, read_manifest

if TYPE_CHECKING:
    from .lora import LoraSource
    from .model import SCAIL2Model


def comfy_8bit_scheme(fmt: str) -> str | None:
    """The scheme a ComfyUI 8-bit file's block Linears are kept in (fp8_scaled, fp8, mxfp8: fp8; int8_convrot:
    int8), None for any other format."""
    from .quantize.comfy_quant import FILE_SCHEMES

    if fmt == "comfy-fp8_scaled":
        return "fp8"
    return FILE_SCHEMES.get(fmt.removeprefix("comfy-")) if fmt.startswith("comfy-") else None


def load_dit(
    path: str | Path,
    config: DiTConfig | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    loras: Sequence[LoraSource] = (),
    compute: str | None = None,
    map_blocks: bool = False,
) -> SCAIL2Model:
    """Build the model on the meta device, then assign each tensor (cast as it is read) so none is copied twice.

    Tensors are copied out of the file mapping into fresh, aligned memory: RAM holds one copy (the page cache
    is evictable) and kernels see the same alignment whatever the file format, so outputs match bit for bit.

    The config comes from `config`, else the quantized manifest or config.json beside the checkpoint, else
    tensor shapes, else 14B. `loras` (`LoraFile`s, (file, strength) pairs, or already mapped (LoRA, strength)
    pairs) are merged in fp32 before the cast; into 8-bit weights by dequantize -> add -> requantize, once at load.
    `compute` forces the QuantLinear matmul path.

    `map_blocks` (quantized folders, no LoRAs): block tensors are left as read-only views of the mapped shards,
    read only when something copies them (to the GPU, or into the streamer's buffers), so loading takes no RAM
    for them. Only for models that will not compute on the CPU: mapped tensors keep the file's alignment.
    """
    from .model import SCAIL2Model

    fmt = formats.detect_format(path)
    try:
        if map_blocks and (fmt != "quantized" or loras):
            raise UserError("map_blocks needs a scail2-lite quantized folder and no LoRAs (merged weights live in RAM)")
        if fmt == "quantized":
            folder = formats.find_dit(path)
            manifest = read_manifest(folder)
            config = config or DiTConfig.from_dict(manifest["config"])
            schemes = linear_schemes(manifest)
            items: Iterable = _mapped_blocks(folder, manifest) if map_blocks else iter_quantized(folder)
        else:
            if config is None:
                config, _ = formats.read_config(path, formats.read_shapes(path))
            items = formats.iter_tensors(path)
            schemes = {}
            if fmt == "comfy-fp8_scaled":
                from .quantize.comfy import from_comfy_fp8

                items = _keep_quantized_linears(from_comfy_fp8(items), schemes)
            elif comfy_8bit_scheme(fmt):
                from .quantize.comfy_quant import from_comfy_quant

                items = _keep_quantized_linears(from_comfy_quant(items, comfy_8bit_scheme(fmt)), schemes)
        state: dict[str, torch.Tensor] = {}
        for name, tensor in items:
            # A quantized folder's dtypes were chosen when it was written (fp32 modulation, bf16 rest), and the
            # streamer can map its blocks from disk only if the model holds exactly those dtypes.
            cast = None if fmt == "quantized" else _cast(name, tensor, dtype)
            mapped = map_blocks and name.startswith("blocks.")
            state[name] = tensor if mapped else tensor.to(device=device, dtype=cast, copy=True)
    except QuantizeError as e:
        raise UserError(str(e)) from None
    shapes = {k: tuple(v.shape) for k, v in state.items() if not k.endswith((".scale", ".smooth"))}
    formats.check_keys(shapes, config, path)
    if loras:
        _merge_loras(state, loras, config)
    with torch.device("meta"):
        model = SCAIL2Model(config)
    if schemes:
        from .quantize.linear import swap_linears

        swap_linears(model, schemes, compute)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _mapped_blocks(folder: Path, manifest: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a quantized folder as a view of its mapped shard (the caller copies what it keeps)."""
    files = formats.WeightFiles([folder / f for f in manifest["dit"]["files"]])
    for name in files.index:
        yield name, files.view(name)


def _cast(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype | None:
    """8-bit weights and their fp32 scales and column factors keep their storage; other floats take the model
    dtype."""
    if not tensor.is_floating_point() or tensor.dtype == torch.float8_e4m3fn or name.endswith((".scale", ".smooth")):
        return None
    return dtype


def _keep_quantized_linears(items: Iterable, schemes: dict[str, str]) -> Iterator[tuple[str, torch.Tensor]]:
    """ComfyUI 8-bit files -> our layout: block Linears that arrive in our layout (`PreQuantized`) stay 8-bit
    (their scheme recorded in `schemes`), anything else that arrives 8-bit is dequantized (we keep those layers in
    high precision)."""
    for name, item in items:
        if not isinstance(item, PreQuantized):
            yield name, item
        elif is_quantized_name(name):
            layer = name.removesuffix(".weight")
            schemes[layer] = item.scheme
            yield name, item.qweight
            yield f"{layer}.scale", item.scale
            if item.smooth is not None:
                yield f"{layer}.smooth", item.smooth
        else:
            yield name, item.dequantized()


def _merge_loras(state: dict[str, torch.Tensor], loras: Sequence[LoraSource], config: DiTConfig) -> None:
    """Merge LoRA deltas into `state` in place (fp32 math, cast back; 8-bit weights requantized)."""
    from .lora import lora_index, merge_block, resolve_loras

    shapes = {k: torch.Size(v) for k, v in formats.wan_shapes(config).items()}
    state.update(merge_block(state, lora_index(resolve_loras(loras, shapes))))


@dataclass(frozen=True)
class ModelDescription:
    """What a checkpoint is, read once without loading tensors: the single source for the planner (in `generate`
    and in `profile` alike), the pipeline and the reports.

    `dit_scheme`: what the DiT's block Linears hold once loaded (bf16, fp8, int8); `text_encoder`: umT5's scheme
    (a quantized folder's recorded one, else bf16); `text_encoder_stored`: what the umT5 files hold (bf16, or
    nf4/int8 stored quantized by `quantize --text-encoder`); `shard_files`: our quantized folder's DiT shards, the only
    files whose blocks can be mapped from disk as they are (none for other formats, or with LoRAs merged, which
    live in RAM); `mappable` whether the blocks are read from them (a plan for a geometry without files may
    assume our quantized folder)."""

    path: Path
    format: str
    config: DiTConfig
    dit_scheme: str
    text_encoder: str
    shard_files: tuple[Path, ...] = ()
    mappable: bool = False
    source: str = ""  # where the figures came from, for printouts
    text_encoder_stored: str = "bf16"

    def with_text_encoder(self, scheme: str | None) -> "ModelDescription":
        """The model with umT5 run in `scheme` (None: as recorded). A bf16 file can be quantized at load to any
        scheme; an encoder stored quantized only runs as stored: its bf16 weights are not in the folder, and
        re-quantizing 4-bit codes to 8 bits would add error without saving anything."""
        if scheme is None or scheme == self.text_encoder:
            return self
        if self.text_encoder_stored != "bf16":
            raise UserError(f"{self.path} stores umT5 quantized to {self.text_encoder_stored}: it runs only as "
                            f"{self.text_encoder_stored}, not --text-encoder {scheme} (drop --text-encoder, or "
                            f"quantize again with --text-encoder {scheme})")
        return dataclasses.replace(self, text_encoder=scheme)

    def without_mapping(self) -> "ModelDescription":
        """The same model with its blocks held in RAM (LoRAs merged: the shards lack them)."""
        return dataclasses.replace(self, shard_files=(), mappable=False)


def describe_model(path: str | Path) -> ModelDescription:
    """Describe a SCAIL-2 folder or DiT checkpoint (reads headers and the manifest only)."""
    path = Path(path)
    fmt = formats.detect_format(path)
    if fmt == "quantized":
        folder = formats.find_dit(path)
        try:
            manifest = read_manifest(folder)
        except QuantizeError as e:
            raise UserError(str(e)) from None
        record = manifest.get("text_encoder") or {}
        te, stored = record.get("scheme", "bf16"), record.get("stored") or "bf16"
        scheme = manifest["dit"]["scheme"]
        kept = f"umT5 {te}" + (", stored quantized" if stored != "bf16" else "")
        return ModelDescription(path, fmt, DiTConfig.from_dict(manifest["config"]), scheme, te,
                                tuple(folder / f for f in manifest["dit"]["files"]), True,
                                f"{path} (quantized, DiT {scheme}, {kept})", stored)
    config, where = formats.read_config(path, formats.read_shapes(path))
    scheme = comfy_8bit_scheme(fmt) or "bf16"  # load_dit keeps a ComfyUI 8-bit file's block Linears 8-bit
    return ModelDescription(path, fmt, config, scheme, "bf16", source=f"{path} ({fmt}, config from {where})")
