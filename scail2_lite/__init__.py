"""scail2-lite: a quantized, low-VRAM runtime for SCAIL-2."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> the module that owns it. Imported lazily: `import scail2_lite` stays cheap for the CLI's --help
# and for quantize/ users.
_EXPORTS = {
    "load_dit": "loader",
    "describe_model": "loader",
    "Pipeline": "pipeline",
    "InputFiles": "inputs",
    "load_inputs": "inputs",
    "GenerationSettings": "settings",
    "MemorySettings": "settings",
    "SCAIL2Model": "model",
    "Conditions": "model",
    "Kernels": "blocks",
    "DiTConfig": "config",
    "UserError": "errors",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(name)
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
