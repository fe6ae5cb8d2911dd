"""Where the DiT runs during one generation: wholly on the device, or streamed block by block as a memory plan
says, with the out-of-memory fallback to a lighter plan. The plan also decides how the blocks compute (`Kernels`).

A placement has a host side (the streamed blocks read from the shards into one buffer, page-locked: RAM and
CPU only) and a device side (resident blocks, slots, hooks: it needs the encoders' memory gone). `prepare()` builds
the host side on a worker thread (`HostSide`) as soon as the plan is known, so the seconds it takes pass while the
encoders and the VAE encode hold the GPU; `apply()` then waits for it and does the device side."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..attention import resolve
from ..blocks import Kernels
from ..errors import UserError
from ..formats import FilePages
from .planner import Plan, lighter
from .layout import ResidentSet
from .profiles import WeightSource
from .streamer import BlockStreamer, StreamConfig


# (what it is doing, units done, units in all): a streamed block read is one unit, page-locking the buffer another.
HostProgress = Callable[[str, int, int], None]


class _Stopped(Exception):
    """Raised inside the worker when its host side is no longer wanted (an error or Ctrl-C in the main thread)."""


class HostSide:
    """A placement's host side built on a daemon worker thread: `build(on_block)` makes the not-yet-attached
    `BlockStreamer` (its `on_block` is told each block read). `wait()` hands the streamer over in the caller's
    thread, raising there whatever the worker raised (a `UserError` stays one line). `stop()` makes the worker give
    up at its next block (at most the blocks being read, `host.READ_THREADS`, or the page-locking call, away) and
    frees what it built, so Ctrl-C or SIGTERM in the main thread never waits for the whole read; being a daemon, the
    worker cannot hold up the interpreter's exit either. `seconds`: how long the worker took; `waited`: how long the
    caller waited for it, the host side's visible cost."""

    def __init__(self, build: Callable[[Callable[[int], None]], BlockStreamer], device: torch.device, blocks: int,
                 progress: HostProgress | None = None) -> None:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.blocks = blocks
        self.units = blocks + (device.type == "cuda")  # reading each block, then page-locking on CUDA
        self.progress = progress
        self.streamer: BlockStreamer | None = None
        self.error: BaseException | None = None
        self.seconds: float | None = None
        self.waited = 0.0
        self._stop = threading.Event()
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._run, args=(build,), name="scail2-dit-host-side", daemon=True)
        self._thread.start()

    def _run(self, build: Callable[[Callable[[int], None]], BlockStreamer]) -> None:
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)  # page-locked for this device's context (not the thread default)
            with torch.no_grad():
                self.streamer = build(self._block_done)
            self.seconds = time.perf_counter() - self._start
            self._tell(f"done in {self.seconds:.1f} s", self.units)
        except BaseException as e:  # handed to the main thread by `wait`
            self.error = e

    def _block_done(self, n: int) -> None:
        if self._stop.is_set():
            raise _Stopped
        self._tell("page-locking" if n == self.blocks < self.units else "reading the streamed blocks", n)

    def _tell(self, what: str, done: int) -> None:
        if self.progress is not None:
            self.progress(what, done, self.units)

    def wait(self) -> BlockStreamer:
        """The built streamer (host side in place, device side not yet); the worker's exception is raised here."""
        t = time.perf_counter()
        self._thread.join()
        self.waited += time.perf_counter() - t
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        streamer, self.streamer = self.streamer, None
        return streamer

    def stop(self) -> None:
        """Make the worker give up, wait for it (the blocks being read or the page-locking at most) and free what it
        built."""
        self._stop.set()
        self._thread.join()
        self.error = None  # `_Stopped`, or an error nobody will ask for now: its traceback holds the buffer
        if self.streamer is not None:
            self.streamer.detach()
            self.streamer = None


