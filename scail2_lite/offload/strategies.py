"""When streamed bytes move: three strategies over the same host (`host.py`) and block layouts (`layout.py`).

Only data moves: the hooks re-point the module's tensors with `.data =` into device buffers and back to the host
copies, so the numbers are those of the resident model, bit for bit.

`SlotRing` (prefetch >= 1): a ring of `prefetch + 1` preallocated slots, each as large as the largest block, so the
caching allocator sees no churn; `prefetch` blocks ahead are copied while the current one computes. Ordering on CUDA,
for a block running in slot s:
  copy of the block into s  --waits for-->  `computed[s]` (the last block that ran in s has been consumed)
  compute of the block      --waits for-->  `copied[s]`   (its weights have arrived)

`SplitSlot` (prefetch 0, profile `8gb`): with one slot the copies still overlap compute: a block's tensors are laid
out with its `ffn` (which runs last and reads only its own weights, model.py's contract) at the end of the slot, so
the next block's head (attention, norms, modulation) is copied while the FFN runs, and its FFN while its attention
runs:
  copy of head j+1  --waits for-->  block j has reached its FFN     compute of block j+1  --waits for-->  head j+1
  copy of FFN j+1   --waits for-->  block j has finished            FFN of block j+1      --waits for-->  FFN j+1

`LayerUnits` (unit "layer", the lightest profile) holds less than a slot: the block declares its big-weight
submodules in the order it runs them (`STREAM_UNITS`: self-attention q, k, v, o, the cross-attention, the FFN),
the small tensors outside them stay on the device, and each unit gets a buffer from the caching allocator when it
is fetched and gives it back when the next unit starts. One unit ahead is fetched, except across the activation
peak: the unit declared done when a module returns (v, when the q/k/v projections return, right before the
attention) is dropped then, and only then is the next one (o) fetched. So the attention runs beside one 5120x5120
weight instead of a 0.8 GB slot (diffusers' leaf level holds the current and the next Linear). Each copy waits for
the compute stream to reach the point where its buffer was allocated, then overlaps the unit before it.

Each strategy: `resume(copier)` allocates its device buffers, `hook(block, j)` returns the hooks of streamed block
j, `start_forward()` undoes what an interrupted forward (an exception inside a block) left behind, `suspend()` frees
the device buffers with every streamed block pointing at the host. `copies` counts block copies issued (a forward
with n streamed blocks issues n, fewer if they fit), `bytes_copied` their bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .host import Copier, MappedHost, PinnedHost
from .layout import TAIL, BlockLayout, view


class _Strategy:
    """What the three strategies share: the streamed blocks' layouts, the host, the counters."""

    def __init__(self, layouts: Sequence[BlockLayout], host: PinnedHost | MappedHost, device: torch.device) -> None:
        self.layouts = layouts
        self.host = host
        self.device = device
        self.n = len(layouts)
        self.slot_bytes = max((layout.size for layout in layouts), default=0)
        self.slots: list[torch.Tensor] = []  # preallocated device slots while resumed (none for layer units)
        self.copies = 0
        self.bytes_copied = 0

    def _to_host(self, j: int) -> None:
        self.layouts[j].point(self.host.rest[j])


class SlotRing(_Strategy):
    """A ring of `num_slots` block slots; `prefetch` blocks ahead are copied (wrapping to the next forward's first
    blocks)."""

    def __init__(self, layouts: Sequence[BlockLayout], host: PinnedHost | MappedHost, device: torch.device,
                 prefetch: int) -> None:
        super().__init__(layouts, host, device)
        self.prefetch = prefetch
        self.num_slots = min(prefetch + 1, self.n)

    def resume(self, copier: Copier) -> None:
        self.copier = copier
        self.slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device)
                      for _ in range(self.num_slots)]
        # Typed views of every streamed block's tensors in every slot, made once: the hooks only re-point `.data`.
        self._views = [[layout.views(slot) for slot in self.slots] for layout in self.layouts]
        self._holds: list[int | None] = [None] * self.num_slots  # block index each slot holds (or is receiving)
        self._where: dict[int, int] = {}  # block index -> slot
        self._next_slot = 0
        self._current: int | None = None  # block running now (its tensors point into a slot)
        self._copied = copier.events(self.num_slots)
        self._computed = copier.events(self.num_slots)

    def hook(self, block: nn.Module, j: int) -> list[RemovableHandle]:
        return [block.register_forward_pre_hook(lambda *_: self._enter(j)),
                block.register_forward_hook(lambda *_: self._after(j))]

    def _after(self, j: int) -> None:
        self.copier.record(self._computed[self._where[j]])
        self._to_host(j)
        self._current = None

    def start_forward(self) -> None:
        if self._current is not None:
            self._to_host(self._current)
            self._current = None
            for event in self._computed:  # later copies must also wait for the interrupted block's queued kernels
                self.copier.record(event)

    def _enter(self, j: int) -> None:
        """Streamed block j is about to run: make sure its copy is issued and awaited, point its tensors into the
        slot, then issue the copies of the next `prefetch` blocks."""
        slot = self._where.get(j)
        if slot is None:
            slot = self._issue(j)
        self.host.ready(self.slots[slot])
        self.copier.wait(self._copied[slot])
        self.layouts[j].point(self._views[j][slot])
        self._current = j
        for k in range(1, self.prefetch + 1):
            b = (j + k) % self.n
            if b not in self._where:
                self._issue(b)

    def _issue(self, j: int) -> int:
        """Start copying streamed block j into the oldest slot (never the one running); returns the slot."""
        slot = self._next_slot
        if self.num_slots > 1 and self._current is not None and self._holds[slot] == self._current:
            slot = (slot + 1) % self.num_slots
        self._next_slot = (slot + 1) % self.num_slots
        evicted = self._holds[slot]
        if evicted is not None:
            del self._where[evicted]
        self._holds[slot] = j
        self._where[j] = slot
        self.copies += 1
        self.bytes_copied += self.layouts[j].size
        self.host.copy_block(j, self.slots[slot], self._computed[slot], self._copied[slot])
        return slot

    def suspend(self) -> None:
        self.slots = []
        self._views = []
        self._holds = [None] * self.num_slots
        self._where = {}


