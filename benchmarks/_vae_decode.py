"""bench_cards.py's VAE parts (issue 25c, 23): the VAE decode at the 704p output size in every tiling the planner
may choose, measured against the planner's prediction; the 704p encodes in the old 256 px tiles and as
`vae_tiles.encode_tiling` now runs them; and the CPU traces behind the planner's per-pixel figures.

`decode_part`: latents of the real 704p x 81 output (1280x704, 21 latent frames, random: time and memory do not
depend on the values) decoded by the full-width Wan VAE (random weights, the shipped layout and cuDNN settings) in
each cut the planner picks for an 8, 12, 16 or 24 GiB card (`planner.decode_cut`: tiles, four frames at a time or
by frame); then, uncapped, each of those tilings in the other mode, and untiled both ways.
Each case runs twice: the first pass pays cuDNN's choices for the shapes (as every run does once), the second is
the steady figure. A card's choice runs under that card's emulated allocator cap (`_cards.Emulator`), so an
under-predicted tiling shows as "out of memory" there.

`trace_part`: the live tensor bytes of `WanVAE.decode_frames` on CPU (no cuDNN workspace), per output pixel, at two
tile sizes: the source of `planner.VAE_DECODE_TENSOR_BYTES_PER_PIXEL`; and of `WanVAE.encode`, per input pixel, of
one frame and of a video: the source of `vae_tiles.ENCODE_IMAGE_BYTES_PER_PIXEL` and `ENCODE_VIDEO_BYTES_PER_PIXEL`.
"""

from __future__ import annotations

import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _cards import GB, Emulator

CARDS = (8, 12, 16, 24)


def _vae(scale: str, device: torch.device):
    from diffusers import AutoencoderKLWan

    from scail2_lite.vae import WanVAE, vae_config

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoencoderKLWan(**vae_config(scale)).eval()
    return WanVAE(model)


def _gb(x: int | None) -> str:
    return "-" if x is None else f"{x / GB:.2f}"