class DitPlacement:
    """Where the DiT runs during one generation: wholly on the device, or streamed block by block as a planner
    `Plan` says. `fallback()` re-places it under the next lighter plan after a CUDA out-of-memory error. Only data
    moves (same weights, same kernels, batch 1), so the numbers do not depend on the plan."""

    def __init__(self, model: torch.nn.Module, device: torch.device, plan: Plan | None = None,
                 attention: str | None = None, weight_files: Sequence[Path] = (),
                 on_fallback: Callable[[str], None] | None = None) -> None:
        self.model, self.device, self.plan = model, device, plan
        self.attention = attention  # the user's choice when there is no plan (a plan carries its resolved backend)
        self.weight_files = list(weight_files)
        self.streamer = None
        self.placed = False
        self.fallbacks: list[str] = []
        self.on_fallback = on_fallback  # told each "old -> new" re-plan as it happens
        self.streamers_built = 0  # host buffers set up (a later segment under the same plan reuses the last)
        self.resident: ResidentSet | None = None  # what moved to the device when no streamer runs
        self.host_side: HostSide | None = None  # the first placement's host side, built beside the encoders
        self._pending: HostSide | None = None  # ... until `apply` takes it

    def __enter__(self) -> "DitPlacement":
        """Owns the clean-up (`close` on exit, the worker stopped too); `apply()` places."""
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def prepare(self, progress: HostProgress | None = None) -> None:
        """Start building the host side of the first placement on a worker thread (`HostSide`), to run while the
        encoders use the GPU; `apply()` waits for it. Only where the plan streams blocks (else there is no host work);
        whether the RAM allows it is the planner's call (`Plan.overlap_placement`). `progress(what, done, total)` is
        called from the worker."""
        if (self.plan is None or self.plan.streamed_blocks == 0 or self.streamer is not None
                or self._pending is not None):
            return
        config, weights = self._stream_config(), self.weight_files or None

        def build(on_block: Callable[[int], None]) -> BlockStreamer:
            return BlockStreamer(self.model, self.device, config, weights=weights, attach=False, on_block=on_block)

        self.streamers_built += 1
        self.host_side = self._pending = HostSide(build, self.device, self.plan.streamed_blocks, progress)

    @property
    def overlap_note(self) -> str:
        """How the first placement's host side ran, for the run's summary."""
        job = self.host_side
        if job is None:
            return "after the encoders"
        if job.seconds is None:
            return "beside the encoders (not finished)"
        return f"host side beside the encoders ({job.seconds:.1f} s), waited for {job.waited:.1f} s"

    def apply(self) -> None:
        """Put the DiT where the plan says (no-op when it is there already); a plan that runs out of CUDA memory
        while placing falls back to the next lighter one."""
        while not self.placed:
            try:
                self._place()
                self.placed = True
                return
            except torch.cuda.OutOfMemoryError:
                pass  # recovered below: inside this clause the error's traceback still holds what was placed
            self.close()
            if not self._lighter():
                raise out_of_memory()

    @property
    def kernels(self) -> Kernels:
        """How the blocks compute under the current plan: its profile's chunks and the attention it was planned with
        (the user's, else the profile's, resolved by the planner)."""
        if self.plan is None:
            return Kernels(resolve(self.attention or "sdpa"))
        profile = self.plan.profile
        return Kernels(self.plan.attention, profile.attn_chunk, profile.ffn_chunk)

    def _stream_config(self) -> StreamConfig:
        plan = self.plan
        source = plan.profile.weight_source if self.weight_files else WeightSource.PINNED
        return StreamConfig(resident_blocks=plan.resident_blocks, prefetch=plan.profile.prefetch, source=source,
                            unit=plan.profile.stream_unit)

    def _place(self) -> None:
        plan = self.plan
        if self._pending is not None:  # the host side built beside the encoders: its worker's error is raised here
            self.streamer = self._pending.wait()  # (kept pending until then: Ctrl-C while waiting still stops it)
            self._pending = None
        if self.streamer is not None:  # a later segment under the same plan: the host side is still in place
            self.streamer.resume()
            return
        if plan is None or plan.streamed_blocks == 0:
            # The resident set remembers the host tensors, so `release` re-points them instead of copying them back
            # (mapped blocks stay mapped); blocks move one at a time and the mapped shards' pages are given back
            # after each, so RAM never holds them all.
            self.resident = ResidentSet(self.model, ())
            self.resident.place(self.device, FilePages(self.weight_files).drop)
        else:
            self.streamers_built += 1
            self.streamer = BlockStreamer(self.model, self.device, self._stream_config(),
                                          weights=self.weight_files or None)

    def release(self) -> None:
        """Give the GPU back (the VAE decodes a 704p segment in about as much memory as the DiT steps take). A
        streamer is only suspended (it points the resident layers back at their host tensors): the next segment
        under the same plan reuses its pinned buffer."""
        self.placed = False
        if self.streamer is not None:
            self.streamer.suspend()
        if self.resident is not None:
            self.resident.restore()
            self.resident = None
        release_cached_memory()

    def close(self) -> None:
        """Release, and unpin the streamer's host buffer for good (a host side still being built is stopped); blocks
        mapped from the shards point at them again, so the buffer is freed here and the next placement's is the only
        one in RAM."""
        if self._pending is not None:
            job, self._pending = self._pending, None
            job.stop()
        self.release()
        if self.streamer is not None:
            self.streamer.detach()
            self.streamer = None

    def fallback(self) -> bool:
        """Re-place the DiT under the next lighter plan; False when there is none."""
        self.close()
        if not self._lighter():
            return False
        self.apply()
        return True

    def _lighter(self) -> bool:
        new = lighter(self.plan) if self.plan is not None else None
        if new is None:
            return False
        self.fallbacks.append(f"{self.plan.profile.name} -> {new.profile.name}")
        if self.on_fallback is not None:
            self.on_fallback(f"out of memory: {self.fallbacks[-1]}")
        self.plan = new
        return True


def out_of_memory() -> UserError:
    return UserError("CUDA ran out of memory and no lighter memory profile is left; try a smaller --size, fewer "
                     "--frames per segment, or FP8 weights (scail2-lite quantize)")


def release_cached_memory() -> None:
    """Return the caching allocator's free blocks to the driver. No garbage collection: a full one walks every object
    the process tracks (the imports, the models' modules) at each call and found no tensor (RESULTS.md, issue 23); the
    runtime leaves none in a reference cycle (tests/test_pipeline.py), so what it drops is freed as it drops it."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
