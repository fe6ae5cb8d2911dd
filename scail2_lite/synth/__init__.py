"""Synthetic SCAIL-2 checkpoints in the real Hugging Face layout, plus a matching input set (test fixtures and
the demo; nothing in the runtime imports this package).

Rooms: `weights` (trained-looking tensors and every file format they are written in), `inputs` (the driving
video, reference and masks).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..cache import cache_root
from ..errors import UserError
from .inputs import write_inputs
from .weights import (
    CLIP_FILE,
    COMFY_FILE,
    COMFY_QUANT_FILE,
    DIT_FORMATS,
    FULL_SHARD_BYTES,
    LORA_DIR,
    LORA_FILES,
    SCALES,
    SHARD_STEM,
    UMT5_FILE,
    VAE_FILE,
    WAN_FILE,
    Progress,
    dit_config,
    dit_tensors,
    synth_tensor,
    tiny_config,
    umt5_tensors,
    wan_to_sat,
    write_dit,
    write_encoders,
    write_loras,
    write_safetensors,
    write_tokenizer,
)

__all__ = [
    "CLIP_FILE", "COMFY_FILE", "COMFY_QUANT_FILE", "DIT_FORMATS", "LORA_DIR", "LORA_FILES", "SCALES", "SHARD_STEM", "UMT5_FILE", "VAE_FILE",
    "WAN_FILE", "cached_demo_folder", "dit_config", "dit_tensors", "synth", "synth_tensor", "tiny_config",
    "umt5_tensors", "wan_to_sat", "write_dit", "write_encoders", "write_inputs", "write_loras", "write_safetensors",
    "write_tokenizer",
]


# ---------------------------------------------------------------- everything


def synth(out: str | Path, scale: str = "tiny", fmt: str = "sat", seed: int = 0,
          progress: Progress | None = None) -> Path:
    """Write a complete synthetic SCAIL-2 folder (HF layout) plus `inputs/`; returns the folder."""
    out = Path(out)
    config = dit_config(scale)
    if fmt not in DIT_FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(DIT_FORMATS)}")
    if scale == "full" and fmt == "sat":
        raise UserError("--scale full --format sat would need the 65 GB fp32 pickle in RAM; use --format wan "
                        "(bf16 shards, streamed) or comfy (fp16, streamed)")
    out.mkdir(parents=True, exist_ok=True)
    step = progress or (lambda _: None)
    step("DiT")
    full = scale == "full"
    write_dit(out, config, fmt, seed, dtype=torch.bfloat16 if full and fmt == "wan" else None,
              shard_bytes=FULL_SHARD_BYTES if full else None, progress=progress)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    step("encoders and VAE")
    write_encoders(out, scale, seed)
    step("tokenizer")
    from ..encoders import umt5_config

    write_tokenizer(out / "umt5-xxl", min(1000, umt5_config(scale).vocab_size))
    step("inputs")
    write_inputs(out / "inputs", scale)
    step("LoRAs")
    write_loras(out / LORA_DIR, config, seed)
    return out


def cached_demo_folder(progress: Progress | None = None) -> Path:
    """The tiny demo checkpoint + inputs under the user cache dir: made once (atomically), then reused."""
    import shutil

    from .. import __version__

    root = cache_root()
    folder = root / f"demo-tiny-{__version__}"
    if (folder / "inputs" / "driving_mask.mp4").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{folder.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        synth(tmp, scale="tiny", fmt="sat", seed=0, progress=progress)
        tmp.rename(folder)
    except OSError:
        if not (folder / "inputs" / "driving_mask.mp4").is_file():  # not a concurrent run that finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
