"""Offload overhead and VRAM: our BlockStreamer vs every block resident vs diffusers group offloading vs mmgp, same run.

Question (issue 6/7): at the real 14B block geometry and 81 frames (512p = 48,832 tokens, 704p = 95,920), what
does streaming the blocks from pinned RAM cost in seconds per forward, and what peak VRAM does it need, under
`set_per_process_memory_fraction` caps emulating 16 GB and 24 GB cards?

Design, to fit one 10-minute device call:
- `--blocks N` (default 8) full-size SCAIL2Blocks with random weights generated on the GPU, block by block (no
  checkpoint). Offloaded and resident runs use the same N, so the ratios are exact; seconds for the 40-block
  model are per-block x 40 (labelled "x40", extrapolated). Streamed peaks do not depend on N (slots + one
  block's activations); the resident peak is extrapolated by adding (40 - N) blocks of weights.
- Each configuration: 1 warm-up forward, then `--forwards` timed forwards (CUDA-synchronised wall time), peak
  allocated/reserved from the allocator statistics reset after the warm-up. The residual input is regenerated
  from a seed before each forward (outside the timer), so no extra copy of it sits in the peak.
- Not included (add for a full model): non-block layers (0.48 GB bf16), the head and embeddings' activations.
- Bit-exactness: the streamed output at 512p is compared with the resident one (torch.equal).
- mmgp (the offloader behind WanGP), `offload.profile` HighRAM_LowVRAM (profile 2): every weight in pinned RAM,
  `asyncTransfers` (the next block is prefetched on a side stream while the current one computes, circular from
  5 blocks on), transformer budget 1200 MB, which preloads no block (two 0.8 GB blocks exceed it), so it matches
  our 0 resident / prefetch 1. No quanto quantization (`quantizeTransformer=False`), no compile (ours is not
  compiled either). It runs last: applying it sets torch's default device to cuda (kept while it is measured, as
  in WanGP, restored after) and patches transformers' device property at import.
- `--only resident,ours,mmgp` runs just those methods; `--skip` removes methods.
Run: `python benchmarks/bench_offload.py` (prints a markdown table; writes $OUT/bench_offload.json if OUT is set,
updated after every measurement so a timeout keeps what finished).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from scail2_lite.config import SIZES, DiTConfig
from scail2_lite.model import CLIP_TOKENS, SCAIL2Block
from scail2_lite.rope import rope_freqs
from scail2_lite.streamer import BlockStreamer

GB = 1e9
CAPS = {"none": None, "24GB": 24e9, "16GB": 16e9}
CONFIG = DiTConfig()
CHUNK = 8192  # ffn_chunk / attn_chunk of the shipped profiles
METHODS = ("resident", "ours", "fp8", "diffusers-block", "diffusers-leaf", "mmgp")
MMGP_METHOD = "mmgp profile 2 HighRAM_LowVRAM: pinned, async prefetch"


class Blocks(nn.Module):
    """Only the block loop of SCAIL2Model (what streaming acts on), called the way the model calls it."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor, freqs: tuple) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, e0, context, freqs)
        return x


def make_blocks(n: int, scheme: str) -> Blocks:
    """n full-size blocks with random weights made on the GPU (bf16 Linears, fp32 modulation), optionally FP8."""
    c = CONFIG
    blocks = []
    for i in range(n):
        with torch.device("meta"):
            block = SCAIL2Block(c.dim, c.ffn_dim, c.num_heads, c.eps)
        block = block.to_empty(device="cuda").to(torch.bfloat16)
        g = torch.Generator(device="cuda").manual_seed(i)
        with torch.no_grad():
            for name, p in block.named_parameters():
                if p.ndim == 2:
                    p.normal_(0, p.shape[1] ** -0.5, generator=g)
                elif name.endswith("modulation"):
                    p.data = torch.randn(p.shape, device="cuda", generator=g) * 0.02
                elif "norm" in name and name.endswith("weight"):
                    p.fill_(1)
                else:
                    p.zero_()
            block.ffn_chunk_size = block.attn_chunk_size = CHUNK
        if scheme != "bf16":
            from scail2_lite.quantize.linear import swap_linears
            from scail2_lite.quantize.schemes import is_quantized_name

            names = {m: scheme for m, mod in block.named_modules()
                     if isinstance(mod, nn.Linear) and is_quantized_name(f"blocks.0.{m}.weight")}
            swap_linears(block, names)
        blocks.append(block)
    torch.cuda.synchronize()
    return Blocks(blocks)


