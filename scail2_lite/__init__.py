"""scail2-lite: a quantized, low-VRAM runtime for SCAIL-2."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load_dit", "Pipeline", "SCAIL2Model", "DiTConfig", "UserError"]


def __getattr__(name: str):
    # Lazy: `import scail2_lite` stays cheap for the CLI's --help and for quantize/ users.
    if name == "load_dit":
        from .loader import load_dit

        return load_dit
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    if name == "SCAIL2Model":
        from .model import SCAIL2Model

        return SCAIL2Model
    if name == "DiTConfig":
        from .config import DiTConfig

        return DiTConfig
    if name == "UserError":
        from .errors import UserError

        return UserError
    raise AttributeError(name)
