"""benchmarks/bench_pipeline.py stage 6 (issue 8's long runs) on the CPU: the tiny pipeline run saves its latents
file, a cached run compared against it reports the deviation and the time ratio, and bad options fail up front."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_pipeline.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_pipeline as bp  # noqa: E402


def _run(tmp: Path, out: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(tmp / out)}
    return subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--stages", "1,2,6", "--workdir", str(tmp / "w"),
                           *args], capture_output=True, text=True, env=env, timeout=120)


def _stage6(out: Path) -> dict:
    stages = json.loads((out / "pipeline.json").read_text())["stages"]
    return next(v for k, v in stages.items() if k.startswith("6_"))


def test_long_run_then_cached_run_against_it(tmp_path: Path) -> None:
    first = _run(tmp_path, "a", "--steps", "12")
    assert first.returncode == 0, first.stderr[-2000:]
    ref_file = tmp_path / "a" / "latents_512p_12steps_g5_unipc_off.pt"
    saved = torch.load(ref_file, weights_only=True)
    assert saved["latents"].dtype == torch.float32 and saved["seconds"]["total"] > 0
    assert saved["settings"]["cache"] == "off" and saved["settings"]["steps"] == 12
    assert "| 512p | 17 | 16gb | 12 | 5 | unipc | off | 24 | 0 |" in first.stdout

    second = _run(tmp_path, "b", "--steps", "12", "--cache", "magcache", "--cache-threshold", "0.5",
                  "--reference", str(ref_file))
    assert second.returncode == 0, second.stderr[-2000:]
    run = _stage6(tmp_path / "b")["long_run"]
    computed, skipped = run["forwards"]
    assert computed + skipped == 24 and skipped > 0
    cmp = run["vs_reference"]
    assert 0 < cmp["relative_error"] < 1 and 0 < cmp["cosine"] < 1
    assert cmp["total_seconds_ratio"] == pytest.approx(saved["seconds"]["total"] / run["seconds"]["total"])
    assert set(cmp["differs"]) == {"cache", "cache_threshold"}
    assert "### vs reference `latents_512p_12steps_g5_unipc_off.pt`" in second.stdout
    assert (tmp_path / "b" / "latents_512p_12steps_g5_unipc_magcache0.5.pt").is_file()


def test_compare_identical_and_mismatched() -> None:
    z = torch.randn(1, 16, 2, 4, 4)
    settings = {"steps": 4, "cache": "off"}
    ref = {"latents": z.clone(), "seconds": {"total": 30.0, "dit": 20.0}, "settings": settings}
    same = bp._compare(z, ref, {"total": 10.0, "dit": 5.0, "settings": settings})
    assert same["relative_error"] == 0 and same["cosine"] == pytest.approx(1.0)
    assert same["total_seconds_ratio"] == 3.0 and same["dit_seconds_ratio"] == 4.0 and same["differs"] == {}
    other = bp._compare(torch.zeros(1, 16, 1, 4, 4), {**ref, "seconds": None}, {"total": 1.0, "dit": None,
                                                                                "settings": {**settings, "steps": 40}})
    assert "latent shapes differ" in other["error"] and other["differs"] == {"steps": (4, 40)}


def test_bad_options_fail_before_any_stage(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    torch.save(torch.zeros(3), bad)
    for args, message in ((["--reference", str(bad)], "not a latents file"),
                          (["--cache-threshold", "0.1"], "needs --cache"),
                          (["--solver", "nope"], "unknown solver")):
        r = _run(tmp_path, "c", *args)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr[-500:])
        assert not (tmp_path / "w").exists()
