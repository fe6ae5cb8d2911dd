"""The FP8 folder and inputs that `bench_pipeline.py` stages 1-2 leave in a work folder, for the scripts that run
on them (torch-free: bench_ram's parent process only watches its children)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def input_files(inputs: Path) -> dict[str, Path]:
    """Stage 1's reference image, its mask, the driving video and its mask, by `Pipeline` keyword."""
    return dict(image=inputs / "ref.png", mask_image=inputs / "ref_mask.png", pose=inputs / "driving",
                mask_video=inputs / "driving_mask")


def fp8_folder(workdir: Path, tiny: bool = False) -> tuple[Path, dict[str, Path]]:
    """(the FP8 model folder, its input files) in `workdir`, made by running stages 1-2 when they are missing."""
    model = workdir / "fp8"
    if not (model / "manifest.json").is_file():
        subprocess.run([sys.executable, str(HERE / "bench_pipeline.py"), "--stages", "1,2", "--workdir", str(workdir),
                        "--keep", *(["--tiny"] if tiny else [])], check=True)
    return model, input_files(workdir / "src" / "inputs")
