"""Wan VAE: converter against the 194-key contract, shapes, normalisation, streaming and tiled decode."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKLWan

from scail2_lite import vae as V
from scail2_lite.errors import UserError
from scail2_lite.vae_tiles import Tiling


@pytest.fixture(scope="module")
def tiny() -> V.WanVAE:
    torch.manual_seed(0)
    return V.WanVAE(AutoencoderKLWan(**V.vae_config("tiny")).eval())


def test_converter_covers_full_contract(oracle):
    contract = set(json.loads((oracle / "key_contract.json").read_text())["vae"])
    assert len(contract) == 194
    with torch.device("meta"):
        model = AutoencoderKLWan(**V.vae_config("full"))
    sd = model.state_dict()
    wan = V.vae_diffusers_to_wan(sd)
    assert set(wan) == contract
    back = V.vae_wan_to_diffusers(wan)
    assert set(back) == set(sd) and all(back[k] is sd[k] for k in sd)
    assert V.vae_config_from_state_dict(wan) == V.vae_config("full")
    assert model.config.latents_mean == AutoencoderKLWan().config.latents_mean  # full = diffusers' Wan2.1 defaults


def test_converter_rejects_unknown_key():
    with pytest.raises(UserError, match="unexpected key"):
        V.vae_wan_to_diffusers({"decoder.upsamples.3.residual.0.gamma": torch.zeros(1)})  # 3 is an upsampler


def test_file_round_trip_is_identity(tiny, tmp_path):
    wan = V.vae_diffusers_to_wan(tiny.model.state_dict())
    torch.save(wan, tmp_path / V.VAE_FILE)
    loaded = V.load_vae(tmp_path / V.VAE_FILE)
    back = V.vae_diffusers_to_wan(loaded.model.state_dict())
    assert set(back) == set(wan) and all(torch.equal(back[k], wan[k]) for k in wan)


def test_shapes_and_normalisation(tiny):
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    z = tiny.encode(video)
    assert z.shape == (1, 16, 2, 4, 4)
    with torch.no_grad():
        raw = tiny.model.encode(video).latent_dist.mean
    mean = torch.tensor(tiny.model.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(tiny.model.config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(z, (raw - mean) / std)
    frames = tiny.decode(z)
    assert frames.shape == (1, 3, 5, 32, 32)
    assert frames.min() >= -1 and frames.max() <= 1
    with torch.no_grad():
        ref = tiny.model.decode(z * std + mean).sample
    assert torch.equal(frames, ref)  # streaming decode is diffusers' decode, bit for bit
    # frame by frame past the last temporal upsampling: the same sums in other blockings (the next test)
    by_frame = torch.cat(list(tiny.decode_frames(z, by_frame=True)), dim=2)
    torch.testing.assert_close(by_frame, ref, atol=1e-5, rtol=0)


def test_by_frame_decode_is_diffusers_decoder_in_float64():
    """`by_frame`: past the last temporal upsampling the decoder runs one output frame at a time through the caches:
    in float64 every latent frame's output equals `WanDecoder3d.forward`'s to 1e-12, and the caches it leaves
    are the same, so the clip stays the same however long."""
    torch.manual_seed(0)
    vae = V.WanVAE(AutoencoderKLWan(**V.vae_config("tiny")).eval().double())
    m = vae.model
    assert 0 < vae._by_frame_from < len(m.decoder.up_blocks)
    z = torch.randn(1, 16, 4, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ours, theirs = [None] * vae._decoder_convs, [None] * vae._decoder_convs
    with torch.no_grad():
        for k in range(z.shape[2]):
            x = m.post_quant_conv(z[:, :, k : k + 1])
            got = vae._decode_chunk(x, ours, k == 0, True)
            want = m.decoder(x, feat_cache=theirs, feat_idx=[0], first_chunk=k == 0)
            assert got.shape == want.shape == (1, 3, 1 if k == 0 else 4, 24, 40)
            torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
            for a, b in zip(ours, theirs, strict=True):  # None (unused slots), "Rep" (first chunk) or frames
                assert a == b if not isinstance(a, torch.Tensor) else torch.allclose(a, b, atol=1e-12, rtol=0)


def test_tiled_decode_streams_the_last_tile(tiny):
    """A tiled decode hands over its first frames before the last tile's last latent frame is decoded."""
    z = torch.randn(1, 16, 3, 6, 6)
    tiny.set_tiling(32, 24)
    calls = []
    real = tiny._decode_chunk
    try:
        tiny._decode_chunk = lambda *a: calls.append(1) or real(*a)
        stream = tiny.decode_frames(z)
        first = next(stream)
        assert first.shape == (1, 3, 1, 48, 48)
        tiles = len(tiny._latent_tiles(6, 6))
        assert tiles > 1 and len(calls) == (tiles - 1) * 3 + 1
        assert [g.shape[2] for g in stream] == [4, 4]
    finally:
        del tiny._decode_chunk
        tiny.set_tiling(None)


