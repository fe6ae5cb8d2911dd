"""Model configuration, size presets and upstream defaults. Data only, no logic beyond (de)serialising."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class DiTConfig:
    """SCAIL-2 DiT geometry; field names follow the upstream constructor so `config.json` files map 1:1."""

    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256
    text_dim: int = 4096
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 20
    mask_dim: int = 28
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    eps: float = 1e-6
    clip_dim: int = 1280

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def preset(cls, name: str) -> "DiTConfig":
        try:
            return PRESETS[name]
        except KeyError:
            from .errors import UserError

            raise UserError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}") from None

    @classmethod
    def from_dict(cls, data: dict) -> "DiTConfig":
        """Take the known keys of an upstream/diffusers-style config dict, ignore the rest."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if "patch_size" in kwargs:
            kwargs["patch_size"] = tuple(kwargs["patch_size"])
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> "DiTConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d


PRESETS: dict[str, DiTConfig] = {
    "scail2-14b": DiTConfig(),
    # Same geometry as the reference fixtures (dim 64, 2 layers, 4 heads): fast on CPU, exercises every path.
    "tiny": DiTConfig(dim=64, ffn_dim=128, freq_dim=32, text_dim=48, num_heads=4, num_layers=2),
}

# Output sizes (height, width) in landscape orientation; the pipeline flips them for portrait driving videos.
SIZES: dict[str, tuple[int, int]] = {"512p": (512, 896), "704p": (704, 1280)}

# Upstream generation defaults (released SCAIL-2 config).
DEFAULT_STEPS = 40
DEFAULT_SHIFT = 5.0
DEFAULT_GUIDANCE = 5.0
DEFAULT_FPS = 16
SEGMENT_LEN = 81
SEGMENT_OVERLAP = 5
# SCAIL-2's released sampler (sample_video.py) uses an empty negative prompt, not Wan's long Chinese one.
DEFAULT_NEGATIVE_PROMPT = ""
# Wan2.1's own default negative prompt (the synthetic tokenizer's corpus covers it, for users who pass it).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

# Fast path for LightX2V's step-distilled Wan2.1-I2V-14B LoRA (`wan2.1_i2v_lora_rank64_lightx2v_4step`): 4 steps,
# shift 5, one forward per step (guidance 1 = no CFG branch). Source: LightX2V
# `configs/distill/wan21/wan_i2v_distill_lora_4step_cfg.json` (infer_steps 4, sample_shift 5, no CFG) and its
# `WanStepDistillScheduler`, whose Wan2.1 variant predicts x0 and re-noises each step = our `lcm` solver
# (the same update as ComfyUI's `lcm` sampler); see scail2_lite/sampling.py (researched by helper H5).
FAST_PRESET = dict(steps=4, guidance=1.0, shift=5.0, solver="lcm")
GENERATION_PRESETS: dict[str, dict] = {"fast": FAST_PRESET}  # `--preset NAME`
