"""Process RAM of a clean generation, per memory profile (issue 6 target: the 16 GB profile within 24 GB of RAM,
disk-mapped mode within 12 GB), measured on the full 14B synthetic FP8 folder at 704p x 81 frames.

Each profile runs in a fresh process through the CLI's own path, `scail2-lite profile MODEL --run` (load, umT5
NF4, CLIP, VAE encode, DiT steps, VAE decode; 1 step with CFG; `--vram 16` caps the process to 16e9 bytes with
`set_per_process_memory_fraction`), while this script samples the child's /proc/PID/status every 50 ms: resident
set (VmRSS) split into anonymous memory (RssAnon: the pinned buffer, tensors, Python), file pages (RssFile: mapped
weights being read, libraries) and shared memory (RssShmem: CUDA's pinned staging), and the kernel's own peak
(VmHWM, up to the last sample). The planner's RAM prediction per phase is in the child's JSON report.

The folder and inputs are made by `bench_pipeline.py` stages 1-2 (reused when `--workdir` already holds them).
Run on the GPU machine (~4-5 minutes): `python benchmarks/bench_ram.py --profiles 16gb,lowram`. Prints a markdown
table; with $OUT set, writes $OUT/bench_ram.json and each run's profile JSON/PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

GB = 1e9
FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _workdir import fp8_folder  # noqa: E402


def status(pid: int) -> dict[str, int] | None:
    """The FIELDS of /proc/PID/status in bytes (None once the process is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        key, _, rest = line.partition(":")
        if key in FIELDS:
            out[key] = int(rest.split()[0]) * 1024
    return out


def run_profile(model: Path, files: dict[str, Path], profile: str, out: Path, size: str, steps: int) -> dict:
    """One `profile --run` child under a 16 GB cap; peaks of each resident-set part while it ran."""
    report = out / f"ram_{profile}.json"
    cmd = [sys.executable, "-m", "scail2_lite.cli", "profile", str(model), "--run", "--size", size, "--frames", "81",
           "--steps", str(steps), "--vram", "16", "--profile", profile, "--json", str(report),
           "--plot", str(out / f"ram_{profile}.png")]
    cmd += [arg for name, path in files.items() for arg in (f"--{name.replace('_', '-')}", str(path))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = dict.fromkeys(FIELDS, 0)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(child.stdout), daemon=True)
    reader.start()
    while child.poll() is None:
        now = status(child.pid)
        if now:
            for k, v in now.items():
                peaks[k] = max(peaks[k], v)
        time.sleep(0.05)
    reader.join(timeout=5)
    row = {"profile": profile, "exit": child.returncode, "seconds": time.perf_counter() - start,
           **{f"peak_{k}": v for k, v in peaks.items()}, "output_tail": "".join(lines[-15:])}
    if report.is_file():
        row["report"] = json.loads(report.read_text())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profiles", default="16gb,lowram")
    ap.add_argument("--size", default="704p")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/scail2_bench_pipeline"))
    args = ap.parse_args()
    out = Path(os.environ.get("OUT") or args.workdir / "ram")
    out.mkdir(parents=True, exist_ok=True)
    model, files = fp8_folder(args.workdir)
    rows = []
    for profile in args.profiles.split(","):
        row = run_profile(model, files, profile, out, args.size, args.steps)
        rows.append(row)
        (out / "bench_ram.json").write_text(json.dumps(rows, indent=1, default=str))
        if row["exit"] != 0:
            print(f"{profile}: exit {row['exit']}\n{row['output_tail']}", flush=True)
    print(f"\n### Process RAM, {args.size} x 81 frames, {args.steps} step(s) with CFG, 16e9-byte VRAM cap, "
          "FP8 folder\n")
    print("| profile | exit | s | peak RSS GB (VmHWM) | peak anon GB | peak file GB | peak shmem GB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['profile']} | {r['exit']} | {r['seconds']:.0f} | {r['peak_VmHWM'] / GB:.2f} "
              f"| {r['peak_RssAnon'] / GB:.2f} | {r['peak_RssFile'] / GB:.2f} | {r['peak_RssShmem'] / GB:.2f} |")
    print("\n| profile | phase | s | RSS GB | predicted GB | error |\n|---|---|---|---|---|---|")
    for r in rows:
        for c in r.get("report", {}).get("comparison", []):
            err = c.get("error_ram")
            print(f"| {r['profile']} | {c['phase']} | {c['seconds']:.1f} | {(c.get('measured_rss') or 0) / GB:.2f} "
                  f"| {(c.get('predicted_ram') or 0) / GB:.2f} | {'-' if err is None else f'{err:+.0%}'} |")


if __name__ == "__main__":
    main()
