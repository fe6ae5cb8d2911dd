"""Where the DiT runs during one generation: wholly on the device, or streamed block by block as a memory plan
says, with the out-of-memory fallback to a lighter plan. The plan also decides how the blocks compute (`Kernels`)."""

from __future__ import annotations

import gc
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


class DitPlacement:
    """Where the DiT runs during one generation: wholly on the device, or streamed block by block as a planner
    `Plan` says. `fallback()` re-places it under the next lighter plan after a CUDA out-of-memory error. Only data
    moves (same weights, same kernels, batch 1), so the numbers do not depend on the plan."""

    def __init__(self, model: torch.nn.Module, device: torch.device, plan: Plan | None = None,
                 attention: str | None = None, weight_files: Sequence[Path] = (),
                 on_fallback: Callable[[str], None] | None = None) -> None:
        self.model, self.device, self.plan = model, device, plan
        self.attention = attention  # the user's choice; None = the plan's profile's
        self.weight_files = list(weight_files)
        self.streamer = None
        self.placed = False
        self.fallbacks: list[str] = []
        self.on_fallback = on_fallback  # told each "old -> new" re-plan as it happens
        self.streamers_built = 0  # host buffers set up (a later segment under the same plan reuses the last)
        self.resident: ResidentSet | None = None  # what moved to the device when no streamer runs

    def __enter__(self) -> "DitPlacement":
        self.apply()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def apply(self) -> None:
        """Put the DiT where the plan says (no-op when it is there already); a plan that runs out of CUDA memory
        while placing falls back to the next lighter one."""
        while not self.placed:
            try:
                self._place()
                self.placed = True
            except torch.cuda.OutOfMemoryError:
                self.close()
                if not self._lighter():
                    raise out_of_memory() from None

    @property
    def kernels(self) -> Kernels:
        """How the blocks compute under the current plan: its profile's chunks and attention (or the user's)."""
        if self.plan is None:
            return Kernels(resolve(self.attention or "sdpa"))
        profile = self.plan.profile
        return Kernels(resolve(self.attention or profile.attention), profile.attn_chunk, profile.ffn_chunk)

    def _place(self) -> None:
        plan = self.plan
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
            source = plan.profile.weight_source if self.weight_files else WeightSource.PINNED
            config = StreamConfig(resident_blocks=plan.resident_blocks, prefetch=plan.profile.prefetch, source=source,
                                  unit=plan.profile.stream_unit)
            self.streamers_built += 1
            self.streamer = BlockStreamer(self.model, self.device, config, weights=self.weight_files or None)

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
        """Release, and unpin the streamer's host buffer for good."""
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
    """Collect garbage and return the caching allocator's free blocks to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
