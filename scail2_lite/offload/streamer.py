"""Block streaming: DiT blocks live in pinned RAM, or stay in the quantized safetensors shards on disk (the "mmap"
weight source: read per use, the model's block tensors are views of the mapped files), and are copied into a small
ring of preallocated GPU slots on a side stream while the previous block computes.

Why this shape: a 14B block is 0.8 GB in bf16 (0.4 GB in 8 bits) and takes 0.1-0.5 s to compute at 512p-704p, so
one block of look-ahead hides a PCIe copy completely; the slots are allocated once, so the caching allocator sees no
churn; and only data moves (the module's tensors are re-pointed with `.data =` in forward hooks), so the numbers are
those of the resident model, bit for bit. The model needs no change: it must call each block of `model.blocks` once
per forward, in order, and touch block weights nowhere else (the contract written in `model.py`). Inference only.

Ordering on CUDA, for a block running in slot s:
  copy of the block into s  --waits for-->  `computed[s]` (the last block that ran in s has been consumed)
  compute of the block      --waits for-->  `copied[s]`   (its weights have arrived)
With one slot (prefetch 0, profile `8gb`) the copies still overlap compute: a block's tensors are laid
out with its `ffn` (which runs last and reads only its own weights, model.py's contract) at the end of the slot, so
the next block's head (attention, norms, modulation) is copied while the FFN runs, and its FFN while its attention
runs:
  copy of head j+1  --waits for-->  block j has reached its FFN     compute of block j+1  --waits for-->  head j+1
  copy of FFN j+1   --waits for-->  block j has finished            FFN of block j+1      --waits for-->  FFN j+1

Layer streaming (unit "layer", the lightest profile) holds less than a slot: the block declares its big-weight
submodules in the order it runs them (`STREAM_UNITS`: self-attention q, k, v, o, the cross-attention, the FFN),
the small tensors outside them stay on the device, and each unit gets a buffer from the caching allocator when it
is fetched and gives it back when the next unit starts. One unit ahead is fetched, except across the activation
peak: the unit declared done when a module returns (v, when the q/k/v projections return, right before the
attention) is dropped then, and only then is the next one (o) fetched. So the attention runs beside one 5120x5120
weight instead of a 0.8 GB slot (diffusers' leaf level holds the current and the next Linear). Each copy waits for
the compute stream to reach the point where its buffer was allocated, then overlaps the unit before it.
On a CPU device the same code runs with synchronous copies (used by the tests).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
from torch import nn

from ..errors import UserError
from ..formats import WeightFiles

ALIGN = 4096  # byte alignment of every tensor in host buffers and slots: any dtype view, page-aligned pinning
TAIL = "ffn"  # the block submodule that runs last and reads only its own weights (model.py's contract)
Source = Literal["pinned", "mmap"]
Unit = Literal["block", "layer"]

def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _view(buf: torch.Tensor, offset: int, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    """A typed view of `shape` at byte `offset` of the flat uint8 `buf` (no copy)."""
    n = shape.numel() * dtype.itemsize
    return buf[offset : offset + n].view(dtype).view(shape)


@dataclass
class _Entry:
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
class _Held:
    """Layer mode: one unit's device copy, as typed views of its tensors (they own the buffer), and the event its
    copy records."""

    views: list[tuple[int, torch.Tensor]]  # (index into the block's entries, view in the unit's buffer)
    copied: torch.cuda.Event | None
    entered: bool = False


def _block_entries(block: nn.Module, prefix: str, parts: Sequence[str]) -> tuple[list[_Entry], int, list[int]]:
    """Every parameter and buffer of `block` (each tensor once) laid out at aligned offsets: first those outside
    the `parts` submodules, then each part's in the given order (a part is one byte range); returns (entries,
    bytes, the byte offset where each part starts followed by the block's size)."""
    groups: list[list[tuple[str, torch.Tensor]]] = [[] for _ in range(len(parts) + 1)]
    seen: set[int] = set()
    for mod_name, mod in block.named_modules(prefix=prefix):
        group = next((k + 1 for k, part in enumerate(parts) if (mod_name + ".").startswith(f"{prefix}.{part}.")), 0)
        for name, t in [*mod._parameters.items(), *mod._buffers.items()]:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            groups[group].append((f"{mod_name}.{name}", t))
    entries: list[_Entry] = []
    starts: list[int] = []
    offset = 0
    for k, group in enumerate(groups):
        if k:
            starts.append(offset)
        for name, t in group:
            entries.append(_Entry(name, t, offset, t.dtype, t.shape))
            offset += _aligned(_nbytes(t))
    return entries, offset, [*starts, offset]


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


