"""inputs.py: the user's four files resized as upstream does, the output oriented by the reference image, and a
warning when the driving video's orientation differs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scail2_lite import media
from scail2_lite.conditioning import half_res
from scail2_lite.inputs import InputFiles, load_inputs


def write_case(folder: Path, ref_wh: tuple[int, int], drive_wh: tuple[int, int], frames: int = 5) -> InputFiles:
    """A reference (noise) with a blue-on-white mask, and a driving video + blue-on-black mask as frame folders."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    w, h = ref_wh
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / "ref.png")
    mask = np.full((h, w, 3), 255, np.uint8)
    mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = (0, 0, 255)
    Image.fromarray(mask).save(folder / "ref_mask.png")
    w, h = drive_wh
    for name, background in (("driving", None), ("driving_mask", (0, 0, 0))):
        (folder / name).mkdir()
        for i in range(frames):
            if background is None:
                frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            else:
                frame = np.zeros((h, w, 3), np.uint8)
                frame[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3] = (0, 0, 255)
            Image.fromarray(frame).save(folder / name / f"{i:03d}.png")
    return InputFiles(folder / "ref.png", folder / "ref_mask.png", folder / "driving", folder / "driving_mask")


@pytest.mark.parametrize("ref_wh, drive_wh, want_hw, warns", [
    ((40, 60), (60, 40), (896, 512), True),    # portrait reference, landscape driving video: portrait, warned
    ((60, 40), (60, 40), (512, 896), False),   # both landscape
    ((50, 50), (40, 60), (512, 896), True),    # square reference keeps landscape (upstream's swap rule)
    ((40, 60), (50, 50), (896, 512), False),   # a square driving video is not warned about
])
def test_orientation_follows_the_reference_image(tmp_path, ref_wh, drive_wh, want_hw, warns):
    files = write_case(tmp_path / "case", ref_wh, drive_wh)
    inputs = load_inputs(files, size="512p")
    assert inputs.size == want_hw
    assert tuple(inputs.pose.shape[2:]) == (want_hw[0] // 2, want_hw[1] // 2)
    orientation_warnings = [w for w in inputs.warnings if "center-cropped" in w]
    assert bool(orientation_warnings) == warns
    if warns:
        assert "driving video" in orientation_warnings[0] and "reference image" in orientation_warnings[0]


def test_explicit_size_is_kept_and_a_crossing_reference_is_warned_about(tmp_path):
    files = write_case(tmp_path / "case", (40, 64), (64, 40))
    inputs = load_inputs(files, size=(64, 32))  # (width, height): landscape for a portrait reference
    assert inputs.size == (32, 64)
    assert any("reference image is portrait" in w and "given explicitly" in w for w in inputs.warnings)


def test_four_files_resized_as_upstream(tmp_path):
    """Reference and its mask: float bicubic at the output size; the videos: 8-bit bicubic then 2x2 average; the
    masks are not thresholded here (edge values survive until the 28-channel compression)."""
    files = write_case(tmp_path / "case", (48, 40), (36, 20), frames=5)
    inputs = load_inputs(files, size=(64, 32))
    ref = media.read_image(files.image)
    assert torch.equal(inputs.image, media.resize_crop(ref, (32, 64)))
    first = media.read_image(files.pose / "000.png")
    assert torch.equal(inputs.pose[:, 0], half_res(media.resize_crop(first, (32, 64), eight_bit=True)))
    assert inputs.mask_video.unique().numel() > 2 and inputs.ref_mask.unique().numel() > 3
    assert inputs.fps == 16 and inputs.frames == 5
