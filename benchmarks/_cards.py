"""Consumer cards emulated on a big GPU, honestly: the caching allocator is capped at the card's size minus this
process's measured CUDA context minus a stated desktop reserve, and every table shows NVML's total for the
process beside PyTorch's allocated and reserved bytes (issue 23).

Why: `set_per_process_memory_fraction` caps the allocator only. The context (1.15 GB on the H100) and the kernels
loaded later sit outside it, so a run "under a 16 GB cap" used 16.58e9 bytes as NVML counts them.

`Emulator.start(device)` must run before anything touches CUDA: it reads NVML's device-wide used bytes first, then
makes the context, warms cuBLAS and cuDNN, and measures what the card holds outside the allocator. NVML's "used"
includes the memory the driver reserves on every card (0.51 GB on the H100 with nothing running; `nvidia-smi` shows
0 MiB), so the card's total used is what a real card of that size would show: the tables report it as the
process total (the benchmark machine runs nothing else). NVML comes from nvidia-ml-py (`pip install 'scail2-lite[profile]'`, or the wheel carried to the device);
without it the NVML columns read "-".
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from scail2_lite.offload import card

GB = 1e9
CARDS_GIB: tuple[int, ...] = (8, 12, 16, 24)


def _nvml_used_before_cuda() -> tuple[object, int | None]:
    """(NVML handle, device-wide used bytes) of the GPU CUDA will call 0, read without making a CUDA context."""
    try:
        import pynvml

        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
        handle = (pynvml.nvmlDeviceGetHandleByUUID(visible) if visible.startswith(("GPU-", "MIG-"))
                  else pynvml.nvmlDeviceGetHandleByIndex(int(visible or 0)))
        return handle, int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:  # noqa: BLE001 (no NVML, no driver access: the NVML columns stay empty)
        return None, None


@dataclass
class Emulator:
    """The device, NVML's used bytes before this process, and this process's context as measured."""

    device: torch.device
    baseline: int | None  # NVML device-wide used bytes before our context (the driver's reserve)
    context: int  # NVML used minus the allocator's reserved bytes after warm-up, driver reserve included
    context_at_start: int | None  # right after the context was made, before cuBLAS/cuDNN loaded (ours only)
    desktop: int = card.DESKTOP_RESERVE

    @classmethod
    def start(cls, device: torch.device) -> "Emulator":
        handle, baseline = _nvml_used_before_cuda()
        torch.cuda.init()
        torch.zeros(1, device=device)
        at_start = cls._used(handle)
        x = torch.randn(512, 512, device=device, dtype=torch.bfloat16)
        (x @ x).sum().item()  # cuBLAS
        conv = torch.nn.Conv3d(4, 4, 3, padding=1).to(device)
        conv(torch.randn(1, 4, 4, 16, 16, device=device)).sum().item()  # cuDNN
        del x, conv
        torch.cuda.synchronize(device)
        after = cls._used(handle)
        reserved = torch.cuda.memory_reserved(device)
        context = after - reserved if after is not None else card.CUDA_CONTEXT
        return cls(device, baseline, int(context),
                   None if at_start is None or baseline is None else at_start - baseline)

    @staticmethod
    def _used(handle: object) -> int | None:
        if handle is None:
            return None
        import pynvml

        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)

    def cap(self, card_gib: float | None) -> int | None:
        """Emulate a card of `card_gib` GiB (None: lift the cap); returns the allocator cap in bytes."""
        if self.device.type != "cuda":
            return None
        return card.emulate(self.device, None if card_gib is None else card.card_bytes(card_gib), self.context,
                            self.desktop)

    def process_total(self, nvml_used: int | None) -> int | None:
        """What NVML shows used on the card while this process runs alone on it (driver reserve included)."""
        return nvml_used

    def describe(self) -> str:
        at_start = "-" if self.context_at_start is None else f"{self.context_at_start / GB:.2f}"
        return (f"NVML used before this process: {'-' if self.baseline is None else f'{self.baseline / GB:.2f}'} GB "
                f"(the driver's reserve); CUDA context {at_start} GB when made; outside the allocator after cuBLAS/"
                f"cuDNN warm-up {self.context / GB:.2f} GB (reserve + context); desktop reserve "
                f"{self.desktop / GB:.2f} GB. A card of C GiB is emulated by capping the allocator at C - "
                f"{self.context / GB:.2f} - {self.desktop / GB:.2f} GB.")


def memory_row(stats: dict, emulator: Emulator | None) -> tuple[str, str, str]:
    """(peak allocated, peak reserved, NVML process total) in GB for one phase's PhaseRecorder stats."""
    def gb(x: int | None) -> str:
        return "-" if x is None else f"{x / GB:.2f}"

    total = emulator.process_total(stats.get("peak_nvml_used")) if emulator is not None else None
    return gb(stats.get("peak_allocated")), gb(stats.get("peak_reserved")), gb(total)
