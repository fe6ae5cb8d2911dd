"""Mapped weight files: tensors viewed in place from the page cache, and the pages handed back after use."""

from __future__ import annotations

import ctypes
import json

import mmap
import os
import struct
import threading
from pathlib import Path

import torch

from ..errors import UserError
from .keys import SAFETENSORS_DTYPES

class FilePages:
    """Hands the pages of memory-mapped weights files back to the page cache once their tensors are on the GPU.

    A `.pth` loaded with mmap, or a mapped quantized shard, is a private, never-written mapping: every page read
    while copying to the GPU would stay in the process's resident set until the last view is freed (9 GB for
    umT5, 6-17 GB for resident DiT blocks). MADV_DONTNEED on an unwritten private file mapping only forgets pages:
    a later read faults them back in from the page cache, unchanged. Linux only; elsewhere `drop` does nothing."""

    def __init__(self, paths: list[str | Path]) -> None:
        self.ranges: list[tuple[int, int]] = []
        self._madvise = getattr(ctypes.CDLL(None), "madvise", None) if os.name == "posix" and paths else None
        if self._madvise is None:
            return
        try:
            maps = Path("/proc/self/maps").read_text().splitlines()
        except OSError:
            return
        real = {os.path.realpath(p) for p in paths}
        for line in maps:
            fields = line.split(None, 5)
            if len(fields) == 6 and fields[5] in real and fields[1].startswith("r") and fields[1][3] == "p":
                start, end = (int(x, 16) for x in fields[0].split("-"))
                self.ranges.append((start, end))

    def drop(self) -> None:
        """Forget every page of the files' mappings (as they were at construction) from the resident set."""
        if self._madvise is None:
            return
        for start, end in self.ranges:
            self._madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)

class WeightFiles:
    """Where every tensor of some safetensors files lies (headers only: no tensor data is read up front).

    Two ways to get a tensor without an in-RAM copy in this process: `read_into` reads its bytes straight into a
    caller's buffer (a pinned host buffer or staging slot: the page cache is used, the process's resident set does
    not grow), and `view` maps it zero-copy (pages are read when touched). The block streamer uses the first, the
    loader the second for blocks that only the streamer will read. Keys are the files' own names.
    """

    def __init__(self, paths: list[Path] | list[str]) -> None:
        self.paths = [Path(p) for p in paths]
        self.index: dict[str, tuple[int, int, int, torch.dtype, tuple[int, ...]]] = {}
        self._maps: dict[int, mmap.mmap] = {}
        self._handles: dict[int, object] = {}
        self._lock = threading.Lock()
        for i, path in enumerate(self.paths):
            try:
                with open(path, "rb") as f:
                    (header_len,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(header_len))
            except (OSError, ValueError, struct.error) as e:
                raise UserError(f"{path}: cannot read the safetensors header ({e})") from None
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                dtype = getattr(torch, SAFETENSORS_DTYPES.get(info["dtype"], ""), None)
                if not isinstance(dtype, torch.dtype):
                    raise UserError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
                begin, end = info["data_offsets"]
                self.index[key] = (i, 8 + header_len + begin, end - begin, dtype, tuple(info["shape"]))

    def check(self, key: str, dtype: torch.dtype, shape: tuple[int, ...], what: str) -> None:
        """Raise a UserError unless `key` exists with this dtype and shape (`what` names the model tensor)."""
        if key not in self.index:
            raise UserError(f"{self._where()}: tensor {key} (for {what}) is missing")
        _, _, _, have_dtype, have_shape = self.index[key]
        if have_dtype != dtype or have_shape != tuple(shape):
            raise UserError(f"{self._where()}: tensor {key} is {have_dtype} {list(have_shape)}, "
                            f"the model expects {dtype} {list(shape)}")

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Read `key`'s bytes into the contiguous CPU uint8 tensor `out` (exactly its size). Thread-safe: positional
        reads on one shared handle per file, so threads read at once (the pinned buffer fills from several,
        `host.PinnedHost`); where the OS has no positional read (Windows), they seek and read in turn."""
        i, offset, n, _, _ = self.index[key]
        if n == 0:
            return
        with self._lock:
            f = self._handles.get(i)
            if f is None:
                f = self._handles[i] = open(self.paths[i], "rb", buffering=0)
        buf = memoryview(out.numpy()).cast("B")
        got = 0
        while got < n:
            k = self._read_at(f, buf[got:n], offset + got)
            if not k:
                raise UserError(f"{self.paths[i]}: file ended inside tensor {key} (truncated?)")
            got += k

    def _read_at(self, f, buf: memoryview, offset: int) -> int:
        if hasattr(os, "preadv"):
            return os.preadv(f.fileno(), [buf], offset)
        with self._lock:
            f.seek(offset)
            return f.readinto(buf)

    def view(self, key: str) -> torch.Tensor:
        """`key` as a typed tensor over a private, copy-on-write mapping of its file (no read until touched)."""
        i, offset, n, dtype, shape = self.index[key]
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        mm = self._maps.get(i)
        if mm is None:
            with open(self.paths[i], "rb") as f:
                # ACCESS_COPY: writable as torch.frombuffer wants, never written, so pages stay the page cache's.
                mm = self._maps[i] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return torch.frombuffer(mm, dtype=torch.uint8, count=n, offset=offset).view(dtype).view(shape)

    def close(self) -> None:
        """Close the read handles (mapped views stay valid: each keeps its mapping alive)."""
        for f in self._handles.values():
            f.close()
        self._handles.clear()
        self._maps.clear()

    def _where(self) -> str:
        return ", ".join(str(p) for p in self.paths)

