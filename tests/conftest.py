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


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
