"""umT5 encoder to 4 or 8 bits, applied to an already-built transformers `UMT5EncoderModel`.

Backends (picked from the scheme and the device):
- nf4 on CUDA: bitsandbytes NF4 `Linear4bit`, compute dtype bf16 (what transformers' BitsAndBytesConfig builds).
- nf4 elsewhere: optimum-quanto qint4 (bitsandbytes' CPU 4-bit backend needs a download unavailable offline).
- int8: optimum-quanto qint8 on any device.
- bf16: no quantization.
Only the Linear layers of the encoder blocks are quantized; the token embedding (256k x 4096) is a lookup,
which the pipeline can keep on the CPU instead.

The quantized folder stores the bf16 umT5 file and re-quantizes at load time: the 4-bit formats of bitsandbytes
and quanto are not interchangeable (a folder made on a GPU must also load on a CPU and vice versa), and
quantizing 5.7B parameters takes seconds on a GPU, small next to reading the 11 GB file.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .schemes import QuantizeError

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


def quantize_text_encoder(model: nn.Module, scheme: str, device: torch.device | str = "cpu",
                          move: Callable[[nn.Module], nn.Module] | None = None) -> nn.Module:
    """Move `model` to `device` in bf16 and quantize its block Linears in place; returns it in eval mode.
    `move` does the move (default `.to(device)`; the loader's moves block by block to bound RAM)."""
    backend = text_encoder_backend(scheme, device)
    move = move or (lambda m: m.to(device))
    model = model.to(dtype=torch.bfloat16).eval().requires_grad_(False)
    if backend == "bitsandbytes-nf4":
        _replace_with_nf4(model)
        return move(model)  # bitsandbytes quantizes Params4bit when they move to the GPU
    model = move(model)
    if backend.startswith("quanto"):
        from optimum.quanto import freeze, qint4, qint8, quantize

        quantize(model, weights=qint4 if scheme == "nf4" else qint8)
        freeze(model)
    return model


# T5's feed-forward output projection stays bf16, as transformers' own bitsandbytes loading keeps it: T5's FFN
# casts its input to `wo.weight.dtype`, which for a packed 4-bit weight is uint8 and destroys the activations.
NF4_SKIP = ("wo",)


def _replace_with_nf4(model: nn.Module) -> None:
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for cname, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or cname in NF4_SKIP:
                continue
            new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                    compute_dtype=torch.bfloat16, quant_type="nf4", device="cpu")
            new.weight = bnb.nn.Params4bit(child.weight.data.to("cpu", torch.bfloat16), requires_grad=False,
                                           quant_type="nf4")
            if child.bias is not None:
                new.bias = nn.Parameter(child.bias.data.to("cpu", torch.bfloat16), requires_grad=False)
            setattr(parent, cname, new)