def decode_part(tiny: bool, device: torch.device, emulator: Emulator | None, res, deadline: float,
                size: str = "704p") -> str:
    """Seconds, peak allocated / reserved / NVML of the decode in each cut, beside the planner's prediction, at
    `size`'s output (81 frames)."""
    from scail2_lite.config import SIZES
    from scail2_lite.offload import planner
    from scail2_lite.offload.card import DeviceMemory, card_bytes
    from scail2_lite.profiling import PhaseRecorder
    from scail2_lite.vae_tiles import DecodeCut

    h, w, frames = (64, 128, 5) if tiny else (*SIZES[size], 81)
    latent_frames = (frames - 1) // 4 + 1
    vae = _vae("tiny" if tiny else "full", device).to(device)
    z = torch.randn(1, 16, latent_frames, h // 8, w // 8, generator=torch.Generator().manual_seed(0)).to(device)
    # (cut, card it is chosen for): each card's choice (smallest card first), then uncapped: the same tilings in the
    # other mode, untiled both ways.
    cases: list[tuple[DecodeCut, int | None]] = []
    for gib in CARDS:
        cut = planner.decode_cut(h, w, frames, DeviceMemory.card(card_bytes(gib)).allocator_budget(), 256)
        if all(c != cut for c, _ in cases):
            cases.append((cut, gib))
    others = [DecodeCut(c.tiling, not c.by_frame) for c, _ in cases] + [DecodeCut(None, b) for b in (False, True)]
    for cut in others:
        if all(c != cut for c, _ in cases):
            cases.append((cut, None))
    cuda = device.type == "cuda"
    rec = PhaseRecorder(device, interval=0.05)
    rows, record = [], {"size": [w, h], "frames": frames, "latents": list(z.shape), "cases": []}
    for cut, gib in cases:
        name = cut.describe(h, w)
        predicted = planner.vae_decode_bytes(h, w, frames, cut.tiling, cut.by_frame)
        entry = {"cut": name, "card_gib": gib, "predicted_allocated": predicted,
                 "predicted_reserved": planner.reserved_bytes("vae_decode", predicted),
                 "predicted_cost": planner.decode_cost(h, w, cut),
                 "decoded_pixels_ratio": (cut.tiling.decoded_pixels(h, w) if cut.tiling else h * w) / (h * w)}
        if time.perf_counter() > deadline - 60:
            entry["status"] = "not run (budget)"
            record["cases"].append(entry)
            continue
        vae.set_tiling(cut.tiling)
        cap = emulator.cap(gib) if emulator is not None and gib is not None else None
        entry["allocator_cap"] = cap
        try:
            for attempt in ("first", "timed"):
                if cuda:
                    torch.cuda.empty_cache()
                key = f"{name} {attempt}"
                t = time.perf_counter()
                with rec(key):
                    for group in vae.decode_frames(z, by_frame=cut.by_frame):
                        group.cpu()
                entry[f"{attempt}_seconds"] = round(time.perf_counter() - t, 3)
                stats = rec.to_json()["phases"][key]
                for k in ("peak_allocated", "peak_reserved", "peak_nvml_used"):
                    entry[f"{attempt}_{k}"] = stats[k]
            entry["status"] = "ok"
        except torch.cuda.OutOfMemoryError as e:
            entry["status"] = f"out of memory: {str(e).splitlines()[0][:160]}"
            entry["peak_allocated_at_failure"] = torch.cuda.max_memory_allocated(device)
        finally:
            if emulator is not None:
                emulator.cap(None)
            if cuda:
                torch.cuda.empty_cache()
        record["cases"].append(entry)
        res.put("decode", record)
        print(f"decode {name} (card {gib} GiB): {entry}", flush=True)
        peak = max(entry.get("first_peak_allocated") or 0, entry.get("timed_peak_allocated") or 0) or None
        reserved = max(entry.get("first_peak_reserved") or 0, entry.get("timed_peak_reserved") or 0) or None
        rows.append(
            f"| {name} | {gib or '-'} | {entry['decoded_pixels_ratio']:.2f} | {entry['predicted_cost']:.2f} | "
            f"{entry.get('first_seconds', '-')} | "
            f"{entry.get('timed_seconds', '-')} | {_gb(peak)} | {_gb(predicted)} | {_gb(reserved)} | "
            f"{_gb(entry['predicted_reserved'])} | {_gb(entry.get('first_peak_nvml_used'))} | {entry['status']} |")
    res.put("decode", record)
    return (f"### VAE decode alone: {w}x{h} x {frames} frames ({latent_frames} latent), fp32, per cut\n"
            "| cut | chosen for GiB (capped) | pixels decoded / frame | predicted cost | first s | s | peak alloc GB "
            "| predicted | peak reserved GB | predicted | NVML used GB (first) | status |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))


def encode_part(tiny: bool, device: torch.device) -> str:
    """The run's first-segment encodes at 704p (the reference frame, 81 pose frames at half size), in 256 px tiles
    (every profile's tiles before) and in the tiles `encode_tiling` gives each input now, each twice in this
    process (the first pays cuDNN's choices): seconds, peak allocated against `planner.vae_encode_bytes`."""
    from scail2_lite.offload import planner
    from scail2_lite.vae_tiles import Tiling, encode_tiling

    h, w, frames = (64, 128, 17) if tiny else (704, 1280, 81)
    vae = _vae("tiny" if tiny else "full", device).to(device)
    g = torch.Generator().manual_seed(0)
    inputs = {"reference": torch.rand(1, 3, 1, h, w, generator=g) * 2 - 1,
              "pose": torch.rand(1, 3, frames, h // 2, w // 2, generator=g) * 2 - 1}
    cuda = device.type == "cuda"
    rows = []
    for name, rule, tile in (("256 px tiles", "tiled", 256), ("encode_tiling (now)", "rule", None)):
        for attempt in ("first", "second"):
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            seconds = {}
            for what, video in inputs.items():
                vae.set_tiling(Tiling.square(tile) if tile else encode_tiling(*video.shape[2:]))
                t = time.perf_counter()
                vae.encode(video.to(device))
                if cuda:
                    torch.cuda.synchronize(device)
                seconds[what] = time.perf_counter() - t
            peak = torch.cuda.max_memory_allocated(device) if cuda else None
            predicted = planner.vae_encode_bytes(h, w, frames, tile)
            rows.append(f"| {name} | {attempt} | {seconds['reference']:.2f} | {seconds['pose']:.2f} | "
                        f"{sum(seconds.values()):.2f} | {_gb(peak)} | {_gb(predicted)} |")
            print(rows[-1], flush=True)
    return (f"### VAE encode alone: the 704p run's reference ({w}x{h}) and pose video ({frames} frames at "
            f"{w // 2}x{h // 2}), fp32, {'tiny' if tiny else 'full-width'} VAE (random weights)\n"
            "| tiles | pass | reference s | pose s | total s | peak alloc GB | predicted (with the run's history "
            "frames) |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows))


class _LiveTensors(TorchDispatchMode):
    """The bytes of the tensors alive, counted per storage as ops create them; `peak` since the last reset."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _drop(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, n = storage.data_ptr(), storage.nbytes()
                if n and key not in self.live:
                    self.live[key] = n
                    self.current += n
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._drop, key)
        return out


def trace_bytes_per_pixel(scale: str, latent: int, latent_frames: int = 3, by_frame: bool = False) -> float:
    """Peak live tensor bytes per output pixel of the steady frame groups (the third on) of an untiled decode of a
    `latent` x `latent` latent frame on CPU (fp32), four frames at a time or `by_frame`."""
    vae = _vae(scale, torch.device("cpu"))
    z = torch.randn(1, 16, latent_frames, latent, latent, generator=torch.Generator().manual_seed(0))
    mode, peaks = _LiveTensors(), []
    with torch.no_grad(), mode:
        for group in vae.decode_frames(z, by_frame=by_frame):
            peaks.append(mode.peak)
            mode.peak = mode.current
            del group
    return max(peaks[2:]) / (latent * 8) ** 2


def trace_encode_bytes_per_pixel(scale: str, frames: int, size: int) -> float:
    """Peak live tensor bytes per input pixel of an untiled encode of a frames x size x size video on CPU (fp32)."""
    vae = _vae(scale, torch.device("cpu"))
    video = torch.rand(1, 3, frames, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mode = _LiveTensors()
    with torch.no_grad(), mode:
        vae.encode(video)
    return mode.peak / size**2


def trace_part(tiny: bool, res) -> str:
    """Bytes per output pixel at two tile sizes and their fit a + b (1/h + 1/w) (padding grows with the edges)."""
    scale = "tiny" if tiny else "full"
    sizes = (4, 8)
    t = time.perf_counter()
    per_px = {n: trace_bytes_per_pixel(scale, n) for n in sizes}
    by_frame = {n: trace_bytes_per_pixel(scale, n, by_frame=True) for n in sizes}
    b = (per_px[sizes[0]] - per_px[sizes[1]]) / (2 / sizes[0] - 2 / sizes[1])
    a = per_px[sizes[1]] - b * 2 / sizes[1]
    encode = {f"{frames} frames, {size} px": trace_encode_bytes_per_pixel(scale, frames, size)
              for frames, size in ((1, 64), (1, 128), (9, 64), (17, 64))}
    record = {"scale": scale, "bytes_per_pixel": per_px, "fit_a": a, "fit_b": b, "by_frame_bytes_per_pixel": by_frame,
              "encode_bytes_per_pixel": encode, "seconds": round(time.perf_counter() - t, 1)}
    res.put("decode_trace", record)
    return (f"### Decode tensors traced on CPU ({scale} VAE, fp32): "
            + ", ".join(f"{n * 8}x{n * 8} px: {v:,.0f} B/px" for n, v in per_px.items())
            + f"; fit {a:,.0f} + {b:,.0f} x (1/h + 1/w) latent px (planner: VAE_DECODE_TENSOR_BYTES_PER_PIXEL)\n\n"
            + "By frame: " + ", ".join(f"{n * 8}x{n * 8} px: {v:,.0f} B/px" for n, v in by_frame.items())
            + " (planner: VAE_DECODE_BY_FRAME_TENSOR_BYTES_PER_PIXEL)\n\n"
            + "Encode tensors per input pixel: " + ", ".join(f"{k}: {v:,.0f} B/px" for k, v in encode.items())
            + " (vae_tiles: ENCODE_IMAGE_BYTES_PER_PIXEL, ENCODE_VIDEO_BYTES_PER_PIXEL)")
