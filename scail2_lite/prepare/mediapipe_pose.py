"""People masks from mediapipe's pose models (the `prepare` extra), offline, a few milliseconds a frame on a CPU.

mediapipe 0.10.21 is the last release whose wheel carries the pose models (detector and `pose_landmark_full`,
Apache-2.0). Its Tasks `PoseLandmarker` returns a segmentation mask per person, but it loads a `.task` bundle
that the wheel does not carry: the bundle is rebuilt here from the two bundled model files, with the input
normalisation each model expects written into its metadata by mediapipe's own metadata writer, and cached.
(Complexity 0 and 2 models would be downloaded at run time: not used.) One person is followed through a video
by the VIDEO-mode landmarker; several are searched for one at a time in every frame (`find_people`).
"""

from __future__ import annotations

import io
import os
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import UserError
from .masks import MIN_PERSON_SHARE
from .masks import iou as _overlap
from .tracking import Detection

# Frames are shrunk to this long side first: the models look at 224-256 px crops, and the masks come back
# at the input size, so more pixels cost time and buy nothing (checked on the composite test footage).
WORK_SIDE = 512
# Low thresholds find people in groups and half-hidden; false finds are filtered by size afterwards.
DETECTION_THRESHOLD = 0.3
PRESENCE_THRESHOLD = 0.3
TRACKING_THRESHOLD = 0.3
FRAME_MS = 40  # VIDEO mode wants increasing timestamps; their spacing does not matter for masks
GREY = 128  # what a found person is painted over with before the next search
ON_GREY = 0.15  # a find lying this much on greyed-out people is their silhouette, not a new person
GROW = 6  # pixels (at WORK_SIDE) a found person's mask is enlarged by before it is greyed out

_MODELS = (  # bundle member, bundled file, input normalisation (mean, std)
    ("pose_detector.tflite", "modules/pose_detection/pose_detection.tflite", 127.5, 127.5),
    ("pose_landmarks_detector.tflite", "modules/pose_landmark/pose_landmark_full.tflite", 0.0, 255.0),
)


def _package_dir() -> Path | None:
    try:
        import mediapipe
    except ImportError:
        return None
    return Path(mediapipe.__file__).parent


def mediapipe_problem() -> str | None:
    """Why mediapipe cannot be used here (not installed, or a release without the pose models: 0.10.30+ and
    1.x ship none), or None when it can."""
    root = _package_dir()
    if root is None:
        return "mediapipe is not installed"
    if not all((root / src).is_file() for _, src, _, _ in _MODELS):
        import mediapipe

        return f"mediapipe {mediapipe.__version__} carries no pose models (0.10.21 is the last that does)"
    return None


def _bundle_path() -> Path:
    import mediapipe

    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scail2-lite"
    return root / f"pose_landmarker-mediapipe-{mediapipe.__version__}.task"


def _build_bundle() -> bytes:
    from mediapipe.tasks.python.metadata.metadata_writers import metadata_writer

    root = _package_dir()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as bundle:
        for member, src, mean, std in _MODELS:
            writer = metadata_writer.MetadataWriter.create(bytearray((root / src).read_bytes()))
            writer.add_general_info(member.removesuffix(".tflite")).add_image_input(norm_mean=[mean], norm_std=[std])
            bundle.writestr(member, bytes(writer.populate()[0]))
    return buf.getvalue()


def pose_bundle() -> bytes:
    """The PoseLandmarker `.task` bundle, built once per mediapipe version and kept in the user cache."""
    path = _bundle_path()
    if path.is_file():
        return path.read_bytes()
    data = _build_bundle()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the rebuild next time
    return data


