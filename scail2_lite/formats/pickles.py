"""Safe loading of pickled checkpoints: `weights_only=True`, with only the globals real files need."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError


def _numpy_globals() -> list:
    """The only globals a SAT pickle may name: NumPy's array reconstruction, under both module spellings."""
    from numpy._core.multiarray import _reconstruct

    allowed: list = [np.ndarray, np.dtype, (_reconstruct, "numpy.core.multiarray._reconstruct"),
                     (_reconstruct, "numpy._core.multiarray._reconstruct")]
    allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType") and n != "ObjectDType"]
    return allowed


def load_sat_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Open a SAT pickle memory-mapped with weights_only: tensors stay on disk until read."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} refused: the pickle asks for something other than tensors ({first})") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable torch checkpoint (truncated or old format?): {first}") from None
    sd = obj.get("module", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path} is not a state dict (expected {{'module': {{name: tensor}}}} or {{name: tensor}})")
    return sd


def load_pth(path: str | Path) -> dict[str, Tensor]:
    """Memory-map a `.pth` state dict (weights_only): 11 GB of umT5 is paged in lazily, never copied."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file not found: {path}")
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt/pickled-code files
        raise UserError(f"cannot read {path}: {exc.__class__.__name__}: {str(exc).splitlines()[0]}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise UserError(f"{path} is not a plain state dict of tensors")
    return sd
