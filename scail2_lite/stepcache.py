"""Step caching (`--cache teacache|magcache|off`): skip DiT block stacks whose result can be predicted.

A sampling step whose input barely changed since the last computed step reuses that step's residual (block stack
output minus its input) instead of running the 40 blocks: out = x + cached_residual. Embedding and head still run
(they are cheap), so the skipped step still sees its own timestep and latents.

Both decision rules follow the published Wan2.1 implementations (read, not copied):
- teacache (ali-vilab/TeaCache, `TeaCache4Wan2.1/teacache_generate.py`, `--use_ret_steps` mode): the probe is the
  block-0 modulation input e0 (the (B, 6, dim) time projection). Each call adds poly(rel_L1(e0, previous e0)) to
  an accumulator, rel_L1 = mean|e0 - e0_prev| / mean|e0_prev|, poly = the 4th-order rescale TeaCache fitted for
  Wan2.1-I2V-14B 480P (`TEACACHE_WAN21_I2V_480P`; SCAIL-2 is a fine-tune of that model, so its time projection
  starts from it: an assumption to check on real weights). Skip while the accumulator is under the threshold,
  else compute and reset it. Default threshold 0.20: TeaCache's "slow" (quality) setting for Wan2.1 i2v 480P with
  retention steps (their table: 385 s -> 212 s); 0.30 is their "fast" setting. Warm-up: 5 steps, as TeaCache.
  A negative poly value (the fit undershoots near 0) counts as 0, so skips cannot accumulate forever.
- magcache (Zehong-Ma/MagCache, `MagCache4Wan2.1/magcache_generate.py`): the magnitude ratio of successive
  residuals, mean over tokens of ||r_t|| / ||r_t-1||, is close to 1 and drifts slowly. Each skipped step multiplies
  an accumulated ratio by the step's ratio and adds |1 - accumulated ratio| to an accumulated error; skip while the
  error is under the threshold and at most K steps were skipped in a row. MagCache reads the per-step ratios from a
  table calibrated offline per model; here they are measured online, from the last two computed residuals of the
  branch (geometric mean per step over the gap), so no calibration run is needed for SCAIL-2 or a LoRA. Defaults:
  threshold 0.12, K 2, warm-up 20% of the steps (their script's defaults; their Wan2.1 I2V 14B example uses the
  faster 0.24 / K 6).
First and last steps are always computed, and so are the warm-up steps.

Measured on the tiny synthetic model (CPU, `python benchmarks/bench_cache.py`, UniPC 30 steps + CFG = 60 forwards,
relative error of the final latents vs uncached): magcache 0.12 skips 8/60 (4.0e-2), 0.24 skips 12/60 (5.6e-2);
teacache with the Wan rescale skips 0/60, because the synthetic time embedding is random and e0 moves ~100% per
step (trained Wan: a few %); with the raw relative L1, threshold 1 skips 16/60 (3.3e-2). These numbers only show
the mechanism works: whether a threshold keeps the video looking the same must be judged on real SCAIL-2 weights. The 4-step distilled
path (`FAST_PRESET`) has nothing to skip: first, last and warm-up steps cover all 4.

Memory: each branch keeps its residual, (tokens, dim) float32 on `store_device` (704p x 81 frames: ~2 GB per
branch), and a computed step holds one more copy of the block input while the blocks run. `store_device="cpu"`
keeps both off the GPU at the cost of copies: the input out before the blocks and back after them (it becomes
the residual there, so one extra stream on the GPU after the blocks have freed their activations), the residual
out, and the residual in for a skipped step, into page-locked buffers reused across steps (one for the input,
one residual per branch: 3 x 1 GB at 512p). Measured at 512p x 81 frames, 40 UniPC steps with CFG, FP8, H100:
with fresh pageable copies and the residual computed on the CPU, each computed step took 14.2-14.8 s instead of
11.1 s uncached.

Pipeline use (one cache per run, model calls made once per branch per step):

    cache = StepCache("teacache")
    for segment in segments:
        cache.begin(num_steps)
        for t in sampler.timesteps:
            with cache.branch("cond"):
                v_cond = model.forward_with_context(..., cache=cache)
            with cache.branch("uncond"):  # only when guidance != 1
                v_uncond = model.forward_with_context(..., cache=cache)
    print(cache.stats)
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .errors import UserError
from .model import Embedded

CACHE_MODES = ("off", "teacache", "magcache")
# TeaCache's rescale polynomial for Wan2.1-I2V-14B 480P with retention steps (e0 probe), highest power first.
TEACACHE_WAN21_I2V_480P = (2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01)
DEFAULT_THRESHOLDS = {"teacache": 0.20, "magcache": 0.12}
TEACACHE_WARMUP_STEPS = 5
MAGCACHE_WARMUP_RATIO = 0.2
MAGCACHE_MAX_SKIPS = 2


@dataclass
class CacheStats:
    """How many block-stack forwards ran and how many were replaced by a cached residual, per branch."""

    computed: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def total(self) -> int:
        return sum(self.computed.values()) + self.total_skipped

    def __str__(self) -> str:
        if not self.total:
            return "step cache: no forwards"
        share = self.total_skipped / self.total
        return f"step cache: skipped {self.total_skipped}/{self.total} DiT forwards ({share:.0%})"


@dataclass
class _Branch:
    """Per-CFG-branch state: its step counter, last probe and residual, and the decision accumulators."""

    step: int = 0
    probe: torch.Tensor | None = None  # teacache: e0 of the previous call
    residual: torch.Tensor | None = None
    norms: torch.Tensor | None = None  # magcache: per-token norms of `residual`, kept where they were computed
    residual_step: int = -1  # step the residual was computed at (magcache's ratio spans the gap)
    ratio: float = 1.0  # magcache: per-step magnitude ratio measured between the last two computed residuals
    acc: float = 0.0  # teacache: accumulated distance; magcache: accumulated error
    acc_ratio: float = 1.0
    run: int = 0  # magcache: skips in a row


class StepCache:
    """TeaCache- or MagCache-style skipping of whole block stacks, keyed per CFG branch (see module doc)."""

    def __init__(
        self,
        mode: str,
        threshold: float | None = None,
        warmup: int | None = None,
        max_skips: int = MAGCACHE_MAX_SKIPS,
        coefficients: tuple[float, ...] = TEACACHE_WAN21_I2V_480P,
        store_device: str | torch.device | None = None,
    ) -> None:
        if mode not in CACHE_MODES:
            raise UserError(f"unknown --cache {mode!r}; choose one of {', '.join(CACHE_MODES)}")
        if threshold is not None and (not math.isfinite(threshold) or threshold < 0):
            raise UserError(f"cache threshold must be a number >= 0, got {threshold}")
        if warmup is not None and warmup < 0:
            raise UserError(f"cache warm-up steps must be >= 0, got {warmup}")
        self.mode = mode
        self.threshold = DEFAULT_THRESHOLDS.get(mode, 0.0) if threshold is None else threshold
        self.warmup = warmup
        self.max_skips = max_skips
        self.coefficients = coefficients
        self.store_device = store_device
        self.stats = CacheStats()
        self._branches: dict[str, _Branch] = {}
        self._current: str | None = None
        self._num_steps: int | None = None
        self._x_in: torch.Tensor | None = None  # the block input of the step being computed (reused buffer)

    # ---- caller API -----------------------------------------------------------------------------------------

    def begin(self, num_steps: int) -> None:
        """Start a sampling loop of `num_steps` steps (each segment): forget every branch's state."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self._num_steps = num_steps
        self._branches = {}

    @contextmanager
    def branch(self, name: str) -> Iterator[None]:
        """Model calls inside belong to CFG branch `name` ("cond", "uncond"): each branch has its own cache, and
        its n-th call since `begin` is step n."""
        previous, self._current = self._current, name
        try:
            yield
        finally:
            self._current = previous

    # ---- the wrapped block loop -----------------------------------------------------------------------------

    def _warmup_steps(self) -> int:
        if self.warmup is not None:
            return self.warmup
        if self.mode == "teacache":
            return TEACACHE_WARMUP_STEPS
        return math.ceil(MAGCACHE_WARMUP_RATIO * self._num_steps)

    def run_blocks(self, emb: Embedded, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The block stack's output for `emb`: `run()` (the model's own block loop), or the input plus the branch's
        cached residual when the cache decides the step can be skipped. Mode "off" always runs."""
        if self.mode == "off":
            return run()
        if self._num_steps is None or self._current is None:
            raise RuntimeError("StepCache: call cache.begin(num_steps) per sampling loop and run the model inside "
                               "`with cache.branch(name):`")
        name = self._current
        b = self._branches.setdefault(name, _Branch())
        step = b.step
        if step >= self._num_steps:
            raise RuntimeError(f"StepCache: branch {name!r} called more than {self._num_steps} times since begin()")
        b.step += 1
        forced = step < max(1, self._warmup_steps()) or step == self._num_steps - 1 or b.residual is None
        if self.mode == "teacache":
            skip = self._teacache_decide(b, emb.e0, forced)
        else:
            skip = self._magcache_decide(b, forced)
        if skip:
            self.stats.skipped[name] = self.stats.skipped.get(name, 0) + 1
            return emb.x.add_(b.residual.to(emb.x.device, non_blocking=True))
        self.stats.computed[name] = self.stats.computed.get(name, 0) + 1
        self._x_in = self._stash(emb.x, self._x_in)
        out = run()
        # The subtraction and the norms run where the blocks ran (the input comes back and becomes the residual).
        residual = self._x_in.to(out.device, non_blocking=True).neg_().add_(out)
        norms = residual.norm(dim=-1) if self.mode == "magcache" else None
        if norms is not None and b.norms is not None:
            ratio = (norms / b.norms.clamp_min(1e-12)).mean().item()
            b.ratio = ratio ** (1.0 / (step - b.residual_step))
        b.residual, b.norms, b.residual_step = self._stash(residual, b.residual), norms, step
        return out

    def _stash(self, src: torch.Tensor, buf: torch.Tensor | None) -> torch.Tensor:
        """`src` copied to `store_device` into `buf`, reused across steps (page-locked when the copy leaves a GPU:
        fresh pageable gigabytes each step cost ~1 s of page faults). Same stream: later reads are ordered."""
        device = torch.device(self.store_device) if self.store_device is not None else src.device
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype or buf.device != device:
            pin = src.is_cuda and device.type == "cpu"
            buf = torch.empty(src.shape, dtype=src.dtype, device=device, pin_memory=pin)
        return buf.copy_(src, non_blocking=True)

    def _teacache_decide(self, b: _Branch, e0: torch.Tensor, forced: bool) -> bool:
        probe = e0.detach().float()
        skip = False
        if forced or b.probe is None:
            b.acc = 0.0
        else:
            rel = ((probe - b.probe).abs().mean() / b.probe.abs().mean().clamp_min(1e-12)).item()
            b.acc += max(0.0, _poly(self.coefficients, rel))
            skip = b.acc < self.threshold
            if not skip:
                b.acc = 0.0
        b.probe = probe.clone()
        return skip

    def _magcache_decide(self, b: _Branch, forced: bool) -> bool:
        if not forced:
            b.acc_ratio *= b.ratio
            b.run += 1
            b.acc += abs(1.0 - b.acc_ratio)
            if b.acc < self.threshold and b.run <= self.max_skips:
                return True
        b.acc, b.acc_ratio, b.run = 0.0, 1.0, 0
        return False


def _poly(coefficients: tuple[float, ...], x: float) -> float:
    """Polynomial with `coefficients` highest power first (numpy.poly1d order), at x."""
    y = 0.0
    for c in coefficients:
        y = y * x + c
    return y
