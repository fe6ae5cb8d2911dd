"""sampling.py: Wan sigmas, the four solvers on a flow with a known answer, determinism, CFG, errors."""

from __future__ import annotations

import math

import pytest
import torch

from scail2_lite.errors import UserError
from scail2_lite.sampling import cfg, flow_sigmas, make_scheduler

MU, SD = 0.7, 0.5  # data distribution N(MU, SD^2): its probability-flow ODE maps noise z to MU + SD * z exactly


def gaussian_velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Exact flow velocity E[noise - x0 | x_sigma] for x0 ~ N(MU, SD^2), x_sigma = (1-sigma) x0 + sigma noise."""
    var = (1 - sigma) ** 2 * SD**2 + sigma**2
    centered = x - (1 - sigma) * MU
    return sigma / var * centered - (MU + (1 - sigma) * SD**2 / var * centered)


def integrate(solver: str, steps: int, shift: float, z: torch.Tensor, seed: int = 1) -> torch.Tensor:
    sampler = make_scheduler(solver, steps, shift, generator=torch.Generator().manual_seed(seed))
    s0 = float(sampler.sigmas[0])
    x = ((1 - s0) * MU + math.sqrt((1 - s0) ** 2 * SD**2 + s0**2) * z).float()  # exact point on the path at s0
    for i, t in enumerate(sampler.timesteps):
        x = sampler.step(gaussian_velocity(x.double(), float(sampler.sigmas[i])).float(), t, x)
    return x


def hand_sigmas(steps: int, shift: float, start: float) -> list[float]:
    out = []
    for i in range(steps):
        s = start - start * i / steps
        out.append(shift * s / (1 + (shift - 1) * s))
    return out


@pytest.mark.parametrize("steps, shift", [(4, 5.0), (10, 3.0), (40, 5.0), (7, 1.0)])
def test_flow_sigmas_hand_computed(steps, shift):
    sigmas = flow_sigmas(steps, shift)
    assert sigmas.dtype == torch.float32 and len(sigmas) == steps
    assert sigmas.tolist() == pytest.approx(hand_sigmas(steps, shift, 0.999), abs=1e-6)
    assert flow_sigmas(steps, shift, sigma_max=1.0).tolist() == pytest.approx(hand_sigmas(steps, shift, 1.0), abs=1e-6)


def test_unipc_schedule_is_wans():
    sampler = make_scheduler("unipc", 40, 5.0)
    assert sampler.sigmas[-1] == 0 and len(sampler.sigmas) == 41
    assert sampler.sigmas[:-1].tolist() == pytest.approx(hand_sigmas(40, 5.0, 0.999), abs=1e-6)
    # Wan feeds the model sigma * 1000 truncated to int64: 999, 994, ... for 40 steps at shift 5.
    assert sampler.timesteps.dtype == torch.int64
    assert sampler.timesteps[:3].tolist() == [999, 994, 989]
    assert sampler.timesteps.tolist() == [int(s * 1000) for s in hand_sigmas(40, 5.0, 0.999)]


def test_dpm_and_few_step_schedules_start_at_one():
    dpm = make_scheduler("dpm++", 10, 5.0)
    assert dpm.sigmas[0] == 1.0 and dpm.sigmas[-1] == 0 and dpm.timesteps[0] == 1000
    euler = make_scheduler("euler", 4, 5.0)
    # LightX2V's 4-step distilled Wan: timesteps [1000, 750, 500, 250] of the shift-5 schedule
    assert euler.sigmas.tolist() == pytest.approx([1.0, 15 / 16, 5 / 6, 0.625, 0.0], abs=1e-6)


@pytest.mark.parametrize("solver, tolerance", [("unipc", 0.03), ("dpm++", 0.03), ("euler", 0.25)])
def test_solvers_integrate_a_known_flow(solver, tolerance):
    z = torch.randn(2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = integrate(solver, 40, 5.0, z)
    error = (x.double() - (MU + SD * z)).abs().max().item()
    assert error < tolerance
    if solver != "euler":  # second-order solvers beat Euler by a wide margin at the same step count
        euler_error = (integrate("euler", 40, 5.0, z).double() - (MU + SD * z)).abs().max().item()
        assert error < euler_error / 4


def test_lcm_ends_on_the_predicted_x0_and_is_seeded():
    z = torch.randn(500, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a, b = integrate("lcm", 4, 5.0, z, seed=3), integrate("lcm", 4, 5.0, z, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, integrate("lcm", 4, 5.0, z, seed=4))
    assert abs(a.mean().item() - MU) < 0.05


@pytest.mark.parametrize("solver", ["unipc", "dpm++", "euler"])
def test_deterministic_and_keeps_layout_and_dtype(solver):
    z = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)[0]
    runs = [integrate(solver, 6, 5.0, z) for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (16, 3, 4, 4)
    sampler = make_scheduler(solver, 3, 5.0)
    x = torch.zeros(16, 2, 4, 4, dtype=torch.bfloat16)
    out = sampler.step(torch.ones_like(x), sampler.timesteps[0], x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape


def test_steps_must_follow_the_schedule():
    sampler = make_scheduler("euler", 2, 5.0)
    x = torch.zeros(4)
    with pytest.raises(RuntimeError, match="expects timestep"):
        sampler.step(x, sampler.timesteps[1], x)
    for t in sampler.timesteps:
        x = sampler.step(torch.ones(4), t, x)
    with pytest.raises(RuntimeError, match="already taken"):
        sampler.step(x, sampler.timesteps[-1], x)


def test_cfg():
    cond, uncond = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    assert cfg(cond, uncond, 5.0).tolist() == [6.0, -4.0]
    assert torch.equal(cfg(cond, uncond, 1.0), cond)


def test_bad_solver_settings():
    with pytest.raises(UserError, match="unknown solver 'ddim'"):
        make_scheduler("ddim", 10, 5.0)
    with pytest.raises(UserError, match="--steps"):
        make_scheduler("unipc", 0, 5.0)
    with pytest.raises(UserError, match="--shift"):
        make_scheduler("unipc", 10, 0.0)
