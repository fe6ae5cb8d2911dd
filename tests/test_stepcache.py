"""Step caching on the tiny DiT: off/threshold 0 are exact, large thresholds skip, branches are independent."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from scail2_lite.blocks import Kernels
from scail2_lite.config import DiTConfig
from scail2_lite.errors import UserError
from scail2_lite.model import Conditions, SCAIL2Model
from scail2_lite.sampling import cfg, make_scheduler
from scail2_lite.stepcache import StepCache

CFG = replace(DiTConfig.preset("tiny"), clip_dim=32)
STEPS = 12


@pytest.fixture(scope="module")
def model() -> SCAIL2Model:
    torch.manual_seed(0)
    return SCAIL2Model(CFG).eval()


@pytest.fixture(scope="module")
def conditioning(model: SCAIL2Model) -> dict:
    g = torch.Generator().manual_seed(1)
    T, H, W = 2, 8, 8

    def r(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g)

    clip = r(1, 257, CFG.clip_dim)
    with torch.no_grad():
        ctx = {n: model.embed_context(r(1, 5, CFG.text_dim), clip) for n in ("cond", "uncond")}
    return dict(x=r(1, 16, T, H, W), cond=Conditions(r(1, 16, T, H // 2, W // 2), r(1, 28, T, H // 2, W // 2),
                                                     r(1, 16, 1, H, W), r(1, 28, 1 + T, H, W)), ctx=ctx)


@torch.no_grad()
def run(model: SCAIL2Model, c: dict, cache: StepCache | None, branches: tuple[str, ...] = ("cond", "uncond")):
    """UniPC loop with CFG over `branches`, each model call inside its cache branch when a cache is given."""
    sampler = make_scheduler("unipc", STEPS, 5.0)
    x = c["x"].clone()
    if cache is not None:
        cache.begin(STEPS)
    for t in sampler.timesteps:
        out = {}
        for name in branches:
            tt = torch.full((1,), float(t))
            if cache is None:
                out[name] = model.forward_with_context(x, tt, c["ctx"][name], c["cond"])
            else:
                with cache.branch(name):
                    out[name] = model.forward_with_context(x, tt, c["ctx"][name], c["cond"], cache=cache)
        v = cfg(out["cond"], out["uncond"], 5.0) if len(out) == 2 else out["cond"]
        x = sampler.step(v, t, x)
    return x


@pytest.fixture(scope="module")
def reference(model: SCAIL2Model, conditioning: dict) -> torch.Tensor:
    return run(model, conditioning, None)


def test_off_runs_every_forward(model, conditioning, reference):
    cache = StepCache("off")
    assert torch.equal(run(model, conditioning, cache), reference)
    assert cache.stats.total == 0


@pytest.mark.parametrize("mode", ["teacache", "magcache"])
def test_threshold_zero_is_exact(model, conditioning, reference, mode):
    cache = StepCache(mode, threshold=0.0)
    out = run(model, conditioning, cache)
    assert torch.equal(out, reference)
    assert cache.stats.total_skipped == 0 and cache.stats.total == 2 * STEPS


@pytest.mark.parametrize("mode,kwargs", [("teacache", dict(coefficients=(1.0, 0.0))), ("magcache", {})])
def test_large_threshold_skips_and_counts(model, conditioning, reference, mode, kwargs):
    cache = StepCache(mode, threshold=100.0, warmup=2, **kwargs)
    calls = []
    block0 = model.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        out = run(model, conditioning, cache)
    finally:
        block0.remove()
    stats = cache.stats
    assert stats.total == 2 * STEPS
    assert stats.total_skipped > 0
    assert sum(stats.computed.values()) == len(calls)  # a skipped forward runs no block
    assert stats.skipped.keys() == {"cond", "uncond"}
    assert not torch.equal(out, reference)
    assert torch.isfinite(out).all()
    if mode == "magcache":  # at most K=2 skips in a row: warm-up 2, last step computed -> steps 2..10 = 3 runs of 3
        assert stats.skipped["cond"] == 6
    else:  # TeaCache has no run limit: everything between warm-up and the last step
        assert stats.skipped["cond"] == STEPS - 3


def test_skip_reuses_residual_exactly(model, conditioning):
    """A skipped call returns its own embedded input plus the residual of the branch's last computed call."""
    c = conditioning
    cache = StepCache("teacache", threshold=100.0, warmup=1, coefficients=(1.0, 0.0))
    cache.begin(3)
    with torch.no_grad():
        outs = []
        for t in (900.0, 800.0):
            with cache.branch("cond"):
                emb = model.embed(c["x"], torch.tensor([t]), c["cond"])
                x_in = emb.x.clone()
                outs.append((x_in, cache.run_blocks(emb, lambda: model.run_blocks(emb, c["ctx"]["cond"], Kernels()))))
    (x0, y0), (x1, y1) = outs
    assert cache.stats.skipped == {"cond": 1}
    torch.testing.assert_close(y1, x1 + (y0 - x0), rtol=0, atol=1e-6)


def test_branches_are_independent(model, conditioning):
    """Interleaving an uncond branch does not change what the cond branch computes or skips."""
    results = []
    for branches in (("cond",), ("cond", "uncond")):
        cache = StepCache("magcache", threshold=0.5, warmup=2)
        cond_outs = []
        sampler = make_scheduler("euler", STEPS, 5.0)
        x = conditioning["x"].clone()
        cache.begin(STEPS)
        with torch.no_grad():
            for t in sampler.timesteps:
                tt = torch.full((1,), float(t))
                for name in branches:
                    with cache.branch(name):
                        ctx = conditioning["ctx"][name]
                        v = model.forward_with_context(x, tt, ctx, conditioning["cond"], cache=cache)
                    if name == "cond":
                        v_cond = v
                        cond_outs.append(v.clone())
                x = sampler.step(v_cond, t, x)  # the trajectory follows cond only: same in both runs
        results.append((cond_outs, cache.stats.skipped.get("cond", 0)))
    (a, skipped_a), (b, skipped_b) = results
    assert skipped_a == skipped_b > 0
    assert len(a) == len(b) == STEPS and all(torch.equal(p, q) for p, q in zip(a, b))


def test_a_cached_run_leaves_the_model_as_it_was(model, conditioning, reference):
    cache = StepCache("teacache", threshold=100.0, warmup=1, coefficients=(1.0, 0.0))
    assert not torch.equal(run(model, conditioning, cache), reference)
    assert "run_blocks" not in vars(model)
    assert torch.equal(run(model, conditioning, None), reference)


def test_misuse_is_refused(model, conditioning):
    with pytest.raises(UserError, match="unknown --cache"):
        StepCache("fastcache")
    with pytest.raises(UserError, match=">= 0"):
        StepCache("teacache", threshold=-1.0)
    cache = StepCache("teacache")
    c = conditioning
    with pytest.raises(RuntimeError, match="cache.branch"), torch.no_grad():  # outside any branch, before begin
        model.forward_with_context(c["x"], torch.tensor([900.0]), c["ctx"]["cond"], c["cond"], cache=cache)
    cache.begin(1)
    with pytest.raises(RuntimeError, match="more than 1"):
        with torch.no_grad(), cache.branch("cond"):
            for t in (900.0, 800.0):
                model.forward_with_context(c["x"], torch.tensor([t]), c["ctx"]["cond"], c["cond"], cache=cache)
