"""Writes `golden_latents_issue18.safetensors` for tests/test_golden.py: the latents of every segment, both modes,
of `generate` on the tiny synthetic SAT checkpoint (seed 0) and its synthetic inputs, with the test's SETTINGS and
no memory profile (the test then checks every profile against them, bit for bit).

Run from the repository root only when a deliberate change moves the numbers (say which and why in the commit):
`python tests/data/make_golden_latents.py`.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_golden import GOLDEN, SETTINGS, run_both_modes  # noqa: E402

from scail2_lite.pipeline import Pipeline  # noqa: E402
from scail2_lite.synth import synth  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = synth(Path(tmp) / "scail2", scale="tiny", fmt="sat", seed=0)
        pipe = Pipeline.from_pretrained(folder, device="cpu", prompt_cache=False)
        latents: dict[str, torch.Tensor] = {}
        for mode, segments in run_both_modes(pipe, folder).items():
            latents.update({f"{mode}.{k}": z.contiguous() for k, z in enumerate(segments)})
    save_file(latents, str(GOLDEN))
    print(f"wrote {GOLDEN} ({', '.join(latents)}) with {SETTINGS}")


if __name__ == "__main__":
    main()
