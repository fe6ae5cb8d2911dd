"""benchmarks/bench_vae_speed.py's proof run on the CPU (tiny VAE): each variant in its own process, the error
column against the first variant run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_variants_run_in_their_own_processes_and_are_compared(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_vae_speed.py"), "--tiny", "--only", "7,6,5"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in done.stdout.splitlines() if re.match(r"\| (fp32|bf16) ", line)}
    assert list(rows) == ["fp32 channels-last heuristics untiled", "fp32 channels-last heuristics",
                          "bf16 channels-last heuristics"]
    # the tiny frame fits one tile: the tiled fp32 decode is the untiled one; bf16 differs, a little
    assert rows["fp32 channels-last heuristics"][5] == "0.00e+00"
    assert 0 < float(rows["bf16 channels-last heuristics"][5]) < 0.1
    assert all(float(r[2]) > 0 for r in rows.values())  # decode seconds measured
