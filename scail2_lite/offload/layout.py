"""What a streamed block looks like in bytes, and which tensors stay on the device.

A block's tensors are laid out at aligned offsets in one flat byte range, the same in the host buffer and in a device
slot, so a block (or one part of it: its FFN tail, or a layer unit) moves as one contiguous copy. `ResidentSet` is the
one owner of the tensors outside the streamed blocks: it remembers where they lived on the host, moves them to the
device and points them back, so mapped weights stay mapped and RAM gains no second copy of the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import UserError

ALIGN = 4096  # byte alignment of every tensor in host buffers and slots: any dtype view, page-aligned pinning
TAIL = "ffn"  # the block submodule that runs last and reads only its own weights (model.py's contract)


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def maps_a_file(t: torch.Tensor) -> bool:
    """Whether `t` is a view of a mapped file (torch.frombuffer over an mmap: the loader's mapped blocks,
    `WeightFiles.view`): its storage is not the allocator's (not resizable), so keeping it holds no RAM."""
    return not t.untyped_storage().resizable()


def view(buf: torch.Tensor, offset: int, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    """A typed view of `shape` at byte `offset` of the flat uint8 `buf` (no copy)."""
    n = shape.numel() * dtype.itemsize
    return buf[offset : offset + n].view(dtype).view(shape)


@dataclass
class Entry:
    """One tensor of a streamed block: the Parameter/buffer object whose `.data` is re-pointed, its place in a slot."""

    name: str  # qualified name in the model, e.g. "blocks.7.ffn.0.weight"
    tensor: torch.Tensor
    offset: int
    dtype: torch.dtype
    shape: torch.Size

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize


@dataclass
class BlockLayout:
    """Every parameter and buffer of one streamed block (each tensor once) at aligned offsets: first those outside
    the parts, then each part's in the given order, so a part is one byte range. `starts`: where each part starts,
    followed by the block's size."""

    entries: list[Entry]
    size: int
    starts: list[int]

    @classmethod
    def build(cls, block: nn.Module, prefix: str, parts: Sequence[str]) -> "BlockLayout":
        groups: list[list[tuple[str, torch.Tensor]]] = [[] for _ in range(len(parts) + 1)]
        seen: set[int] = set()
        for mod_name, mod in block.named_modules(prefix=prefix):
            group = next((k + 1 for k, part in enumerate(parts) if (mod_name + ".").startswith(f"{prefix}.{part}.")), 0)
            for name, t in [*mod._parameters.items(), *mod._buffers.items()]:
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                groups[group].append((f"{mod_name}.{name}", t))
        entries: list[Entry] = []
        starts: list[int] = []
        offset = 0
        for k, group in enumerate(groups):
            if k:
                starts.append(offset)
            for name, t in group:
                entries.append(Entry(name, t, offset, t.dtype, t.shape))
                offset += aligned(nbytes(t))
        return cls(entries, offset, [*starts, offset])

    def views(self, buf: torch.Tensor, base: int = 0) -> list[torch.Tensor]:
        """Typed views of every entry in the flat uint8 `buf`, the block starting at byte `base`."""
        return [view(buf, base + e.offset, e.dtype, e.shape) for e in self.entries]

    def point(self, tensors: Sequence[torch.Tensor]) -> None:
        """Re-point every entry's Parameter/buffer at the matching tensor (only data moves)."""
        for e, t in zip(self.entries, tensors):
            e.tensor.data = t

    def mapped(self) -> list[torch.Tensor | None]:
        """Per entry: its tensor now if it is a view of a mapped file (`maps_a_file`), else None: what to point it
        back at when streaming ends (`point_back`), so that the host buffer it is re-pointed into is freed with the
        streamer. Tensors that hold RAM are not kept: the buffer replaces them (RAM holds one copy)."""
        return [e.tensor.data if maps_a_file(e.tensor) else None for e in self.entries]

    def point_back(self, kept: Sequence[torch.Tensor | None]) -> None:
        """Re-point the entries `mapped()` kept at those tensors (the others stay where they are)."""
        for e, t in zip(self.entries, kept):
            if t is not None:
                e.tensor.data = t

    def part_indices(self) -> list[list[int]]:
        """Per part: the indices of its entries."""
        s = self.starts
        return [[k for k, e in enumerate(self.entries) if lo <= e.offset < hi] for lo, hi in zip(s, s[1:])]


def stream_units(block: nn.Module) -> tuple[tuple[str, str | None], ...]:
    """The block's layer-streaming units, (submodule name, the submodule whose return ends the unit or None), in
    the order it runs them (`STREAM_UNITS`, model.py's contract); a one-line error for a block without them."""
    units = getattr(block, "STREAM_UNITS", None)
    try:
        if units:
            for name, done in units:
                block.get_submodule(name)
                if done is not None:
                    block.get_submodule(done)
            return tuple(units)
    except AttributeError:
        pass
    raise UserError(f"{type(block).__name__} declares no valid STREAM_UNITS: it can only be streamed block by block")


class ResidentSet:
    """Every parameter and buffer of `model` outside the `streamed` blocks: what a placement keeps on the device.

    Their host tensors are remembered at creation, so `restore()` re-points them instead of copying them back
    (mapped weights stay mapped). `place()` moves the resident blocks one at a time (as `Module.to` would), calling
    `between` after each (the caller drops the mapped file pages it read, so RAM never holds them all), then the
    tensors outside the blocks."""

    def __init__(self, model: nn.Module, streamed: Sequence[nn.Module]) -> None:
        streamed_ids = {id(b) for b in streamed}
        self.blocks = [b for b in model.blocks if id(b) not in streamed_ids]
        skip = {id(m) for b in streamed for m in b.modules()}
        self._saved: list[tuple[nn.Module, str, bool, torch.Tensor]] = []
        for mod in model.modules():
            if id(mod) in skip:
                continue
            self._saved += [(mod, name, True, p.data) for name, p in mod._parameters.items() if p is not None]
            self._saved += [(mod, name, False, b) for name, b in mod._buffers.items() if b is not None]
        in_blocks = {id(m) for b in model.blocks for m in b.modules()}
        self._outside = [s for s in self._saved if id(s[0]) not in in_blocks]
        self.placed = False

    def place(self, device: torch.device, between: Callable[[], None] | None = None) -> None:
        """Move every resident tensor to `device` (no-op while placed)."""
        if self.placed:
            return
        for block in self.blocks:
            block.to(device)
            if between is not None:
                between()
        for mod, name, is_param, t in self._outside:
            if is_param:
                mod._parameters[name].data = t.to(device)
            else:
                mod._buffers[name] = t.to(device)
        if between is not None:
            between()
        self.placed = True

    def restore(self) -> None:
        """Point every resident tensor back at its host tensor (the device copies are freed by the caller's GC)."""
        for mod, name, is_param, t in self._saved:
            if is_param:
                mod._parameters[name].data = t
            else:
                mod._buffers[name] = t
        self.placed = False
