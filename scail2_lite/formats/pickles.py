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


# Where a checkpoint pickle keeps its tensors: SAT/DeepSpeed ("module"), others ("state_dict", "model"), else flat.
STATE_DICT_KEYS = ("module", "state_dict", "model")


def load_safe_pickle(path: Path, mmap: bool = True) -> object:
    """`torch.load` with weights_only=True and, beyond tensors and plain containers, only NumPy's array
    reconstruction (a SAT checkpoint's extras, e.g. the NumPy RNG state, need it). Anything else is refused."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} refused: the pickle asks for something other than tensors ({first})") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable torch checkpoint (truncated or old format?): {first}") from None


def state_dict_of(obj: object) -> dict | None:
    """The state dict inside a loaded checkpoint (see STATE_DICT_KEYS), or None when there is no dict."""
    if not isinstance(obj, dict):
        return None
    return next((obj[k] for k in STATE_DICT_KEYS if isinstance(obj.get(k), dict)), obj)


def load_sat_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Open a SAT pickle memory-mapped with weights_only: tensors stay on disk until read."""
    sd = state_dict_of(load_safe_pickle(path))
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
