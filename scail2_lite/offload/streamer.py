"""Block streaming: DiT blocks live on the host (a pinned RAM buffer, or the quantized safetensors shards mapped from
disk: `host.py`) and are copied into device buffers on a side stream while the previous block computes (when and
into what: `strategies.py`, which explains the ordering).

Why this shape: a 14B block is 0.8 GB in bf16 (0.4 GB in 8 bits) and takes 0.1-0.5 s to compute at 512p-704p, so
one block of look-ahead hides a PCIe copy completely; device buffers are allocated once per segment, so the caching
allocator sees no churn; and only data moves (the module's tensors are re-pointed with `.data =` in forward hooks),
so the numbers are those of the resident model, bit for bit. The model needs no change: it must call each block of
`model.blocks` once per forward, in order, and touch block weights nowhere else (the contract written in
`model.py`). Inference only. On a CPU device the same code runs with synchronous copies (used by the tests).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import UserError
from ..formats import FilePages, WeightFiles
from .host import Copier, MappedHost, PinnedHost
from .layout import TAIL, BlockLayout, ResidentSet, stream_units
from .profiles import StreamUnit, WeightSource
from .strategies import LayerUnits, SlotRing, SplitSlot


def _choice(kind: type[enum.Enum], value: object, what: str) -> enum.Enum:
    try:
        return kind(value)
    except ValueError:
        names = " or ".join(repr(m.value) for m in kind)
        raise UserError(f"{what} must be {names}, got {value!r}") from None


@dataclass(frozen=True)
class StreamConfig:
    """How to stream: the first `resident_blocks` blocks stay on the device; `prefetch` = how many blocks ahead are
    copied (a ring of `prefetch + 1` slots, each as large as the largest block; 0 = one slot whose head and FFN tail
    are copied separately); `source`: where the streamed blocks live (`WeightSource`; "mmap" needs the weight
    files); `unit` "layer" streams the blocks' units instead (pinned source only, `prefetch` unused). Strings are
    accepted for the enums; validated once, here."""

    resident_blocks: int = 0
    prefetch: int = 1
    source: WeightSource = WeightSource.PINNED
    unit: StreamUnit = StreamUnit.BLOCK

    def __post_init__(self) -> None:
        if self.resident_blocks < 0:
            raise UserError(f"resident_blocks must be >= 0, got {self.resident_blocks}")
        if self.prefetch < 0:
            raise UserError(f"prefetch must be >= 0, got {self.prefetch}")
        object.__setattr__(self, "source", _choice(WeightSource, self.source, "weight source"))
        object.__setattr__(self, "unit", _choice(StreamUnit, self.unit, "stream unit"))
        if self.unit is StreamUnit.LAYER and self.source is not WeightSource.PINNED:
            raise UserError("layer streaming reads the blocks from pinned RAM: use weight source 'pinned'")


class BlockStreamer:
    """Keep `model`'s non-block layers and first `config.resident_blocks` blocks on `device`; stream the others.

    `weights`: the safetensors file(s) holding the blocks (keys = the model's state_dict names); needed by the
    "mmap" source; with the pinned source, the pinned buffer is then filled straight from the files (no second copy
    of a block in RAM while it fills), and the files' mapped pages are dropped after each resident block moves.

    Use as a context manager or call `detach()`. `suspend()` gives the GPU back between segments (device buffers
    freed, resident layers pointed back at their host tensors) while the host side stays ready for `resume()`.

    `attach=False` builds the host side only (the streamed blocks in their pinned buffer or mapped files: no device
    memory) and leaves the device side to a later `resume()`, so the host side can be built beside other GPU work
    (placement.py). `on_block(n)` is told each streamed block put in the pinned buffer; an exception it raises stops
    the build (the model keeps whole blocks).
    """

    def __init__(self, model: nn.Module, device: torch.device | str, config: StreamConfig = StreamConfig(),
                 weights: str | Path | Sequence[str | Path] | WeightFiles | None = None, *, attach: bool = True,
                 on_block: Callable[[int], None] | None = None) -> None:
        self.device = torch.device(device)
        self.config = config
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise UserError("model has no non-empty nn.ModuleList 'blocks' to stream")
        resident = config.resident_blocks
        if resident > len(blocks):
            raise UserError(f"resident_blocks must be 0..{len(blocks)}, got {resident}")
        if config.source is WeightSource.MMAP and weights is None:
            raise UserError("weight source 'mmap' needs the safetensors file(s) holding the blocks")
        self.model = model
        streamed = list(blocks)[resident:]
        self._streamed = streamed
        layers = config.unit is StreamUnit.LAYER
        units = stream_units(streamed[0]) if layers and streamed else ()
        if layers and any(stream_units(b) != units for b in streamed):
            raise UserError("layer streaming needs the same STREAM_UNITS in every streamed block")
        parts = [name for name, _ in units] if layers else [TAIL]
        self.layouts = [BlockLayout.build(b, f"blocks.{resident + j}", parts) for j, b in enumerate(streamed)]
        self.files: WeightFiles | None = None
        if weights is not None:
            self.files = weights if isinstance(weights, WeightFiles) else WeightFiles(
                [weights] if isinstance(weights, (str, Path)) else list(weights))
            for layout in self.layouts:
                for e in layout.entries:
                    self.files.check(e.name, e.dtype, e.shape, e.name)
        self.resident = ResidentSet(model, streamed)
        # The streamed tensors that are views of mapped files, pointed back at them by `detach` (the pinned buffer
        # then has no reference left, and the next placement's buffer is the only one in RAM).
        self._mapped = [layout.mapped() for layout in self.layouts]
        self.host: PinnedHost | MappedHost | None = None
        self._hooks: list = []  # non-empty while attached
        try:
            # Host side first; `resume` moves the resident layers (their mapped pages dropped block by block, so RAM
            # holds at most one of them beside the full host buffer).
            cuda = self.device.type == "cuda"
            if config.source is WeightSource.PINNED:
                self.host = PinnedHost(self.layouts, self.files, cuda, on_block)
            else:
                self.host = MappedHost(self.layouts, self.files, cuda)
            if layers:
                self.strategy = LayerUnits(self.layouts, self.host, self.device, units)
            elif config.prefetch == 0 and isinstance(self.host, PinnedHost) and SplitSlot.fits(self.layouts):
                self.strategy = SplitSlot(self.layouts, self.host, self.device)
            else:
                self.strategy = SlotRing(self.layouts, self.host, self.device, config.prefetch)
            if attach:
                self.resume()
        except BaseException:
            self.detach()
            raise

    # ---- stats ------------------------------------------------------------------------------------------------

    @property
    def copies(self) -> int:
        """Block copies issued since attach (a forward with n streamed blocks issues n, fewer if they fit)."""
        return self.strategy.copies

    @property
    def bytes_copied(self) -> int:
        return self.strategy.bytes_copied

    @property
    def host_bytes(self) -> int:
        """Page-locked RAM held for weights (streamed blocks in pinned mode, the staging ring in mmap mode)."""
        return self.host.nbytes

    @property
    def slot_bytes(self) -> int:
        return self.strategy.slot_bytes

    @property
    def num_slots(self) -> int:
        return self.strategy.num_slots

    @property
    def split(self) -> bool:
        """One slot whose head and tail are copied separately (`SplitSlot`)."""
        return isinstance(self.strategy, SplitSlot)

    @property
    def layers(self) -> bool:
        """Layer streaming (`LayerUnits`)."""
        return isinstance(self.strategy, LayerUnits)

    # ---- attach / detach --------------------------------------------------------------------------------------

    def _place_resident(self) -> None:
        """Move the resident layers to the device, dropping the weight files' mapped pages after each block (fresh
        page ranges each time: mappings come and go between segments)."""
        pages = FilePages(self.files.paths) if self.files is not None else None
        self.resident.place(self.device, None if pages is None else pages.drop)

    def resume(self) -> None:
        """Move the resident layers to the device, allocate the device buffers and hook the blocks (no-op if
        attached)."""
        if self._hooks:
            return
        self._place_resident()
        copier = Copier(self.device)
        self.host.start(copier)
        self.strategy.resume(copier)
        strategy = self.strategy
        self._hooks.append(self.model.blocks[0].register_forward_pre_hook(lambda *_: strategy.start_forward()))
        for j, block in enumerate(self._streamed):
            self._hooks += strategy.hook(block, j)

    def suspend(self) -> None:
        """Unhook the blocks, free the device buffers and point the resident layers back at their host tensors; the
        host side (pinned buffer or file mapping) stays for `resume()`. Streamed blocks point at host memory."""
        if self._hooks:
            for h in self._hooks:
                h.remove()
            self._hooks = []
            self.host.settle()
            self.strategy.copier.synchronize()
            self.strategy.start_forward()
            self.strategy.suspend()
            self.host.stop()
        self.resident.restore()

    def detach(self) -> None:
        """`suspend()`, then unpin the host buffer, point the streamed tensors that were views of mapped files back
        at them (a half-filled buffer's too) and close the weight files. Streamed blocks of a model held in RAM stay
        in host memory (pinned mode: the buffer, as plain RAM: it is their only copy; mmap mode: views of the
        mapped files). Safe to call twice."""
        self.suspend()
        if self.host is not None:
            self.host.release()
        for layout, kept in zip(self.layouts, self._mapped):
            layout.point_back(kept)
        if self.files is not None:
            self.files.close()

    def __enter__(self) -> "BlockStreamer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()
