"""benchmarks/bench_cards.py on the CPU. Its VAE traces: the live tensors of the full-width VAE decode per output
pixel and of its encode per input pixel, the sources of the planner's VAE model, still match
`planner.VAE_DECODE_TENSOR_BYTES_PER_PIXEL` and `vae_tiles`' encode figures (which decide the encode's tiles). Its
detached parts: the child runs from its own copy of the code and a later call collects it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import pytest  # noqa: E402
from _vae_decode import trace_bytes_per_pixel, trace_encode_bytes_per_pixel  # noqa: E402
from bench_cards import collect, detach, private_code  # noqa: E402

from scail2_lite.offload.planner import (  # noqa: E402
    VAE_DECODE_BY_FRAME_TENSOR_BYTES_PER_PIXEL, VAE_DECODE_TENSOR_BYTES_PER_PIXEL,
)
from scail2_lite.vae_tiles import ENCODE_IMAGE_BYTES_PER_PIXEL, ENCODE_VIDEO_BYTES_PER_PIXEL  # noqa: E402


@pytest.mark.parametrize("by_frame, figure", [(False, VAE_DECODE_TENSOR_BYTES_PER_PIXEL),
                                               (True, VAE_DECODE_BY_FRAME_TENSOR_BYTES_PER_PIXEL)])
def test_traced_decode_tensors_match_the_planners_figure(by_frame: bool, figure: int) -> None:
    """32x32 px tiles (4x4 latent) carry the most padding per pixel: the trace sits 0-3% above the figure for large
    tiles (four frames at a time 19,794 B/px when measured, the fit's asymptote 19,486; by frame 14,733 and
    14,583)."""
    per_px = trace_bytes_per_pixel("full", 4, latent_frames=3, by_frame=by_frame)
    assert figure <= per_px <= figure * 1.03


@pytest.mark.parametrize("frames, figure", [(1, ENCODE_IMAGE_BYTES_PER_PIXEL), (9, ENCODE_VIDEO_BYTES_PER_PIXEL)])
def test_traced_encode_tensors_match_the_figures(frames: int, figure: int) -> None:
    """One frame (a reference) runs the first causal chunk alone; 9 frames reach the steady 4-frame chunks."""
    assert trace_encode_bytes_per_pixel("full", frames, 64) == pytest.approx(figure, rel=0.02)


def test_the_private_copy_holds_the_package_as_pyproject_maps_it(tmp_path: Path) -> None:
    """`scail2_lite.quantize` lives in the top-level `quantize/` folder: a child importing from the copy alone must
    find it, and the profiles' TOML files, there."""
    code = private_code(tmp_path / "code")
    probe = ("import scail2_lite, scail2_lite.quantize.linear as q, scail2_lite.profiles as p; "
             "print(scail2_lite.__file__); print(q.__file__); print(p.__path__[0])")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(code)}).stdout.split()
    assert len(out) == 3 and all(Path(f).is_relative_to(code) for f in out), out
    assert list((code / "scail2_lite" / "profiles").glob("*.toml"))
    assert (code / "benchmarks" / "bench_cards.py").is_file()


def test_a_detached_part_is_collected_after_it_ends(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """No parts: the child only starts (from its copy), writes its results and says it is done."""
    work = tmp_path / "work"
    detach(["--tiny", "--parts", "none", "--workdir", str(work)], work, "proof")
    collect(work, "proof", wait=240)
    printed = capsys.readouterr().out
    assert "proof: finished" in printed and "Traceback" not in printed, printed
    assert (work / "detached" / "proof" / "tables.md").is_file()


def test_the_latents_part_runs_each_backend_against_sdpa(tmp_path: Path) -> None:
    """The tiny model, 2 steps under sdpa and then math: sdpa against itself is exact, and math differs (so the
    backend reaches the model's attention) by no more than rounding."""
    import json

    env = {**os.environ, "OUT": str(tmp_path / "out")}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_cards.py"), "--tiny", "--parts", "latents",
                    "--workdir", str(tmp_path / "work")], env=env, check=True, capture_output=True, timeout=600)
    stages = json.loads((tmp_path / "out" / "cards.json").read_text())["stages"]
    assert stages["latents_sdpa_vs_sdpa"]["relative_error"] == 0.0
    math = stages["latents_math_vs_sdpa"]
    assert 0.0 < math["relative_error"] < 0.05 and math["cosine"] > 0.999
    assert stages["latents_math"]["settings"]["attention"] == "math"
