"""The benchmark suite in one command (issue 7): per-Linear speed, attention backends, offload vs peers with
bf16/FP8/INT8 weights, full pipeline under a cap.

Runs the question scripts one after another as subprocesses (each keeps its own CUDA context and peak counters),
sized to finish inside one 10-minute device call on an H100: the slices add up to BUDGET seconds (machine start-up
takes the rest) and a step may also use what earlier steps left of theirs. Then appends one dated section to
`benchmarks/RESULTS.md` (device, torch, command, every script's tables) and copies it to `$OUT/suite.md` when
`OUT` is set. A script that fails or runs out of its time is recorded as such, with the tail of its progress
output; the others still run. Order matters: Triton caches compiled kernels on disk, so the INT8 GEMM
(bench_linear) and sage's kernels (bench_attention) are compiled before bench_offload's warm-ups need them.

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
BUDGET = 540  # seconds for all slices: the device call allows 600 and the machine's start counts against it
# (title: what the step answers, command, seconds allowed). Estimates from RESULTS.md's figures (H100): see each.
STEPS: list[tuple[str, list[str], int]] = [
    # ~25-30 s: 6 shapes x 5 variants x 13 calls of <= 20 ms, INT8 autotuning, CUDA start.
    ("Per-Linear speed at 512p/704p token counts: bf16 vs FP8 vs INT8 (issue 5: FP8 >= 1.35x, INT8 >= 1.2x at 704p)",
     ["benchmarks/bench_linear.py"], 35),
    # Measured 110-116 s in the 2026-11-25 suite runs.
    ("Attention backends: speed and error against SDPA (issue 6, deliverable 5: which backend may be a default)",
     ["benchmarks/bench_attention.py"], 125),
    # ~150-160 s (measured 149 and 158 s): 30 measurements of 2 forwards of 3 blocks (~55 s at 0.16 / 0.47 s per
    # bf16 block at 512p / 704p, fp8/int8 a little less, fp8 attention 0.75x at 704p, leaf level +20-30%), CUDA start
    # and imports (~8 s), block generation and pinning (~12 s), INT8 autotuning at the chunk shapes (~15-30 s),
    # diffusers and mmgp set-up (~15 s), input generation, allocator clean-up and output checks (~10 s).
    ("Offload at a 16 GB cap, 512p and 704p: ours (two slots, one slot, layer by layer) vs resident vs diffusers "
     "block/leaf vs mmgp; "
     "bf16 vs FP8 vs INT8 per forward; FP8 + fp8 attention (self-attention; SDPA cross) vs diffusers bf16 (issue 6: "
     "<= 0.7x)",
     ["benchmarks/bench_offload.py", "--blocks", "3", "--forwards", "1", "--caps", "16GB", "--attention", "fp8"],
     165),
    # 180-215 s measured: synthetic encoders (~20 s), DiT drawn and written FP8 (~25 s), load, 704p phases (~130 s).
    ("Full pipeline, FP8, 704p x 81 frames under a 16 GB cap, lowest-memory profile: peak <= 8 GB (issue 6), "
     "planner error per phase (issue 7)",
     ["benchmarks/bench_pipeline.py", "--stages", "1,2,3", "--profile", "layers"], 215),
]
TAIL_LINES = 30  # progress lines kept from a script that failed or ran out of time
KEPT = ("|", "#", "> ", "note", "Verdict")  # output lines that go to RESULTS.md: tables, headings, context, notes
SUMMARY = "## Results"  # the heading of bench_pipeline.py's closing summary


def slice_for(index: int, elapsed: float) -> int:
    """Seconds step `index` may run: its own slice plus what the earlier steps left unused, so a quick step gives
    its margin to the next ones and the suite still ends within the sum of the slices."""
    return max(1, int(sum(seconds for _, _, seconds in STEPS[: index + 1]) - elapsed))


def step_markdown(title: str, args: list[str], status: str, took: float, stdout: str, stderr: str = "") -> str:
    """One step's part of the section: its tables and notes; for a step that did not finish, also the tail of its
    progress output and stderr (partial results: the scripts log each measurement as it finishes)."""
    lines = stdout.splitlines()
    if SUMMARY in lines:  # a script that ends with a summary repeats its tables there: keep the summary only
        lines = lines[lines.index(SUMMARY) + 1 :]
    # the scripts' own headings go under the step's "###"
    kept = "\n".join("####" + line.lstrip("#") if line.startswith("#") else line
                     for line in lines if line.startswith(KEPT))
    text = f"### {title}\n\n`{shlex.join(['python', *args])}` ({status}, {took:.0f} s)\n\n{kept or '(no table)'}\n"
    if status != "ok":
        rest = [line for line in lines if not line.startswith(KEPT)][-TAIL_LINES:]
        rest += stderr.strip().splitlines()[-TAIL_LINES:]
        if rest:
            text += "\n```text\n" + "\n".join(rest) + "\n```\n"
    return text


def _text(captured: str | bytes | None) -> str:
    """What a timed-out subprocess left (bytes, whatever `text=` said)."""
    return captured.decode(errors="replace") if isinstance(captured, bytes) else (captured or "")


def run_step(title: str, args: list[str], seconds: int) -> str:
    """Run one script in its time slice; returns its markdown part (see `step_markdown`)."""
    if not (ROOT / args[0]).is_file():
        return step_markdown(title, args, f"not run: {args[0]} does not exist", 0.0, "")
    start = time.perf_counter()
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path,
           "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    try:
        done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=seconds,
                              env=env)
    except subprocess.TimeoutExpired as e:
        out, err, status = _text(e.stdout), _text(e.stderr), f"stopped after its {seconds} s slice"
    else:
        out, err = done.stdout, done.stderr
        status = "ok" if done.returncode == 0 else f"exit code {done.returncode}"
    return step_markdown(title, args, status, time.perf_counter() - start, out, err)


def section(parts: list[str], device: str, torch_version: str) -> str:
    """The dated RESULTS.md section for one suite run."""
    today = dt.date.today().isoformat()
    return (f"\n## Suite run {today}: {device}, torch {torch_version}\n\n"
            f"Command: `python benchmarks/suite.py`. Synthetic weights, full 14B geometry.\n\n" + "\n".join(parts))


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="list the commands and their time slices, run nothing")
    args = ap.parse_args()
    if args.dry_run:
        for title, cmd, seconds in STEPS:
            missing = "" if (ROOT / cmd[0]).is_file() else "  (script missing)"
            print(f"{seconds:4d} s  python {shlex.join(cmd)}{missing}  # {title}")
        print(f"{sum(seconds for _, _, seconds in STEPS):4d} s  in all (budget {BUDGET} s)")
        return
    import torch

    if not torch.cuda.is_available():
        sys.exit("the suite needs a CUDA GPU (see --dry-run)")
    t0 = time.perf_counter()
    parts = []
    for index, (title, command, _) in enumerate(STEPS):
        seconds = slice_for(index, time.perf_counter() - t0)
        print(f"[suite {time.perf_counter() - t0:5.0f}s] {title} (up to {seconds} s)", flush=True)
        parts.append(run_step(title, command, seconds))
        print(parts[-1].split("\n")[2], flush=True)  # the command line with its status and time
    # Asked only now: the suite's own CUDA context would otherwise sit beside every script's.
    text = section(parts, torch.cuda.get_device_name(), torch.__version__)
    write_atomic(RESULTS, RESULTS.read_text() + text)
    if os.environ.get("OUT"):
        write_atomic(Path(os.environ["OUT"], "suite.md"), text)
    print(text)


if __name__ == "__main__":
    main()