class SplitSlot(_Strategy):
    """One slot for blocks of one layout (pinned host only): head and tail are copied separately."""

    num_slots = 1

    def __init__(self, layouts: Sequence[BlockLayout], host: PinnedHost, device: torch.device) -> None:
        super().__init__(layouts, host, device)
        self.tail_at = layouts[0].starts[0]

    @staticmethod
    def fits(layouts: Sequence[BlockLayout]) -> bool:
        """Every block has the same size and tail offset, with a non-empty head and tail."""
        tails = {layout.starts[0] for layout in layouts}
        sizes = {layout.size for layout in layouts}
        return len(layouts) > 1 and len(tails) == 1 and len(sizes) == 1 and 0 < min(tails) < max(sizes)

    def resume(self, copier: Copier) -> None:
        self.copier = copier
        self.slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device)]
        self._views = [layout.views(self.slots[0]) for layout in self.layouts]
        self._current: int | None = None
        self._in_head: int | None = None  # block whose head is in (or arriving in) the slot
        self._in_tail: int | None = None  # ... and whose tail
        self._tail_entered = False  # the running block has started its tail (its FFN)
        self._part_copied = copier.events(2)  # [head, tail] copied
        self._part_free = copier.events(2)  # [head, tail] free to overwrite

    def hook(self, block: nn.Module, j: int) -> list[RemovableHandle]:
        return [block.register_forward_pre_hook(lambda *_: self._enter(j)),
                block.register_forward_hook(lambda *_: self._after(j)),
                getattr(block, TAIL).register_forward_pre_hook(lambda *_: self._tail(j))]

    def _enter(self, j: int) -> None:
        """Streamed block j is about to run: its head must have arrived (its tail is awaited by the tail hook, while
        the head computes)."""
        if self._in_head != j:
            self._issue_part(j, 0)
        if self._in_tail != j:
            self._issue_part(j, 1)
        self.copier.wait(self._part_copied[0])
        self.layouts[j].point(self._views[j])
        self._current = j
        self._tail_entered = False

    def _tail(self, j: int) -> None:
        """Block j's FFN is about to run (once per chunk; the first call acts): its head is no longer read, so the
        next block's head is copied over it; the FFN waits for its own tail."""
        if self._tail_entered:
            return
        self._tail_entered = True
        self.copier.record(self._part_free[0])
        self._issue_part((j + 1) % self.n, 0)
        if self._in_tail != j:
            self._issue_part(j, 1)
        self.copier.wait(self._part_copied[1])

    def _after(self, j: int) -> None:
        self.copier.record(self._part_free[1])
        self._to_host(j)
        self._current = None
        self._issue_part((j + 1) % self.n, 1)

    def _issue_part(self, j: int, part: int) -> None:
        """Start copying the head (part 0) or tail (part 1) of streamed block j into the slot."""
        lo, hi = (0, self.tail_at) if part == 0 else (self.tail_at, self.layouts[j].size)
        if part == 0:
            self._in_head = j
            self.copies += 1
        else:
            self._in_tail = j
        self.bytes_copied += hi - lo
        self.host.copy_range(j, lo, hi, self.slots[0][lo:hi], self._part_free[part], self._part_copied[part])

    def start_forward(self) -> None:
        if self._current is not None:
            self._to_host(self._current)
            self._current = None
            for event in self._part_free:  # later copies must also wait for the interrupted block's queued kernels
                self.copier.record(event)

    def suspend(self) -> None:
        self.slots = []
        self._views = []
        self._in_head = self._in_tail = None


@dataclass
class Held:
    """One unit's device copy, as typed views of its tensors (they own the buffer), and the event its copy records."""

    views: list[tuple[int, torch.Tensor]]  # (index into the block's entries, view in the unit's buffer)
    copied: torch.cuda.Event | None
    entered: bool = False


