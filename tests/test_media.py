"""media.py: image/video/folder reading, resize rules, atomic H.264 writing, previews, output sizes."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import av

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from scail2_lite.conditioning import compress_mask, half_res
from scail2_lite.errors import UserError
from scail2_lite.media import (
    VideoWriter,
    output_size,
    read_image,
    read_video,
    resize_crop,
    save_frames,
    side_by_side,
    to_uint8,
    write_video,
)


@pytest.fixture(scope="module")
def upstream_resize() -> dict[str, torch.Tensor]:
    """Upstream's preprocessing of small inputs, computed with torchvision (tests/data/make_upstream_resize.py)."""
    return load_file(Path(__file__).parent / "data" / "upstream_resize.safetensors")


def smooth_video(t: int = 9, h: int = 64, w: int = 64) -> torch.Tensor:
    """Low-frequency moving pattern: survives H.264 at high quality, changes every frame."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    frames = [torch.stack([torch.sin(3 * xx + 0.3 * i), torch.cos(2 * yy - 0.2 * i), xx * yy]) for i in range(t)]
    return torch.stack(frames, dim=1) * 0.8


def as_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def test_video_round_trip(tmp_path):
    video = smooth_video()
    write_video(tmp_path / "a.mp4", video, fps=16)
    back, fps = read_video(tmp_path / "a.mp4")
    assert back.shape == video.shape and back.dtype == torch.float32
    assert fps == 16.0
    assert (back - video).abs().mean() < 0.04
    with av.open(str(tmp_path / "a.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
    # Frames keep their order: each decoded frame is nearest to its own source frame.
    dist = ((back[:, :, None] - video[:, None]) ** 2).mean(dim=(0, 3, 4))
    assert torch.equal(dist.argmin(dim=1), torch.arange(video.shape[1]))


def test_read_video_resizes_while_decoding_and_keeps_fractional_fps(tmp_path):
    write_video(tmp_path / "a.mp4", smooth_video(t=5, h=64, w=96), fps=29.97)
    frames, fps = read_video(tmp_path / "a.mp4", size=(32, 32), max_frames=3)
    assert frames.shape == (3, 3, 32, 32)
    halved, _ = read_video(tmp_path / "a.mp4", size=(32, 32), max_frames=3, per_frame=half_res)
    assert torch.equal(halved, half_res(frames))
    assert fps == pytest.approx(29.97, abs=1e-3)


def test_to_uint8_rounds_each_frame_into_a_contiguous_array():
    video = torch.cat([smooth_video(t=3), torch.full((3, 2, 64, 64), 2.0), torch.full((3, 1, 64, 64), -1.5)], dim=1)
    frames = to_uint8(video)
    assert frames.dtype == np.uint8 and frames.shape == (6, 64, 64, 3) and frames.flags["C_CONTIGUOUS"]
    assert all(np.array_equal(frames[i], as_uint8(video[:, i])) for i in range(6))  # out of range: clamped
    assert video.min() == -1.5  # the input is not changed in place


def test_streaming_writer_takes_frame_groups(tmp_path):
    video = smooth_video()
    with VideoWriter(tmp_path / "s.mp4", 16, (64, 64)) as writer:
        for group in video.split(4, dim=1):
            writer.write(group)
    assert writer.frames_written == 9
    streamed, _ = read_video(tmp_path / "s.mp4")
    assert streamed.shape == video.shape
    assert (streamed - video).abs().mean() < 0.04
    with pytest.raises(ValueError, match="expected frames"):
        with VideoWriter(tmp_path / "bad.mp4", 16, (64, 64)) as writer:
            writer.write(smooth_video(t=2, h=32, w=32))
    assert not (tmp_path / "bad.mp4").exists()


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_writer_leaves_nothing_on_error(tmp_path, error):
    with pytest.raises(error):
        with VideoWriter(tmp_path / "x.mp4", 16, (64, 64)) as writer:
            writer.write(smooth_video(t=2))
            raise error()
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_odd_size_and_missing_folder(tmp_path):
    with pytest.raises(UserError, match="even"):
        VideoWriter(tmp_path / "x.mp4", 16, (63, 64))
    with pytest.raises(UserError, match="does not exist"):
        with VideoWriter(tmp_path / "nope" / "x.mp4", 16, (64, 64)):
            pass


def test_read_gif(tmp_path):
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    images = [Image.new("RGB", (40, 24), c) for c in colors]
    images[0].save(tmp_path / "a.gif", save_all=True, append_images=images[1:], duration=100, loop=0)
    frames, fps = read_video(tmp_path / "a.gif")
    assert frames.shape == (3, 5, 24, 40)
    assert fps == pytest.approx(10.0)
    expected = torch.tensor(colors, dtype=torch.float32).T / 127.5 - 1  # (3, 5)
    assert torch.allclose(frames.mean(dim=(2, 3)), expected, atol=0.02)


def test_read_image_folder_natural_order_and_alpha(tmp_path):
    for i in (10, 2, 1):  # natural sort must give 1, 2, 10
        Image.new("RGBA", (16, 8), (i * 20, 0, 0, 128)).save(tmp_path / f"frame{i}.png")
    with pytest.raises(UserError, match="transparent"):  # half-transparent frames need a background
        read_video(tmp_path)
    frames, fps = read_video(tmp_path, background=(0, 0, 0))
    assert frames.shape == (3, 3, 8, 16) and fps == 16.0
    reds = ((frames[0, :, 0, 0] + 1) * 127.5).round().tolist()
    assert reds == [round(r * 128 / 255) for r in (20, 40, 200)]  # alpha 128 over black
    image = read_image(tmp_path / "frame2.png", (255, 255, 255))
    assert image.shape == (3, 8, 16) and image.min() >= -1 and image.max() <= 1


def test_missing_and_unreadable_inputs_name_the_file(tmp_path):
    with pytest.raises(UserError, match="nothere.png"):
        read_image(tmp_path / "nothere.png")
    with pytest.raises(UserError, match="nothere.mp4"):
        read_video(tmp_path / "nothere.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all")
    with pytest.raises(UserError, match="junk.mp4"):
        read_video(junk)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(UserError, match="bad.png"):
        read_image(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        read_video(tmp_path / "empty")


def eight_bit(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(127.5).sub(1.0)


@pytest.mark.parametrize("name", ["image_up", "image_down"])
def test_images_resize_as_upstream(upstream_resize, name):
    """Float images: torchvision bicubic with antialias (also when enlarging), no clamp, center crop."""
    x, want = upstream_resize[f"{name}.in"], upstream_resize[f"{name}.out"]
    out = resize_crop(x, tuple(want.shape[1:]))
    assert out.shape == want.shape
    assert (out - want).abs().max() < 1e-5
    if name == "image_up":
        assert want.max() > 1 or want.min() < -1  # bicubic overshoots and upstream does not clamp images


@pytest.mark.parametrize("name", ["video_up", "video_down"])
def test_videos_resize_as_upstream_8_bit_frames_then_halve(upstream_resize, name):
    """Videos: resized as uint8 (rounded and clamped), then halved with upstream's bilinear 0.5 = a 2x2 average."""
    x, want = eight_bit(upstream_resize[f"{name}.in"]), eight_bit(upstream_resize[f"{name}.out"])
    out = resize_crop(x, tuple(want.shape[2:]), eight_bit=True)
    assert torch.equal(out, want)
    assert (half_res(out) - upstream_resize[f"{name}.half"]).abs().max() < 1e-6


