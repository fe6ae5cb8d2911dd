"""Refactors move code, not numbers: `generate` on the tiny model gives, in both modes, latents near those committed
in `tests/data/golden_latents_issue18.safetensors` (same checkpoint, inputs and settings; written by
`tests/data/make_golden_latents.py`), and every shipped profile gives the same latents, bit for bit.

History: first captured at commit 11d0f90; recaptured for issue 18, whose upstream preprocessing (bicubic
antialiased resize of all four inputs to the full size, 8-bit video frames, masks thresholded after the resize and
the 2x2 halving, instead of ComfyUI's nearest/area rules) changes the conditioning of these inputs on purpose.
Every profile still had to give the same latents as the others, bit for bit. Since 2026-12-07 the capture is held
within `DRIFT` (other CPUs round differently) and the profiles bit for bit against this machine's run."""

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

GOLDEN = Path(__file__).parent / "data" / "golden_latents_issue18.safetensors"
# The settings of the capture, spelled out: later default changes (shift, compositing) must not move this test.
SETTINGS = GenerationSettings(size=(128, 128), steps=2, seed=3, shift=5.0, guidance=5.0, solver="unipc",
                              segment_len=9, segment_overlap=5, composite_reference=False)


def run_both_modes(pipe: Pipeline, folder: Path) -> dict[str, list[torch.Tensor]]:
    """Each mode's per-segment latents on the synthetic inputs (17 frames, 3 segments), empty negative prompt."""
    inputs = folder / "inputs"
    files = InputFiles(inputs / "ref.png", inputs / "ref_mask.png", inputs / "driving.mp4",
                       inputs / "driving_mask.mp4")
    out = {}
    for mode in ("animate", "replace"):
        latents: list[torch.Tensor] = []
        result = pipe(files, "a person dancing", "", SETTINGS.with_changes(replace=mode == "replace"),
                      on_latents=lambda k, z: latents.append(z))
        assert result.num_frames == 17 and result.settings["segments"] == 3 and len(latents) == 3
        out[mode] = latents
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return synth(tmp_path_factory.mktemp("golden") / "scail2", scale="tiny", fmt="sat", seed=0)


# The capture is one machine's floating point. On a CPU with AVX-512 BF16 (and its libraries) the same code gave
# latents 1.2-3.0% from it (relative, per segment, 2026-12-07): the tiny synthetic model amplifies rounding. So this
# machine's run without a profile must stay near the capture, and every profile must equal that run bit for bit.
DRIFT = 0.1


@pytest.fixture(scope="module")
def reference(folder: Path) -> dict[str, list[torch.Tensor]]:
    return run_both_modes(Pipeline.from_pretrained(folder, device="cpu", profile=None, prompt_cache=False), folder)


def test_the_latents_stay_near_the_capture(reference: dict[str, list[torch.Tensor]]) -> None:
    golden = load_file(GOLDEN)
    for mode, latents in reference.items():
        for k, z in enumerate(latents):
            g = golden[f"{mode}.{k}"]
            assert z.shape == g.shape and float((z - g).norm() / g.norm()) < DRIFT, f"{mode} segment {k}"


@pytest.mark.parametrize("profile", [p.name for p in list_profiles()])
def test_every_profile_reproduces_the_latents(folder: Path, reference: dict[str, list[torch.Tensor]],
                                              profile: str) -> None:
    pipe = Pipeline.from_pretrained(folder, device="cpu", profile=profile, prompt_cache=False)
    for mode, latents in run_both_modes(pipe, folder).items():
        for k, z in enumerate(latents):
            assert torch.equal(z, reference[mode][k]), f"{profile} {mode} segment {k}"
