"""How the two truth mattes in `scail2_lite/prepare/data/` were made (run once; the PNGs are committed).

The people of the packaged photos (scikit-image's astronaut, matplotlib's Grace Hopper) are cut out with
mediapipe's pose mask refined by OpenCV's GrabCut (mediapipe's mask sets the sure/probable regions, the photo's
edges decide the boundary), largest piece kept, holes filled. The astronaut's helmet, held at her side, is
marked as background: it is an object, not the person. The result was checked by eye (cut-outs over a dark
background). The composites built from these cut-outs (`scail2_lite.prepare.composite`) show exactly the
matte's pixels, so their truth is known by construction; that the mattes came partly from mediapipe biases
the reference IoU in its favour only at the boundary, which GrabCut moved to the photo's edges.
Run: `python benchmarks/make_mattes.py` (needs the `prepare` extra: mediapipe brings OpenCV).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage

from scail2_lite.prepare.composite import DATA, photo
from scail2_lite.prepare.masks import upsample
from scail2_lite.prepare.mediapipe_pose import MediapipeSegmenter


def refine(rgb: np.ndarray, soft: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
    grab = np.full(soft.shape, cv2.GC_PR_BGD, np.uint8)
    grab[soft > 0.3] = cv2.GC_PR_FGD
    grab[ndimage.binary_erosion(soft > 0.5, iterations=12)] = cv2.GC_FGD
    grab[~ndimage.binary_dilation(soft > 0.5, iterations=12)] = cv2.GC_BGD
    if exclude is not None:
        grab[exclude] = cv2.GC_BGD
    cv2.grabCut(rgb[..., ::-1].copy(), grab, None, np.zeros((1, 65)), np.zeros((1, 65)), 8, cv2.GC_INIT_WITH_MASK)
    mask = (grab == cv2.GC_FGD) | (grab == cv2.GC_PR_FGD)
    labels, n = ndimage.label(mask)
    mask = labels == 1 + np.argmax(ndimage.sum(mask, labels, range(1, n + 1)))
    return ndimage.binary_fill_holes(mask)


def main() -> None:
    segmenter = MediapipeSegmenter.load()
    yy, xx = np.mgrid[:512, :512]
    helmet = ((xx - 400) ** 2 + (yy - 450) ** 2 < 115**2) & (xx > 300)
    for name, exclude in (("astronaut", helmet), ("grace_hopper", None)):
        rgb = photo(name)
        soft = upsample(segmenter.image(rgb, 1)[0], rgb.shape[:2])
        matte = refine(rgb, soft, exclude)
        Image.fromarray(matte).convert("1").save(Path(DATA) / f"{name}_matte.png", optimize=True)
        print(name, f"{matte.mean():.1%} of the photo")


if __name__ == "__main__":
    main()
