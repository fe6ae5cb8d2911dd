"""Mixed precision: which block Linears keep a higher-precision format than the rest, under a size share.

Two ways to choose, both limited to `share` of the block Linears' parameters:
- "edges": whole blocks from the ends inwards (first, last, second, second to last, ...). A W8A8 study on Wan2.1
  kept the first and last blocks in bf16; the ends of a DiT see the raw patch embedding and feed the head.
- "sensitive": the Linears whose quantization alone adds the most error to a DiT forward (`measure_sensitivity`,
  one forward per Linear with only that Linear quantized), most sensitive first.
The kept layers are stored as `keep_as` (int8: same bytes as fp8, FP8's speed lost on those layers; bf16: twice
the bytes). What each choice buys for FP8 on the synthetic 14B is in RESULTS.md (bench_formats).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from .schemes import QuantizeError, quantize_dequantize, relative_error

STRATEGIES: tuple[str, ...] = ("none", "edges", "sensitive")
KEEP_AS: tuple[str, ...] = ("int8", "bf16")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


@dataclass(frozen=True)
class MixedPrecision:
    """`strategy` (none, edges, sensitive), `keep_as` (int8, bf16) and `share`, the most of the block Linears'
    parameters kept (0-1)."""

    strategy: str = "none"
    keep_as: str = "bf16"
    share: float = 0.05

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise QuantizeError(f"unknown --keep {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.keep_as not in KEEP_AS:
            raise QuantizeError(f"unknown --keep-as {self.keep_as!r}; choose one of {', '.join(KEEP_AS)}")
        if not 0 < self.share <= 1:
            raise QuantizeError(f"--keep-share must be in (0, 1], got {self.share}")

    @property
    def active(self) -> bool:
        return self.strategy != "none"

    def check_scheme(self, scheme: str) -> None:
        """Keeping layers means something only under a lower-precision scheme than `keep_as`."""
        if self.active and (scheme == "bf16" or scheme == self.keep_as):
            raise QuantizeError(f"--keep {self.strategy} keeps layers as {self.keep_as}, but --dit {scheme} "
                                "already stores them so")


def block_index(name: str) -> int:
    m = _BLOCK.match(name)
    if m is None:
        raise QuantizeError(f"{name!r} is not a block Linear")
    return int(m.group(1))


def edge_layers(sizes: Mapping[str, int], share: float) -> list[str]:
    """Whole blocks from both ends inwards, as many as fit in `share` of the parameters in `sizes` (Linear name
    -> parameter count). At least the first block, even if it alone is over the share: asking for edges means one."""
    blocks: dict[int, list[str]] = {}
    for name in sizes:
        blocks.setdefault(block_index(name), []).append(name)
    order = sorted(blocks)
    ends = [b for pair in zip(order, reversed(order)) for b in pair]
    seen: list[int] = []
    for b in ends:
        if b not in seen:
            seen.append(b)
    limit, used, kept = share * sum(sizes.values()), 0, []
    for b in seen:
        cost = sum(sizes[n] for n in blocks[b])
        if kept and used + cost > limit:
            break
        kept += blocks[b]
        used += cost
    return kept


def sensitive_layers(sensitivity: Mapping[str, float], sizes: Mapping[str, int], share: float) -> list[str]:
    """The most sensitive Linears first, skipping any that would overflow `share` of the parameters."""
    limit, used, kept = share * sum(sizes.values()), 0, []
    for name in sorted(sensitivity, key=sensitivity.__getitem__, reverse=True):
        if used + sizes[name] <= limit:
            kept.append(name)
            used += sizes[name]
    return kept


@torch.no_grad()
def measure_sensitivity(model: nn.Module, names: Iterable[str], scheme: str, run: Callable[[], torch.Tensor],
                        progress: Callable[[int, int], None] | None = None,
                        quantizer: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """Forward relative error against `run()`'s unquantized output when only Linear `name` (a module name) holds
    `scheme`'s quantize -> dequantize weight (or `quantizer`'s); each weight is restored before the next."""
    reference = run().float()
    names = list(names)
    out: dict[str, float] = {}
    for i, name in enumerate(names):
        weight = model.get_submodule(name).weight
        saved = weight.detach().clone()
        approx = quantizer(saved) if quantizer is not None else quantize_dequantize(saved, scheme)
        weight.copy_(approx.to(weight.dtype))
        try:
            out[name] = relative_error(reference, run().float())
        finally:
            weight.copy_(saved)
        if progress is not None:
            progress(i + 1, len(names))
    return out


def choose_layers(mixed: MixedPrecision, sizes: Mapping[str, int],
                  sensitivity: Mapping[str, float] | None = None) -> dict[str, str]:
    """Weight name (`...weight`) -> `keep_as` for the layers `mixed` keeps; `sizes` maps module names to
    parameter counts; `sensitivity` (module name -> forward error) is needed by "sensitive"."""
    if not mixed.active:
        return {}
    if mixed.strategy == "edges":
        names = edge_layers(sizes, mixed.share)
    else:
        if sensitivity is None:
            raise QuantizeError("--keep sensitive needs the per-layer sensitivity measurement")
        names = sensitive_layers(sensitivity, sizes, mixed.share)
    return {f"{n}.weight": mixed.keep_as for n in names}