def test_decode_frames_streams_groups(tiny):
    groups = [g.shape[2] for g in tiny.decode_frames(torch.randn(1, 16, 3, 2, 2))]
    assert groups == [1, 4, 4]


@pytest.mark.parametrize("dim", [-1, -2])
def test_blend_edge_is_diffusers_blend_bit_for_bit(dim):
    """The tiled decode's blend in one step gives the bits of diffusers' loop (`blend_h` / `blend_v`), also where
    the overlap is wider than a tile or zero."""
    blend = AutoencoderKLWan.blend_h if dim == -1 else AutoencoderKLWan.blend_v
    g = torch.Generator().manual_seed(0)
    for extent in (0, 1, 18, 144, 300):
        a, b = torch.randn(1, 3, 4, 40, 150, generator=g), torch.randn(1, 3, 4, 40, 150, generator=g)
        assert torch.equal(V.blend_edge(a.clone(), b.clone(), extent, dim), blend(None, a.clone(), b.clone(), extent))


def test_tiled_decode_matches_diffusers_tiling(tiny):
    z = torch.randn(1, 16, 2, 6, 6)
    tiny.set_tiling(32, 24)
    try:
        tiled = tiny.decode(z)
        with torch.no_grad():
            ref = tiny.model.tiled_decode(z * tiny.std + tiny.mean).sample
    finally:
        tiny.set_tiling(None)
    torch.testing.assert_close(tiled, ref, atol=1e-5, rtol=0)


