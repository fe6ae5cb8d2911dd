"""benchmarks/bench_offload.py on the CPU: argument checks, the run plan, the comparison tables' arithmetic, the
attention backend scope of a measurement, and that diffusers' block-level offloading prefetches on the harness's
wrapper."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_offload as bo  # noqa: E402
from scail2_lite.blocks import Kernels  # noqa: E402



def test_defaults_and_plan() -> None:
    args = bo.parse_args([])
    assert args.caps == bo.CAPS and args.sizes == ["512p", "704p"] and args.attention == ["sdpa"]
    two, one, layers = bo.TWO_SLOTS, bo.ONE_SLOT, bo.LAYERS
    assert bo.plan(args) == [("bf16", True, [(two, ["sdpa"]), (one, ["sdpa"]), (layers, ["sdpa"])]),
                             ("fp8", True, [(two, ["sdpa"]), (one, ["sdpa"]), (layers, ["sdpa"])]),
                             ("int8", True, [(two, ["sdpa"])])]


def test_plan_with_attention_and_filters() -> None:
    two, one, layers = bo.TWO_SLOTS, bo.ONE_SLOT, bo.LAYERS
    args = bo.parse_args(["--attention", "sage,flash,sdpa,sage", "--skip",
                          "int8,ours-1slot,fp8-1slot,ours-layers,fp8-layers", "--caps", "16GB"])
    assert args.caps == {"16GB": 16e9}
    assert bo.plan(args) == [("bf16", True, [(two, ["sdpa"])]), ("fp8", True, [(two, ["sdpa", "sage", "flash"])])]
    only = bo.parse_args(["--only", "fp8-attention", "--attention", "sage"])
    assert bo.plan(only) == [("fp8", False, [(two, ["sage"])])]
    assert bo.plan(bo.parse_args(["--only", "diffusers-block,mmgp"])) == []
    light = bo.parse_args(["--only", "fp8-1slot,fp8-layers,fp8-attention", "--attention", "fp8"])
    assert bo.plan(light) == [("fp8", False, [(two, ["fp8"]), (one, ["fp8"]), (layers, ["fp8"])])]
    assert bo.plan(bo.parse_args(["--only", "ours-layers"])) == [("bf16", False, [(layers, ["sdpa"])])]


@pytest.mark.parametrize("argv", [["--skip", "nope"], ["--caps", "8GB"], ["--attention", "fast"],
                                  ["--sizes", "1080p"], ["--blocks", "0"]])
def test_bad_arguments_exit(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        bo.parse_args(argv)


def _row(method: str, dtype: str, size: str, cap: float | None, s: float | None = None, peak: float = 0.0,
         error: str | None = None) -> dict:
    row = {"method": method, "dtype": dtype, "size": size, "cap": cap}
    if error:
        return {**row, "error": error}
    return {**row, "s_per_forward": s, "peak_allocated": peak}


def test_versus_ratios_errors_and_matching() -> None:
    ours, block, leaf = bo.ours_label(bo.TWO_SLOTS), bo.DIFFUSERS_BLOCK, bo.DIFFUSERS_LEAF
    rows = [
        _row(ours, "bf16", "512p", 16e9, 1.0, 6e9),
        _row(ours, "bf16", "704p", 16e9, 3.0, 9e9),
        _row(ours, "fp8", "704p", 16e9, 1.0, 1e9),  # another dtype: not ours here
        _row(block, "bf16", "512p", 16e9, 2.0, 4e9),
        _row(block, "bf16", "704p", 16e9, error="out of memory"),
        _row(block, "bf16", "704p", None, 5.0, 5e9),  # no run of ours at this cap
        _row(leaf, "bf16", "512p", 16e9, 0.5, 3e9),
    ]
    table = bo.versus(rows, (ours, "bf16"), [(block, "bf16"), (leaf, "bf16")])
    assert [(e["peer"].split(",")[1].strip(), e["size"]) for e in table] == [
        ("block level", "512p"), ("block level", "704p"), ("leaf level", "512p")]
    assert table[0]["time_ratio"] == pytest.approx(0.5) and table[0]["peak_ratio"] == pytest.approx(1.5)
    assert table[1]["peer_error"] == "out of memory" and "time_ratio" not in table[1]
    assert table[2]["time_ratio"] == pytest.approx(2.0)


def test_vs_reference() -> None:
    ref = torch.randn(1, 64, 8)
    assert bo.vs_reference({"output": ref.clone()}, ref) == {"bit_exact_vs_resident": True}
    assert bo.vs_reference({"output": ref + 1e-3}, ref) == {"bit_exact_vs_resident": False}
    assert bo.vs_reference({}, ref) == {} and bo.vs_reference({"output": ref}, None) == {}
    close = bo.vs_reference({"output": ref * 1.01}, ref, exact=False)
    assert close["rel_err_vs_sdpa"] == pytest.approx(0.01, rel=1e-3)
    assert close["cosine_vs_sdpa"] == pytest.approx(1.0, abs=1e-6)


def test_labels() -> None:
    assert bo.ours_label(bo.TWO_SLOTS) == "ours: 0 resident, prefetch 1"
    assert bo.ours_label(bo.ONE_SLOT) == "ours: 0 resident, prefetch 0 (one slot)"
    assert bo.ours_label(bo.TWO_SLOTS, "sage") == "ours: 0 resident, prefetch 1, sage attention"
    assert bo.ours_label(bo.LAYERS, "fp8") == "ours: 0 resident, layer by layer, fp8 attention"


def test_measure_with_runs_under_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def fake_measure(model: nn.Module, size: str, cap: float | None, forwards: int, keep: bool,
                     kernels: Kernels = Kernels()) -> dict:
        seen.append(kernels.attention)
        if kernels.attention == "flash":
            raise RuntimeError("no flash kernel for this input")
        return {"size": size, "cap": cap, "s_per_forward": 1.0}

    monkeypatch.setattr(bo, "measure", fake_measure)
    assert bo.measure_with("sdpa", None, "512p", 16e9, 1, False)["s_per_forward"] == 1.0
    row = bo.measure_with("flash", None, "512p", 16e9, 1, False)  # a kernel failure: a row, the run goes on
    assert row["error"] == "RuntimeError: no flash kernel for this input"
    assert seen == ["sdpa", "flash"]


def test_missing_backend_gives_an_error_row(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise bo.UserError(f"attention backend {name!r} needs a package")

    monkeypatch.setattr("scail2_lite.attention.resolve", missing)
    row = bo.measure_with("sage", None, "512p", 16e9, 1, False)  # raised on entering: the model is never called
    assert row["size"] == "512p" and row["error"].startswith("attention sage unavailable: UserError")


class _Bare(nn.Module):
    """The harness's wrapper as it was: nothing but the block list."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])


