"""Refactors move code, not numbers: `generate` on the tiny model gives, under every shipped profile and in both
modes, the very latents the code gave before the house was rebuilt (captured at commit 11d0f90 with the same
checkpoint, inputs and settings; `tests/data/golden_latents_11d0f90.safetensors`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scail2_lite.inputs import InputFiles
from scail2_lite.offload.profiles import list_profiles
from scail2_lite.pipeline import Pipeline
from scail2_lite.settings import GenerationSettings
from scail2_lite.synth import synth

GOLDEN = Path(__file__).parent / "data" / "golden_latents_11d0f90.safetensors"
# The settings of the capture, spelled out: later default changes (shift, resizing) must not move this test.
SETTINGS = GenerationSettings(size=(128, 128), steps=2, seed=3, shift=5.0, guidance=5.0, segment_len=9,
                              segment_overlap=5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return synth(tmp_path_factory.mktemp("golden") / "scail2", scale="tiny", fmt="sat", seed=0)


@pytest.mark.parametrize("profile", [None] + [p.name for p in list_profiles()])
def test_every_profile_reproduces_the_latents_from_before(folder: Path, profile: str | None) -> None:
    golden = load_file(GOLDEN)
    inputs = folder / "inputs"
    files = InputFiles(inputs / "ref.png", inputs / "ref_mask.png", inputs / "driving.mp4",
                       inputs / "driving_mask.mp4")
    pipe = Pipeline.from_pretrained(folder, device="cpu", profile=profile, prompt_cache=False)
    for mode in ("animate", "replace"):
        latents: list[torch.Tensor] = []
        result = pipe(files, "a person dancing", "", SETTINGS.with_changes(replace=mode == "replace"),
                      on_latents=lambda k, z: latents.append(z))
        assert result.num_frames == 17 and result.settings["segments"] == 3
        assert len(latents) == 3
        for k, z in enumerate(latents):
            assert torch.equal(z, golden[f"{mode}.{k}"]), f"{profile} {mode} segment {k}"
