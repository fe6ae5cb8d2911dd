"""Full-size synthetic weights fast enough for a 9-minute GPU benchmark (helpers of bench_fidelity.py).

- `write_dit_parallel`: the same files as `synth.write_dit(folder, config, "wan", seed, dtype, shard_bytes)`
  (same shard grouping, same bytes: each tensor has its own seeded generator), with the shards written by a
  pool of processes. `synth_tensor` draws on one core (~25-60 M values/s), so the 16.4 G values of the 14B DiT
  take ~5 minutes serially and well under one minute on 15 cores.
- `device_synth_tensor`: `synth.synth_tensor` with its generator on the device. Same distribution, not the same
  values: used for tensors that never go through a file (the 5.7 B-parameter umT5 is built on the GPU in seconds
  instead of minutes on the CPU).
- `device_dit`: the bf16 DiT built from such tensors, for benchmarks that need no file.
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from scail2_lite.config import DiTConfig
from scail2_lite.formats import wan_shapes
from scail2_lite.model import SCAIL2Model
from scail2_lite.synth import SHARD_STEM, synth_tensor, write_safetensors

_META = {"format": "pt", "synthetic": "scail2-lite"}  # what synth.write_dit puts in every shard


def shard_groups(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, shard_bytes: int) -> list[list[str]]:
    """Tensor names per shard, grouped exactly as `synth.write_dit` groups them (in order, cut before overflow)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def _write_shard(path: str, names: list[str], shapes: dict[str, tuple[int, ...]], seed: int,
                 dtype: torch.dtype) -> tuple[int, float]:
    """Pool worker: one shard, one core (the pool provides the parallelism); -> (bytes, wall-clock end time)."""
    torch.set_num_threads(1)
    specs = [(n, shapes[n], dtype) for n in names]
    write_safetensors(Path(path), specs, (synth_tensor(n, shapes[n], seed) for n in names), _META)
    return sum(math.prod(shapes[n]) * dtype.itemsize for n in names), time.time()


class ParallelDiTWriter:
    """Starts writing the sharded Wan-format DiT in the background; `result()` waits and returns the index path.

    The pool uses spawned processes so it is safe after CUDA was initialised in the parent, and the parent can
    run GPU work meanwhile."""

    def __init__(self, folder: Path, config: DiTConfig, seed: int, dtype: torch.dtype, shard_bytes: int,
                 workers: int) -> None:
        self.started = time.time()
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        shapes = wan_shapes(config)
        groups = shard_groups(shapes, dtype, shard_bytes)
        self.files = [f"{SHARD_STEM}-{n:05d}-of-{len(groups):05d}.safetensors" for n in range(1, len(groups) + 1)]
        self.weight_map = {name: f for f, names in zip(self.files, groups) for name in names}
        self.pool = ProcessPoolExecutor(max_workers=min(workers, len(groups)), mp_context=get_context("spawn"))
        self.futures: list[Future] = [self.pool.submit(_write_shard, str(self.folder / f), names, shapes, seed, dtype)
                                      for f, names in zip(self.files, groups)]
        (self.folder / "config.json").write_text(json.dumps(config.to_dict(), indent=1))

    def done_count(self) -> int:
        return sum(f.done() for f in self.futures)

    def result(self) -> tuple[Path, int, float]:
        """Wait for every shard, write the index (as write_dit does); -> (index path, tensor bytes, seconds from
        the start to the last shard written)."""
        done = [f.result() for f in self.futures]
        total = sum(n for n, _ in done)
        self.pool.shutdown()
        index = self.folder / f"{SHARD_STEM}.safetensors.index.json"
        tmp = index.with_name(f".{index.name}.tmp")
        tmp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": self.weight_map}, indent=1))
        os.replace(tmp, index)
        return index, total, max(t for _, t in done) - self.started

    def cancel(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def device_synth_tensor(name: str, shape: tuple[int, ...], seed: int, namespace: str,
                        device: torch.device | str) -> torch.Tensor:
    """`synth_tensor` drawn by a generator on `device` (same recipe; on CUDA not the CPU files' values)."""
    return synth_tensor(name, shape, seed, namespace, device=device)


def device_dit(config: DiTConfig, seed: int, device: torch.device | str) -> SCAIL2Model:
    """The bf16 DiT of `config` with `device_synth_tensor` weights, built on the meta device and assigned (no copy)."""
    with torch.device("meta"):
        model = SCAIL2Model(config)
    state = {k: device_synth_tensor(k, s, seed, "dit", device).to(torch.bfloat16) for k, s in wan_shapes(config).items()}
    model.load_state_dict(state, assign=True)
    return model.eval()
