"""umT5 encoder to 4 or 8 bits, one block at a time on the device it runs on.

Backends (picked from the scheme and the device):
- nf4 on CUDA: bitsandbytes NF4 `Linear4bit`, compute dtype bf16 (what transformers' BitsAndBytesConfig builds).
- nf4 elsewhere: optimum-quanto qint4 (bitsandbytes' CPU 4-bit backend needs a download unavailable offline).
- int8: optimum-quanto qint8 on any device.
- bf16: no quantization.
Only the Linear layers of the encoder blocks are quantized; the token embedding (256k x 4096) is a lookup,
which the pipeline keeps on the CPU instead.

Each quantized weight is first rotated the way the DiT's INT8 weights are (`schemes`: signed power-of-two column
factors, then a 64-column Hadamard rotation), and the Linear's input takes the inverse path in a forward pre-hook
(bf16, a (tokens, 64) x (64, 64) product per group: nothing next to the layer itself for 512 tokens). Block-wise
4- and 8-bit grids are set by each block's largest entry, so spreading outlier columns over their group lowers
the weight error: on the synthetic umT5 (Student-t values, 1% outlier columns) 13% -> 8% for NF4 and 3.4% -> 0.8%
for per-row INT8 (RESULTS.md). A layer whose fan-in is not a multiple of 64 (tiny test models) is quantized plain.

The quantized folder stores the bf16 umT5 file and re-quantizes at load time: the 4-bit formats of bitsandbytes
and quanto are not interchangeable (a folder made on a GPU must also load on a CPU and vice versa), and
quantizing 5.7B parameters takes seconds on a GPU, small next to reading the 11 GB file.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .schemes import ROTATION_BLOCK, QuantizeError, column_factors, rotate_columns, rotated_layout

TEXT_ENCODER_SCHEMES: tuple[str, ...] = ("bf16", "int8", "nf4")


def text_encoder_backend(scheme: str, device: torch.device | str) -> str:
    """Which implementation `quantize_text_encoder` uses for `scheme` on `device` (recorded in reports)."""
    if scheme not in TEXT_ENCODER_SCHEMES:
        raise QuantizeError(f"unknown text-encoder scheme {scheme!r}; choose one of {', '.join(TEXT_ENCODER_SCHEMES)}")
    if scheme == "bf16":
        return "bf16"
    if scheme == "nf4":
        return "bitsandbytes-nf4" if torch.device(device).type == "cuda" else "quanto-qint4"
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
             and not (nf4 and name.rsplit(".", 1)[-1] in NF4_SKIP)]
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
        from optimum.quanto import freeze, qint4, qint8, quantize

        quantize(block, weights=qint4 if scheme == "nf4" else qint8)
        freeze(block)
    for name, f in factors.items():
        module = block.get_submodule(name)
        module.register_buffer("input_factors", f.to(torch.bfloat16), persistent=False)
        module.register_forward_pre_hook(_rotate_input)


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
