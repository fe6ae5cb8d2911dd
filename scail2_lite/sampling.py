"""Flow-matching sigmas, solvers and the CFG combination (SPEC section 4, Wan's samplers).

The DiT predicts the flow velocity v = noise - x0 at noise level sigma (x_sigma = (1 - sigma) x0 + sigma noise).
A `Sampler` is built per segment (solvers keep multistep history) and used as:

    sampler = make_scheduler("unipc", steps, shift)
    for t in sampler.timesteps:
        v = cfg(model(x, t, cond), model(x, t, uncond), guidance)
        x = sampler.step(v, t, x)

Schedules (all end at sigma 0):
- unipc: Wan's FlowUniPC = shift(linspace(0.999 as float32, 0, N+1)[:-1]) run by diffusers' UniPCMultistepScheduler
  (Wan's FlowUniPCMultistepScheduler is diffusers 0.31's UniPC with flow prediction and the same defaults:
  order 2, bh2, predict_x0, lower_order_final, final sigma zero). Timesteps are sigma * 1000 truncated to
  int64, as Wan feeds them to the model.
- dpm++: Wan's i2v `dpm++` = DPM-Solver++ 2M (midpoint) on shift(linspace(1, 0, N+1)[:-1]) (Wan's
  `get_sampling_sigmas` starts at 1, not 0.999), run by diffusers' DPMSolverMultistepScheduler.
- euler: deterministic flow Euler, x + (sigma_next - sigma) v, on shift(linspace(1, 0, N+1)[:-1]). This is
  the few-step schedule of the 4-step distilled Wan LoRAs: LightX2V's `WanStepDistillScheduler` with
  `sample_shift` 5 picks sigmas at timesteps [1000, 750, 500, 250] of that same shifted linspace (= steps 4
  here) and no CFG (`configs/distill/wan21/wan_i2v_distill_lora_4step_cfg.json`); its Wan2.2 variant steps
  deterministically like this, its Wan2.1 variant re-noises (`lcm`).
- lcm: predict x0 = x - sigma v, then re-noise to sigma_next with fresh noise from the sampler's generator
  (LightX2V's Wan2.1 step-distill step; ComfyUI's `lcm` sampler).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from .errors import UserError

SOLVERS = ("unipc", "dpm++", "euler", "lcm")
NUM_TRAIN_TIMESTEPS = 1000
# Wan's FlowUniPC takes sigma_max from a float32 tensor: 0.999 rounded to float32, then float64 math.
UNIPC_SIGMA_MAX = float(np.float32(0.999))


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """Wan's timestep shift s*x / (1 + (s-1)*x): more steps at high noise for large shift."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _flow_sigmas64(steps: int, shift: float, sigma_max: float) -> np.ndarray:
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    if shift <= 0:
        raise UserError(f"--shift must be positive, got {shift}")
    return shift_sigmas(np.linspace(sigma_max, 0.0, steps + 1)[:-1], shift)


def flow_sigmas(steps: int, shift: float, sigma_max: float = UNIPC_SIGMA_MAX) -> torch.Tensor:
    """`steps` shifted sigmas from linspace(sigma_max, 0, steps+1)[:-1] (float64 math, float32 result).

    The default is Wan's FlowUniPC schedule; sigma_max 1.0 is Wan's `get_sampling_sigmas` (dpm++, distilled LoRAs).
    """
    return torch.from_numpy(_flow_sigmas64(steps, shift, sigma_max).astype(np.float32))


def cfg(cond: torch.Tensor, uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + guidance * (cond - uncond)."""
    return uncond + guidance * (cond - uncond)


class Sampler:
    """One solver run over a fixed schedule: `timesteps` to feed the model, `step` to advance the sample.

    `sigmas` has steps+1 entries ending in 0. Steps must be taken in order, once each; build a new Sampler
    per segment. `step` computes in float32 and returns the sample's dtype.
    """

    def __init__(
        self,
        solver: str,
        sigmas: torch.Tensor,
        timesteps: torch.Tensor,
        scheduler: UniPCMultistepScheduler | DPMSolverMultistepScheduler | None = None,
        generator: torch.Generator | None = None,
    ):
        self.solver = solver
        self.sigmas = sigmas
        self.timesteps = timesteps
        self._scheduler = scheduler
        self._generator = generator
        self._index = 0

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor | float, sample: torch.Tensor) -> torch.Tensor:
        """Advance `sample` from the current sigma to the next one given the velocity `model_output`."""
        i = self._index
        if i >= len(self.timesteps):
            raise RuntimeError(f"all {len(self.timesteps)} steps of this sampler were already taken")
        if float(timestep) != float(self.timesteps[i]):
            raise RuntimeError(f"step {i} expects timestep {float(self.timesteps[i])}, got {float(timestep)}")
        self._index += 1
        v, x = model_output.float(), sample.float()
        if self._scheduler is not None:
            # diffusers' multistep updates want a leading batch axis: give it one, whatever the caller's layout.
            out = self._scheduler.step(v[None], self.timesteps[i], x[None], return_dict=False)[0][0]
        else:
            sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
            if self.solver == "euler":
                out = x + (sigma_next - sigma) * v
            else:  # lcm
                x0 = x - sigma * v
                noise = torch.randn(x.shape, generator=self._generator, device=x.device, dtype=x.dtype)
                out = (1 - sigma_next) * x0 + sigma_next * noise if sigma_next > 0 else x0
        return out.to(sample.dtype)


def make_scheduler(
    solver: str, steps: int, shift: float, generator: torch.Generator | None = None
) -> Sampler:
    """A fresh `Sampler` for `solver` in SOLVERS. `generator` feeds `lcm`'s re-noising (others are deterministic)."""
    if solver == "unipc":
        scheduler = UniPCMultistepScheduler(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=1.0,  # the sigmas passed in are already shifted
            solver_order=2,
            solver_type="bh2",
            predict_x0=True,
            lower_order_final=True,
            final_sigmas_type="zero",
        )
        scheduler.set_timesteps(sigmas=_flow_sigmas64(steps, shift, UNIPC_SIGMA_MAX))
        return Sampler(solver, scheduler.sigmas, scheduler.timesteps, scheduler=scheduler)
    if solver == "dpm++":
        sigmas64 = _flow_sigmas64(steps, shift, 1.0)
        scheduler = DPMSolverMultistepScheduler(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
            algorithm_type="dpmsolver++",
            solver_order=2,
            solver_type="midpoint",
            lower_order_final=True,
            final_sigmas_type="zero",
        )
        scheduler.set_timesteps(steps)
        # diffusers' DPM-Solver takes no custom sigmas: install Wan's (start at 1.0 instead of 0.999).
        scheduler.sigmas = torch.from_numpy(np.append(sigmas64, 0.0).astype(np.float32))
        scheduler.timesteps = torch.from_numpy((sigmas64 * NUM_TRAIN_TIMESTEPS).astype(np.int64))
        return Sampler(solver, scheduler.sigmas, scheduler.timesteps, scheduler=scheduler)
    if solver in ("euler", "lcm"):
        sigmas = flow_sigmas(steps, shift, sigma_max=1.0)
        return Sampler(
            solver, torch.cat([sigmas, sigmas.new_zeros(1)]), sigmas * NUM_TRAIN_TIMESTEPS, generator=generator
        )
    raise UserError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
