"""The settings of a run, as typed values built once (by the CLI, or by a Python caller) and passed whole.

`GenerationSettings` says what to make (size, length, sampler, seed, segments, step cache); `MemorySettings` says
where and how it runs (device, memory profile, VRAM budget, attention backend, text-encoder scheme, VAE tiles).
Both validate their fields when built, so a bad value fails before minutes of loading, with one line.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from .config import (
    DEFAULT_GUIDANCE,
    DEFAULT_SHIFT,
    DEFAULT_SOLVER,
    DEFAULT_STEPS,
    GENERATION_PRESETS,
    SEGMENT_LEN,
    SEGMENT_OVERLAP,
)
from .errors import UserError

Solver = Literal["unipc", "dpm++", "euler", "lcm"]
CacheMode = Literal["off", "teacache", "magcache"]
TextEncoderScheme = Literal["bf16", "int8", "nf4"]
ParallelMode = Literal["auto", "cfg", "ulysses", "off"]  # distributed.py says what each does
PARALLEL_MODES: tuple[str, ...] = ("auto", "cfg", "ulysses", "off")
VaeDtype = Literal["bf16", "fp32"]
VAE_DTYPES: tuple[str, ...] = ("bf16", "fp32")
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit integer
# Words in the file names of step-distill LoRAs (LightX2V, Lightning, CausVid-style "step" LoRAs).
DISTILL_LORA_HINTS = ("lightx2v", "distill", "step", "lightning")


def _choice(value: object, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise UserError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


@dataclass(frozen=True)
class GenerationSettings:
    """What to generate. `size` is "512p"/"704p" (orientation from the reference image, as upstream) or (width,
    height); `frames` None = the whole driving video; `guidance` 1 runs one DiT forward per step (no CFG branch);
    `cache` skips DiT forwards that change little (`cache_threshold` None = the mode's default).
    `composite_reference` (replacement mode only) paints the reference black outside its mask before the VAE, as
    ComfyUI does; upstream encodes the reference as given (the default). `preset` names the recipe the sampling
    fields came from (config.GENERATION_PRESETS)."""

    size: str | tuple[int, int] = "512p"
    frames: int | None = None
    steps: int = DEFAULT_STEPS
    shift: float = DEFAULT_SHIFT
    guidance: float = DEFAULT_GUIDANCE
    solver: Solver = DEFAULT_SOLVER
    seed: int = 0
    segment_len: int = SEGMENT_LEN
    segment_overlap: int = SEGMENT_OVERLAP
    cache: CacheMode = "off"
    cache_threshold: float | None = None
    replace: bool = False
    composite_reference: bool = False
    fps: float | None = None
    preset: str | None = None

    def __post_init__(self) -> None:
        from .sampling import SOLVERS
        from .stepcache import CACHE_MODES

        if self.steps < 1:
            raise UserError(f"--steps must be at least 1, got {self.steps}")
        if self.frames is not None and self.frames < 5:
            raise UserError(f"--frames must be at least 5 (SCAIL-2 generates 4k+1 frames), got {self.frames}")
        if not 0 <= self.seed <= MAX_SEED:
            raise UserError(f"--seed must be between 0 and {MAX_SEED}, got {self.seed}")
        for name in ("shift", "guidance"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise UserError(f"--{name} must be a positive number, got {value}")
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise UserError(f"fps must be a positive number, got {self.fps}")
        _choice(self.solver, SOLVERS, "solver")
        _choice(self.cache, CACHE_MODES, "--cache")
        if self.preset is not None:
            _choice(self.preset, tuple(GENERATION_PRESETS), "--preset")
        if self.composite_reference and not self.replace:
            raise UserError("--composite-reference applies to replacement mode only (pass --replace, or drop it)")

    @classmethod
    def build(cls, preset: str | None = None, **given: Any) -> "GenerationSettings":
        """Explicit values (those not None) win, then the preset's, then the defaults: the one place where the
        CLI's optional flags and a Python caller's keywords become settings."""
        if preset is not None:
            _choice(preset, tuple(GENERATION_PRESETS), "--preset")
        values = GENERATION_PRESETS[preset].settings() if preset is not None else {}
        values.update({k: v for k, v in given.items() if v is not None})
        return cls(preset=preset, **values)

    def with_changes(self, **changes: Any) -> "GenerationSettings":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def uses_cfg(self) -> bool:
        return self.guidance != 1.0

    def preset_warning(self, loras: Sequence[str | Path]) -> str | None:
        """Why this run may give noise: a distill recipe (`preset`) with none of the LoRAs loaded looking like a
        distill LoRA (judged by file name: "lightx2v", "distill", "step" or "lightning"). None when all is well."""
        if self.preset is None:
            return None
        names = [Path(p).name for p in loras]
        if any(hint in name.lower() for name in names for hint in DISTILL_LORA_HINTS):
            return None
        recipe = GENERATION_PRESETS[self.preset]
        loaded = f"the LoRAs loaded ({', '.join(names)}) do not look like one" if names else "no LoRA is loaded"
        return (f"--preset {self.preset} ({recipe.steps} steps, guidance {recipe.guidance:g}) is made for the distill "
                f"LoRA {recipe.lora} (--lora FILE) and {loaded}: without it the video will be noise")


@dataclass(frozen=True)
class MemorySettings:
    """Where and how a run computes. None = decided per run: `device` cuda when available; `profile` the fastest
    that fits (see `scail2-lite profile`); `vram_budget` (bytes) the card's total, when planning for a card smaller
    than the free VRAM (the CUDA context and a desktop reserve come off it); `attention` the profile's;
    `text_encoder` what a quantized folder recorded, else bf16; `vae_tile` (pixels, 0 = untiled) square tiles to
    encode and decode in (else encode by the input's size alone, `vae_tiles.encode_tiling`, and decode in the
    quickest cut the card has room for, `planner.decode_cut`);
    `vae_dtype` the decode's precision (fp32; bf16 is faster, its error above the seams of large tiles:
    `Pipeline.vae_dtype`).
    `prompt_cache`: reuse the prompt embeddings of an earlier run with the same encoder files (cache.py).
    `parallel`: how several processes (torchrun) split a run: auto, cfg, ulysses or off (distributed.py)."""

    device: str | None = None
    profile: str | None = None
    vram_budget: int | None = None
    attention: str | None = None
    text_encoder: TextEncoderScheme | None = None
    vae_tile: int | None = None
    vae_dtype: VaeDtype | None = None
    prompt_cache: bool = True
    parallel: ParallelMode = "auto"

    def __post_init__(self) -> None:
        from .attention import resolve
        from .offload.profiles import load_profile
        from .quantize.text_encoder import TEXT_ENCODER_SCHEMES

        if self.vram_budget is not None and self.vram_budget <= 0:
            raise UserError(f"--vram-budget must be a positive number of GB, got {self.vram_budget / 1e9:g}")
        if self.vae_tile is not None and self.vae_tile < 0:
            raise UserError(f"--vae-tile must be 0 (untiled) or a positive number of pixels, got {self.vae_tile}")
        if self.vae_tile:
            from .vae_tiles import from_setting

            from_setting(self.vae_tile)  # multiples of 8: said before any loading
        if self.text_encoder is not None:
            _choice(self.text_encoder, TEXT_ENCODER_SCHEMES, "--text-encoder")
        if self.vae_dtype is not None:
            _choice(self.vae_dtype, VAE_DTYPES, "--vae-dtype")
        if self.profile is not None:
            load_profile(self.profile)
        if self.attention is not None:
            resolve(self.attention)
        _choice(self.parallel, PARALLEL_MODES, "--parallel")

    def with_changes(self, **changes: Any) -> "MemorySettings":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
