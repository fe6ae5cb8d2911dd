"""Peak host RAM and throughput of `scail2-lite quantize` on the full-size synthetic checkpoint (issue 5: <= 8 GB).

Usage (repository installed, ~100 GB free disk):
    python benchmarks/bench_quantize_ram.py SYNTH_FULL_FOLDER OUT_FOLDER [--dit fp8|int8]
where SYNTH_FULL_FOLDER comes from `scail2-lite synth --scale full --format wan -o ...`. Runs the CLI in a child
process and prints a markdown row: scheme, wall seconds, source GB/s, peak RSS of the child (ru_maxrss).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--dit", default="fp8")
    args = ap.parse_args()
    src_bytes = sum(p.stat().st_size for p in args.src.rglob("*.safetensors"))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "scail2_lite.cli", "quantize", str(args.src), "-o", str(args.out),
                    "--dit", args.dit, "--force"], check=True)
    wall = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9  # Linux reports KiB
    print("| scheme | wall s | source GB/s | peak RSS GB |\n|---|---|---|---|")
    print(f"| {args.dit} | {wall:.0f} | {src_bytes / wall / 1e9:.2f} | {peak_gb:.2f} |")


if __name__ == "__main__":
    main()
