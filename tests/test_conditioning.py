"""conditioning.py: 28-channel masks (fixture parity), composite, mask checks, segments, history mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scail2_lite.conditioning import (
    PLANES,
    compress_mask,
    composite_on_black,
    check_extra_mask,
    check_mask,
    additional_ref_mask_channels,
    driving_mask_channels,
    half_res,
    history_mask,
    latent_frames,
    reference_mask_channels,
    frames_to_generate,
    segment_plan,
)
from scail2_lite.errors import UserError
from tests.conftest import load_npy

COLOR = {  # pure colours on the [-1, 1] scale
    "black": (-1, -1, -1), "white": (1, 1, 1), "red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1),
    "yellow": (1, 1, -1), "magenta": (1, -1, 1), "cyan": (-1, 1, 1),
}


def painted(
    background: str, blobs: dict[str, tuple[slice, slice]], t: int | None = None, size: int = 32
) -> torch.Tensor:
    """A mask image (3, size, size), or video (3, t, ...) of it, with rectangles painted on a background."""
    mask = torch.tensor(COLOR[background], dtype=torch.float32)[:, None, None].repeat(1, size, size)
    for color, (rows, cols) in blobs.items():
        mask[:, rows, cols] = torch.tensor(COLOR[color], dtype=torch.float32)[:, None, None]
    return mask if t is None else mask[:, None].repeat(1, t, 1, 1)


def test_compress_matches_fixture(oracle):
    mask = load_npy(oracle / "maskcompress" / "mask.npy")
    out = compress_mask(mask)
    assert out.shape == (28, 3, 8, 8)
    torch.testing.assert_close(out, load_npy(oracle / "maskcompress" / "compress_out.npy"), atol=1e-6, rtol=0)


def test_half_res_is_upstreams_bilinear_and_the_same_on_a_frame_or_a_video():
    """Upstream halves each (1, 3, H, W) frame with F.interpolate; the pipeline halves frame by frame while decoding,
    the tests whole videos: the same bits either way, within a rounding of upstream's."""
    video = torch.randint(0, 256, (3, 4, 96, 160), generator=torch.Generator().manual_seed(0)).float() / 127.5 - 1
    frames = torch.stack([half_res(video[:, t]) for t in range(video.shape[1])], dim=1)
    assert torch.equal(half_res(video), frames)
    upstream = torch.stack([F.interpolate(video[None, :, t], scale_factor=0.5, mode="bilinear", align_corners=False)[0]
                            for t in range(video.shape[1])], dim=1)
    assert (frames - upstream).abs().max() <= 2 ** -23


def test_half_res_matches_fixture(oracle):
    out = half_res(load_npy(oracle / "maskcompress" / "hb_in.npy"))
    torch.testing.assert_close(out, load_npy(oracle / "maskcompress" / "hb_out.npy"), atol=1e-6, rtol=0)


def test_planes_and_packing_layout():
    # Each colour lights exactly its own plane; 225 is "off", 226 "on" (strict threshold at 225).
    for index, (name, _) in enumerate(PLANES):
        planes = compress_mask(painted(name, {}, t=1, size=8))
        assert planes.shape == (28, 1, 1, 1)
        expected = torch.zeros(7)
        expected[index] = 1
        assert torch.equal(planes[:7, 0, 0, 0], expected), name
    at, above = (225 - 127.5) / 127.5, (226 - 127.5) / 127.5
    assert compress_mask(torch.full((3, 1, 8, 8), at)).sum() == 0
    assert compress_mask(torch.full((3, 1, 8, 8), above))[0].sum() == 1  # white plane
    # Frame-major packing: latent frame 1 holds frames 1..4, channel = 7 * (frame - 1) + plane.
    video = painted("black", {}, t=5, size=8)
    video[:, 3] = torch.tensor(COLOR["red"], dtype=torch.float32)[:, None, None]
    out = compress_mask(video)
    assert out.shape == (28, 2, 1, 1)
    assert out[:, 0].sum() == 0  # frame 0 (black) repeated 4 times
    assert out[:, 1, 0, 0].nonzero().flatten().tolist() == [7 * 2 + 1]  # frame 3 = 3rd of its group, red = plane 1


