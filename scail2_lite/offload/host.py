"""Where streamed blocks live between uses, and how their bytes reach a device buffer.

`PinnedHost`: one page-locked buffer holds every streamed block in its slot layout (registered with
cudaHostRegister, so no power-of-two rounding of the caching host allocator), filled from the model or read straight
from the weight files (no second copy of a block in RAM while it fills). `MappedHost`: the blocks stay in the
safetensors files; the model's block tensors are views of the mapped files, and each use reads the block into one of
two pinned staging buffers on a worker thread, so process RAM stays at two blocks.

Both answer the strategies the same way: `copy_block(j, dst, after, copied)` starts copying streamed block j into the
device buffer `dst` once the event `after` has passed and records `copied` behind it; `ready(dst)` returns once that
copy has been issued (so `copied` may be waited on). `Copier` is the ordering on the device: a side stream and
events on CUDA, synchronous copies and no events on a CPU device (used by the tests).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Sequence

import torch

from ..errors import UserError
from ..formats import WeightFiles
from .layout import BlockLayout, view

# Threads reading streamed blocks into a pinned buffer at once: one thread's reads are bound by faulting in the
# fresh buffer's pages and copying out of the page cache, work that spreads over cores (a user's desktop CPU has 8
# or more); more threads than that would only contend for the same memory bandwidth.
READ_THREADS = 4


class Copier:
    """Copies host -> device on a side stream and the events that order them against the compute stream; on a CPU
    device copies are synchronous and every event is None."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def events(self, n: int) -> list[torch.cuda.Event | None]:
        return [torch.cuda.Event() if self.cuda else None for _ in range(n)]

    def record(self, event: torch.cuda.Event | None) -> None:
        """Record `event` on the compute stream (the work queued so far)."""
        if self.cuda:
            event.record(torch.cuda.current_stream(self.device))

    def wait(self, event: torch.cuda.Event | None) -> None:
        """Make the compute stream wait for `event`."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(event)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: torch.cuda.Event | None,
             copied: torch.cuda.Event | None, done: torch.cuda.Event | None = None) -> None:
        """Copy host `src` into the start of device `dst` on the side stream once `after` has passed (the bytes it
        overwrites are no longer read); record `copied` (and `done`, the source's release) behind it."""
        if not self.cuda:
            dst[: src.numel()].copy_(src)
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(after)
            dst[: src.numel()].copy_(src, non_blocking=True)
            copied.record(self.stream)
            if done is not None:
                done.record(self.stream)

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


class PinnedHost:
    """Every streamed block in one flat host buffer, block after block in its slot layout, page-locked in place on
    CUDA. From the weight files when given (read straight into the buffer), else from the model's tensors (each
    original is freed as it is replaced, so RAM peaks at the model plus one block; a buffer they already live in, laid
    out alike, is taken over: the previous run's under the same plan). Each entry is re-pointed only
    once its bytes are in, so a fill stopped half way (`on_block` raising) leaves every block whole. Needs no device
    memory: it may be built on a worker thread while the GPU runs something else (placement.py)."""

    def __init__(self, layouts: Sequence[BlockLayout], files: WeightFiles | None, cuda: bool,
                 on_block: Callable[[int], None] | None = None) -> None:
        self.layouts = layouts
        self.starts: list[int] = []  # per block: its byte offset in the buffer
        total = 0
        for layout in layouts:
            self.starts.append(total)
            total += layout.size
        laid_out = None if files is not None else _laid_out(layouts, self.starts, total)
        self.buffer = laid_out if laid_out is not None else torch.empty(total, dtype=torch.uint8)
        self.registered = False
        self.rest: list[list[torch.Tensor]] = []  # per block: the host tensors its entries point at between runs
        # Read from the files on READ_THREADS threads, READ_THREADS blocks ahead of the one being put in place (each
        # block's bytes land in its own part of the buffer); the entries are re-pointed in block order as each
        # block's read ends. A stopped fill starts no other read, and leaving the pool waits for those running, so
        # none writes into the buffer afterwards.
        reads: dict[int, Future] = {}

        def read_ahead(b: int) -> None:
            if files is not None and b < len(layouts):
                reads[b] = pool.submit(self._read_block, files, layouts[b], self.starts[b])

        with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="scail2-fill") as pool:
            for b in range(READ_THREADS):
                read_ahead(b)
            try:
                for b, (layout, start) in enumerate(zip(layouts, self.starts)):
                    if files is not None:
                        reads.pop(b).result()
                    views = []
                    for e in layout.entries:
                        v = view(self.buffer, start + e.offset, e.dtype, e.shape)
                        if files is None and laid_out is None:
                            v.copy_(e.tensor.detach())
                        e.tensor.data = v
                        views.append(v)
                    self.rest.append(views)
                    if on_block is not None:
                        on_block(len(self.rest))  # blocks in place so far (progress; raises to stop the fill)
                    read_ahead(b + READ_THREADS)
            except BaseException:
                for read in reads.values():
                    read.cancel()
                raise
        if cuda and total:
            err = torch.cuda.cudart().cudaHostRegister(self.buffer.data_ptr(), total, 0)
            if int(err) != 0:
                raise UserError(f"cannot page-lock {total / 1e9:.1f} GB of RAM for streaming (CUDA error {int(err)})")
            self.registered = True

    def _read_block(self, files: WeightFiles, layout: BlockLayout, start: int) -> None:
        for e in layout.entries:
            files.read_into(e.name, self.buffer[start + e.offset : start + e.offset + e.nbytes])

    @property
    def nbytes(self) -> int:
        """Page-locked RAM held for weights."""
        return self.buffer.numel()

    def range(self, j: int, lo: int, hi: int) -> torch.Tensor:
        """Bytes lo..hi of streamed block j (one part of it when lo, hi are part starts)."""
        return self.buffer[self.starts[j] + lo : self.starts[j] + hi]

    def start(self, copier: Copier) -> None:
        self.copier = copier

    def copy_range(self, j: int, lo: int, hi: int, dst: torch.Tensor, after: torch.cuda.Event | None,
                   copied: torch.cuda.Event | None) -> None:
        """Copy bytes lo..hi of streamed block j into the start of `dst`."""
        self.copier.copy(dst, self.range(j, lo, hi), after, copied)

    def copy_block(self, j: int, dst: torch.Tensor, after: torch.cuda.Event | None,
                   copied: torch.cuda.Event | None) -> None:
        self.copy_range(j, 0, self.layouts[j].size, dst, after, copied)

    def ready(self, dst: torch.Tensor) -> None:
        """Copies are issued on the caller's thread: nothing to wait for."""

    def settle(self) -> None:
        """No copy is issued elsewhere."""

    def stop(self) -> None:
        """Nothing to free between segments: the buffer stays for the next `start`."""

    def release(self) -> None:
        """Unpin the buffer. It is freed with this host once no block points into it: the streamer points blocks that
        were views of mapped files back at them; a model held in RAM keeps it as its blocks' only copy."""
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
            self.registered = False


