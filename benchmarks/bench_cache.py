"""Step caching on the tiny synthetic model: forwards skipped vs deviation from the uncached run.

Question (issue 8, deliverable 4): how many block-stack forwards do `teacache` and `magcache` skip at a few
thresholds, and how far do the final latents move from the uncached result? A UniPC run with CFG (two branches per
step, as the pipeline calls them) on the tiny DiT with the synthetic checkpoint's trained-looking weights.
Only the mechanism is measured here: random weights say nothing about visual quality on real SCAIL-2 weights.
Run: `python benchmarks/bench_cache.py [--steps 30]` (CPU, under a minute). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch

from scail2_lite.model import Conditions, SCAIL2Model
from scail2_lite.sampling import cfg, make_scheduler
from scail2_lite.stepcache import TEACACHE_WAN21_I2V_480P, StepCache
from scail2_lite.synth import dit_tensors, tiny_config


def tiny_model(seed: int = 0) -> SCAIL2Model:
    """The tiny DiT with the synthetic checkpoint's weights (fp32)."""
    config = tiny_config()
    model = SCAIL2Model(config)
    model.load_state_dict(dict(dit_tensors(config, seed)))
    return model.eval()


def sample(model: SCAIL2Model, cache: StepCache | None, steps: int, guidance: float = 5.0, solver: str = "unipc",
           shift: float = 5.0, seed: int = 0) -> torch.Tensor:
    """Final latents of a `steps`-step run with CFG on fixed random conditioning; `cache` attached if given."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    T, H, W = 4, 16, 16

    def r(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g)

    cond = Conditions(r(1, 16, T, H // 2, W // 2), r(1, 28, T, H // 2, W // 2), r(1, 16, 1, H, W),
                      r(1, 28, 1 + T, H, W))
    clip = r(1, 257, c.clip_dim)
    contexts = {"cond": model.embed_context(r(1, 7, c.text_dim), clip),
                "uncond": model.embed_context(r(1, 7, c.text_dim), clip)}
    x = r(1, 16, T, H, W)
    sampler = make_scheduler(solver, steps, shift, generator=torch.Generator().manual_seed(seed + 1))
    if cache is not None:
        cache.begin(steps)
    for t in sampler.timesteps:
        out = {}
        for name, ctx in contexts.items():
            if name == "uncond" and guidance == 1:
                continue
            tt = torch.full((1,), float(t))
            if cache is not None:
                with cache.branch(name):
                    out[name] = model.forward_with_context(x, tt, ctx, cond, cache=cache)
            else:
                out[name] = model.forward_with_context(x, tt, ctx, cond)
        v = cfg(out["cond"], out["uncond"], guidance) if "uncond" in out else out["cond"]
        x = sampler.step(v, t, x)
    return x


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = tiny_model()
    t0 = time.perf_counter()
    ref = sample(model, None, args.steps)
    base_s = time.perf_counter() - t0
    rows = [("off", "-", "-", 0, 2 * args.steps, 0.0, base_s)]
    # The synthetic time embedding is random: e0 moves ~100% between steps (trained Wan: a few %), so TeaCache's
    # Wan-fitted rescale blows up and nothing is skipped; the raw relative L1 (rescale = identity) shows the rule.
    runs = [("teacache", "Wan2.1 I2V poly", TEACACHE_WAN21_I2V_480P, (0.2, 0.3)),
            ("teacache", "raw rel-L1", (1.0, 0.0), (1.0, 2.0, 4.0)),
            ("magcache", "online ratio", TEACACHE_WAN21_I2V_480P, (0.03, 0.06, 0.12, 0.24, 0.5))]
    for mode, rule, coefficients, thresholds in runs:
        for th in thresholds:
            cache = StepCache(mode, th, coefficients=coefficients)
            t0 = time.perf_counter()
            x = sample(model, cache, args.steps)
            seconds = time.perf_counter() - t0
            err = ((x - ref).norm() / ref.norm()).item()
            rows.append((mode, rule, f"{th:g}", cache.stats.total_skipped, cache.stats.total, err, seconds))
    print(f"tiny synthetic SCAIL-2 DiT, UniPC {args.steps} steps, shift 5, CFG 5 (2 forwards/step), CPU fp32\n")
    print("| cache | rule | threshold | forwards skipped | skipped % | rel. error of final latents | wall s |")
    print("|---|---|---|---|---|---|---|")
    for mode, rule, th, skipped, total, err, seconds in rows:
        print(f"| {mode} | {rule} | {th} | {skipped}/{total} | {skipped / total:.0%} | {err:.2e} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
