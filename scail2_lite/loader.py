"""`load_dit`: a checkpoint of any format -> a ready `SCAIL2Model`, holding one copy of the weights in RAM."""

from __future__ import annotations

from pathlib import Path

import torch

from . import formats
from .config import DiTConfig
from .errors import UserError


def load_dit(
    path: str | Path,
    config: DiTConfig | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> "SCAIL2Model":  # noqa: F821 (imported lazily below)
    """Build the model on the meta device, then assign each tensor (cast as it is read) so none is copied twice.

    Tensors are copied out of the file mapping into fresh, aligned memory: RAM holds one copy (the page cache
    is evictable) and kernels see the same alignment whatever the file format, so outputs match bit for bit.

    The config comes from `config`, else config.json beside the checkpoint, else tensor shapes, else 14B.
    """
    from .model import SCAIL2Model

    fmt = formats.detect_format(path)
    if fmt == "quantized":
        raise UserError(f"{path} is a quantized folder: loading quantized DiTs is not wired into load_dit yet")
    if fmt == "comfy-fp8_scaled":
        raise UserError(f"{path} is a ComfyUI fp8_scaled file: convert it with `scail2-lite quantize` first")
    if config is None:
        config, _ = formats.read_config(path, formats.read_shapes(path))
    state: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, tensor in formats.iter_tensors(path):
        shapes[name] = tuple(tensor.shape)
        state[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None, copy=True)
    formats.check_keys(shapes, config, path)
    with torch.device("meta"):
        model = SCAIL2Model(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
