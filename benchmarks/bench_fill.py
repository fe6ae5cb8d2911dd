"""How fast the streamed blocks' pinned buffer fills from the weight files, by reading threads (issue 23).

The host side of a placement reads every streamed block from the quantized shards into one buffer
(`offload.host.PinnedHost`), on `host.READ_THREADS` threads. This times that fill, without the page-locking call (no
GPU needed), for 1 and READ_THREADS threads, alternating, from a warm page cache (a run's usual case: the files were
read or written recently) and from a cold one (the file's pages dropped with posix_fadvise first: a disk read).
Blocks have the FP8 14B block's tensors (q, k, v, o, the cross-attention's six, the FFN's two; 0.40 GB each).

    python benchmarks/bench_fill.py --blocks 6 --repeats 3

`--beside-encode` (CUDA): what the fill costs the GPU work beside it. In a run the host side is built on a worker
thread while CLIP and the VAE encode use the GPU (placement.py). A probe, the VAE encode of the 704p run's
reference frame (full-width VAE, random weights), runs back to back on the main thread: alone, then while a worker
reads `--blocks` blocks into the buffer and page-locks it with cudaHostRegister in one call, as `PinnedHost` does.
Each probe is counted in the part of the fill it overlapped most (reading or page-locking).

    python benchmarks/bench_fill.py --blocks 23 --beside-encode
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from scail2_lite.formats import WeightFiles
from scail2_lite.offload import host
from scail2_lite.offload.layout import BlockLayout

DIM, FFN = 5120, 13824
SQUARES = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
           "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img")


def fp8_block() -> nn.Module:
    """A module with the FP8 block's large tensors (uint8 storage: the fill only moves bytes)."""
    block = nn.Module()
    for name in SQUARES:
        block.register_buffer(name.replace(".", "_"), torch.empty(DIM, DIM, dtype=torch.uint8))
    block.register_buffer("ffn_0", torch.empty(FFN, DIM, dtype=torch.uint8))
    block.register_buffer("ffn_2", torch.empty(DIM, FFN, dtype=torch.uint8))
    return block


def write_shard(path: Path, blocks: int) -> None:
    """`blocks` blocks of random bytes (one block's drawn, the others copies of it: the fill only moves bytes)."""
    g = torch.Generator().manual_seed(0)
    drawn = {name: torch.randint(0, 256, t.shape, dtype=torch.uint8, generator=g)
             for name, t in fp8_block().named_buffers()}
    save_file({f"blocks.{b}.{name}": t.clone() for b in range(blocks) for name, t in drawn.items()}, str(path))


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def fill_seconds(path: Path, blocks: int, threads: int, cold: bool) -> float:
    """One fill of every block into a fresh buffer, as a placement's host side does (page-locking left out)."""
    host.READ_THREADS = threads
    modules = [fp8_block() for _ in range(blocks)]
    layouts = [BlockLayout.build(m, f"blocks.{b}", ["tail"]) for b, m in enumerate(modules)]
    files = WeightFiles([path])
    if cold:
        drop_cache(path)
    t = time.perf_counter()
    filled = host.PinnedHost(layouts, files, cuda=False)
    seconds = time.perf_counter() - t
    files.close()
    del filled
    return seconds


def beside_encode(path: Path, blocks: int, repeats: int) -> str:
    """Probe seconds alone and beside each part of the fill (see the module docstring)."""
    import threading

    from _vae_decode import _vae

    device = torch.device("cuda")
    vae = _vae("full", device).to(device)
    reference = (torch.rand(1, 3, 1, 704, 1280, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)

    def probe() -> tuple[float, float]:
        t = time.perf_counter()
        vae.encode(reference)
        torch.cuda.synchronize(device)
        return t, time.perf_counter()

    for _ in range(3):
        probe()  # cuDNN's first choices
    alone = [e - t for t, e in (probe() for _ in range(10))]
    rows = [f"| alone | {len(alone)} | {statistics.median(alone) * 1e3:.0f} | {max(alone) * 1e3:.0f} | - |"]
    parts: dict[str, list[float]] = {"reading": [], "page-locking": []}
    spans: dict[str, list[float]] = {"reading": [], "page-locking": []}
    for _ in range(repeats):
        modules = [fp8_block() for _ in range(blocks)]
        layouts = [BlockLayout.build(m, f"blocks.{b}", ["tail"]) for b, m in enumerate(modules)]
        files = WeightFiles([path])
        marks: dict[str, float] = {}

        def fill() -> None:
            marks["start"] = time.perf_counter()
            filled = host.PinnedHost(layouts, files, cuda=False)
            marks["read"] = time.perf_counter()
            buffer = filled.buffer
            err = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
            marks["locked"] = time.perf_counter()
            assert int(err) == 0, f"cudaHostRegister: {int(err)}"
            torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())

        worker = threading.Thread(target=fill)
        worker.start()
        probes = []
        while worker.is_alive():
            probes.append(probe())
        worker.join()
        files.close()
        spans["reading"].append(marks["read"] - marks["start"])
        spans["page-locking"].append(marks["locked"] - marks["read"])
        for t, e in probes:
            read = max(0.0, min(e, marks["read"]) - max(t, marks["start"]))
            lock = max(0.0, min(e, marks["locked"]) - max(t, marks["read"]))
            if read or lock:
                parts["reading" if read >= lock else "page-locking"].append(e - t)
    for name, ts in parts.items():
        if ts:
            rows.append(f"| beside {name} | {len(ts)} | {statistics.median(ts) * 1e3:.0f} | {max(ts) * 1e3:.0f} | "
                        f"{statistics.median(spans[name]):.2f} |")
    gb = path.stat().st_size / 1e9
    return (f"probe: the VAE encode of one 1280x704 frame; fill: {blocks} blocks, {gb:.2f} GB, {host.READ_THREADS} "
            f"threads, warm page cache\n| probe | probes | median ms | max ms | that part of the fill s (median) |\n"
            "|---|---|---|---|---|\n" + "\n".join(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the shard (default: a temporary folder)")
    ap.add_argument("--beside-encode", action="store_true", help="CUDA: a VAE encode probe beside the fill")
    args = ap.parse_args()
    shipped = host.READ_THREADS
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "blocks.safetensors"
        write_shard(path, args.blocks)
        gb = path.stat().st_size / 1e9
        print(f"{args.blocks} blocks, {gb:.2f} GB, {os.cpu_count()} CPUs", flush=True)
        if args.beside_encode:
            print(beside_encode(path, args.blocks, args.repeats), flush=True)
            return
        rows = []
        for cold in (False, True):
            fill_seconds(path, args.blocks, 1, cold=False)  # the page cache holds the file (warm) or is reset (cold)
            times: dict[int, list[float]] = {1: [], shipped: []}
            for _ in range(args.repeats):
                for threads in times:
                    times[threads].append(fill_seconds(path, args.blocks, threads, cold))
            for threads, ts in times.items():
                med = statistics.median(ts)
                rows.append(f"| {'cold' if cold else 'warm'} | {threads} | {med:.2f} | {gb / med:.2f} | "
                            f"{', '.join(f'{t:.2f}' for t in ts)} |")
                print(rows[-1], flush=True)
    host.READ_THREADS = shipped
    print("| page cache | threads | s (median) | GB/s | runs |\n|---|---|---|---|---|\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