def test_coverage_counted_in_bytes_is_the_float_planes_pooled():
    """`compress_mask` counts each pattern's pixels per 8x8 area in bytes; the definition pools a float plane per
    pattern. Every colour, edge values near the threshold, several frames: the same values exactly."""
    g = torch.Generator().manual_seed(1)
    levels = torch.tensor([-1.0, (225 - 127.5) / 127.5, (226 - 127.5) / 127.5, 1.0, 0.3])
    mask = levels[torch.randint(0, len(levels), (3, 9, 32, 48), generator=g)]
    on = mask > (225 - 127.5) / 127.5
    planes = torch.stack([(on[0] == r) & (on[1] == gr) & (on[2] == b) for _, (r, gr, b) in PLANES], dim=1).float()
    pooled = F.avg_pool2d(planes, 8)  # (T, 7, h, w)
    padded = torch.cat([pooled[:1].expand(3, -1, -1, -1), pooled])
    assert torch.equal(compress_mask(mask), padded.reshape(3, 28, 4, 6).permute(1, 0, 2, 3))


def test_area_downsample_keeps_coverage():
    mask = painted("black", {"blue": (slice(0, 2), slice(0, 8))}, t=1, size=16)  # 16 of 64 pixels of block (0, 0)
    out = compress_mask(mask)
    assert out[3, 0, 0, 0] == pytest.approx(0.25) and out[3, 0, 1, 1] == 0


def test_reference_and_driving_shapes():
    ref = reference_mask_channels(painted("white", {"blue": (slice(8, 24), slice(8, 24))}), latent_frames(9))
    assert ref.shape == (28, 1 + 3, 4, 4)
    assert ref[:, 1:].abs().sum() == 0 and ref[:, 0].sum() > 0
    drv = driving_mask_channels(painted("black", {"blue": (slice(0, 8), slice(0, 8))}, t=9, size=16))
    assert drv.shape == (28, 3, 2, 2)
    with pytest.raises(UserError, match="4k\\+1"):
        compress_mask(torch.zeros(3, 6, 16, 16))
    with pytest.raises(UserError, match="divisible by 8"):
        compress_mask(torch.zeros(3, 5, 12, 16))


def test_latent_frames():
    assert [latent_frames(n) for n in (1, 5, 9, 81)] == [1, 2, 3, 21]


def test_composite_on_black_uses_a_0_1_threshold_of_0_1():
    image = torch.full((3, 2, 2), 0.5)
    mask = torch.full((3, 2, 2), -1.0)
    mask[2, 0, 0] = 1.0  # blue: kept
    mask[0, 0, 1] = 2 * 0.11 - 1  # 0.11 on [0, 1]: kept
    mask[1, 1, 0] = 2 * 0.09 - 1  # 0.09 on [0, 1]: dropped
    out = composite_on_black(image, mask)
    assert out[:, 0, 0].tolist() == [0.5] * 3 and out[:, 0, 1].tolist() == [0.5] * 3
    assert out[:, 1, 0].tolist() == [-1.0] * 3 and out[:, 1, 1].tolist() == [-1.0] * 3
    with pytest.raises(UserError, match="reference mask"):
        composite_on_black(image, torch.zeros(3, 4, 4))


def test_check_mask_backgrounds_per_mode():
    blob = {"red": (slice(4, 12), slice(4, 12))}
    on_black, on_white = painted("black", blob), painted("white", blob)
    assert check_mask(on_white, "reference", replace=False) == []
    assert check_mask(on_black[:, None].repeat(1, 5, 1, 1), "driving", replace=False) == []
    assert check_mask(on_black, "reference", replace=True) == []
    assert check_mask(on_white, "driving", replace=True) == []
    [warning] = check_mask(on_black, "reference", replace=False)
    assert "on black" in warning and "expects it on white" in warning and "--replace" in warning
    [warning] = check_mask(on_black, "driving", replace=True)
    assert "replacement mode expects it on white" in warning