def resident_tensors(model: nn.Module, streamed: Sequence[nn.Module]) -> list[tuple[nn.Module, str, bool, torch.Tensor]]:
    """(module, name, is parameter, data) of every parameter and buffer outside the `streamed` blocks: what a
    placement keeps on the device."""
    skip = {id(m) for b in streamed for m in b.modules()}
    out = []
    for mod in model.modules():
        if id(mod) in skip:
            continue
        out += [(mod, name, True, p.data) for name, p in mod._parameters.items() if p is not None]
        out += [(mod, name, False, b) for name, b in mod._buffers.items() if b is not None]
    return out


class BlockStreamer:
    """Keep `model`'s non-block layers and first `resident_blocks` blocks on `device`; stream the other blocks.

    source "pinned": one page-locked host buffer holds every streamed block (registered with cudaHostRegister, so no
    power-of-two rounding of the caching host allocator). source "mmap": blocks are read from the safetensors
    `weights` files (keys = the model's state_dict names) into a ring of two pinned staging buffers by a worker
    thread; process RAM stays at two blocks. With `weights` given, the pinned buffer is also filled straight from
    the files (no second copy of a block in RAM while it fills). `prefetch` = how many blocks ahead are copied
    (ring of `prefetch + 1` slots, each as large as the largest block). `unit` "layer" streams the blocks' units
    instead (module docstring; pinned source only, `prefetch` unused).

    Use as a context manager or call `detach()`. `suspend()` gives the GPU back between segments (slots freed,
    resident layers left for the caller to move) while the host side stays ready for `resume()`.
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device | str,
        resident_blocks: int = 0,
        prefetch: int = 1,
        source: Source = "pinned",
        weights: str | Path | Sequence[str | Path] | WeightFiles | None = None,
        unit: Unit = "block",
    ) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise UserError("model has no non-empty nn.ModuleList 'blocks' to stream")
        if not 0 <= resident_blocks <= len(blocks):
            raise UserError(f"resident_blocks must be 0..{len(blocks)}, got {resident_blocks}")
        if prefetch < 0:
            raise UserError(f"prefetch must be >= 0, got {prefetch}")
        if source not in ("pinned", "mmap"):
            raise UserError(f"weight source must be 'pinned' or 'mmap', got {source!r}")
        if source == "mmap" and weights is None:
            raise UserError("weight source 'mmap' needs the safetensors file(s) holding the blocks")
        if unit not in ("block", "layer"):
            raise UserError(f"stream unit must be 'block' or 'layer', got {unit!r}")
        if unit == "layer" and source != "pinned":
            raise UserError("layer streaming reads the blocks from pinned RAM: use weight source 'pinned'")
        self.model = model
        self.source = source
        self.resident_blocks = resident_blocks
        self.prefetch = prefetch
        self.copies = 0  # block copies issued since attach (a forward with n streamed blocks issues n, fewer if they fit)
        self.bytes_copied = 0

        streamed = list(blocks)[resident_blocks:]
        self._streamed = streamed
        self._n = len(streamed)
        self.layers = unit == "layer"
        self._units = stream_units(streamed[0]) if self.layers and streamed else ()
        if self.layers and any(stream_units(b) != self._units for b in streamed):
            raise UserError("layer streaming needs the same STREAM_UNITS in every streamed block")
        parts = [name for name, _ in self._units] if self.layers else [TAIL]
        layouts = [_block_entries(b, f"blocks.{resident_blocks + j}", parts) for j, b in enumerate(streamed)]
        self._entries = [entries for entries, _, _ in layouts]
        self._sizes = [size for _, size, _ in layouts]
        self._starts = [starts for _, _, starts in layouts]  # per block: where each part starts, then its size
        self._unit_indices = [  # layer mode, per block and unit: the indices of the unit's entries
            [[k for k, e in enumerate(entries) if lo <= e.offset < hi] for lo, hi in zip(starts, starts[1:])]
            for entries, starts in zip(self._entries, self._starts)] if self.layers else []
        self.slot_bytes = max(self._sizes, default=0)
        self.num_slots = 0 if self.layers else min(prefetch + 1, self._n)
        # One pinned slot for several blocks of one layout: head and tail are copied separately (see the docstring)
        tails = {starts[0] for starts in self._starts}
        self.split = (not self.layers and self.num_slots == 1 and self._n > 1 and source == "pinned"
                      and len(tails) == 1 and len({*self._sizes}) == 1 and 0 < min(tails) < self.slot_bytes)
        self._tail_at = min(tails, default=0)

        self._files: WeightFiles | None = None
        if weights is not None:
            self._files = weights if isinstance(weights, WeightFiles) else WeightFiles(
                [weights] if isinstance(weights, (str, Path)) else list(weights))
            for entries in self._entries:
                for e in entries:
                    self._files.check(e.name, e.dtype, e.shape, e.name)
        self._host: torch.Tensor | None = None
        self._registered = False
        self._rest: list[list[torch.Tensor]]  # per block: the host tensors its entries point at between runs
        if source == "pinned":
            self._rest = self._fill_host()
        else:
            self._rest = [[self._files.view(e.name) for e in entries] for entries in self._entries]
            for entries, rest in zip(self._entries, self._rest):
                for e, r in zip(entries, rest):
                    e.tensor.data = r  # the model's own copy of the block is released here
        self._hooks: list = []  # non-empty while attached
        try:
            self.resume()
        except BaseException:
            self.detach()
            raise

    # ---- setup ------------------------------------------------------------------------------------------------

    def _move_resident(self) -> None:
        """Move every tensor of the model except the streamed blocks' to the device (they stay there)."""
        for mod, name, is_param, t in resident_tensors(self.model, self._streamed):
            if is_param:
                mod._parameters[name].data = t.to(self.device)
            else:
                mod._buffers[name] = t.to(self.device)

    def _fill_host(self) -> list[list[torch.Tensor]]:
        """Gather the streamed blocks into one flat host buffer, block after block, then page-lock it in place.
        From the weight files when given (read straight into the buffer), else from the model's tensors (each
        original is freed as it is replaced, so RAM peaks at the model plus one block)."""
        starts = []
        total = 0
        for size in self._sizes:
            starts.append(total)
            total += size
        self._host = torch.empty(total, dtype=torch.uint8)
        rest = []
        for entries, start in zip(self._entries, starts):
            views = []
            for e in entries:
                view = _view(self._host, start + e.offset, e.dtype, e.shape)
                if self._files is not None:
                    self._files.read_into(e.name, self._host[start + e.offset : start + e.offset + e.nbytes])
                else:
                    view.copy_(e.tensor.detach())
                e.tensor.data = view
                views.append(view)
            rest.append(views)
        if self.cuda and total:
            cudart = torch.cuda.cudart()
            err = cudart.cudaHostRegister(self._host.data_ptr(), total, 0)
            if int(err) != 0:
                raise UserError(f"cannot page-lock {total / 1e9:.1f} GB of RAM for streaming (CUDA error {int(err)})")
            self._registered = True
        self._host_starts = starts
        return rest

    def resume(self) -> None:
        """Move the resident layers to the device, allocate the slots and hook the blocks (no-op if attached)."""
        if self._hooks:
            return
        self._move_resident()
        self._slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device)
                       for _ in range(self.num_slots)]
        # Typed views of every streamed block's tensors in every slot, made once: the hooks only re-point `.data`.
        self._views = [
            [[_view(slot, e.offset, e.dtype, e.shape) for e in entries] for slot in self._slots]
            for entries in self._entries
        ]
        self._holds: list[int | None] = [None] * self.num_slots  # block index each slot holds (or is receiving)
        self._where: dict[int, int] = {}  # block index -> slot
        self._next_slot = 0
        self._current: int | None = None  # block running now (its tensors point into a slot)
        self._pending: dict[int, Future] = {}  # mmap mode: slot -> worker job that issues its copy
        self._in_head: int | None = None  # split mode: block whose head is in (or arriving in) the slot
        self._in_tail: int | None = None  # ... and whose tail
        self._tail_entered = False  # split mode: the running block has started its tail (its FFN)
        if self.cuda:
            self._copy_stream = torch.cuda.Stream(self.device)
            self._copied = [torch.cuda.Event() for _ in range(self.num_slots)]
            self._computed = [torch.cuda.Event() for _ in range(self.num_slots)]
            # split mode: [head, tail] copied / free to overwrite
            self._part_copied = [torch.cuda.Event(), torch.cuda.Event()]
            self._part_free = [torch.cuda.Event(), torch.cuda.Event()]
        if self.source == "mmap" and self.cuda:
            self._staging = [torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            self._staging_free = [torch.cuda.Event() for _ in range(2)]
            self._next_staging = 0
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scail2-stream")
        if self.layers:
            self._resume_layers()
        for i, block in enumerate(self.model.blocks):
            if i == 0 or (i >= self.resident_blocks and not self.layers):
                self._hooks.append(block.register_forward_pre_hook(self._make_pre_hook(i)))
            if i >= self.resident_blocks:
                j = i - self.resident_blocks
                if self.layers:
                    self._hook_units(block, j)
                else:
                    self._hooks.append(block.register_forward_hook(self._make_post_hook(j)))
                if self.split:
                    self._hooks.append(getattr(block, TAIL).register_forward_pre_hook(self._make_tail_hook(j)))

    @property
    def host_bytes(self) -> int:
        """Page-locked RAM held for weights (streamed blocks in pinned mode, the staging ring in mmap mode)."""
        if self.source == "pinned":
            return 0 if self._host is None else self._host.numel()
        return 2 * self.slot_bytes if self.cuda else 0

    # ---- copies -----------------------------------------------------------------------------------------------

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
        self.bytes_copied += self._sizes[j]
        if not self.cuda:
            if self.source == "mmap":
                self._read_block(j, self._slots[slot])
            else:
                for src, dst in zip(self._rest[j], self._views[j][slot]):
                    dst.copy_(src)
        elif self.source == "pinned":
            start = self._host_starts[j]
            self._cuda_copy(self._slots[slot], self._host[start : start + self._sizes[j]], self._computed[slot],
                            self._copied[slot])
        else:
            previous = self._pending.pop(slot, None)
            if previous is not None:
                previous.result()
            self._pending[slot] = self._worker.submit(self._stage_and_copy, j, slot)
        return slot

    def _issue_part(self, j: int, part: int) -> None:
        """Split mode: start copying the head (part 0) or tail (part 1) of streamed block j into the slot."""
        lo, hi = (0, self._tail_at) if part == 0 else (self._tail_at, self._sizes[j])
        if part == 0:
            self._in_head = j
            self.copies += 1
        else:
            self._in_tail = j
        self.bytes_copied += hi - lo
        start = self._host_starts[j]  # the host buffer has the slot's layout: the part is one byte range
        src, dst = self._host[start + lo : start + hi], self._slots[0][lo:hi]
        if self.cuda:
            self._cuda_copy(dst, src, self._part_free[part], self._part_copied[part])
        else:
            dst.copy_(src)

    def _read_block(self, j: int, dest: torch.Tensor) -> None:
        """Read streamed block j from the weight files into the flat uint8 buffer `dest` (its slot layout)."""
        for e in self._entries[j]:
            self._files.read_into(e.name, dest[e.offset : e.offset + e.nbytes])

    def _cuda_copy(self, dst: torch.Tensor, src: torch.Tensor, after: torch.cuda.Event, copied: torch.cuda.Event,
                   done: torch.cuda.Event | None = None) -> None:
        """Copy host `src` into the start of GPU `dst` on the side stream once `after` has passed (the bytes it
        overwrites are no longer read); record `copied` (and `done`, the source's release) behind it."""
        with torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_event(after)
            dst[: src.numel()].copy_(src, non_blocking=True)
            copied.record(self._copy_stream)
            if done is not None:
                done.record(self._copy_stream)

    def _stage_and_copy(self, j: int, slot: int) -> None:
        """Worker thread (mmap mode): weight files -> pinned staging buffer (plain reads: the page cache serves
        them and the process's resident set does not grow), then an async copy staging -> slot. Two staging
        buffers: one fills while the other is copied."""
        k = self._next_staging
        self._next_staging = 1 - k
        staging = self._staging[k]
        self._staging_free[k].synchronize()  # its previous copy to the GPU has finished
        self._read_block(j, staging)
        self._cuda_copy(self._slots[slot], staging[: self._sizes[j]], self._computed[slot], self._copied[slot],
                        self._staging_free[k])

    # ---- hooks ------------------------------------------------------------------------------------------------

    def _make_pre_hook(self, i: int) -> Callable:
        def pre_hook(module: nn.Module, args: tuple) -> None:
            if i == 0:
                self._start_forward()
            j = i - self.resident_blocks
            if j >= 0 and not self.layers:
                self._enter(j)

        return pre_hook

    def _make_post_hook(self, j: int) -> Callable:
        def post_hook(module: nn.Module, args: tuple, output: object) -> None:
            if self.cuda:
                event = self._part_free[1] if self.split else self._computed[self._where[j]]
                event.record(torch.cuda.current_stream(self.device))
            for e, rest in zip(self._entries[j], self._rest[j]):
                e.tensor.data = rest
            self._current = None
            if self.split:
                self._issue_part((j + 1) % self._n, 1)

        return post_hook

    def _make_tail_hook(self, j: int) -> Callable:
        def tail_hook(module: nn.Module, args: tuple) -> None:
            """Split mode, block j's FFN is about to run (once per chunk; the first call acts): its head is no
            longer read, so the next block's head is copied over it; the FFN waits for its own tail."""
            if self._tail_entered:
                return
            self._tail_entered = True
            if self.cuda:
                self._part_free[0].record(torch.cuda.current_stream(self.device))
            self._issue_part((j + 1) % self._n, 0)
            if self._in_tail != j:
                self._issue_part(j, 1)
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(self._part_copied[1])

        return tail_hook

    def _start_forward(self) -> None:
        """Block 0 is about to run: undo what an interrupted forward (an exception inside a block) left behind."""
        if self.layers:  # keep only a prefetched first unit
            self._release_entered()
            for key in [k for k in self._held if k != (0, 0)]:
                self._release_unit(key)
            return
        if self._current is not None:
            for e, rest in zip(self._entries[self._current], self._rest[self._current]):
                e.tensor.data = rest
            self._current = None
            if self.cuda:  # later copies must also wait for the interrupted block's queued kernels
                stream = torch.cuda.current_stream(self.device)
                for event in (*self._computed, *self._part_free):
                    event.record(stream)

    def _enter(self, j: int) -> None:
        """Streamed block j is about to run: make sure its copy is issued and awaited, point its tensors into the
        slot, then issue the copies of the next `prefetch` blocks (wrapping to the next forward's first blocks)."""
        if self.split:
            self._enter_split(j)
            return
        slot = self._where.get(j)
        if slot is None:
            slot = self._issue(j)
        if self.cuda:
            job = self._pending.pop(slot, None)
            if job is not None:
                job.result()
            torch.cuda.current_stream(self.device).wait_event(self._copied[slot])
        for e, view in zip(self._entries[j], self._views[j][slot]):
            e.tensor.data = view
        self._current = j
        for k in range(1, self.prefetch + 1):
            b = (j + k) % self._n
            if b not in self._where:
                self._issue(b)

    def _enter_split(self, j: int) -> None:
        """Split mode, streamed block j is about to run: its head must have arrived (its tail is awaited by the
        tail hook, while the head computes)."""
        if self._in_head != j:
            self._issue_part(j, 0)
        if self._in_tail != j:
            self._issue_part(j, 1)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self._part_copied[0])
        for e, view in zip(self._entries[j], self._views[j][0]):
            e.tensor.data = view
        self._current = j
        self._tail_entered = False

    # ---- layer streaming -------------------------------------------------------------------------------------

    def _resume_layers(self) -> None:
        """Layer mode: the small tensors outside the units (norms, modulation: ~0.2 MB a block) stay on the device;
        units come and go in buffers of their own."""
        self._rest_device = []
        for j, entries in enumerate(self._entries):
            start, rest = self._host_starts[j], self._starts[j][0]
            buf = torch.empty(rest, dtype=torch.uint8, device=self.device).copy_(self._host[start : start + rest])
            self._rest_device.append(buf)
            for e in entries:
                if e.offset < rest:
                    e.tensor.data = _view(buf, e.offset, e.dtype, e.shape)
        self._held: dict[tuple[int, int], _Held] = {}  # (block, unit) -> its device copy, in issue order
        self._unit_now: tuple[int, int] | None = None  # the unit running now

    def _hook_units(self, block: nn.Module, j: int) -> None:
        """A unit is entered by the first call of any of its modules (chunked work calls them many times); a unit
        declared done when a module returns gets a hook on that module's forward; the block's end releases the last
        one."""
        for u, (name, done) in enumerate(self._units):
            for mod in block.get_submodule(name).modules():
                self._hooks.append(mod.register_forward_pre_hook(self._make_unit_hook(j, u)))
            if done is not None:
                self._hooks.append(block.get_submodule(done).register_forward_hook(self._make_return_hook(j, u)))
        self._hooks.append(block.register_forward_hook(lambda *_: self._release_entered()))

    def _make_unit_hook(self, j: int, u: int) -> Callable:
        def unit_hook(module: nn.Module, args: tuple) -> None:
            if self._unit_now != (j, u):
                self._enter_unit(j, u)

        return unit_hook

    def _make_return_hook(self, j: int, u: int) -> Callable:
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
        lo, hi = self._starts[j][u], self._starts[j][u + 1]
        buf = torch.empty(hi - lo, dtype=torch.uint8, device=self.device)
        src = self._host[self._host_starts[j] + lo : self._host_starts[j] + hi]
        copied = None
        if self.cuda:
            allocated, copied = torch.cuda.Event(), torch.cuda.Event()
            allocated.record(torch.cuda.current_stream(self.device))
            self._cuda_copy(buf, src, allocated, copied)
        else:
            buf.copy_(src)
        entries = self._entries[j]
        views = [(k, _view(buf, entries[k].offset - lo, entries[k].dtype, entries[k].shape))
                 for k in self._unit_indices[j][u]]
        self._held[j, u] = _Held(views, copied)
        self.copies += int(u == 0)
        self.bytes_copied += hi - lo

    def _issue_next(self, j: int, u: int) -> None:
        """Fetch the unit after (j, u): the block's next one, or the next block's first (wrapping to the next
        forward's first block)."""
        nxt = (j, u + 1) if u + 1 < len(self._units) else ((j + 1) % self._n, 0)
        if nxt not in self._held:
            self._issue_unit(*nxt)

    def _enter_unit(self, j: int, u: int) -> None:
        """Unit u of streamed block j is about to run: release the unit before it, wait for its copy, point its
        tensors into its buffer, and fetch the next unit (unless the unit ends with a module's return: then that
        hook does)."""
        self._release_entered()
        if (j, u) not in self._held:
            self._issue_unit(j, u)
        held = self._held[j, u]
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(held.copied)
        for k, view in held.views:
            self._entries[j][k].tensor.data = view
        held.entered = True
        self._unit_now = (j, u)
        if self._units[u][1] is None:
            self._issue_next(j, u)

    def _release_entered(self) -> None:
        """Drop the running unit's device copy (its tensors point back at the host buffer). The allocator frees
        in the compute stream's order, after the kernels that read it."""
        if self._unit_now is not None:
            self._release_unit(self._unit_now)
            self._unit_now = None

    def _release_unit(self, key: tuple[int, int]) -> None:
        held = self._held.pop(key)
        if self.cuda and not held.entered:  # its copy may still be writing: free it after the copy
            torch.cuda.current_stream(self.device).wait_event(held.copied)
        rest = self._rest[key[0]]
        for k, _ in held.views:
            self._entries[key[0]][k].tensor.data = rest[k]

    # ---- teardown ---------------------------------------------------------------------------------------------

    def suspend(self) -> None:
        """Unhook the blocks and free the slots; the host side (pinned buffer or file mapping) stays for `resume()`.
        Streamed blocks point at host memory afterwards; the caller moves the resident layers where it wants."""
        if not self._hooks:
            return
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for job in self._pending.values():
            job.result()
        self._pending.clear()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._start_forward()
        if self.layers:
            for key in list(self._held):
                self._release_unit(key)
            for entries, rest in zip(self._entries, self._rest):
                for e, r in zip(entries, rest):
                    e.tensor.data = r
            self._rest_device = []
        if self.source == "mmap" and self.cuda:
            self._worker.shutdown()
            self._staging = []
        self._slots = []
        self._views = []
        self._holds = [None] * self.num_slots
        self._where = {}
        self._in_head = self._in_tail = None

    def detach(self) -> None:
        """`suspend()`, then unpin the host buffer and close the weight files; streamed blocks stay in host memory
        (pinned mode: plain RAM; mmap mode: views of the mapped files). Safe to call twice."""
        self.suspend()
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self._host.data_ptr())
            self._registered = False
        if self._files is not None:
            self._files.close()

    def __enter__(self) -> "BlockStreamer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()
