"""benchmarks/bench_cards.py's decode trace on the CPU: the live tensors of the full-width VAE decode per output
pixel, the source of the planner's decode model, still match `planner.VAE_DECODE_TENSOR_BYTES_PER_PIXEL`."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _vae_decode import trace_bytes_per_pixel  # noqa: E402

from scail2_lite.offload.planner import VAE_DECODE_TENSOR_BYTES_PER_PIXEL  # noqa: E402


def test_traced_decode_tensors_match_the_planners_figure() -> None:
    """32x32 px tiles (4x4 latent) carry the most padding per pixel: the trace sits 0-3% above the figure for large
    tiles (19,794 B/px when measured; the fit's asymptote is 19,486)."""
    per_px = trace_bytes_per_pixel("full", 4, latent_frames=3)
    assert VAE_DECODE_TENSOR_BYTES_PER_PIXEL <= per_px <= VAE_DECODE_TENSOR_BYTES_PER_PIXEL * 1.03