def _laid_out(layouts: Sequence[BlockLayout], starts: Sequence[int], total: int) -> torch.Tensor | None:
    """The flat uint8 buffer that the streamed tensors of a model held in RAM already fill in this layout (a previous
    `PinnedHost`'s, whose blocks are their only copy), else None. Copying them into a new buffer would hold both
    until the last block is in (the old one is one allocation): twice the streamed blocks in RAM."""
    base = None
    for layout, start in zip(layouts, starts):
        for e in layout.entries:
            storage = e.tensor.untyped_storage()
            base = storage if base is None else base
            if (storage.data_ptr() != base.data_ptr() or storage.device.type != "cpu" or not e.tensor.is_contiguous()
                    or e.tensor.data_ptr() - storage.data_ptr() != start + e.offset):
                return None
    if base is None or base.nbytes() != total:
        return None
    return torch.empty(0, dtype=torch.uint8).set_(base)


class MappedHost:
    """The streamed blocks stay in the safetensors files: the model's block tensors become views of the mapped files
    (the model's own copy of each block is released), and each copy reads the block again. On CUDA a worker thread
    reads into a ring of two pinned staging buffers (plain reads: the page cache serves them and the process's
    resident set does not grow), then copies staging -> device; one buffer fills while the other is copied."""

    def __init__(self, layouts: Sequence[BlockLayout], files: WeightFiles, cuda: bool) -> None:
        self.layouts = layouts
        self.files = files
        self.cuda = cuda
        self.staging_bytes = max((layout.size for layout in layouts), default=0)
        self.rest = [[files.view(e.name) for e in layout.entries] for layout in layouts]
        for layout, rest in zip(layouts, self.rest):
            layout.point(rest)
        self._pending: dict[int, Future] = {}  # device buffer address -> worker job that issues its copy

    @property
    def nbytes(self) -> int:
        """Page-locked RAM held for weights: the staging ring."""
        return 2 * self.staging_bytes if self.cuda else 0

    def read(self, j: int, dest: torch.Tensor) -> None:
        """Read streamed block j from the weight files into the flat uint8 buffer `dest` (its slot layout)."""
        for e in self.layouts[j].entries:
            self.files.read_into(e.name, dest[e.offset : e.offset + e.nbytes])

    def start(self, copier: Copier) -> None:
        self.copier = copier
        if self.cuda:
            self._staging = [torch.empty(self.staging_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            self._staging_free = copier.events(2)
            self._next_staging = 0
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scail2-stream")

    def copy_block(self, j: int, dst: torch.Tensor, after: torch.cuda.Event | None,
                   copied: torch.cuda.Event | None) -> None:
        if not self.cuda:
            self.read(j, dst)
            return
        previous = self._pending.pop(dst.data_ptr(), None)
        if previous is not None:
            previous.result()
        self._pending[dst.data_ptr()] = self._worker.submit(self._stage_and_copy, j, dst, after, copied)

    def _stage_and_copy(self, j: int, dst: torch.Tensor, after: torch.cuda.Event, copied: torch.cuda.Event) -> None:
        """Worker thread: weight files -> the next staging buffer once its previous copy has finished, then an
        async copy staging -> `dst`."""
        k = self._next_staging
        self._next_staging = 1 - k
        staging = self._staging[k]
        self._staging_free[k].synchronize()
        self.read(j, staging)
        self.copier.copy(dst, staging[: self.layouts[j].size], after, copied, self._staging_free[k])

    def ready(self, dst: torch.Tensor) -> None:
        """Wait until the worker has issued the copy into `dst` (its `copied` event is recorded)."""
        job = self._pending.pop(dst.data_ptr(), None)
        if job is not None:
            job.result()

    def settle(self) -> None:
        """Wait for every copy the worker still has to issue."""
        for job in self._pending.values():
            job.result()
        self._pending.clear()

    def stop(self) -> None:
        """Free the staging ring and stop the worker (the file mapping stays for the next `start`)."""
        if self.cuda:
            self._worker.shutdown()
            self._staging = []

    def release(self) -> None:
        """The mapping lives as long as the views; the caller closes the files."""
