"""The benchmark suite in one command (issue 7): per-Linear speed, offload vs peers, full pipeline under caps.

Runs the question scripts one after another as subprocesses (each keeps its own CUDA context and peak counters),
sized to finish inside one 10-minute device call on an H100, then appends one dated section to
`benchmarks/RESULTS.md` (device, torch, command, every script's table) and copies it to `$OUT/suite.md` when
`OUT` is set. A script that fails or runs out of its time slice is recorded as such; the others still run.

Run from the repository root on a CUDA machine: `python benchmarks/suite.py` (`--dry-run` lists the commands).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
# (title, command, seconds allowed): the slices add up to ~9 minutes.
STEPS: list[tuple[str, list[str], int]] = [
    ("Per-Linear speed, bf16 vs FP8 vs INT8", ["benchmarks/bench_linear.py"], 90),
    ("Block streaming vs resident vs diffusers vs mmgp (4 blocks, 16 GB cap rows)",
     ["benchmarks/bench_offload.py", "--blocks", "4", "--forwards", "1"], 200),
    ("Full pipeline, FP8, 704p x 81 frames under a 16 GB cap, lowest-memory profile",
     ["benchmarks/bench_pipeline.py", "--stages", "1,2,3", "--profile", "8gb", "--budget", "240"], 250),
]


def run_step(title: str, args: list[str], seconds: int) -> str:
    """One script's markdown output (its tables), or a line saying why there is none."""
    command = [sys.executable, *args]
    start = time.perf_counter()
    try:
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=seconds,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path,
                                   "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        status = f"stopped after its {seconds} s slice"
    else:
        out = done.stdout
        status = "ok" if done.returncode == 0 else f"exit code {done.returncode}: {done.stderr.strip()[-300:]}"
    tables = "\n".join(line for line in out.splitlines() if line.startswith("|") or line.startswith("#"))
    took = time.perf_counter() - start
    return f"### {title}\n\n`{shlex.join(['python', *args])}` ({status}, {took:.0f} s)\n\n{tables or '(no table)'}\n"


def section(parts: list[str], device: str, torch_version: str) -> str:
    """The dated RESULTS.md section for one suite run."""
    today = dt.date.today().isoformat()
    return (f"\n## Suite run {today}: {device}, torch {torch_version}\n\n"
            f"Command: `python benchmarks/suite.py`. Synthetic weights, full 14B geometry.\n\n" + "\n".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="list the commands and their time slices, run nothing")
    args = ap.parse_args()
    if args.dry_run:
        for title, cmd, seconds in STEPS:
            print(f"{seconds:4d} s  python {shlex.join(cmd)}  # {title}")
        return
    import torch

    if not torch.cuda.is_available():
        sys.exit("the suite needs a CUDA GPU (see --dry-run)")
    text = section([run_step(*step) for step in STEPS], torch.cuda.get_device_name(), torch.__version__)
    with RESULTS.open("a") as f:
        f.write(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "suite.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
