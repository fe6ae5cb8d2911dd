"""`scail2-lite profile`: plan mode for a table of cards (CPU, no weights), its JSON, bad input; the PhaseRecorder
on CPU (times, RSS timeline, JSON, plot); the measured-vs-predicted comparison; `--run` on a tiny checkpoint."""

from __future__ import annotations

import json
import mmap
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from scail2_lite import profiling
from scail2_lite.cli import app
from scail2_lite.config import SIZES
from scail2_lite.offload.card import CUDA_CONTEXT, DESKTOP_RESERVE, DeviceMemory, card_bytes
from scail2_lite.offload.planner import PHASES, list_profiles, plan
from scail2_lite.loader import describe_model
from scail2_lite.synth import dit_config, synth, tiny_config

runner = CliRunner()
C14 = dit_config("full")


def plan_json(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "plan.json"
    result = runner.invoke(app, ["profile", "--synthetic", "full", *args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    "size,weights,vram,ram,expected",
    [
        ("704p", "bf16", 12, 64, "24gb"),
        ("704p", "bf16", 16, 64, "24gb"),
        ("704p", "bf16", 24, 64, "24gb"),
        ("512p", "bf16", 8, 64, "24gb"),
        ("704p", "fp8", 32, 64, "resident"),
        ("704p", "fp8", 16, 12, "lowram"),  # pinned 8-bit blocks do not fit 12 GB of RAM: map them
    ],
)
def test_plan_mode_picks_the_planners_profile(tmp_path: Path, size, weights, vram, ram, expected) -> None:
    data = plan_json(tmp_path, "--size", size, "--vram", str(vram), "--ram", str(ram), "--weights", weights)
    p = data["plan"]
    assert p["profile"] == expected and p["fits"]
    card = DeviceMemory.card(card_bytes(vram))
    assert p["peak_vram_reserved"] <= card.allocator_budget() and p["peak_ram"] <= ram * 1e9
    assert p["peak_process_total"] == p["peak_vram_reserved"] + CUDA_CONTEXT <= card.total - card.desktop
    # The CLI reports what the library plans: same choice, same figures.
    direct = plan(C14, *SIZES[size], 81, card, int(ram * 1e9), weights=weights, mappable=weights != "bf16")
    assert p == profiling.plan_to_json(direct)


def test_plan_json_structure_and_fits_on(tmp_path: Path) -> None:
    data = plan_json(tmp_path, "--size", "704p", "--vram", "16", "--ram", "64")
    assert (data["height"], data["width"], data["frames"]) == (704, 1280, 81)
    assert set(data["plan"]["phases"]) == set(PHASES)
    for mem in data["plan"]["phases"].values():
        assert set(mem) == {"vram", "vram_reserved", "process_total", "ram"} and mem["vram_reserved"] >= mem["vram"]
        assert mem["process_total"] == mem["vram_reserved"] + CUDA_CONTEXT
    assert data["plan"]["resident_blocks"] + data["plan"]["streamed_blocks"] == 40
    # 704p bf16 does not fit an 8 GB card beside its CUDA context and a desktop (layer streaming would need
    # 6.9 GB of the 6.7 left); every larger common card fits.
    assert data["fits_on"]["8"] is None
    assert all(data["fits_on"][gb] not in (None, "layers") for gb in ("12", "16", "24", "32"))
    assert [p["profile"] for p in data["profiles"]] == [p.name for p in list_profiles()]
    for p in data["profiles"]:
        budget = card_bytes(16) - CUDA_CONTEXT - DESKTOP_RESERVE
        assert p["fits"] == (p["peak_vram_reserved"] <= budget and p["peak_ram"] <= 64e9)


def test_plan_mode_printout(tmp_path: Path) -> None:
    result = runner.invoke(app, ["profile", "--synthetic", "full", "--size", "704p", "--vram", "16", "--ram", "64"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in ("profile 24gb", "fastest that fits", "dit_step", "fits on: 12 GB (24gb, decode 704x432 px tiles (4))",
                 "(NVML)", "every profile", "VAE decode 704x576 px tiles (3)"):
        assert text in result.output


def test_plan_mode_shows_the_decode_tiles_and_vae_tile_overrides_them(tmp_path: Path) -> None:
    auto = plan_json(tmp_path, "--size", "704p", "--vram", "24", "--ram", "64", "--weights", "fp8")["plan"]
    assert auto["vae_decode_tiling"] is None and auto["vae_decode_by_frame"]  # untiled, by frame
    tiled = plan_json(tmp_path, "--size", "704p", "--vram", "24", "--ram", "64", "--weights", "fp8",
                      "--vae-tile", "256")["plan"]
    assert tiled["vae_decode_tiling"] == {"height": 256, "width": 256, "stride_h": 192, "stride_w": 192}
    assert not tiled["vae_decode_by_frame"]  # four frames at a time fit in these tiles
    assert tiled["phases"]["vae_decode"]["vram"] < auto["phases"]["vae_decode"]["vram"]
    # --vae-tile tiles the encode too
    assert tiled["phases"]["vae_encode"]["vram"] < auto["phases"]["vae_encode"]["vram"]
    vae = ("vae_encode", "vae_decode")
    assert {k: v for k, v in tiled["phases"].items() if k not in vae} == {
        k: v for k, v in auto["phases"].items() if k not in vae}
    untiled = plan_json(tmp_path, "--size", "704p", "--vram", "16", "--ram", "64", "--weights", "fp8",
                        "--vae-tile", "0")["plan"]
    assert untiled["vae_decode_tiling"] is None and not untiled["fits"] and "--vae-tile" in untiled["reason"]
    result = runner.invoke(app, ["profile", "--synthetic", "full", "--size", "704p", "--vram", "24", "--ram", "64",
                                 "--vae-tile", "0"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "VAE decode untiled, by frame (--vae-tile)" in result.output, result.output
    assert "VAE encode untiled (--vae-tile)" in result.output


def test_plan_mode_counts_extra_references(tmp_path: Path) -> None:
    plain = plan_json(tmp_path, "--size", "512p", "--vram", "16", "--ram", "64")
    data = plan_json(tmp_path, "--size", "512p", "--vram", "16", "--ram", "64", "--extra-refs", "2")
    assert data["extra_refs"] == 2 and data["plan"]["extra_refs"] == 2
    assert data["plan"]["tokens"] == plain["plan"]["tokens"] + 2 * 1_792
    direct = plan(C14, *SIZES["512p"], 81, DeviceMemory.card(card_bytes(16)), 64 * 10**9, mappable=False, extra_refs=2)
    assert data["plan"] == profiling.plan_to_json(direct)
    result = runner.invoke(app, ["profile", "--synthetic", "full", "--vram", "16", "--ram", "64", "--extra-refs", "2"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "2 extra references" in result.output and "(52,416 tokens)" in result.output
    assert "dit_step (+3,584 tokens: 2 extra refs)" in result.output


def test_nothing_fitting_is_an_answer_not_a_crash(tmp_path: Path) -> None:
    data = plan_json(tmp_path, "--size", "704p", "--vram", "2", "--ram", "64")
    assert data["plan"] is None and data["no_fit"].startswith("no profile fits")
    assert not any(p["fits"] for p in data["profiles"])


def test_plan_mode_reads_a_model_folder(tmp_path: Path) -> None:
    folder = synth(tmp_path / "m", scale="tiny")
    target = describe_model(folder)
    assert target.config == tiny_config() and (target.dit_scheme, target.text_encoder) == ("bf16", "bf16")
    out = tmp_path / "p.json"
    result = runner.invoke(app, ["profile", str(folder), "--width", "128", "--height", "128", "--frames", "5",
                                 "--vram", "24", "--ram", "32", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["plan"]["tokens"] == 8 * 8 + 2 * 64 + 2 * 64 // 4


@pytest.mark.parametrize(
    "args,message",
    [
        (["--synthetic", "full", "--vram", "12", "--profile", "nope"], "unknown profile"),
        (["--synthetic", "full", "--vram", "12", "--width", "500", "--height", "512"], "multiples of 32"),
        (["--synthetic", "full", "--vram", "12", "--size", "600p"], "unknown size"),
        (["/no/such/model", "--vram", "12"], "does not exist"),
        (["--vram", "12"], "MODEL folder or --synthetic"),
        (["--synthetic", "full", "--vram", "12", "--weights", "fp4"], "unknown DiT quantization"),
        (["--synthetic", "full", "--run"], "--run needs weights"),
        (["--synthetic", "full", "--vram", "12", "--extra-refs", "-1"], "--extra-refs must be"),
        (["--synthetic", "tiny", "--run", "--extra-refs", "1"], "only plan"),
        (["--synthetic", "full", "--vram", "12", "--vae-tile", "-8"], "--vae-tile must be"),
        (["--synthetic", "full", "--vram", "12", "--vae-tile", "100"], "multiples of 8"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["profile", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


# ---- PhaseRecorder ---------------------------------------------------------------------------------------------


def test_recorder_times_phases_and_samples_rss() -> None:
    rec = profiling.PhaseRecorder("cpu", interval=0.01)
    with rec("inputs"):
        time.sleep(0.05)
    for _ in range(2):
        with rec("dit steps"):
            # 200 MB of fresh pages, touched: an anonymous map, where the heap could reuse what an earlier test freed
            big = mmap.mmap(-1, 200_000_000)
            for i in range(0, len(big), mmap.PAGESIZE):
                big[i] = 1
            time.sleep(0.1)
            big.close()
    with pytest.raises(RuntimeError, match="do not nest"):
        with rec("vae decode"):
            with rec("clip"):
                pass
    assert rec.seconds["inputs"] >= 0.05 and rec.seconds["dit steps"] >= 0.2
    assert rec.stats["dit steps"].calls == 2 and rec.peaks == {}  # no CUDA: no allocator peaks
    assert rec.stats["dit steps"].peak_rss >= rec.stats["inputs"].peak_rss + 150e6
    data = rec.to_json()
    assert [i[0] for i in data["intervals"]] == ["inputs", "dit steps", "dit steps", "vae decode"]
    starts = [i[1] for i in data["intervals"]]
    assert starts == sorted(starts)
    tl = data["timeline"]
    assert set(tl) == set(profiling.Sample._fields)
    assert tl["t"] == sorted(tl["t"]) and tl["phase"].count("dit steps") >= 6  # sampled inside, plus both edges
    assert all(v is None for v in tl["allocated"]) and all(v > 0 for v in tl["rss"])


def test_recorder_save_and_plot(tmp_path: Path) -> None:
    rec = profiling.PhaseRecorder("cpu", interval=0.01)
    for name in ("text encoder", "dit steps", "vae decode"):
        with rec(name):
            time.sleep(0.02)
    saved = json.loads(rec.save(tmp_path / "r.json").read_text())
    assert saved["phases"].keys() == {"text encoder", "dit steps", "vae decode"}
    pytest.importorskip("matplotlib", reason="matplotlib not installed (the optional 'profile' extra)")
    p = plan(tiny_config(), 128, 128, 5, DeviceMemory.card(card_bytes(8)), int(32e9))
    png = rec.plot(tmp_path / "r.png", p)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".*tmp*"))


def test_compare_errors_per_phase() -> None:
    p = plan(C14, *SIZES["704p"], 81, DeviceMemory.card(card_bytes(16)), int(64e9))
    pred = p.phases["dit_step"].vram
    measured = {"phases": {
        "dit steps": {"seconds": 1.0, "peak_allocated": pred // 2, "peak_reserved": None, "peak_nvml_used": None,
                      "peak_rss": 10**9},
        "inputs": {"seconds": 0.1, "peak_allocated": 1, "peak_reserved": 1, "peak_nvml_used": None, "peak_rss": 1},
    }}
    (row,) = profiling.compare(measured, p)  # "inputs" has no prediction
    assert row["planner_phase"] == "dit_step" and row["predicted_allocated"] == pred
    assert row["error_allocated"] == pytest.approx(1.0, abs=1e-6)
    assert row["error_reserved"] is None
    assert row["predicted_process_total"] == p.phases["dit_step"].reserved + CUDA_CONTEXT
    assert row["error_ram"] == pytest.approx(p.phases["dit_step"].ram / 1e9 - 1)
    assert profiling.PIPELINE_TO_PLANNER.keys() >= {"text encoder", "clip", "vae encode", "dit steps", "vae decode"}
    assert set(profiling.PIPELINE_TO_PLANNER.values()) == set(PHASES)


# ---- --run -----------------------------------------------------------------------------------------------------


def test_profile_run_on_a_tiny_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = synth(tmp_path / "m", scale="tiny")
    monkeypatch.chdir(tmp_path)  # files are written only when asked: nothing lands in the working folder
    result = runner.invoke(app, ["profile", str(folder), "--run", "--width", "64", "--height", "64", "--frames", "5",
                                 "--steps", "1", "--vram", "24", "--device", "cpu", "--json", "out/profile.json",
                                 "--plot", "out/profile.png"])
    assert result.exit_code == 2 and "out" in result.output  # the folder is checked before the run
    (tmp_path / "out").mkdir()
    result = runner.invoke(app, ["profile", str(folder), "--run", "--width", "64", "--height", "64", "--frames", "5",
                                 "--steps", "1", "--vram", "24", "--device", "cpu", "--json", "out/profile.json",
                                 "--plot", "out/profile.png"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"]
    report = json.loads((tmp_path / "out" / "profile.json").read_text())
    phases = report["measured"]["phases"]
    assert set(phases) >= {"load", "inputs", "text encoder", "clip", "vae encode", "dit placement", "conditions",
                           "dit steps", "vae decode"}
    assert all(s["seconds"] > 0 and s["peak_rss"] > 0 for s in phases.values())
    assert len(report["step_seconds"]) == 1 and report["settings"]["steps"] == 1
    assert [r["planner_phase"] for r in report["comparison"]] == list(PHASES)
    assert report["plan"]["width"] == 64 and report["plan"]["frames"] == 5
    assert "measured (cpu) vs predicted" in result.output
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no plot" in result.output
    else:
        assert (tmp_path / "out" / "profile.png").read_bytes()[:4] == b"\x89PNG"


def test_a_comfy_fp8_file_is_planned_as_loaded_not_as_mapped(tmp_path: Path) -> None:
    """load_dit copies a ComfyUI fp8_scaled file's blocks into RAM (they are rescaled, not views of the file): the
    model description says so once, and `profile` plans what `generate` runs (issue 17: they used to disagree)."""
    from safetensors.torch import save_file

    from scail2_lite.formats import COMFY_PREFIX
    from scail2_lite.synth import dit_tensors

    sd = {}
    for name, t in dit_tensors(tiny_config(), 0):
        fp8 = name.startswith("blocks.") and t.ndim == 2
        sd[COMFY_PREFIX + name] = t.to(torch.float8_e4m3fn) if fp8 else t.half()
        if fp8:
            sd[COMFY_PREFIX + name[: -len("weight")] + "scale_weight"] = torch.tensor(0.5)
    sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / "scail2_fp8_scaled.safetensors"
    save_file(sd, path)
    target = describe_model(path)
    assert (target.format, target.dit_scheme, target.mappable) == ("comfy-fp8_scaled", "fp8", False)
    out = tmp_path / "p.json"
    args = ["--width", "128", "--height", "128", "--frames", "5", "--vram", "24", "--ram", "32", "--json", str(out)]
    result = runner.invoke(app, ["profile", str(path), *args])
    assert result.exit_code == 0, result.output
    expected = plan(tiny_config(), 128, 128, 5, DeviceMemory.card(card_bytes(24)), int(32e9), weights="fp8",
                    text_encoder="bf16", mappable=False)
    assert json.loads(out.read_text())["plan"] == profiling.plan_to_json(expected)
