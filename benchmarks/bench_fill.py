"""How fast the streamed blocks' pinned buffer fills from the weight files, by reading threads (issue 23).

The host side of a placement reads every streamed block from the quantized shards into one buffer
(`offload.host.PinnedHost`), on `host.READ_THREADS` threads. This times that fill, without the page-locking call (no
GPU needed), for 1 and READ_THREADS threads, alternating, from a warm page cache (a run's usual case: the files were
read or written recently) and from a cold one (the file's pages dropped with posix_fadvise first: a disk read).
Blocks have the FP8 14B block's tensors (q, k, v, o, the cross-attention's six, the FFN's two; 0.40 GB each).

    python benchmarks/bench_fill.py --blocks 6 --repeats 3
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
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for b in range(blocks):
        for name, t in fp8_block().named_buffers(prefix=f"blocks.{b}"):
            tensors[name] = torch.randint(0, 256, t.shape, dtype=torch.uint8, generator=g)
    save_file(tensors, str(path))


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the shard (default: a temporary folder)")
    args = ap.parse_args()
    shipped = host.READ_THREADS
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "blocks.safetensors"
        write_shard(path, args.blocks)
        gb = path.stat().st_size / 1e9
        print(f"{args.blocks} blocks, {gb:.2f} GB, {os.cpu_count()} CPUs", flush=True)
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
