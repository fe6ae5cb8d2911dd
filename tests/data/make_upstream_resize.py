"""Writes `upstream_resize.safetensors`: inputs and what upstream SCAIL-2's preprocessing makes of them, computed
with torchvision (not a dependency of ours) exactly as upstream's `generate.py` does it, for tests/test_media.py.

Upstream (`wan/utils/scail_utils.py` `resize_for_rectangle_crop`, `generate.py`, `SCAIL2Pipeline.generate`):
scale with torchvision `resize(..., InterpolationMode.BICUBIC)` (antialias True by default) so the picture covers
the target, the covering side `int(...)`-truncated; center crop (`delta // 2`). Images are float tensors on [-1, 1];
videos are uint8 (T, C, H, W) tensors (stored (C, T, H, W), uint8) (torchvision rounds and clamps), mapped to [-1, 1] with (x - 127.5) / 127.5
after the resize; pose video and driving mask are then halved with `F.interpolate(scale_factor=0.5,
mode="bilinear", align_corners=False)`.

Run once (torchvision's pure-Python resize suffices): `python tests/data/make_upstream_resize.py`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import crop, resize


def resize_for_rectangle_crop(arr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, *size), upstream's rule with reshape_mode "center"."""
    if arr.shape[3] / arr.shape[2] > size[1] / size[0]:
        arr = resize(arr, size=[size[0], int(arr.shape[3] * size[0] / arr.shape[2])],
                     interpolation=InterpolationMode.BICUBIC)
    else:
        arr = resize(arr, size=[int(arr.shape[2] * size[1] / arr.shape[3]), size[1]],
                     interpolation=InterpolationMode.BICUBIC)
    h, w = arr.shape[2], arr.shape[3]
    return crop(arr, top=(h - size[0]) // 2, left=(w - size[1]) // 2, height=size[0], width=size[1])


def main() -> None:
    g = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    # Images: float (3, H, W) on [-1, 1] from 8-bit values, as ToTensor() * 2 - 1 gives them.
    for name, (h, w), size in (("image_up", (37, 53), (32, 64)), ("image_down", (90, 60), (32, 32))):
        x = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8).float() / 255 * 2 - 1
        out[f"{name}.in"] = x
        out[f"{name}.out"] = resize_for_rectangle_crop(x[None], size)[0].contiguous()
    # Videos: uint8 (T, 3, H, W); a smooth pattern plus noise (values near 0 and 255 exercise the clamp).
    for name, (t, h, w), size in (("video_up", (2, 23, 40), (32, 48)), ("video_down", (2, 60, 42), (32, 64))):
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        base = torch.stack([xx, yy, (xx - yy).abs()]) * 300 - 20
        noise = torch.randn(t, 3, h, w, generator=g) * 40
        video = (base[None] + noise).round().clamp(0, 255).to(torch.uint8)
        resized8 = resize_for_rectangle_crop(video, size)  # (T, 3, h, w) uint8
        resized = (resized8.float() - 127.5) / 127.5
        out[f"{name}.in"] = video.permute(1, 0, 2, 3).contiguous()  # (3, T, H, W) uint8
        out[f"{name}.out"] = resized8.permute(1, 0, 2, 3).contiguous()
        halved = F.interpolate(resized, scale_factor=0.5, mode="bilinear", align_corners=False)
        out[f"{name}.half"] = halved.permute(1, 0, 2, 3).contiguous()
    # A palette mask video (identities blue/red on black), 8-bit: thresholds after resize and halving.
    labels = torch.zeros(1, 50, 70, dtype=torch.long)
    labels[:, 10:40, 8:30], labels[:, 5:45, 40:62] = 1, 2
    palette = torch.tensor([[0, 0, 0], [0, 0, 255], [255, 0, 0]], dtype=torch.uint8)
    mask = palette[labels].permute(0, 3, 1, 2).contiguous()  # (1, 3, 50, 70)
    resized = (resize_for_rectangle_crop(mask, (64, 96)).float() - 127.5) / 127.5
    out["mask.in"] = mask.permute(1, 0, 2, 3).contiguous()
    out["mask.half"] = F.interpolate(resized, scale_factor=0.5, mode="bilinear",
                                     align_corners=False).permute(1, 0, 2, 3).contiguous()
    save_file(out, str(Path(__file__).with_name("upstream_resize.safetensors")))


if __name__ == "__main__":
    main()