def test_diffusers_block_level_prefetches_on_the_harness_wrapper(monkeypatch: pytest.MonkeyPatch) -> None:
    group_offloading = pytest.importorskip("diffusers.hooks.group_offloading")

    class Stream:
        def synchronize(self) -> None:
            pass

    class Backend:  # streams without CUDA: enough for diffusers to build its hooks
        def __init__(self, device: torch.device) -> None:
            self.Stream = Stream

        def current_stream(self) -> Stream:
            return Stream()

    monkeypatch.setattr(group_offloading, "TorchDeviceBackend", Backend)
    results = []
    for model in (_Bare(), bo.Blocks([nn.Linear(4, 4) for _ in range(3)])):
        group_offloading.apply_group_offloading(model, onload_device=torch.device("cuda"), offload_type="block_level",
                                                num_blocks_per_group=1, use_stream=True, low_cpu_mem_usage=True)
        results.append(bo.diffusers_prefetches(model))
    assert results == [False, True]


def test_printed_tables_are_well_formed(capsys: pytest.CaptureFixture) -> None:
    ours, sage = bo.ours_label(bo.TWO_SLOTS), bo.ours_label(bo.TWO_SLOTS, "sage")
    rows = [
        {**_row("resident", "bf16", "704p", None, 2.8, 12e9), "ratio": 1.0, "peak_reserved": 13e9,
         "peak_allocated_40_blocks": 40e9},
        {**_row(ours, "bf16", "704p", 16e9, 2.8, 9e9), "ratio": 1.0, "peak_reserved": 10e9,
         "bit_exact_vs_resident": True},
        {**_row(sage, "fp8", "704p", 16e9, 1.5, 8e9), "peak_reserved": 9e9, "rel_err_vs_sdpa": 0.01,
         "cosine_vs_sdpa": 0.9999},
        {**_row(bo.DIFFUSERS_BLOCK, "bf16", "704p", 16e9, 2.9, 9e9), "peak_reserved": 10e9},
        _row(bo.DIFFUSERS_LEAF, "bf16", "704p", 16e9, error="out of memory"),
    ]
    report = {"device": "GPU", "torch": "2.x", "pinned_h2d_GBps": 50.0, "attention": ["sage"], "rows": rows,
              "notes": ["a note"]}
    bo.print_tables(report, 3, 1)
    out = capsys.readouterr().out
    tables = [block.splitlines() for block in out.split("\n\n") if block.startswith("|")]
    assert len(tables) == 3  # every row, ours vs peers, FP8 + sage (no FP8 + sdpa row: no table)
    for table in tables:
        assert len({line.count("|") for line in table}) == 1, table
    assert "| 0.517 |" in out and "met |" in out and "out of memory" in out and "note: a note" in out