def test_check_mask_off_palette_and_empty():
    mask = painted("black", {"blue": (slice(0, 8), slice(0, 8))})
    mask[:, 16:, :] = torch.tensor([1.0, 0.0, -1.0])[:, None, None]  # orange half: not a palette colour
    [warning] = check_mask(mask, "driving", replace=False)
    assert "not pure colours" in warning and "blue, red, green, magenta, cyan, yellow" in warning
    with pytest.raises(UserError, match="no foreground"):
        check_mask(painted("white", {}), "reference", replace=False)


@pytest.mark.parametrize(
    "total, plan",
    [
        (5, [(0, 5)]),
        (8, [(0, 9)]),  # padded to 4k+1: the pipeline repeats the last driving frame, drops the extra output
        (81, [(0, 81)]),
        (82, [(0, 81), (76, 85)]),  # upstream: 81 frames out
        (85, [(0, 81), (76, 85)]),
        (100, [(0, 81), (76, 101)]),  # upstream: 81 frames out
        (157, [(0, 81), (76, 157)]),
        (161, [(0, 81), (76, 157), (152, 161)]),
        (200, [(0, 81), (76, 157), (152, 201)]),  # upstream: 157 frames out
    ],
)
def test_segment_plan(total, plan):
    assert segment_plan(total) == plan
    assert plan[-1][1] == frames_to_generate(total) and 0 <= plan[-1][1] - total <= 3
    for start, end in plan:
        assert (end - start - 1) % 4 == 0 and end - start <= 81
    for (_, prev_end), (start, _) in zip(plan, plan[1:]):
        assert prev_end - start == 5


def test_segment_plan_errors():
    with pytest.raises(UserError, match="at least 5 frames"):
        segment_plan(4)
    with pytest.raises(UserError, match="segment-len"):
        segment_plan(100, segment_len=80)
    with pytest.raises(UserError, match="segment-overlap"):
        segment_plan(100, segment_len=9, overlap=9)
    assert segment_plan(20, segment_len=9, overlap=5) == [(0, 9), (4, 13), (8, 17), (12, 21)]


def test_history_mask():
    mask = history_mask(5, 3, 4, history_latents=latent_frames(5))
    assert mask.shape == (4, 5, 3, 4)
    assert mask[:, :2].min() == 1 and mask[:, 2:].max() == 0


def test_extra_masks_know_background_and_character_views():
    quarter = (slice(0, 16), slice(0, 16))
    # a background view: white over the visible background (black where something hides it), no identity colour
    assert check_extra_mask(painted("white", {}), 1) == []
    assert check_extra_mask(painted("white", {"black": quarter}), 1) == []
    # a character view: its identity colour on black
    assert check_extra_mask(painted("black", {"red": quarter}), 2) == []
    # identity colours on white (a primary reference mask in animation style): told what a view should be
    warnings = check_extra_mask(painted("white", {"red": quarter}), 2)
    assert len(warnings) == 1 and "extra reference 2 mask" in warnings[0] and "on black" in warnings[0]
    # nothing visible at all
    assert "all black" in check_extra_mask(painted("black", {}), 3)[0]
    # blurred colours are reported like the primary's
    noisy = painted("black", {"red": quarter})
    noisy[:, 16:] = -0.3  # half of it dark grey
    assert any("not pure colours" in w for w in check_extra_mask(noisy, 1))


def test_additional_ref_masks_are_compressed_alone_without_zero_frames():
    views = [painted("white", {}), painted("black", {"blue": (slice(0, 16), slice(0, 32))})]
    out = additional_ref_mask_channels(views)
    assert out.shape == (28, 2, 4, 4)
    for k, view in enumerate(views):
        one = compress_mask(view[:, None])[:, 0]
        assert torch.equal(out[:, k], one)
        assert torch.equal(one[:7].repeat(4, 1, 1), one)  # 4 identical copies of the 7 planes
    assert out[0, 0].eq(1).all() and out[3, 1, :2].eq(1).all() and out[3, 1, 2:].eq(0).all()
