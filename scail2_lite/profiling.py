"""VRAM and time recording per pipeline phase, the planner's predictions beside them, JSON report and plot.

Why: users must see where their memory goes before a run (the plan) and during one (the recording), and the
planner's per-phase model is only trusted once measured against it (`scail2-lite profile --run`, goal 10%).

`PhaseRecorder(device)` is the pipeline's phase timer: `with recorder("dit steps"): ...` adds the phase's wall
time and takes, per phase name, the max of PyTorch's peak allocated and reserved bytes (exact, from the caching
allocator's peak counters, reset at each phase entry), of NVML's device-used bytes and of process RSS (sampled).
While a phase runs, a daemon thread samples every `interval` seconds into a timeline for the plot; between phases
nothing runs. Phases do not nest (each entry resets the allocator's peak counters). Work done on another thread
beside the phases is recorded apart (`beside`): its own seconds and how long the main thread waited for it (the part
of it that a phase's seconds include).
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import torch

from .errors import UserError
from .loader import ModelDescription
from .offload.card import DeviceMemory, card_bytes, nvml_handle
from .offload.planner import GB, Plan, list_profiles, plan, resolve

# Pipeline phase name (pipeline.py's `with recorder(...)`) -> the planner's phase it is predicted by. "inputs"
# (reading files), "dit placement" and "dit release" (moving weights), "conditions" (the prompt's context and a
# segment's DiT conditions), "video write" (the wait for the mp4's encoder) have no prediction of their own.
PIPELINE_TO_PLANNER: dict[str, str] = {
    "text encoder": "text_encoder",
    "clip": "clip",
    "vae encode": "vae_encode",
    "dit steps": "dit_step",
    "vae decode": "vae_decode",
}
CARDS_GB: tuple[int, ...] = (8, 12, 16, 24, 32)
TOLERANCE = 0.10  # the planner's goal: predicted peaks within 10% of measured
REPORT_VERSION = 1


class Sample(NamedTuple):
    """One point of the timeline; memory in bytes, None where not measurable (no CUDA, no NVML, no RSS)."""

    t: float  # seconds since the recorder was made
    phase: str
    allocated: int | None
    peak_allocated: int | None  # the allocator's peak since the phase began (catches spikes between samples)
    reserved: int | None
    nvml_used: int | None
    rss: int | None


@dataclass
class PhaseStats:
    seconds: float = 0.0
    calls: int = 0
    peak_allocated: int | None = None
    peak_reserved: int | None = None
    peak_nvml_used: int | None = None
    peak_rss: int | None = None


def _max(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def _rss() -> int | None:
    """Resident set size of this process (psutil when installed, else /proc; None elsewhere)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PhaseRecorder:
    """Wall time and memory per named phase plus a sampled timeline (see the module docstring).

    Same interface as the pipeline's former timer: `__call__(name)` context manager, `.seconds` (phase -> total
    seconds; repeated phases add up) and `.peaks` (phase -> max PyTorch peak allocated bytes, CUDA only)."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.05) -> None:
        device = torch.device(device)
        self.cuda = device.type == "cuda"
        if self.cuda and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.interval = interval
        self.seconds: dict[str, float] = {}
        self.peaks: dict[str, int] = {}
        self.stats: dict[str, PhaseStats] = {}
        self.intervals: list[tuple[str, float, float]] = []
        self.events: list[tuple[float, str]] = []  # (seconds since start, what happened): e.g. OOM re-plans
        self.background: dict[str, dict[str, float | None]] = {}  # work beside the phases: seconds, waited
        self.samples: list[Sample] = []
        self._nvml, self.nvml_note = nvml_handle(device.index) if self.cuda else (None, "NVML: no CUDA device")
        self._t0 = time.perf_counter()
        self._phase: str | None = None
        self._phase_peak_nvml: int | None = None
        self._phase_peak_rss: int | None = None
        self._stop = threading.Event()

    # ---- sampling ----------------------------------------------------------------------------------------------

    def _sample(self, phase: str) -> Sample:
        allocated = peak = reserved = nvml = None
        if self.cuda:
            allocated = torch.cuda.memory_allocated(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            reserved = torch.cuda.memory_reserved(self.device)
        if self._nvml is not None:
            import pynvml

            try:
                nvml = int(pynvml.nvmlDeviceGetMemoryInfo(self._nvml).used)
            except pynvml.NVMLError:
                nvml = None
        sample = Sample(time.perf_counter() - self._t0, phase, allocated, peak, reserved, nvml, _rss())
        self.samples.append(sample)
        self._phase_peak_nvml = _max(self._phase_peak_nvml, nvml)
        self._phase_peak_rss = _max(self._phase_peak_rss, sample.rss)
        return sample

    def _loop(self, phase: str) -> None:
        while not self._stop.wait(self.interval):
            self._sample(phase)

    # ---- phases ------------------------------------------------------------------------------------------------

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self._phase is not None:
            raise RuntimeError(f"phase {name!r} started inside phase {self._phase!r}: phases do not nest")
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._phase, self._phase_peak_nvml, self._phase_peak_rss = name, None, None
        self._sample(name)
        self._stop.clear()
        sampler = threading.Thread(target=self._loop, args=(name,), name=f"profile-{name}", daemon=True)
        sampler.start()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize(self.device)
            end = time.perf_counter()
            self._stop.set()
            sampler.join()
            self._sample(name)
            self._phase = None
            self._close_phase(name, start, end)

    def _close_phase(self, name: str, start: float, end: float) -> None:
        s = self.stats.setdefault(name, PhaseStats())
        s.seconds += end - start
        s.calls += 1
        if self.cuda:
            s.peak_allocated = _max(s.peak_allocated, torch.cuda.max_memory_allocated(self.device))
            s.peak_reserved = _max(s.peak_reserved, torch.cuda.max_memory_reserved(self.device))
            self.peaks[name] = s.peak_allocated
        s.peak_nvml_used = _max(s.peak_nvml_used, self._phase_peak_nvml)
        s.peak_rss = _max(s.peak_rss, self._phase_peak_rss)
        self.seconds[name] = s.seconds
        self.intervals.append((name, start - self._t0, end - self._t0))

    def beside(self, name: str, seconds: float | None, waited: float) -> None:
        """Record work that ran on another thread beside the phases: it took `seconds` there (None: unfinished) and
        the main thread waited `waited` of them inside a phase (its visible cost)."""
        self.background[name] = {"seconds": seconds, "waited": waited}

    def note(self, what: str) -> None:
        """Record an event at this moment (shown in the JSON beside the phases)."""
        self.events.append((time.perf_counter() - self._t0, what))

    # ---- output ------------------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        """Measured figures only (bytes, seconds); `report` adds the plan and the comparison."""
        samples = sorted(self.samples, key=lambda s: s.t)
        return {
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.cuda else "cpu",
            "torch": torch.__version__,
            "interval_s": self.interval,
            "nvml": self.nvml_note,
            "phases": {name: dict(vars(s)) for name, s in self.stats.items()},
            "intervals": [list(i) for i in self.intervals],
            "events": [list(e) for e in self.events],
            "background": self.background,
            "timeline": {field: [getattr(s, field) for s in samples] for field in Sample._fields},
        }

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_json())

    def plot(self, path: str | Path, predicted: Plan | None = None, title: str = "") -> Path:
        return plot_timeline(self.to_json(), path, predicted, title)


# ---- files -----------------------------------------------------------------------------------------------------


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_json(path: str | Path, data: dict) -> Path:
    """Write `data` to `path` through a temporary name, so a crash never leaves half a report."""
    path = Path(path)
    tmp = _tmp(path)
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return path


def plot_timeline(measured: dict, path: str | Path, predicted: Plan | None = None, title: str = "") -> Path:
    """PNG of memory over time (a `PhaseRecorder.to_json()` dict): VRAM (allocated, allocator peak, reserved,
    NVML) on CUDA, process RSS below; phases as shaded bands; the plan's per-phase peaks as dashed lines."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError:
        raise UserError("the plot needs matplotlib: pip install 'scail2-lite[profile]'") from None
    path = Path(path)
    tl = measured["timeline"]
    cuda = any(v is not None for v in tl["allocated"])
    rows = [("VRAM (GB)", ("allocated", "peak_allocated", "reserved", "nvml_used"), "vram")] if cuda else []
    if any(v is not None for v in tl["rss"]):
        rows.append(("process RAM (GB)", ("rss",), "ram"))
    if not rows:
        raise UserError("nothing to plot: no memory was measured")
    fig = Figure(figsize=(11, 3.2 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), 1, sharex=True, squeeze=False)[:, 0]
    names = list(dict.fromkeys(name for name, _, _ in measured["intervals"]))
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}
    styles = {"allocated": "-", "peak_allocated": ":", "reserved": "-", "nvml_used": "--", "rss": "-"}
    for ax, (label, fields, kind) in zip(axes, rows):
        for name, start, end in measured["intervals"]:
            ax.axvspan(start, end, color=colors[name], alpha=0.15, lw=0)
            phase = PIPELINE_TO_PLANNER.get(name)
            if predicted is not None and phase is not None:
                mem = predicted.phases[phase]
                ax.hlines((mem.vram if kind == "vram" else mem.ram) / GB, start, end, colors="k", linestyles="--",
                          lw=1)
        for field in fields:
            points = [(t, v / GB) for t, v in zip(tl["t"], tl[field]) if v is not None]
            if points:
                ax.plot(*zip(*points), styles[field], lw=1.2, label=field.replace("_", " "))
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    lines, _ = axes[0].get_legend_handles_labels()
    bands = [Patch(color=colors[n], alpha=0.3, label=n) for n in names]
    extra = [Line2D([], [], color="k", linestyle="--", lw=1, label="predicted peak")] if predicted else []
    axes[0].legend(handles=lines + bands + extra, fontsize=8, loc="upper left", ncol=2)
    for ax in axes[1:]:
        ax.legend(fontsize=8, loc="upper left")
    axes[-1].set_xlabel("seconds")
    axes[0].set_title(title or f"scail2-lite profile ({measured['device_name']})")
    tmp = _tmp(path)
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)
    return path


