"""What scail2-lite keeps between runs under the user's cache folder: the demo checkpoint, and prompt embeddings.

Prompt embeddings depend only on the text encoder's files, its scheme and the prompt, and umT5 takes seconds to
load and run (11 GB in bf16): a re-run of the same prompt reads a few hundred kilobytes instead. Entries are
written under a temporary name and renamed, so a crash never leaves a half-written entry; a damaged entry is
re-encoded, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

PROMPT_CACHE_VERSION = 1


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/scail2-lite`, else `~/.cache/scail2-lite`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scail2-lite"


def file_identity(paths: list[Path]) -> str:
    """Resolved path, size and modification time of each file: a changed or replaced file is a new identity."""
    parts = []
    for p in paths:
        st = p.stat()
        parts.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


class PromptCache:
    """Prompts -> their embeddings (fp32, CPU) for one text encoder identity and scheme. The key is the whole
    list, encoded together (prompt and negative prompt are one batch): a hit returns exactly what a miss computes."""

    def __init__(self, encoder_identity: str, scheme: str, folder: Path | None = None) -> None:
        self.folder = folder or cache_root() / "prompts"
        self._salt = f"v{PROMPT_CACHE_VERSION}|{encoder_identity}|{scheme}|"

    def _path(self, prompts: list[str]) -> Path:
        key = self._salt + json.dumps(prompts, ensure_ascii=False)
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()}.safetensors"

    def get(self, prompts: list[str]) -> list[torch.Tensor] | None:
        path = self._path(prompts)
        if not path.is_file():
            return None
        try:
            stored = load_file(path)
            return [stored[str(i)] for i in range(len(prompts))]
        except (SafetensorError, OSError, KeyError):
            return None

    def put(self, prompts: list[str], embeddings: list[torch.Tensor]) -> None:
        """Store an entry; a cache that cannot be written (read-only, full disk) is skipped, never an error."""
        path = self._path(prompts)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_file({str(i): e.contiguous() for i, e in enumerate(embeddings)}, str(tmp))
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
