"""The one interface every segmenter meets, and the choice among them (with the exact fix when none works).

A segmenter finds people: in one picture (probability maps, any order) and frame by frame in a video
(`Detection`s, any order, with the segmenter's own ids when it has them). Stable identities across the video
come from `tracking.IdentityTracker`, the same for every segmenter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import UserError
from .settings import PrepareSettings, SegmenterName
from .tracking import Detection

MEDIAPIPE_HINT = "pip install 'scail2-lite[prepare]' (mediapipe 0.10.21, Python 3.10-3.12)"
SAM3_HINT = ("download SAM3 (https://huggingface.co/facebook/sam3, gated: accept its licence) and pass "
             "--segmenter sam3 --sam3 PATH")


class VideoSession(Protocol):
    def detect(self, frame: np.ndarray) -> list[Detection]:
        """People in the next frame (uint8 RGB (H, W, 3)); frames must come in order."""


class Segmenter(Protocol):
    name: str

    def image(self, rgb: np.ndarray, max_people: int) -> list[np.ndarray]:
        """Probability maps (float32 in [0, 1], the picture's aspect, any size) of up to `max_people` people."""

    def video(self, people: int) -> VideoSession:
        """A session for one video in which `people` people are followed."""

    def close(self) -> None:
        """Free the models."""


def open_segmenter(settings: PrepareSettings) -> Segmenter:
    """The segmenter asked for; `auto` takes SAM3 when weights are given, else mediapipe when installed.
    Fails before any work starts, saying what to install or download."""
    choice = settings.segmenter
    if choice is SegmenterName.AUTO:
        if settings.sam3 is not None:
            choice = SegmenterName.SAM3
        elif settings.prompt_object != "person":
            raise UserError(f"finding {settings.prompt_object!r} needs SAM3: {SAM3_HINT}")
        else:
            choice = SegmenterName.MEDIAPIPE
    if choice is SegmenterName.SAM3:
        if settings.sam3 is None:
            raise UserError(f"--segmenter sam3 needs its weights: {SAM3_HINT}")
        from .sam3 import Sam3Segmenter

        return Sam3Segmenter.load(Path(settings.sam3), settings.prompt_object)
    from .mediapipe_pose import MediapipeSegmenter, mediapipe_problem

    problem = mediapipe_problem()
    if problem is not None:
        alternatives = "" if settings.segmenter is SegmenterName.MEDIAPIPE else f", or {SAM3_HINT}"
        raise UserError(f"no segmenter is usable ({problem}): {MEDIAPIPE_HINT}{alternatives}")
    return MediapipeSegmenter.load()
