"""Synthetic LoRA files from `synth`, and `quantize --lora`: merged in fp32 before quantizing, recorded, refused
when the LoRA belongs to another model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from scail2_lite.cli import app
from scail2_lite.config import DiTConfig
from scail2_lite.formats import iter_tensors, wan_shapes
from scail2_lite.lora import SKIP_RULE, load_lora, make_synthetic_lora, merge_into_state_dict
from scail2_lite.quantize.schemes import dequantize, is_quantized_name, quantize_linear, relative_error
from scail2_lite.quantize.store import fingerprint, load_quantized
from scail2_lite.synth import LORA_DIR, LORA_FILES, synth, tiny_config

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth(tmp_path_factory.mktemp("ck") / "scail2", scale="tiny", fmt="wan", seed=3)


@pytest.fixture(scope="module")
def shapes() -> dict[str, torch.Size]:
    return {k: torch.Size(v) for k, v in wan_shapes(tiny_config()).items()}


def _low_rank_deltas(lora) -> dict[str, torch.Tensor]:
    return {u.target: u.delta(torch.Size(u.up.shape[:1] + u.down.shape[1:])) for u in lora.updates if u.diff is None}


def test_synth_writes_a_lora_per_format(checkpoint: Path, shapes):
    loras = {fmt: load_lora(checkpoint / LORA_DIR / name, shapes) for fmt, name in LORA_FILES.items()}
    for fmt, lo in loras.items():
        assert lo.updates and not lo.unmatched, (fmt, lo.report())
    assert set(loras["lightx2v"].skipped) == {SKIP_RULE} and set(loras["kohya"].skipped) == {SKIP_RULE}
    full = load_lora(checkpoint / LORA_DIR / LORA_FILES["kohya"], shapes, full_patches=True)
    diffs = {u.target for u in full.updates if u.diff is not None}
    assert "blocks.0.modulation" in diffs and "blocks.1.norm3.weight" in diffs and "blocks.0.ffn.0.bias" in diffs
    assert all(u.diff is None for fmt in ("peft", "diffusers", "comfy", "sat", "wan") for u in loras[fmt].updates)
    ref = _low_rank_deltas(loras["comfy"])  # (the kohya file's extra diffs draw from the same random stream)
    for fmt in ("peft", "diffusers"):  # same seed, no diffs: the same effective low-rank deltas in every layout
        other = _low_rank_deltas(loras[fmt])
        assert other.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(other[k], ref[k], rtol=2e-2, atol=1e-4)
    # SCAIL-2's own SAT pickle and its convert_lora.py output: the same updates, bit for bit
    sat, wan = _low_rank_deltas(loras["sat"]), _low_rank_deltas(loras["wan"])
    assert sat.keys() == wan.keys() and len(sat) == 10 * tiny_config().num_layers
    assert all(torch.equal(sat[k], wan[k]) for k in sat)


def test_quantize_with_lora_matches_merged_quantization(checkpoint: Path, shapes, tmp_path: Path):
    lora_path = checkpoint / LORA_DIR / LORA_FILES["kohya"]
    out = tmp_path / "q"
    res = runner.invoke(app, ["quantize", str(checkpoint), "-o", str(out), "--dit", "int8",
                              "--lora", f"{lora_path}:0.8"])
    assert res.exit_code == 0, res.output
    manifest, state = load_quantized(out)
    (record,) = manifest["loras"]
    lo = load_lora(lora_path, shapes)
    assert record["name"] == lora_path.name and record["strength"] == 0.8
    assert record["sha256_head_tail"] == fingerprint(lora_path)["sha256_head_tail"]
    assert record["matched_keys"] == lo.matched_keys and record["unmatched"] == [] and not record["full_patches"]
    assert record["skipped"] == lo.skipped and len(record["skipped"][SKIP_RULE]) == 6 * tiny_config().num_layers

    source = {k: v.float() for k, v in iter_tensors(checkpoint)}
    merged32 = merge_into_state_dict(dict(source), [(lo, 0.8)])
    merged_bf16 = merge_into_state_dict({k: v.to(torch.bfloat16) for k, v in source.items()}, [(lo, 0.8)])
    targets = {u.target for u in lo.updates}
    for name in targets:
        if is_quantized_name(name):
            layer = name.removesuffix("weight")
            q, s, smooth = quantize_linear(merged32[name], "int8")
            assert torch.equal(state[name], q) and torch.equal(state[layer + "scale"], s)
            assert torch.equal(state[layer + "smooth"], smooth)
            got = dequantize(state[name], state[layer + "scale"], smooth=state[layer + "smooth"])
            assert relative_error(merged_bf16[name].float(), got) < 0.02  # int8 error ~1.2%, bf16 rounding ~0.3%
            assert relative_error(source[name], got) > 0.1  # the LoRA really is in there
        else:  # norms, biases, modulation: merged, kept in high precision
            torch.testing.assert_close(state[name].float(), merged_bf16[name].float(), rtol=1e-2, atol=1e-3)
            assert not torch.allclose(state[name].float(), source[name], rtol=1e-3, atol=1e-4)


def test_quantize_refuses_lora_of_another_model(checkpoint: Path, tmp_path: Path):
    wrong_cfg = replace(DiTConfig.preset("tiny"), dim=32, ffn_dim=64, num_heads=2)  # e.g. a 1.3B LoRA on the 14B
    bad = tmp_path / "wrong.safetensors"
    save_file(make_synthetic_lora(wan_shapes(wrong_cfg), "kohya"), str(bad))
    out = tmp_path / "q"
    res = runner.invoke(app, ["quantize", str(checkpoint), "-o", str(out), "--dit", "int8", "--lora", str(bad)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "wrong.safetensors" in lines[0] and "does not fit" in lines[0], res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wrong.safetensors"]  # nothing written, no partial folder


def test_generate_prints_what_each_lora_matched_and_skipped(checkpoint: Path, tmp_path: Path):
    d, loras = checkpoint / "inputs", checkpoint / LORA_DIR
    args = ["generate", str(checkpoint), "--image", str(d / "ref.png"), "--mask-image", str(d / "ref_mask.png"),
            "--pose", str(d / "driving.mp4"), "--mask-video", str(d / "driving_mask.mp4"), "--width", "128",
            "--height", "128", "--frames", "5", "--steps", "1", "--device", "cpu", "-o", str(tmp_path / "o.mp4"),
            "--lora", f"{loras / LORA_FILES['lightx2v']}:0.5", "--lora", str(loras / LORA_FILES["sat"])]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())  # the console wraps long lines
    n = tiny_config().num_layers
    assert f"LoRA {LORA_FILES['lightx2v']} at strength 0.5: {36 * n}/{42 * n + 2} keys applied" in out
    assert "full-tensor patches skipped by upstream's rule" in out and "diffusion_model.patch_embedding.diff" in out
    assert f"LoRA {LORA_FILES['sat']} at strength 1: {20 * n}/{20 * n} keys applied ({10 * n} low-rank)" in out
    res = runner.invoke(app, args + ["--lora-full-patches"])
    out = " ".join(res.output.split())
    assert res.exit_code == 0 and "1 shaped for another model, skipped: diffusion_model.patch_embedding.diff" in out