class LayerUnits(_Strategy):
    """Layer streaming (pinned host only): the small tensors outside the units (norms, modulation: ~0.2 MB a block)
    stay on the device; units come and go in buffers of their own."""

    num_slots = 0

    def __init__(self, layouts: Sequence[BlockLayout], host: PinnedHost, device: torch.device,
                 units: tuple[tuple[str, str | None], ...]) -> None:
        super().__init__(layouts, host, device)
        self.units = units
        self._unit_indices = [layout.part_indices() for layout in layouts]  # per block and unit: its entries
        self.held: dict[tuple[int, int], Held] = {}  # (block, unit) -> its device copy, in issue order

    def resume(self, copier: Copier) -> None:
        self.copier = copier
        self._rest_device = []
        for j, layout in enumerate(self.layouts):
            rest = layout.starts[0]
            buf = torch.empty(rest, dtype=torch.uint8, device=self.device).copy_(self.host.range(j, 0, rest))
            self._rest_device.append(buf)
            for e in layout.entries:
                if e.offset < rest:
                    e.tensor.data = view(buf, e.offset, e.dtype, e.shape)
        self.held = {}
        self._unit_now: tuple[int, int] | None = None  # the unit running now

    def hook(self, block: nn.Module, j: int) -> list[RemovableHandle]:
        """A unit is entered by the first call of any of its modules (chunked work calls them many times); a unit
        declared done when a module returns gets a hook on that module's forward; the block's end releases the last
        one."""
        hooks = []
        for u, (name, done) in enumerate(self.units):
            for mod in block.get_submodule(name).modules():
                hooks.append(mod.register_forward_pre_hook(self._unit_hook(j, u)))
            if done is not None:
                hooks.append(block.get_submodule(done).register_forward_hook(self._return_hook(j, u)))
        hooks.append(block.register_forward_hook(lambda *_: self._release_entered()))
        return hooks

    def _unit_hook(self, j: int, u: int):
        def unit_hook(module: nn.Module, args: tuple) -> None:
            if self._unit_now != (j, u):
                self._enter_unit(j, u)

        return unit_hook

    def _return_hook(self, j: int, u: int):
        def return_hook(module: nn.Module, args: tuple, output: object) -> None:
            """The unit is done and the block's activation peak comes next: release it, and only then fetch the
            next unit, so that the peak holds one unit's weights."""
            self._release_entered()
            self._issue_next(j, u)

        return return_hook

    def _issue_unit(self, j: int, u: int) -> None:
        """Allocate a device buffer for unit u of streamed block j and copy the unit into it on the side stream,
        once the compute stream has reached this point (the allocator may hand out memory that kernels queued
        before still read)."""
        layout = self.layouts[j]
        lo, hi = layout.starts[u], layout.starts[u + 1]
        buf = torch.empty(hi - lo, dtype=torch.uint8, device=self.device)
        allocated, copied = self.copier.events(2)
        self.copier.record(allocated)
        self.host.copy_range(j, lo, hi, buf, allocated, copied)
        views = [(k, view(buf, layout.entries[k].offset - lo, layout.entries[k].dtype, layout.entries[k].shape))
                 for k in self._unit_indices[j][u]]
        self.held[j, u] = Held(views, copied)
        self.copies += int(u == 0)
        self.bytes_copied += hi - lo

    def _issue_next(self, j: int, u: int) -> None:
        """Fetch the unit after (j, u): the block's next one, or the next block's first (wrapping to the next
        forward's first block)."""
        nxt = (j, u + 1) if u + 1 < len(self.units) else ((j + 1) % self.n, 0)
        if nxt not in self.held:
            self._issue_unit(*nxt)

    def _enter_unit(self, j: int, u: int) -> None:
        """Unit u of streamed block j is about to run: release the unit before it, wait for its copy, point its
        tensors into its buffer, and fetch the next unit (unless the unit ends with a module's return: then that
        hook does)."""
        self._release_entered()
        if (j, u) not in self.held:
            self._issue_unit(j, u)
        held = self.held[j, u]
        self.copier.wait(held.copied)
        for k, v in held.views:
            self.layouts[j].entries[k].tensor.data = v
        held.entered = True
        self._unit_now = (j, u)
        if self.units[u][1] is None:
            self._issue_next(j, u)

    def _release_entered(self) -> None:
        """Drop the running unit's device copy (its tensors point back at the host buffer). The allocator frees
        in the compute stream's order, after the kernels that read it."""
        if self._unit_now is not None:
            self._release_unit(self._unit_now)
            self._unit_now = None

    def _release_unit(self, key: tuple[int, int]) -> None:
        held = self.held.pop(key)
        if not held.entered:  # its copy may still be writing: free it after the copy
            self.copier.wait(held.copied)
        rest = self.host.rest[key[0]]
        for k, _ in held.views:
            self.layouts[key[0]].entries[k].tensor.data = rest[k]

    def start_forward(self) -> None:
        """Keep only a prefetched first unit."""
        self._release_entered()
        for key in [k for k in self.held if k != (0, 0)]:
            self._release_unit(key)

    def suspend(self) -> None:
        for key in list(self.held):
            self._release_unit(key)
        for j in range(self.n):
            self._to_host(j)
        self._rest_device = []
