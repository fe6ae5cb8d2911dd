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

# Output sizes (height, width) in landscape orientation; a portrait reference image turns them portrait (upstream).
SIZES: dict[str, tuple[int, int]] = {"512p": (512, 896), "704p": (704, 1280)}

# Upstream generation defaults (SPEC section 8): the wan-branch CLI (`generate.py` `_validate_args`, README "Useful
# sampling options") samples 40 steps at shift 3.0 for every resolution; `SCAIL2Pipeline.generate`'s own 5.0 is
# reached only by Python callers that pass no shift, and ComfyUI workflows commonly use 5.0: pass --shift 5 for it.
DEFAULT_STEPS = 40
DEFAULT_SHIFT = 3.0
DEFAULT_GUIDANCE = 5.0
DEFAULT_SOLVER = "unipc"
DEFAULT_FPS = 16
SEGMENT_LEN = 81
SEGMENT_OVERLAP = 5
# The unconditional branch encodes the empty string: the wan config's `sample_neg_prompt` is "" and `generate.py`
# passes none (SPEC section 8), not Wan2.1's long Chinese default. Every path (CLI, demo, Python API) uses this.
DEFAULT_NEGATIVE_PROMPT = ""
# Wan2.1's own default negative prompt (the synthetic tokenizer's corpus covers it, for users who pass it).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


@dataclass(frozen=True)
class GenerationPreset:
    """A sampling recipe made for one distill LoRA: the settings it fixes and the LoRA file it expects.

    The recipe only samples well with that LoRA merged (`--lora FILE`); without it the few steps give noise."""

    steps: int
    shift: float
    guidance: float
    solver: str
    lora: str  # the file the recipe was made for, as its publisher names it
    source: str  # where the recipe comes from

    def settings(self) -> dict:
        """The GenerationSettings fields the preset sets (explicit flags still win over them)."""
        return dict(steps=self.steps, shift=self.shift, guidance=self.guidance, solver=self.solver)


# Upstream's recipe (SCAIL-2 README "LoRA Integrations", SPEC section 8): LightX2V's rank-128 CFG+step distill LoRA
# for Wan2.1-I2V-14B-480p at strength 1, 8 steps, shift 1, guidance 1 (one DiT pass per step), solver left at unipc.
LIGHTX2V_PRESET = GenerationPreset(
    steps=8, shift=1.0, guidance=1.0, solver="unipc",
    lora="lightx2v_I2V_14B_480p_cfg_step_distill_rank128_bf16.safetensors",
    source="SCAIL-2 README (Kijai/WanVideo_comfy, folder Lightx2v/; the rank-64 variant also works)")
# LightX2V's own 4-step recipe for its step-distilled Wan2.1-I2V-14B LoRA: 4 steps, shift 5, one forward per step.
# Source: LightX2V `configs/distill/wan21/wan_i2v_distill_lora_4step_cfg.json` (infer_steps 4, sample_shift 5, no
# CFG) and its `WanStepDistillScheduler`, whose Wan2.1 variant predicts x0 and re-noises each step = our `lcm`
# solver (the same update as ComfyUI's `lcm` sampler); see scail2_lite/sampling.py.
LIGHTX2V_4STEP_PRESET = GenerationPreset(
    steps=4, shift=5.0, guidance=1.0, solver="lcm",
    lora="wan2.1_i2v_lora_rank64_lightx2v_4step.safetensors",
    source="LightX2V (lightx2v/Wan2.1-Distill-Loras)")
# `--preset NAME`. "fast" is the 4-step recipe's name before upstream published its own (kept as an alias).
GENERATION_PRESETS: dict[str, GenerationPreset] = {
    "lightx2v": LIGHTX2V_PRESET,
    "lightx2v-4step": LIGHTX2V_4STEP_PRESET,
    "fast": LIGHTX2V_4STEP_PRESET,
}