@contextmanager
def _native_logs_muted() -> Iterator[None]:
    """mediapipe's C++ side logs setup chatter (EGL, XNNPACK, feedback tensors) straight to file descriptor 2,
    past Python: hide it while a landmarker is created and runs its first picture. Errors still surface as
    Python exceptions."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _grow(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=GROW)


def _shrink(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    scale = WORK_SIDE / max(h, w)
    if scale >= 1:
        return np.ascontiguousarray(rgb)
    from PIL import Image

    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))


class _TrackingSession:
    """One person: the VIDEO-mode landmarker follows them from frame to frame (the detector runs only when
    they are lost), the fast path."""

    def __init__(self, landmarker):
        self._landmarker = landmarker
        self._time_ms = 0

    def detect(self, frame: np.ndarray) -> list[Detection]:
        import mediapipe as mp

        image = mp.Image(image_format=mp.ImageFormat.SRGB, data=_shrink(frame))
        if self._time_ms == 0:
            with _native_logs_muted():
                result = self._landmarker.detect_for_video(image, self._time_ms)
        else:
            result = self._landmarker.detect_for_video(image, self._time_ms)
        self._time_ms += FRAME_MS
        return [Detection(np.array(m.numpy_view(), dtype=np.float32)) for m in result.segmentation_masks or []]


class _SearchSession:
    """Several people: every frame is searched afresh (`find_people`); the tracker links the finds."""

    def __init__(self, segmenter: "MediapipeSegmenter", people: int):
        self._segmenter = segmenter
        self._people = people

    def detect(self, frame: np.ndarray) -> list[Detection]:
        return [Detection(m) for m in self._segmenter.find_people(_shrink(frame), self._people)]


class MediapipeSegmenter:
    """mediapipe PoseLandmarker: a single-pose IMAGE-mode landmarker that finds people one at a time, and a
    VIDEO-mode one per followed video."""

    name = "mediapipe"

    def __init__(self, bundle: bytes):
        self._bundle = bundle
        self._landmarkers: list = []
        self._single = None

    @classmethod
    def load(cls) -> "MediapipeSegmenter":
        return cls(pose_bundle())

    def _landmarker(self, video: bool):
        from mediapipe.tasks.python import BaseOptions, vision

        options = vision.PoseLandmarkerOptions(
            base_options=BaseOptions(model_asset_buffer=self._bundle),
            running_mode=vision.RunningMode.VIDEO if video else vision.RunningMode.IMAGE,
            num_poses=1,
            min_pose_detection_confidence=DETECTION_THRESHOLD,
            min_pose_presence_confidence=PRESENCE_THRESHOLD,
            min_tracking_confidence=TRACKING_THRESHOLD,
            output_segmentation_masks=True,
        )
        try:
            with _native_logs_muted():
                landmarker = vision.PoseLandmarker.create_from_options(options)
        except RuntimeError as e:
            raise UserError(f"mediapipe could not load its pose models ({e}); reinstall mediapipe==0.10.21") from None
        self._landmarkers.append(landmarker)
        return landmarker

    def find_people(self, small: np.ndarray, max_people: int) -> list[np.ndarray]:
        """Up to `max_people` masks in a (shrunk) picture, found one at a time: each find is greyed out
        (slightly enlarged) before looking again. The pose detector asked for several poses at once misses
        people next to a more salient one (one of two side by side in our composites); this finds both."""
        import mediapipe as mp

        if self._single is None:
            self._single = self._landmarker(False)
            with _native_logs_muted():  # the first run logs its graph's setup
                self._single.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=small))
        picture = small.copy()
        greyed = np.zeros(small.shape[:2], dtype=bool)
        found: list[np.ndarray] = []
        while len(found) < max_people:
            result = self._single.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=picture))
            if not result.segmentation_masks:
                break
            soft = np.array(result.segmentation_masks[0].numpy_view(), dtype=np.float32)
            mask = soft > 0.5
            area = np.count_nonzero(mask)
            # A grey silhouette can pass for a person (with the background around it): such finds are not.
            if area < MIN_PERSON_SHARE * mask.size or np.count_nonzero(mask & greyed) > ON_GREY * area:
                break
            found.append(soft)
            grown = _grow(mask)
            picture[grown] = GREY
            greyed |= grown
        return found

    def image(self, rgb: np.ndarray, max_people: int) -> list[np.ndarray]:
        """Each person's mask averaged with the mask found in the mirrored picture: a leak onto background
        that looks like a person from one side rarely does from the other (reference composite IoU 0.84 ->
        0.91 on the hardest background, unchanged on the others)."""
        small = _shrink(rgb)
        found = self.find_people(small, max_people)
        mirrored = [m[:, ::-1] for m in self.find_people(np.ascontiguousarray(small[:, ::-1]), max_people)]
        out = []
        for soft in found:
            overlaps = [_overlap(soft > 0.5, m > 0.5) for m in mirrored]
            best = int(np.argmax(overlaps)) if overlaps else -1
            out.append((soft + mirrored[best]) / 2 if best >= 0 and overlaps[best] > 0.5 else soft)
        return out

    def video(self, people: int) -> _TrackingSession | _SearchSession:
        return _TrackingSession(self._landmarker(True)) if people == 1 else _SearchSession(self, people)

    def close(self) -> None:
        for landmarker in self._landmarkers:
            landmarker.close()
        self._landmarkers.clear()
        self._single = None