# ---- plans -----------------------------------------------------------------------------------------------------


def plan_to_json(p: Plan) -> dict:
    return {
        "profile": p.profile.name,
        "description": p.profile.description,
        "reason": p.reason,
        "fits": p.fits,
        "quantization": p.quantization,
        "text_encoder": p.text_encoder,
        "resident_blocks": p.resident_blocks,
        "streamed_blocks": p.streamed_blocks,
        "overlap_placement": p.overlap_placement,
        "height": p.height,
        "width": p.width,
        "frames": p.frames,
        "extra_refs": p.extra_refs,
        "tokens": p.tokens,
        "attention": p.attention,
        "vram_budget": p.vram_budget,
        "outside_allocator": p.outside_allocator,
        "vae_decode_tiling": None if p.vae_decode.tiling is None else dataclasses.asdict(p.vae_decode.tiling),
        "vae_decode_by_frame": p.vae_decode.by_frame,
        "ram_available": p.ram_available,
        "peak_vram": p.peak_vram,
        "peak_vram_reserved": p.peak_vram_reserved,
        "peak_process_total": p.peak_process_total,
        "peak_ram": p.peak_ram,
        "phases": {k: {"vram": m.vram, "vram_reserved": m.reserved, "process_total": p.process_total(k), "ram": m.ram}
                   for k, m in p.phases.items()},
    }


