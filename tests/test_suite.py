"""benchmarks/suite.py on the CPU: the time budget, the markdown it records, and a real subprocess that fails or
overruns its slice."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import suite  # noqa: E402


def test_steps_fit_the_device_call() -> None:
    assert sum(seconds for _, _, seconds in suite.STEPS) <= suite.BUDGET <= 540
    for title, command, seconds in suite.STEPS:
        assert (suite.ROOT / command[0]).is_file(), command[0]
        assert title and seconds > 0


def test_offload_step_arguments_parse() -> None:
    """The suite's bench_offload command line (its `--attention` backends included) passes the script's checks."""
    import bench_offload

    (command,) = [command for _, command, _ in suite.STEPS if command[0] == "benchmarks/bench_offload.py"]
    args = bench_offload.parse_args(command[1:])
    assert args.attention == ["fp8"] and args.blocks == 3 and list(args.caps) == ["16GB"]


def test_dry_run_lists_every_step(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "argv", ["suite.py", "--dry-run"])
    suite.main()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(suite.STEPS) + 1
    assert all(f"python {command[0]}" in line for line, (_, command, _) in zip(lines, suite.STEPS))
    assert lines[-1].split()[:2] == [str(sum(s for _, _, s in suite.STEPS)), "s"]


def test_markdown_keeps_tables_and_the_tail_of_a_failure() -> None:
    out = "[ 1s] progress\n| a | b |\n|---|---|\nnote: something\n> context\nchatter\n"
    ok = suite.step_markdown("T", ["x.py", "--k"], "ok", 3.2, out, "warning")
    assert ok.startswith("### T\n\n`python x.py --k` (ok, 3 s)")
    assert "| a | b |" in ok and "note: something" in ok and "> context" in ok
    assert "progress" not in ok and "warning" not in ok
    failed = suite.step_markdown("T", ["x.py"], "exit code 1", 1.0, out, "Traceback\nValueError: bad")
    assert "```text\n[ 1s] progress\nchatter\nTraceback\nValueError: bad\n```" in failed
    assert "(no table)" in suite.step_markdown("T", ["x.py"], "ok", 0.0, "nothing\n")
    summary = "## Stage 3\n| early | 1 |\n## Results\n### Stage 3\n| final | 1 |\nVerdict: fine\n"
    text = suite.step_markdown("T", ["x.py"], "ok", 1.0, summary)
    assert "early" not in text and "#### Stage 3\n| final | 1 |\nVerdict: fine" in text and "## Results" not in text


def test_missing_script_is_recorded_not_run() -> None:
    text = suite.run_step("T", ["benchmarks/does_not_exist.py"], 5)
    assert "not run: benchmarks/does_not_exist.py does not exist" in text


def test_real_subprocess_timeout_and_failure(tmp_path: Path) -> None:
    slow = tmp_path / "slow.py"
    slow.write_text("import time\nprint('| row | 1 |', flush=True)\nprint('[0s] measured one', flush=True)\n"
                    "time.sleep(30)\n")
    text = suite.run_step("slow", [str(slow)], 3)
    assert "stopped after its 3 s slice" in text and "| row | 1 |" in text and "[0s] measured one" in text
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nprint('| partial |')\nsys.exit('boom')\n")
    text = suite.run_step("bad", [str(bad)], 20)
    assert "exit code 1" in text and "| partial |" in text and "boom" in text


def test_section_is_dated() -> None:
    text = suite.section(["### a\n", "### b\n"], "GPU X", "2.11")
    assert text.startswith("\n## Suite run ") and "GPU X, torch 2.11" in text and text.endswith("### a\n\n### b\n")


def test_unused_time_carries_over_within_the_total() -> None:
    slices = [seconds for _, _, seconds in suite.STEPS]
    assert suite.slice_for(0, 0.0) == slices[0]
    assert suite.slice_for(1, slices[0] - 10.0) == slices[1] + 10  # the first step finished 10 s early
    assert suite.slice_for(1, slices[0] + 5.0) == slices[1] - 5  # the first one overran (kill, clean-up)
    last = len(slices) - 1
    assert suite.slice_for(last, sum(slices) + 100.0) == 1  # already past the total: one second, not a negative