def test_bf16_decode_is_close_and_switches_nothing_for_the_caller(tiny):
    """The decode in bf16 (autocast around each latent frame only): fp32 frames out, within bf16's rounding of the
    fp32 decode, tiled or not; between frames the caller's code runs without autocast."""
    z = torch.randn(1, 16, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    for tile in (None, 32):
        tiny.set_tiling(tile, None if tile is None else 24)
        try:
            ref = tiny.decode(z)
            groups = []
            for g in tiny.decode_frames(z, torch.bfloat16):
                assert not torch.is_autocast_enabled("cpu")
                groups.append(g)
        finally:
            tiny.set_tiling(None)
        low = torch.cat(groups, dim=2)
        assert low.dtype == torch.float32 and low.shape == ref.shape
        rel = ((low - ref).norm() / ref.norm()).item()
        assert 0 < rel < 0.05


def _pixel_local(model: AutoencoderKLWan) -> None:
    """Keep only the spatial centre tap of every conv and silence the mid attention: outputs become pixel-local,
    so a correctly placed and blended tiling must reproduce the untiled result."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Conv3d | torch.nn.Conv2d) and mod.weight.shape[-1] == 3:
                keep = mod.weight[..., 1:2, 1:2].clone()
                mod.weight.zero_()
                mod.weight[..., 1:2, 1:2] = keep
        for block in (model.encoder.mid_block, model.decoder.mid_block):
            block.attentions[0].proj.weight.zero_()
            block.attentions[0].proj.bias.zero_()


def test_tiling_close_to_untiled_on_local_model():
    # With random (non-local) weights tiling is not expected to match: measured on this tiny model, 64x64 frames,
    # tiles of 32-48 px, the tiled decode differs by up to 1.2-1.4 (mean 0.11-0.15). On a pixel-local model any
    # misplaced tile or wrong blend would show at O(1), so 1e-5 is a real check of the tiling itself.
    torch.manual_seed(0)
    model = AutoencoderKLWan(**V.vae_config("tiny")).eval()
    _pixel_local(model)
    vae = V.WanVAE(model)
    video = torch.rand(1, 3, 5, 48, 40) * 2 - 1
    z = vae.encode(video)
    frames = vae.decode(z)
    vae.set_tiling(32, 24)
    torch.testing.assert_close(vae.encode(video), z, atol=1e-5, rtol=0)
    torch.testing.assert_close(vae.decode(z), frames, atol=1e-5, rtol=0)


def test_strips_and_non_square_tiles_reproduce_untiled_on_local_model():
    """Tiles spanning the whole height and part of the width (the planner's strips), and non-square tiles, are
    placed and blended right: on a pixel-local model they decode what the untiled decode does."""
    torch.manual_seed(0)
    model = AutoencoderKLWan(**V.vae_config("tiny")).eval()
    _pixel_local(model)
    vae = V.WanVAE(model)
    z = torch.randn(1, 16, 2, 5, 9, generator=torch.Generator().manual_seed(2))
    frames = vae.decode(z)
    for tiling in (Tiling.strips(40, 72, 3), Tiling.strips(72, 40, 2), Tiling(24, 40, 16, 32)):
        zz = z if tiling.height <= 40 or tiling.width != 40 else z.transpose(-1, -2).contiguous()
        ref = frames if zz is z else vae.decode(zz)
        vae.set_tiling(tiling)
        try:
            assert len(vae._latent_tiles(*zz.shape[-2:])) > 1
            torch.testing.assert_close(vae.decode(zz), ref, atol=1e-5, rtol=0)
        finally:
            vae.set_tiling(None)


def test_tiling_geometry():
    h, w = 704, 1280
    strips = Tiling.strips(h, w, 3)
    assert (strips.height, strips.stride_h) == (h, h) and strips.width == 576 and strips.stride_w == 432
    windows = strips.windows(h // 8, w // 8)
    assert [(i, j, th, tw) for i, j, th, tw in windows] == [(0, 0, 88, 72), (0, 54, 88, 72), (0, 108, 88, 52)]
    assert strips.decoded_pixels(h, w) == 88 * 196 * 64 and strips.largest_tile(h, w) == 704 * 576
    assert strips.describe(h, w) == "704x576 px tiles (3)"
    assert Tiling.square(256).describe(h, w) == "256 px tiles (28)"
    assert Tiling.square(2048).covers(h, w) and Tiling.square(2048).describe(h, w) == "untiled"
    portrait = Tiling.strips(w, h, 2)
    assert portrait.width == h and len(portrait.windows(w // 8, h // 8)) == 2
    # every window stays inside the frame and together they cover it
    for tiling in (strips, portrait, Tiling.square(256), Tiling(256, 512, 192, 384)):
        hh, ww = (w, h) if tiling is portrait else (h, w)
        seen = torch.zeros(hh // 8, ww // 8, dtype=torch.bool)
        for i, j, th, tw in tiling.windows(hh // 8, ww // 8):
            assert i + th <= hh // 8 and j + tw <= ww // 8
            seen[i : i + th, j : j + tw] = True
        assert seen.all()


@pytest.mark.parametrize("tile, stride", [(30, 16), (32, 0), (32, 40)])
def test_bad_tiling_is_a_user_error(tiny, tile, stride):
    with pytest.raises(UserError, match="multiples of 8"):
        tiny.set_tiling(tile, stride)