def fits_on(target: ModelDescription, height: int, width: int, frames: int, ram_bytes: int,
            cards_gb: tuple[int, ...] = CARDS_GB, extra_refs: int = 0,
            sequence_split: int = 1) -> dict[int, Plan | None]:
    """Card size as sold (GB: 16 = a 16 GiB card, with its CUDA context and a desktop) -> the plan `plan` picks
    there, None if nothing fits (one rank's plan under a sequence split)."""
    out: dict[int, Plan | None] = {}
    for card in cards_gb:
        try:
            out[card] = plan(target.config, height, width, frames, DeviceMemory.card(card_bytes(card)), ram_bytes,
                             weights=target.dit_scheme, text_encoder=target.text_encoder, mappable=target.mappable,
                             extra_refs=extra_refs, sequence_split=sequence_split)
        except UserError:
            out[card] = None
    return out


def all_profiles(target: ModelDescription, height: int, width: int, frames: int, device: DeviceMemory,
                 ram_bytes: int, extra_refs: int = 0, sequence_split: int = 1) -> list[Plan]:
    """Every shipped profile resolved for one card (fastest first), fitting or not."""
    return [resolve(p, target.config, height, width, frames, device.allocator_budget(), ram_bytes, target.dit_scheme,
                    "", target.text_encoder, target.mappable, extra_refs,
                    device.outside_allocator, sequence_split) for p in list_profiles()]


# ---- measured vs predicted -------------------------------------------------------------------------------------


def _error(predicted: int, measured: int | None) -> float | None:
    return None if not measured else (predicted - measured) / measured


def compare(measured: dict, p: Plan) -> list[dict]:
    """One row per predicted phase that ran: measured peaks (a `PhaseRecorder.to_json()` dict) beside the plan's,
    with relative errors (predicted - measured) / measured; None where nothing was measured."""
    rows = []
    for name, phase in PIPELINE_TO_PLANNER.items():
        m = measured["phases"].get(name)
        if m is None:
            continue
        pred = p.phases[phase]
        rows.append({
            "phase": name,
            "planner_phase": phase,
            "seconds": m["seconds"],
            "measured_allocated": m["peak_allocated"],
            "predicted_allocated": pred.vram,
            "error_allocated": _error(pred.vram, m["peak_allocated"]),
            "measured_reserved": m["peak_reserved"],
            "predicted_reserved": pred.reserved,
            "error_reserved": _error(pred.reserved, m["peak_reserved"]),
            "measured_nvml_used": m["peak_nvml_used"],
            "predicted_process_total": p.process_total(phase) or None,
            "measured_rss": m["peak_rss"],
            "predicted_ram": pred.ram,
            "error_ram": _error(pred.ram, m["peak_rss"]),
        })
    return rows


def run_report(measured: dict, predicted: Plan | None, settings: dict, step_seconds: list[float],
               command: list[str]) -> dict:
    """The `profile --run` JSON: what ran, the measured figures, the plan and the per-phase comparison."""
    rows = compare(measured, predicted) if predicted is not None else []
    errors = [abs(r["error_allocated"]) for r in rows if r["error_allocated"] is not None]
    return {
        "version": REPORT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
        "settings": settings,
        "step_seconds": step_seconds,
        "plan": plan_to_json(predicted) if predicted is not None else None,
        "measured": measured,
        "comparison": rows,
        "max_abs_error_allocated": max(errors) if errors else None,
        "within_tolerance": all(e <= TOLERANCE for e in errors) if errors else None,
    }
