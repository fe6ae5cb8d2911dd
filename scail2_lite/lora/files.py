"""LoRA files as the user names them: `--lora PATH[:STRENGTH]`, the merge rule, and the tensors of the file."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..formats.pickles import load_safe_pickle, state_dict_of

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


@dataclass(frozen=True)
class LoraFile:
    """One LoRA to merge: its file, strength and merge rule.

    `full_patches` False is upstream SCAIL-2's rule (`fuse_lora_with_diff_b`): low-rank pairs and the `diff_b` of a
    paired layer only; a file's full-tensor patches (`.diff`, `diff_m`, a `diff_b` without a pair) are skipped and
    listed in the match report. True is ComfyUI's: those patches are added too wherever their shape fits the
    model (one that does not fit, such as LightX2V's 36-channel `patch_embedding` entry, is still skipped)."""

    path: Path
    strength: float = 1.0
    full_patches: bool = False

    @classmethod
    def parse(cls, arg: str, full_patches: bool = False) -> "LoraFile":
        """From a `--lora PATH[:STRENGTH]` value."""
        path, strength = parse_lora_arg(arg)
        return cls(Path(path), strength, full_patches)


def as_lora_file(item: "LoraFile | tuple[str | Path, float]") -> LoraFile:
    """A `LoraFile` from itself or from a (path, strength) pair (upstream's merge rule)."""
    if isinstance(item, LoraFile):
        return item
    path, strength = item
    return LoraFile(Path(path), float(strength))


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """`PATH[:STRENGTH]` -> (path, strength). Only a trailing `:number` is a strength (Windows paths keep `C:`)."""
    m = re.match(r"^(?P<path>.*):(?P<s>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)$", arg)
    path, strength = (m.group("path"), float(m.group("s"))) if m else (arg, 1.0)
    if not path or not math.isfinite(strength):
        raise UserError(f"--lora {arg!r}: expected PATH or PATH:STRENGTH, e.g. my_lora.safetensors:0.8")
    return path, strength


def read_lora_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a LoRA file: safetensors, or a `.pt/.pth/.bin/.ckpt` pickle opened with `weights_only` (the same
    allow-list as the SAT DiT: SCAIL-2's own LoRAs are SAT checkpoints, their tensors under "module")."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
            raise UserError(f"LoRA {path}: not a readable safetensors file ({e})") from None
    if path.suffix not in PICKLE_SUFFIXES:
        raise UserError(f"LoRA {path}: unknown file type {path.suffix!r} (expected .safetensors, .pt or .pth)")
    state = state_dict_of(load_safe_pickle(path, mmap=False))  # small enough to read; old pickle formats too
    if state is None:
        raise UserError(f"LoRA {path}: expected a dict of tensors")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def peft_alpha(path: Path) -> float | None:
    """PEFT keeps alpha in `adapter_config.json` beside `adapter_model.safetensors`, not in the tensors."""
    cfg_path = path.with_name("adapter_config.json")
    if not cfg_path.is_file():
        return None
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("alpha_pattern"):
        raise UserError(f"{cfg_path}: per-module alpha_pattern is not supported; merge the adapter with PEFT first")
    alpha = cfg.get("lora_alpha")
    return float(alpha) if alpha is not None else None
