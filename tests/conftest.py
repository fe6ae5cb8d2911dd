"""Shared test fixtures: the reference oracle folder and tiny synthetic checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ORACLE = REPO.parent / "shared" / "fixtures" / "scail2_oracle"


@pytest.fixture(scope="session")
def oracle() -> Path:
    if not ORACLE.is_dir():
        pytest.fail(f"reference fixtures not found at {ORACLE}: the shared/ folder must sit beside the repository")
    return ORACLE


def rss_file() -> int:
    """Bytes of mapped files in this process's resident set (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile")


def load_npy(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.load(path))


@pytest.fixture(autouse=True, scope="session")
def _own_cache_folder(tmp_path_factory):
    """The demo checkpoint and prompt embeddings go to a folder of this session, not the user's cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    yield
    patch.undo()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


COND_NAMES = ("pose_latents", "driving_masks", "ref_latents", "ref_masks")


def conditions(inputs: dict[str, torch.Tensor], replace: bool = False, **extra: torch.Tensor):
    """`model.Conditions` from a dict of named input tensors (fixtures and random inputs use these names)."""
    from scail2_lite.model import Conditions

    return Conditions(*(inputs[n] for n in COND_NAMES), replace=replace, **extra)


def run_model(model, inputs: dict[str, torch.Tensor], replace: bool = False, kernels=None,
              **extra: torch.Tensor) -> torch.Tensor:
    """The DiT's forward on named inputs (x, t, context, clip_fea and the conditions)."""
    from scail2_lite.blocks import Kernels

    return model(inputs["x"], inputs["t"], inputs["context"], inputs["clip_fea"], conditions(inputs, replace, **extra),
                 kernels or Kernels())
