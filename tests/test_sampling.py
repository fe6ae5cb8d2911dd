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


def unipc_reference(model, x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """UniPC (Zhao et al. 2023) written out from the paper for flow matching in float64: data prediction
    x0 = x - sigma v, alpha = 1 - sigma, lambda = log(alpha / sigma), B(h) = expm1(-h) ("bh2"), order 2 with one
    first-order warm-up step, a first-order last step (lower_order_final) and the UniC corrector after every step
    but the first. Independent of diffusers; used to check the solver behind `--preset lightx2v`."""
    def lam(s: float) -> float:
        return math.log(1 - s) - math.log(s) if s > 0 else math.inf

    def coeffs(s0: float, s1: float) -> tuple[float, float, float, float]:
        h = lam(s1) - lam(s0)
        hh = -h
        phi1 = math.expm1(hh)  # -1 when s1 = 0
        return h, phi1, phi1, 1 - s1  # h, h*phi_1, B(h), alpha_t

    n = len(sigmas)
    sig = sigmas + [0.0]
    x0s: list[torch.Tensor] = []
    prev_x = None
    for i in range(n):
        x0 = x - sig[i] * model(x, sig[i])
        if i > 0:  # UniC: correct x with the model output just computed at it (order 1 after the warm-up)
            s0, s1 = sig[i - 1], sig[i]
            h, hphi1, bh, alpha = coeffs(s0, s1)
            base = s1 / s0 * prev_x - alpha * hphi1 * x0s[-1]
            d1t = x0 - x0s[-1]
            order = min(2, i)  # the order the predictor used for this step
            if order == 1:
                x = base - alpha * bh * 0.5 * d1t
            else:
                rk = (lam(sig[i - 2]) - lam(s0)) / h
                d1 = (x0s[-2] - x0s[-1]) / rk
                # b_k = h_phi_k * k! / B(h) for k = 1, 2 with h_phi_1 = phi1/hh - 1, h_phi_2 = h_phi_1/hh - 1/2
                hphi_1 = hphi1 / -h - 1
                hphi_2 = hphi_1 / -h - 0.5
                b1, b2 = hphi_1 / bh, hphi_2 * 2 / bh
                # rhos solve [[1, 1], [rk, 1]] rho = [b1, b2]
                rho1 = (b1 - b2) / (1 - rk)
                rho2 = b1 - rho1
                x = base - alpha * bh * (rho1 * d1 + rho2 * d1t)
        x0s.append(x0)
        prev_x = x
        s0, s1 = sig[i], sig[i + 1]
        h, hphi1, bh, alpha = coeffs(s0, s1)
        x_next = (s1 / s0) * x - alpha * hphi1 * x0
        order = min(2, i + 1, n - i)
        if order == 2:
            rk = (lam(sig[i - 1]) - lam(s0)) / h
            d1 = (x0s[-2] - x0) / rk
            x_next = x_next - alpha * bh * 0.5 * d1
        x = x_next
    return x


@pytest.mark.parametrize("steps, shift", [(8, 1.0), (5, 3.0)])
def test_unipc_matches_a_hand_derived_unipc(steps, shift):
    """`--preset lightx2v` samples 8 UniPC steps at shift 1 (upstream's FlowUniPCMultistepScheduler)."""
    z = torch.randn(300, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sampler = make_scheduler("unipc", steps, shift)
    sigmas = [float(s) for s in sampler.sigmas[:-1]]
    assert sigmas == pytest.approx(hand_sigmas(steps, shift, 0.999), abs=1e-6)
    x = z.clone()
    for i, t in enumerate(sampler.timesteps):
        x = sampler.step(gaussian_velocity(x.double(), sigmas[i]).float(), t, x.float()).double()
    want = unipc_reference(gaussian_velocity, z.clone(), sigmas)
    assert (x - want).abs().max().item() < 2e-5
    euler = z.clone()  # and the reference is not a plain Euler integration
    for i in range(steps):
        euler = euler + ((sigmas + [0.0])[i + 1] - sigmas[i]) * gaussian_velocity(euler, sigmas[i])
    assert (euler - want).abs().max().item() > 1e-3
