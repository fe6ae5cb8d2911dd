"""People (or any text-named subject) from SAM3 through transformers' `Sam3VideoModel`, with weights the user
downloads (facebook/sam3, gated): the model family upstream's SCAIL-Pose uses, for what mediapipe cannot find
(animals, drawn characters: `--prompt-object`).

Frames are fed one at a time (streaming): the session keeps the tracker's memory, not the video. Pre- and
post-processing are done here with torch alone (resize to the model's square input, normalise; upsample the
low-resolution mask logits), so transformers' image processors and their torchvision dependency are not
needed. A picture is segmented as a one-frame video.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from .tracking import Detection

WORK_SIDE = 512  # masks are returned at this long side (the frame's aspect)
DEFAULT_MEAN = (0.5, 0.5, 0.5)  # transformers' Sam3ImageProcessor defaults, used when the folder has no
DEFAULT_STD = (0.5, 0.5, 0.5)  # preprocessor_config.json


class _Session:
    """One video: frames go in one by one, each object's mask comes out with SAM3's own object id."""

    def __init__(self, segmenter: "Sam3Segmenter"):
        from transformers.models.sam3_video.modeling_sam3_video import (
            Sam3VideoInferenceSession,
        )

        self._seg = segmenter
        self._state = Sam3VideoInferenceSession(
            inference_device=segmenter.device, inference_state_device=segmenter.device,
            video_storage_device=segmenter.device, dtype=segmenter.dtype,
        )
        prompt_id = self._state.add_prompt(segmenter.prompt)
        tokens = segmenter.tokenizer(segmenter.prompt, return_tensors="pt", padding="max_length", max_length=32)
        self._state.prompt_input_ids[prompt_id] = tokens.input_ids.to(segmenter.device)
        self._state.prompt_attention_masks[prompt_id] = tokens.attention_mask.to(segmenter.device)
        self._index = 0

    @torch.inference_mode()
    def detect(self, frame: np.ndarray) -> list[Detection]:
        seg = self._seg
        h, w = frame.shape[:2]
        self._state.video_height, self._state.video_width = h, w
        out = seg.model(inference_session=self._state, frame=seg.pixels(frame), frame_idx=self._index)
        self._state.processed_frames.pop(self._index - 1, None)  # the tracker keeps features, not frames
        self._index += 1
        hidden = set(out.suppressed_obj_ids or ()) | set(self._state.hotstart_removed_obj_ids)
        scale = WORK_SIDE / max(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        found = []
        for obj_id, logits in sorted(out.obj_id_to_mask.items()):
            if obj_id in hidden:
                continue
            soft = F.interpolate(logits.float()[None], size=size, mode="bilinear", align_corners=False)[0, 0]
            soft = torch.sigmoid(soft).cpu().numpy()
            if soft.max() > 0.5:
                found.append(Detection(soft, key=int(obj_id)))
        return found


class Sam3Segmenter:
    name = "sam3"

    def __init__(self, model, tokenizer, prompt: str, image_size: int, mean, std, device: torch.device,
                 dtype: torch.dtype):
        self.model = model
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.device = device
        self.dtype = dtype

    @classmethod
    def load(cls, folder: Path, prompt: str, device: str | None = None) -> "Sam3Segmenter":
        """Weights in transformers' layout (config.json, safetensors, tokenizer files); CUDA when present."""
        if not (folder / "config.json").is_file():
            raise UserError(f"--sam3 {folder}: not a transformers model folder (no config.json); download "
                            "facebook/sam3 with `hf download facebook/sam3 --local-dir PATH`")
        from transformers import AutoTokenizer, Sam3VideoModel

        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        try:
            model = Sam3VideoModel.from_pretrained(folder, dtype=dtype).to(dev).eval()
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise UserError(f"--sam3 {folder}: cannot load SAM3 ({e})") from None
        size, mean, std = model.config.image_size, DEFAULT_MEAN, DEFAULT_STD
        pre = folder / "preprocessor_config.json"
        if pre.is_file():
            settings = json.loads(pre.read_text())
            size = int(settings.get("size", {}).get("height", size))
            mean, std = settings.get("image_mean", mean), settings.get("image_std", std)
        return cls(model, tokenizer, prompt, size, mean, std, dev, dtype)

    def pixels(self, rgb: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) -> the model's input (3, S, S): bilinear resize (antialiased), [0, 1], normalised."""
        x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float().div_(255)
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                          antialias=True)[0]
        return ((x - self.mean) / self.std).to(self.device, self.dtype)

    def image(self, rgb: np.ndarray, max_people: int) -> list[np.ndarray]:
        found = _Session(self).detect(rgb)
        found.sort(key=lambda d: -float(d.soft.sum()))
        return [d.soft for d in found[:max_people]]

    def video(self, people: int) -> _Session:
        return _Session(self)

    def close(self) -> None:
        self.model = None
