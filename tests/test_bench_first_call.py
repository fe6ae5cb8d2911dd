"""benchmarks/bench_first_call.py's proof run on the CPU: each case runs in its own process on one Triton cache
folder and prints a row of three timed forwards of the block."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_run_prints_a_row_per_cache_state() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_first_call.py"), "--tiny"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| sdpa")]
    assert [r[1].strip() for r in rows] == ["cold", "warm"]
    for row in rows:
        forwards = [float(c) for c in row[4:7]]
        assert all(f > 0 for f in forwards), row
        assert abs(float(row[7]) - (forwards[0] - forwards[2])) < 0.006, row