def test_mask_video_thresholded_after_resize_and_halving(upstream_resize):
    """A palette mask keeps its resized edge values until the colours are thresholded: same planes as upstream."""
    mask = eight_bit(upstream_resize["mask.in"])
    want = upstream_resize["mask.half"]
    out = half_res(resize_crop(mask, (64, 96), eight_bit=True))
    assert (out - want).abs().max() < 1e-6
    assert out.unique().numel() > 3  # edge pixels are neither colour before thresholding
    assert torch.equal(compress_mask(out[:, [0] * 5]), compress_mask(want[:, [0] * 5]))


def test_resize_crop_size_and_crop_follow_upstream():
    """The covering side is truncated (int), the crop centred with the odd pixel at the end; no resize when the
    size already fits (torchvision returns the input as is)."""
    x = torch.arange(4.0).repeat_interleave(8)[None, None].expand(3, 16, 32) / 4 - 0.5  # 4 stripes, 8 wide
    assert torch.equal(resize_crop(x, (16, 16)), x[..., 8:24])
    assert torch.equal(resize_crop(x, (16, 31)), x[..., :31])
    odd = torch.rand(3, 30, 47) * 2 - 1
    assert resize_crop(odd, (32, 32)).shape == (3, 32, 32)  # 47 * 32 / 30 = 50.13 -> 50 wide, 9 cut on the left


def test_output_size_follows_the_reference_and_explicit_sizes_are_checked():
    assert output_size("512p", (720, 1280)) == (512, 896)
    assert output_size("512p", (1280, 720)) == (896, 512)
    assert output_size("704p", (500, 500)) == (704, 1280)  # square keeps landscape, as upstream's swap rule
    assert output_size((640, 384), (1000, 10)) == (384, 640)  # explicit: as given
    with pytest.raises(UserError, match="--width 500"):
        output_size((500, 384), (10, 10))
    with pytest.raises(UserError, match="--height 390"):
        output_size((640, 390), (10, 10))
    with pytest.raises(UserError, match="unknown size"):
        output_size("1080p", (10, 10))


def test_save_frames_is_atomic_and_refuses_non_empty_folder(tmp_path):
    video = smooth_video(t=3, h=16, w=16)
    save_frames(tmp_path / "frames", video)
    names = sorted(p.name for p in (tmp_path / "frames").iterdir())
    assert names == ["00000.png", "00001.png", "00002.png"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "frames" / "00001.png")), as_uint8(video[:, 1]))
    with pytest.raises(UserError, match="already exists and is not empty"):
        save_frames(tmp_path / "frames", video)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames"]


