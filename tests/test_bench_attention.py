"""benchmarks/bench_attention.py: the verdict rule, which kernel rows sage gets, and the whole script's plumbing
on the CPU (tiny preset)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_attention  # noqa: E402

from scail2_lite.config import PRESETS  # noqa: E402


def block_row(backend: str, size: str, tokens: int, ms: float, cosines: list[float]) -> dict:
    return {"size": size, "tokens": tokens, "backend": backend, "ms_per_block": ms, "x40_s": ms * 0.04,
            "blocks": [{"cosine": c, "rel_error": 1 - c} for c in cosines]}


def test_verdict_picks_the_fastest_backend_accurate_at_every_block_and_size() -> None:
    rows = [
        block_row("sdpa", "704p", 95920, 400.0, [1.0, 1.0]),
        block_row("sdpa", "512p", 48832, 130.0, [1.0, 1.0]),
        block_row("flash", "704p", 95920, 390.0, [0.99999, 0.99998]),
        block_row("flash", "512p", 48832, 128.0, [0.99999, 0.99998]),
        # fastest, but drifts below the bar at block 2 of the smaller size only
        block_row("sage", "704p", 95920, 250.0, [0.9995, 0.9991]),
        block_row("sage", "512p", 48832, 90.0, [0.9993, 0.9987]),
        block_row("efficient", "704p", 95920, 260.0, [0.9996, 0.9993]),
        block_row("efficient", "512p", 48832, 95.0, [0.9995, 0.9992]),
        {"size": "704p", "tokens": 95920, "backend": "cudnn", "blocks": [], "error": "RuntimeError: no kernel"},
    ]
    kernel = [{"size": "704p", "attention": a, "backend": b, "rel_error": e, "cosine": 0.99}
              for a, b, e in (("self", "efficient", 0.02), ("cross-img", "efficient", 0.03), ("self", "sage", 0.05),
                              ("self", "flash", 0.5))]
    text = bench_attention.verdict(rows, 0.999, kernel)
    assert "**efficient**" in text
    assert "relative 0.0300, cosine 0.990000 (cross-img attention, 704p)" in text  # its worst kernel row
    loose = bench_attention.verdict(rows, 0.998, kernel)
    assert "**sage**" in loose and "relative 0.0500, cosine 0.990000 (self attention, 704p)" in loose
    assert "at 704p, 1.54x sdpa" in text  # 400 / 260, at the largest size
    assert "sage (cosine 0.99870 after block 2 at 512p)" in text
    assert "cudnn (704p: RuntimeError: no kernel)" in text
    assert "flash" not in text.split("Rejected:")[1]
    assert "**sdpa**" in bench_attention.verdict(rows, 0.9999999)
    assert "no backend reaches" in bench_attention.verdict(rows, 1.1)


def test_sage_gets_kernel_rows_only_where_attention_calls_sageattention(monkeypatch) -> None:
    monkeypatch.setattr(bench_attention, "QUANTIZED_MIN_KEYS", 600)  # between the 512 text keys and a 1024-token q
    rows: list[dict] = []
    bench_attention.kernel_level(PRESETS["tiny"], "cpu", "t", 1024, ["sdpa", "sage"], 1, rows.append)
    assert [(r["attention"], r["backend"]) for r in rows] == [
        ("self", "sdpa"), ("self", "sage"), ("cross-img", "sdpa"), ("cross-text", "sdpa")]
    # the sage backend ran (here without sageattention or without CUDA: an error row, the run goes on)
    assert rows[1]["error"].startswith("UserError: attention backend 'sage' needs")


def test_tiny_cpu_run_writes_rows_errors_and_verdict(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OUT", str(tmp_path))
    report = bench_attention.main(["--tiny", "--sizes", "64x64x5", "--blocks", "2", "--repeats", "1",
                                   "--kernel-reps", "1", "--backends", "math,efficient,sdpa"])
    assert json.loads((tmp_path / "bench_attention.json").read_text()) == report
    kernel = {(r["attention"], r["backend"]): r for r in report["kernel"]}
    assert [r["backend"] for r in report["kernel"][:3]] == ["sdpa", "math", "efficient"]  # sdpa first
    assert {kv for kv, _ in kernel} == {"self", "cross-img", "cross-text"}
    assert kernel["self", "sdpa"]["rel_error"] == 0.0
    assert 0 < kernel["self", "math"]["rel_error"] < 0.01  # a different kernel, bf16-close
    assert kernel["cross-img", "efficient"]["error"].startswith("RuntimeError")  # no CPU kernel: a row, no crash
    block = {r["backend"]: r for r in report["block"]}
    assert len(block["math"]["blocks"]) == 2 and min(b["cosine"] for b in block["math"]["blocks"]) > 0.9999
    assert block["math"]["blocks"][1]["rel_error"] > 0
    assert "error" in block["efficient"]
    assert "efficient (64x64x5: RuntimeError" in report["verdict"]
