"""What a GPU really has for this process: its total, what the driver reports free, and what the process holds
outside PyTorch's caching allocator (the CUDA context and the kernels it loads lazily).

Why: `set_per_process_memory_fraction` and the planner's budget count the caching allocator only. On the H100 the
context alone took 1.15 GB (NVML before any allocation) and a 704p run under a 16.0e9-byte allocator cap reached
16.58e9 bytes in NVML, more than a "16 GB" card leaves beside a desktop. So the planner's budget is the allocator's
share: the card (or what is free on it) minus the context, minus a reserve for a desktop that may grow.

`DeviceMemory` is a typed value built once per run (`detect`, or `DeviceMemory.card` for a card that is not
here) and passed to `planner.plan`; tests pass fake ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

GIB = 2**30  # cards are sold in GiB: a "16 GB" card reports 16 GiB (17.18e9 bytes)
# Bytes this process holds outside the caching allocator at its peak: the CUDA context plus the kernel modules
# loaded lazily by cuBLAS/cuDNN/Triton. H100, torch 2.11: 1.15 GB right after the context is made (NVML before any
# allocation), 16.58 - 15.24 = 1.34 GB over the allocator's reserved memory at the 704p steps (RESULTS.md).
# Consumer GPUs have fewer SMs and a smaller context; the H100 figure is used for them until measured there.
CUDA_CONTEXT = int(1.35e9)
CUDA_CONTEXT_AT_START = int(1.15e9)  # what exists once `cudaMemGetInfo` has made the context
DESKTOP_RESERVE = int(0.5e9)  # a desktop (compositor, browser) may take 0.3-1 GB beside the run


def card_bytes(gb: float) -> int:
    """A card's total from its size as sold ("16" GB -> 16 GiB)."""
    return int(gb * GIB)


@dataclass(frozen=True)
class DeviceMemory:
    """One GPU as this run sees it at start-up (bytes).

    `free`: what the driver reports free plus what this process's allocator already caches (it is ours to reuse);
    `context_in_use`: how much of `CUDA_CONTEXT` already exists (and so is not in `free`); `desktop`: kept free for
    other programs."""

    total: int
    free: int
    context_in_use: int = 0
    context: int = CUDA_CONTEXT
    desktop: int = DESKTOP_RESERVE

    @classmethod
    def card(cls, total: int, desktop: int = DESKTOP_RESERVE) -> "DeviceMemory":
        """A card of `total` bytes with nothing of ours on it yet (planning for a card that is not here)."""
        return cls(total=int(total), free=int(total), context_in_use=0, desktop=desktop)

    @property
    def outside_allocator(self) -> int:
        """What NVML will show for this process beyond the allocator's reserved bytes."""
        return max(self.context, self.context_in_use)

    def allocator_budget(self, card_total: int | None = None) -> int:
        """Bytes the caching allocator may reserve: what is free minus the context still to come minus the desktop
        reserve; with `card_total` (`--vram-budget`: the card's total), at most that card minus the context and
        the reserve."""
        from_free = self.free - max(0, self.context - self.context_in_use) - self.desktop
        if card_total is None:
            return max(0, from_free)
        return max(0, min(from_free, int(card_total) - self.context - self.desktop))


def detect(device: torch.device | str | None = None) -> DeviceMemory | None:
    """The GPU's memory as the driver reports it now; None without CUDA. `cudaMemGetInfo` makes the context if it
    does not exist yet, so `free` excludes it; NVML (when installed) says how big it is, else its size at start is
    assumed."""
    if not torch.cuda.is_available():
        return None
    device = torch.device(device or "cuda")
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    used = process_used(device)
    in_use = used - reserved if used is not None else CUDA_CONTEXT_AT_START
    return DeviceMemory(total=int(total), free=int(free + reserved), context_in_use=int(max(0, in_use)))


def nvml_handle(index: int | None) -> tuple[Any, str]:
    """(NVML handle of CUDA device `index`, note); the handle is None when NVML cannot be used, the note says why.

    The device is found by UUID, so CUDA_VISIBLE_DEVICES reordering cannot pick the wrong GPU."""
    try:
        import pynvml
    except ImportError:
        return None, "NVML not measured: nvidia-ml-py is not installed (pip install 'scail2-lite[profile]')"
    try:
        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index).uuid)
        if not uuid.startswith(("GPU-", "MIG-")):
            uuid = "GPU-" + uuid
        return pynvml.nvmlDeviceGetHandleByUUID(uuid), "NVML: device-wide used memory (all processes)"
    except (pynvml.NVMLError, AttributeError, RuntimeError) as e:
        return None, f"NVML not measured: {e}"


def process_used(device: torch.device | str | None = None) -> int | None:
    """Bytes NVML charges to this process on `device` (context + allocator + the rest); None when NVML is missing
    or does not list the process (some containers hide their process ids from it)."""
    handle, _ = nvml_handle(torch.device(device or "cuda").index)
    if handle is None:
        return None
    import pynvml

    try:
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                return int(proc.usedGpuMemory)
    except pynvml.NVMLError:
        return None
    return None


def emulate(device: torch.device | str, card_total: int | None, context: int = CUDA_CONTEXT,
            desktop: int = DESKTOP_RESERVE) -> int | None:
    """Cap this process's caching allocator as a card of `card_total` bytes would leave it: the card minus the
    CUDA context (`context`: measured, or the estimate) and a desktop reserve. None lifts the cap. Returns the
    cap in bytes (None when lifted)."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    if card_total is None:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        return None
    cap = max(0, int(card_total) - context - desktop)
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    return cap