def test_side_by_side_matches_heights_and_keeps_even_width():
    reference = torch.zeros(3, 64, 32)
    driving = torch.ones(3, 5, 16, 9)
    result = -torch.ones(3, 5, 64, 32)
    preview = side_by_side(reference, driving, result)
    # driving scaled to height 64: width 9 * 4 = 36 (even)
    assert preview.shape == (3, 5, 64, 32 + 36 + 32)
    assert torch.equal(preview[:, :, :, :32], torch.zeros(3, 5, 64, 32))
    assert torch.allclose(preview[:, :, :, 32:68], torch.ones(3, 5, 64, 36))
    assert torch.equal(preview[:, :, :, 68:], result)
    assert preview.shape[-1] % 2 == 0


def _png16(path: Path, values: np.ndarray) -> Path:
    """A 16-bit PNG (grayscale, gray+alpha, RGB or RGBA by the channel count) written by hand: Pillow cannot
    write them, and this is what 16-bit exports of photo editors look like."""
    arr = np.asarray(values, dtype=">u2")
    arr = arr[..., None] if arr.ndim == 2 else arr
    h, w, c = arr.shape
    raw = b"".join(b"\0" + arr[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def _as_255(image: torch.Tensor) -> list:
    return ((image[:, 0, 0] + 1) * 127.5).round().tolist()


def test_images_read_as_the_user_means_them(tmp_path):
    """16-bit grayscale at its level (not clipped to white), 16-bit colour, palette (with and without a
    transparent entry), grayscale, and alpha: opaque alpha dropped, real transparency composited over the
    caller's background or refused with the reason."""
    gray16 = _png16(tmp_path / "g16.png", np.full((4, 6), 30000))
    assert _as_255(read_image(gray16)) == [117, 117, 117]  # 30000 / 257
    rgb16 = _png16(tmp_path / "rgb16.png", np.tile(np.array([1000, 30000, 65535]), (4, 6, 1)))
    assert np.allclose(_as_255(read_image(rgb16)), [1000 / 257, 30000 / 257, 255], atol=1)  # Pillow: high byte
    palette = Image.new("P", (6, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255])
    palette.save(tmp_path / "p.png")
    assert _as_255(read_image(tmp_path / "p.png")) == [255, 0, 0]
    palette.save(tmp_path / "pt.png", transparency=1)  # the red entry is transparent
    with pytest.raises(UserError, match="100% of the picture is transparent"):
        read_image(tmp_path / "pt.png")
    assert _as_255(read_image(tmp_path / "pt.png", (0, 0, 255))) == [0, 0, 255]
    Image.new("L", (6, 4), 200).save(tmp_path / "l.png")
    assert _as_255(read_image(tmp_path / "l.png")) == [200, 200, 200]
    Image.new("RGBA", (6, 4), (10, 20, 30, 255)).save(tmp_path / "opaque.png")
    assert _as_255(read_image(tmp_path / "opaque.png")) == [10, 20, 30]
    Image.new("LA", (6, 4), (100, 0)).save(tmp_path / "la.png")
    assert _as_255(read_image(tmp_path / "la.png", (255, 255, 255))) == [255, 255, 255]
    ga16 = _png16(tmp_path / "ga16.png", np.stack([np.full((4, 6), 65535), np.full((4, 6), 32768)], -1))
    assert _as_255(read_image(ga16, (0, 0, 0))) == [128, 128, 128]


def test_paired_inputs_must_agree(tmp_path):
    """A driving mask video of another size than the driving video is an error (as for the image pair); a
    reference of another aspect than the output is cropped with a warning that says how much."""
    from scail2_lite.inputs import InputFiles, load_inputs

    drive = tmp_path / "d.mp4"
    write_video(drive, torch.zeros(3, 5, 64, 64), fps=16)
    small = tmp_path / "m.mp4"
    write_video(small, torch.zeros(3, 5, 32, 32), fps=16)
    mask = torch.full((3, 64, 64), -1.0)
    mask[2, 20:40, 20:40] = 1.0  # a blue figure on black
    Image.fromarray(as_uint8(mask)).save(tmp_path / "rm.png")
    Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / "r.png")
    with pytest.raises(UserError, match="driving mask video is 32x32 but the driving video is 64x64"):
        load_inputs(InputFiles(tmp_path / "r.png", tmp_path / "rm.png", drive, small), size=(64, 64))
    wide = Image.new("RGB", (128, 64), (90, 90, 90))
    wide.save(tmp_path / "wide.png")
    Image.fromarray(np.tile(as_uint8(mask), (1, 2, 1))).save(tmp_path / "widem.png")
    blue_mask = torch.full((3, 5, 64, 64), -1.0)
    blue_mask[2, :, 20:40, 20:40] = 1.0
    write_video(tmp_path / "dm.mp4", blue_mask, fps=16)
    loaded = load_inputs(InputFiles(tmp_path / "wide.png", tmp_path / "widem.png", drive, tmp_path / "dm.mp4"),
                         size=(64, 64))
    assert any("reference image (128x64)" in w and "50%" in w for w in loaded.warnings), loaded.warnings
