"""`scail2-lite prepare`: from a photo and a video to SCAIL-2's inputs (masks, inputs.json, a preview sheet).

Modules: `settings` (what was asked), `segmenter` (the interface, and the choice), `mediapipe_pose` and `sam3`
(the segmenters), `tracking` (identities through a video), `masks` (from probabilities to pure colours),
`framing` (reference reframing), `footage` (reading and writing pictures), `folder` (inputs.json, all-or-nothing
writing), `preview` (the sheet), `run` (the phases), `composite` (test footage with
known truth). The command itself is `cli/prepare.py`.
"""

from __future__ import annotations

from .folder import PreparedInputs, read_inputs
from .settings import ExtraReference, Mode, PrepareSettings, SegmenterName

__all__ = ["PreparedInputs", "read_inputs", "PrepareSettings", "Mode", "SegmenterName", "ExtraReference", "prepare"]


def __getattr__(name: str):
    if name == "prepare":  # lazy: `generate --inputs` reads folders without importing the segmentation code
        from .run import prepare

        return prepare
    raise AttributeError(name)
