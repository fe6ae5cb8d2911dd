"""Synthetic SCAIL-2 checkpoints in the real Hugging Face layout, plus a matching input set (test fixtures and
the demo; nothing in the runtime imports this package).

Rooms: `weights` (trained-looking tensors and every file format they are written in), `inputs` (the driving
video, reference and masks).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .. import outputs
from ..cache import cache_root
from ..errors import UserError
from .inputs import EXTRA_REFERENCES, write_extra_references, write_inputs
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
    write_sat,
    write_tokenizer,
)

__all__ = [
    "EXTRA_REFERENCES", "write_extra_references",
    "CLIP_FILE", "COMFY_FILE", "COMFY_QUANT_FILE", "DIT_FORMATS", "LORA_DIR", "LORA_FILES", "SCALES", "SHARD_STEM", "UMT5_FILE", "VAE_FILE",
    "WAN_FILE", "cached_demo_folder", "dit_config", "dit_tensors", "synth", "synth_tensor", "tiny_config",
    "umt5_tensors", "wan_to_sat", "write_dit", "write_encoders", "write_inputs", "write_loras", "write_safetensors",
    "write_sat", "write_tokenizer",
]


# ---------------------------------------------------------------- everything


def synth(out: str | Path, scale: str = "tiny", fmt: str = "sat", seed: int = 0,
          progress: Progress | None = None) -> Path:
    """Write a complete synthetic SCAIL-2 folder (HF layout) plus `inputs/`; returns the folder. `out` must be
    new or empty (nothing of the user's is overwritten); it is built under a hidden name and renamed at the end,
    so an error, a full disk, Ctrl-C or SIGTERM leaves nothing behind."""
    out = Path(out)
    config = dit_config(scale)
    if fmt not in DIT_FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(DIT_FORMATS)}")
    if scale == "full" and fmt == "sat":
        raise UserError("--scale full --format sat would need the 65 GB fp32 pickle in RAM; use --format wan "
                        "(bf16 shards, streamed) or comfy (fp16, streamed)")
    full = scale == "full"
    dit_dtype = torch.bfloat16 if full and fmt == "wan" else None
    outputs.check_folder_target(out, "-o", _estimate_bytes(config, scale, fmt, dit_dtype))
    step = progress or (lambda _: None)
    with outputs.new_folder(out) as staging:
        step("DiT")
        write_dit(staging, config, fmt, seed, dtype=dit_dtype, shard_bytes=FULL_SHARD_BYTES if full else None,
                  progress=progress)
        (staging / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
        step("encoders and VAE")
        write_encoders(staging, scale, seed)
        step("tokenizer")
        from ..encoders import umt5_config

        write_tokenizer(staging / "umt5-xxl", min(1000, umt5_config(scale).vocab_size))
        step("inputs")
        write_inputs(staging / "inputs", scale)
        step("LoRAs")
        write_loras(staging / LORA_DIR, config, seed)
    return out


def _estimate_bytes(config, scale: str, fmt: str, dit_dtype: torch.dtype | None) -> int:
    """Bytes `synth` writes: the DiT at its file dtype, the encoders and VAE from their parameter counts (umT5
    bf16, CLIP fp16, VAE fp32); inputs, tokenizer and LoRAs are a few MB at most."""
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionModel, UMT5EncoderModel

    from ..encoders import clip_config, umt5_config
    from ..formats import wan_shapes
    from ..vae import vae_config

    itemsize = (dit_dtype or (torch.float16 if fmt == "comfy" else torch.float32)).itemsize
    total = sum(math.prod(s) for s in wan_shapes(config).values()) * itemsize
    with torch.device("meta"):
        for module, size in ((UMT5EncoderModel(umt5_config(scale)), 2), (CLIPVisionModel(clip_config(scale)), 2),
                             (AutoencoderKLWan(**vae_config(scale)), 4)):
            total += sum(p.numel() for p in module.parameters()) * size
    return total + 20 * 2**20


def cached_demo_folder(progress: Progress | None = None) -> Path:
    """The tiny demo checkpoint + inputs under the user cache dir: made once (atomically), then reused (a folder
    made before the extra reference views existed gets them added)."""
    import shutil

    from .. import __version__

    root = cache_root()
    folder = root / f"demo-tiny-{__version__}"
    if (folder / "inputs" / "driving_mask.mp4").is_file():
        if not all((folder / "inputs" / name).is_file() for pair in EXTRA_REFERENCES for name in pair):
            write_extra_references(folder / "inputs", "tiny")
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
