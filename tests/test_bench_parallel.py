"""benchmarks/bench_parallel.py's CPU proof (tiny DiT, gloo, 1, 2 and 4 ranks, ~10 s): every split's latents are
one process's bit for bit, every rank holds the same, and the JSON record and table are written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_parallel  # noqa: E402


def test_tiny_run_every_split_matches_one_process(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    result = bench_parallel.main(["--tiny", "--steps", "1"])
    runs = {(r["world"], r["split"], r["guidance"]) for r in result["runs"]}
    assert runs == {(1, "one process", 5.0), (1, "one process", 1.0), (2, "cfg 2 over 2 ranks", 5.0),
                    (2, "ulysses 2 over 2 ranks", 5.0), (2, "ulysses 2 over 2 ranks", 1.0),
                    (4, "cfg 2 x ulysses 2 over 4 ranks", 5.0), (4, "ulysses 4 over 4 ranks", 5.0),
                    (4, "ulysses 4 over 4 ranks", 1.0)}
    assert all(r["equal"] and r["ranks_agree"] and r["rel_error"] == 0 for r in result["runs"])
    assert [(a["world"], a["transport"]) for a in result["all_to_all"]] == [(2, "gloo"), (4, "gloo")]
    assert all(a["tokens"] == 114 and a["bytes_sent_per_rank"] > 0 for a in result["all_to_all"])
    assert "failed" not in result
    assert json.loads((tmp_path / "parallel.json").read_text())["runs"] == json.loads(json.dumps(result["runs"]))
    assert "| 4 | cfg 2 x ulysses 2 over 4 ranks | 5 |" in capsys.readouterr().out