def inputs(size: str, seed: int = 0) -> tuple:
    height, width = SIZES[size]
    grid = (21, height // 16, width // 16)
    f, h, w = grid
    length = h * w + f * h * w + f * (h // 2) * (w // 2)
    g = torch.Generator(device="cuda").manual_seed(seed)
    e0 = torch.randn(1, 6, CONFIG.dim, device="cuda", generator=g) * 0.02
    context = torch.randn(1, CLIP_TOKENS + CONFIG.text_len, CONFIG.dim, device="cuda", generator=g).bfloat16()
    return length, e0, context, rope_freqs(CONFIG.head_dim, grid, False, device="cuda")


def residual(length: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(1)
    return torch.randn(1, length, CONFIG.dim, device="cuda", generator=g)


def clean() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


@torch.no_grad()
def measure(model: nn.Module, size: str, cap: float | None, forwards: int, keep: bool = False) -> dict:
    """Time `forwards` forwards after one warm-up, under an optional VRAM cap; returns a result row."""
    clean()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total) if cap else 1.0)
    row: dict = {"size": size, "cap": cap}
    try:
        length, e0, context, freqs = inputs(size)
        row["tokens"] = length
        model(residual(length), e0, context, freqs)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(forwards):
            x = residual(length)
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = model(x, e0, context, freqs)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        row.update(s_per_forward=min(times), times=times, peak_allocated=torch.cuda.max_memory_allocated(),
                   peak_reserved=torch.cuda.max_memory_reserved())
        if keep:
            row["output"] = out.cpu()
        del x, out
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        clean()
    return row


def safe_measure(model: nn.Module, size: str, cap: float | None, forwards: int, keep: bool = False) -> dict:
    """`measure`, with any failure of a third-party offloader's hooks turned into an error row instead of a crash."""
    try:
        return measure(model, size, cap, forwards, keep)
    except Exception as e:
        return {"size": size, "cap": cap, "error": failure(e)}


def failure(e: Exception) -> str:
    """One table-safe line naming the exception."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:160] if lines else ''}".replace("|", "/")


def apply_mmgp(model: Blocks) -> "mmgp.offload.offload":
    """Hook mmgp's fastest low-VRAM profile onto the blocks (on the CPU); returns mmgp's offload object.

    mmgp asserts one dtype per model unless a module carries `_lock_dtype`: the blocks keep their float32
    modulation that way, and `_lock_dtype = None` on the root stops its top-level hook from casting the float32
    residual stream and e0 to bfloat16 (which would change the numbers, not just the speed).
    """
    from mmgp import offload, profile_type

    for block in model.blocks:
        block._lock_dtype = torch.float32
    model._lock_dtype = None
    return offload.profile({"transformer": model}, profile_type.HighRAM_LowVRAM, quantizeTransformer=False,
                           convertWeightsFloatTo=None, verboseLevel=1)


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--forwards", type=int, default=2)
    parser.add_argument("--sizes", default="512p,704p")
    parser.add_argument("--skip", default="", help=f"comma list of methods to skip: {', '.join(METHODS)}")
    parser.add_argument("--only", default="", help="comma list of the methods to run (default: all)")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    only = set(filter(None, args.only.split(",")))
    if unknown := (skip | only) - set(METHODS):
        parser.error(f"unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}")
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    sizes = args.sizes.split(",")

    def selected(method: str) -> bool:
        return method not in skip and (not only or method in only)

    n = args.blocks
    out_dir = os.environ.get("OUT")
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "blocks": n,
              "forwards": args.forwards, "rows": [], "notes": []}
    start_all = time.perf_counter()

    def record(method: str, dtype: str, row: dict, extra: dict | None = None) -> dict:
        row = {"method": method, "dtype": dtype, **row, **(extra or {})}
        row.pop("output", None)
        report["rows"].append(row)
        result = row.get("error") or f"{row['s_per_forward']:.3f} s, {row['peak_allocated'] / GB:.2f} GB"
        print(f"[{time.perf_counter() - start_all:6.0f}s] {method} {dtype} {row['size']} cap={row['cap']}: {result}",
              flush=True)
        if out_dir:
            tmp = Path(out_dir) / "bench_offload.json.tmp"
            tmp.write_text(json.dumps(report, indent=1, default=str))
            tmp.rename(Path(out_dir) / "bench_offload.json")
        return row

    # Host-to-device bandwidth from page-locked memory (what a streamed block copy runs at).
    host = torch.empty(int(1e9), dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(host, device="cuda")
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    report["pinned_h2d_GBps"] = 3 * host.numel() / (time.perf_counter() - t) / GB
    del host, dev
    clean()

    schemes = (["bf16"] if selected("resident") or selected("ours") else []) + (["fp8"] if selected("fp8") else [])
    reference = None  # bf16 resident output at 512p, for mmgp's bit-exactness check
    for scheme in schemes:
        try:
            model = make_blocks(n, scheme)
        except Exception as e:  # FP8 needs the quantize package and an FP8-capable GPU
            report["notes"].append(f"{scheme}: could not build blocks ({type(e).__name__}: {e})")
            continue
        per_block = weight_bytes(model) / n
        report[f"block_bytes_{scheme}"] = per_block
        resident = {}
        for size in sizes if scheme != "bf16" or selected("resident") else []:
            row = measure(model, size, None, args.forwards, keep=size == "512p")
            resident[size] = row
            record("resident", scheme, row, {"peak_allocated_40_blocks": row.get("peak_allocated", 0) + (40 - n) * per_block})
        if scheme == "bf16" and selected("mmgp"):
            reference = resident.get("512p", {}).get("output")
        streaming = scheme != "bf16" or selected("ours")
        with (BlockStreamer(model, "cuda", resident_blocks=0, prefetch=1) if streaming else contextlib.nullcontext()) \
                as streamer:
            for size in sizes if streaming else []:
                for cap_name, cap in CAPS.items():
                    if scheme != "bf16" and cap_name == "24GB":
                        continue
                    row = measure(model, size, cap, args.forwards, keep=size == "512p" and cap is None)
                    extra = {"copies": streamer.copies}
                    if "output" in row and "output" in resident.get(size, {}):
                        extra["bit_exact_vs_resident"] = bool(torch.equal(row["output"], resident[size]["output"]))
                    if "s_per_forward" in row and "s_per_forward" in resident.get(size, {}):
                        extra["ratio"] = row["s_per_forward"] / resident[size]["s_per_forward"]
                    record("ours: 0 resident, prefetch 1", scheme, row, extra)
        for row in resident.values():
            row.pop("output", None)
        del model
        clean()

    bf16_resident = {r["size"]: r for r in report["rows"] if r["method"] == "resident" and r["dtype"] == "bf16"}
    levels = [level for level in ("block_level", "leaf_level") if selected(f"diffusers-{level.split('_')[0]}")]
    try:
        from diffusers.hooks import apply_group_offloading
    except ImportError:
        apply_group_offloading = None
        if levels:
            report["notes"].append("diffusers not importable: group offloading skipped")
    if apply_group_offloading is not None:
        for level in levels:
            model = make_blocks(n, "bf16").to("cpu")
            clean()
            kwargs = {"num_blocks_per_group": 1} if level == "block_level" else {}
            apply_group_offloading(model, onload_device=torch.device("cuda"), offload_type=level, use_stream=True,
                                   **kwargs)
            for size in sizes:
                for cap_name, cap in CAPS.items():
                    row = safe_measure(model, size, cap, args.forwards)
                    extra = {}
                    if "s_per_forward" in row and "s_per_forward" in bf16_resident.get(size, {}):
                        extra["ratio"] = row["s_per_forward"] / bf16_resident[size]["s_per_forward"]
                    record(f"diffusers group offload, {level.replace('_', ' ')}, streams", "bf16", row, extra)
            del model
            clean()

    if selected("mmgp"):
        model = offloader = None
        try:
            model = make_blocks(n, "bf16").to("cpu")
            clean()
            offloader = apply_mmgp(model)
        except Exception as e:  # not installed, or its hooks refuse the module: an error row, not a crash
            for size in sizes:
                record(MMGP_METHOD, "bf16", {"size": size, "cap": None, "error": f"could not apply: {failure(e)}"})
        else:
            for size in sizes:
                for cap in CAPS.values():
                    row = safe_measure(model, size, cap, args.forwards, keep=size == "512p" and cap is None)
                    extra = {}
                    if "output" in row and reference is not None:
                        extra["bit_exact_vs_resident"] = bool(torch.equal(row["output"], reference))
                    if "s_per_forward" in row and "s_per_forward" in bf16_resident.get(size, {}):
                        extra["ratio"] = row["s_per_forward"] / bf16_resident[size]["s_per_forward"]
                    record(MMGP_METHOD, "bf16", row, extra)
        finally:
            if offloader is not None:
                offloader.release()
            torch.set_default_device(None)  # this script never sets one; mmgp leaves it at cuda
            del model, offloader
            clean()

    print(f"\n{report['device']}, torch {report['torch']}; {n} full-size blocks, {args.forwards} timed forwards after "
          f"1 warm-up; pinned H2D {report['pinned_h2d_GBps']:.1f} GB/s. 'x40' = per-block time x 40 (extrapolated); "
          "ratio = seconds / resident seconds of the same dtype in this run. Non-block layers (0.48 GB) not included.\n")
    print("| method | dtype | size | cap | s/forward | s/block | x40 s/forward | ratio | peak alloc GB | peak reserved GB | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        cap = f"{r['cap'] / GB:.0f} GB" if r["cap"] else "-"
        if "error" in r:
            print(f"| {r['method']} | {r['dtype']} | {r['size']} | {cap} | {r['error']} | | | | | | |")
            continue
        note = []
        if "peak_allocated_40_blocks" in r:
            note.append(f"40 blocks: {r['peak_allocated_40_blocks'] / GB:.1f} GB alloc (extrapolated)")
        if "bit_exact_vs_resident" in r:
            note.append("bit-exact" if r["bit_exact_vs_resident"] else "NOT bit-exact")
        s = r["s_per_forward"]
        ratio = f"{r['ratio']:.3f}" if "ratio" in r else "1" if r["method"] == "resident" else "-"
        print(f"| {r['method']} | {r['dtype']} | {r['size']} | {cap} | {s:.3f} | {s / n:.4f} | {s / n * 40:.2f} | "
              f"{ratio} | {r['peak_allocated'] / GB:.2f} | {r['peak_reserved'] / GB:.2f} | {'; '.join(note)} |")
    for note in report["notes"]:
        print(f"\nnote: {note}")


if __name__ == "__main__":
    main()
