"""umT5 encoder to 4 or 8 bits, one block at a time on the device it runs on.

Backends (picked from the scheme; the same on every device, so stored codes load anywhere):
- nf4: bitsandbytes NF4 `Linear4bit` (64-value blocks, double-quantized absmax), compute dtype bf16, what
  transformers' BitsAndBytesConfig builds; bitsandbytes (>= 0.50, tested) quantizes and runs it on the CPU too.
- int8: optimum-quanto qint8 (per-row absmax) on any device.
- bf16: no quantization.
Only the Linear layers of the encoder blocks are quantized (in NF4 not `wo` and not a Linear whose rows are not
whole 64-value blocks: `NF4_SKIP`, `NF4_BLOCK`); the token embedding (256k x 4096) is a lookup, which the pipeline
keeps on the CPU instead.

Each quantized weight is first rotated the way the DiT's INT8 weights are (`schemes`: signed power-of-two column
factors, then a 64-column Hadamard rotation), and the Linear's input takes the inverse path in a forward pre-hook
(bf16, a (tokens, 64) x (64, 64) product per group: nothing next to the layer itself for 512 tokens). Block-wise
4- and 8-bit grids are set by each block's largest entry, so spreading outlier columns over their group lowers
the weight error: on the synthetic umT5 (Student-t values, 1% outlier columns) 13% -> 8% for NF4 and 3.4% -> 0.8%
for per-row INT8 (RESULTS.md). A layer whose fan-in is not a multiple of 64 (tiny test models) is quantized plain.

Two ways to get a quantized encoder: quantize each bf16 block as it is loaded (`quantize_block`, a folder that
stores the bf16 file), or load blocks a quantized folder stores already quantized (`block_state` wrote them,
`load_block` rebuilds them: the same tensors, no re-quantization). Stored blocks are plain safetensors tensors:
bitsandbytes' packed NF4 codes with their quant-state entries (transformers' serialization of `Linear4bit`),
quanto's int8 data and scales, and each rotated Linear's `input_factors`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .schemes import ROTATION_BLOCK, QuantizeError, column_factors, rotate_columns, rotated_layout
from .store import save_tensors

TEXT_ENCODER_SCHEMES: tuple[str, ...] = ("bf16", "int8", "nf4")
STORED_SCHEMES: tuple[str, ...] = ("int8", "nf4")
# A umT5 folder that holds the encoder already quantized: this index (written last) names the scheme, the geometry
# and one safetensors file per block plus one for the rest (token embedding, final norm: bf16).
STORED_INDEX = "umt5-quantized.json"
STORED_FORMAT = "scail2-lite-umt5"
STORED_VERSION = 1


def text_encoder_backend(scheme: str, device: torch.device | str) -> str:
    """Which implementation `quantize_text_encoder` uses for `scheme` on `device` (recorded in reports)."""
    if scheme not in TEXT_ENCODER_SCHEMES:
        raise QuantizeError(f"unknown text-encoder scheme {scheme!r}; choose one of {', '.join(TEXT_ENCODER_SCHEMES)}")
    if scheme == "bf16":
        return "bf16"
    if scheme == "nf4":
        return "bitsandbytes-nf4"
    return "quanto-qint8"


def quantize_block(block: nn.Module, scheme: str, rotate: bool = True) -> None:
    """Quantize one umT5 encoder block's Linears in place, on the device the block is on (bf16 weights there):
    the loader's hook (`encoders.load_text_encoder`), so only one block is ever in bf16 on the GPU. `rotate=False`
    quantizes the weights as they are (the comparison in tests and benchmarks)."""
    backend = text_encoder_backend(scheme, next(block.parameters()).device)
    if backend == "bf16":
        return
    nf4 = backend == "bitsandbytes-nf4"
    names = [name for name, m in block.named_modules() if isinstance(m, nn.Linear)
             and not (nf4 and (name.rsplit(".", 1)[-1] in NF4_SKIP or m.in_features % NF4_BLOCK))]
    factors = {}
    for name in names:
        linear = block.get_submodule(name)
        if rotate and linear.in_features % ROTATION_BLOCK == 0:
            factors[name] = column_factors(linear.weight)
            linear.weight.data = rotated_layout(linear.weight.data, factors[name])
    if nf4:
        for name in names:  # one at a time, so each bf16 weight is freed as its NF4 copy is made
            parent, _, child = name.rpartition(".")
            owner = block.get_submodule(parent)
            setattr(owner, child, _to_nf4(getattr(owner, child)))
    else:
        from optimum.quanto import freeze, qint8, quantize

        quantize(block, weights=qint8)
        freeze(block)
    for name, f in factors.items():
        _rotate_inputs(block.get_submodule(name), f.to(torch.bfloat16))


def _rotate_inputs(module: nn.Module, factors: torch.Tensor) -> None:
    """Give a Linear whose weight is stored rotated the inverse rotation of its input (`_rotate_input`)."""
    module.register_buffer("input_factors", factors, persistent=False)
    module.register_forward_pre_hook(_rotate_input)


def block_state(block: nn.Module) -> dict[str, torch.Tensor]:
    """A block quantized by `quantize_block` as the tensors a quantized folder stores, on the CPU: its state dict
    (bitsandbytes: packed NF4 codes and quant-state entries; quanto: int8 `_data` and `_scale`; bf16 norms, bias
    tables and the NF4 path's `wo`) and each rotated Linear's `<name>.input_factors`."""
    state = {k: v.detach().to("cpu") for k, v in block.state_dict().items()}
    for name, module in block.named_modules():
        if isinstance(getattr(module, "input_factors", None), torch.Tensor):
            state[f"{name}.input_factors"] = module.input_factors.detach().to("cpu")
    return state


def load_block(block: nn.Module, state: dict[str, torch.Tensor], scheme: str, device: torch.device | str) -> None:
    """Fill `block` (a bf16 encoder block built on the meta device) in place from `block_state`'s tensors, on
    `device`: the quantized modules are rebuilt from the stored codes, nothing is quantized again."""
    if scheme not in ("int8", "nf4"):
        raise QuantizeError(f"no stored text-encoder blocks in scheme {scheme!r}")
    state = dict(state)
    factors = {k.removesuffix(".input_factors"): state.pop(k) for k in list(state) if k.endswith(".input_factors")}
    if scheme == "nf4":
        _load_nf4_block(block, state, device)
    else:
        from optimum.quanto import requantize

        qmap = {name.removesuffix(".weight._data"): {"weights": "qint8", "activations": "none"}
                for name in state if name.endswith(".weight._data")}
        requantize(block, state, qmap, torch.device(device))
    loaded = {k for k in block.state_dict()}
    if loaded != set(state):
        missing, extra = sorted(loaded - set(state)), sorted(set(state) - loaded)
        raise QuantizeError(f"stored text-encoder block does not match the model: missing {missing[:3]}, "
                            f"unexpected {extra[:3]}")
    for name, f in factors.items():
        _rotate_inputs(block.get_submodule(name), f.to(device))
    block.requires_grad_(False)


def _load_nf4_block(block: nn.Module, state: dict[str, torch.Tensor], device: torch.device | str) -> None:
    """bitsandbytes `Linear4bit`s from their stored codes (`Params4bit.from_prequantized`), the rest assigned."""
    import bitsandbytes as bnb

    for name, linear in [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]:
        prefix = f"{name}.weight."
        stats = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if not stats:
            continue  # kept bf16 (NF4_SKIP)
        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
        new.weight = bnb.nn.Params4bit.from_prequantized(state[f"{name}.weight"], stats, device=device, module=new)
        parent, _, child = name.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, child, new)
    for key, module_param in list(block.named_parameters()):
        if isinstance(module_param, bnb.nn.Params4bit):
            continue
        parent, _, child = key.rpartition(".")
        owner = block.get_submodule(parent) if parent else block
        owner._parameters[child] = nn.Parameter(state[key].to(device), requires_grad=False)


def _rotate_input(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """x -> H(x * factors), the inverse of the weight's rotation, so the layer's product is unchanged. Exact
    but for rounding the rotated activations to bf16 (2^-9 of each value)."""
    return (rotate_columns(args[0] * module.input_factors), *args[1:])


def quantize_text_encoder(model: nn.Module, scheme: str, device: torch.device | str = "cpu",
                          rotate: bool = True) -> nn.Module:
    """A whole in-memory encoder moved to `device` and quantized the loader's way (`quantize_block` on each block
    once it is there); returns it in eval mode. For tests and benchmarks: the pipeline loads through
    `encoders.load_text_encoder`."""
    model = model.to(dtype=torch.bfloat16).eval().requires_grad_(False)
    return move_in_pieces(model, device, lambda: None, lambda block: quantize_block(block, scheme, rotate))


# T5's feed-forward output projection stays bf16, as transformers' own bitsandbytes loading keeps it: T5's FFN
# casts its input to `wo.weight.dtype`, which for a packed 4-bit weight is uint8 and destroys the activations.
NF4_SKIP = ("wo",)
# NF4's blocks run over the flattened weight, 64 values each; bitsandbytes' CPU kernels (0.50) decode each row's
# blocks on their own, so a weight whose rows are not a multiple of 64 values came back wrong there (cosine 0.77
# against its bf16 weight on a 48-wide test model). Such a Linear stays bf16 on every device, so stored codes load
# anywhere; every real umT5 row (4096, 10240 values) is a multiple.
NF4_BLOCK = 64


def _to_nf4(linear: nn.Linear) -> nn.Module:
    """A bitsandbytes NF4 `Linear4bit` holding `linear`'s weight, quantized on `linear`'s (CUDA) device."""
    import bitsandbytes as bnb

    new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
    new.weight = bnb.nn.Params4bit(linear.weight.data.to(torch.bfloat16), requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.data.to(torch.bfloat16), requires_grad=False)
    return new.to(linear.weight.device)  # bitsandbytes quantizes a Params4bit when it moves to a CUDA device


def move_in_pieces(model: nn.Module, device: str | torch.device, after_each: Callable[[], None],
                   prepare: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """`model.to(device)` one encoder block at a time, then the rest. `prepare` (the quantizer) runs on each block
    once it is on `device`, so no more than one block is ever there in full precision; `after_each` runs after
    every piece, so the CPU side can let go of what has moved before the next piece is read."""
    for block in model.encoder.block:
        block.to(device)
        if prepare is not None:
            prepare(block)
        after_each()
    model.to(device)
    after_each()
    return model


def write_stored(folder: str | Path, scheme: str, config: Mapping[str, int],
                 blocks: Iterable[Mapping[str, torch.Tensor]], rest: Mapping[str, torch.Tensor],
                 progress: Callable[[int, int], None] | None = None) -> dict:
    """Write an encoder quantized block by block into `folder`: `blocks` yields each block's `block_state` in order
    (so only one block is in memory at a time), `rest` the tensors outside the blocks. Each file is written under
    a temporary name and renamed; the index goes last, so a folder without it holds no stored encoder. `progress`
    gets (index of the block written, number of blocks). Returns the index."""
    if scheme not in STORED_SCHEMES:
        raise QuantizeError(f"only {', '.join(STORED_SCHEMES)} text encoders are stored quantized, not {scheme!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": STORED_FORMAT, "scheme": scheme}
    files = []
    for i, state in enumerate(blocks):
        files.append(f"umt5-{scheme}-block{i:02d}.safetensors")
        save_tensors(dict(state), folder / files[-1], meta)
        if progress is not None:
            progress(i, config["num_layers"])
    if len(files) != config["num_layers"]:
        raise QuantizeError(f"wrote {len(files)} text-encoder blocks, the config has {config['num_layers']}")
    rest_file = f"umt5-{scheme}-rest.safetensors"
    save_tensors(dict(rest), folder / rest_file, meta)
    index = {"format": STORED_FORMAT, "format_version": STORED_VERSION, "scheme": scheme,
             "backend": text_encoder_backend(scheme, "cpu"), "config": dict(config), "blocks": files,
             "rest": rest_file}
    tmp = folder / f".{STORED_INDEX}.partial-{os.getpid()}"
    tmp.write_text(json.dumps(index, indent=1))
    tmp.replace(folder / STORED_INDEX)
    return index




def read_stored_index(folder: str | Path) -> dict | None:
    """The index of a umT5 folder holding the encoder stored quantized, checked; None when it holds none (the
    bf16 file of the download)."""
    path = Path(folder) / STORED_INDEX
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
        ok = (index.get("format") == STORED_FORMAT and index.get("scheme") in STORED_SCHEMES
              and len(index["blocks"]) == index["config"]["num_layers"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise QuantizeError(f"{path} is damaged; quantize again")
    if index.get("format_version") != STORED_VERSION:
        raise QuantizeError(f"{path}: stored text-encoder version {index.get('format_version')} is not supported "
                            f"by this version (expects {STORED_VERSION}); quantize again")
    for name in (*index["blocks"], index["rest"]):
        if not (path.parent / name).is_file():
            raise QuantizeError(f"{path.parent} is incomplete: {name} is missing")
    return index


def read_stored(folder: str | Path, name: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of one stored file, read straight onto `device`. On the CPU each is copied into memory of its
    own: safetensors (0.8) hands out views of the mapped file at any byte offset, and PyTorch's CPU int8 x bf16
    product (quanto's CPU path) crashed the process on such a weight."""
    path = Path(folder) / name
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) if torch.device(device).type != "cpu" else f.get_tensor(k).clone()
                    for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise QuantizeError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
