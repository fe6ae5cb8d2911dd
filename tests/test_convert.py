"""`scail2-lite quantize` end to end on a tiny synthetic checkpoint: fp8/int8 DiT, 4-bit umT5, inspect, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from scail2_lite.cli import app
from scail2_lite.quantize_checkpoint import quantize_checkpoint
from scail2_lite.errors import UserError
from scail2_lite.loader import load_dit
from scail2_lite.synth import synth

# Tiny-model bounds (documented in RESULTS.md's spirit: the full model is measured on the GPU): a 2-block DiT
# loses ~1.6% (fp8) / ~1.3% (int8) in one forward; 4-bit umT5 on the CPU path (quanto qint4) keeps cosine ~0.9.
FORWARD_BOUND = {"fp8": 0.05, "int8": 0.05}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return synth(tmp_path_factory.mktemp("src") / "scail2", scale="tiny", fmt="sat", seed=1)


@pytest.mark.parametrize("dit", ["fp8", "int8"])
def test_quantize_then_inspect_and_load(source, tmp_path, dit):
    out = tmp_path / f"q-{dit}"
    res = CliRunner().invoke(app, ["quantize", str(source), "-o", str(out), "--dit", dit, "--text-encoder", "nf4"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "fidelity.json").read_text())
    assert report["dit_forward"]["rel_error"] < FORWARD_BOUND[dit]
    assert report["text_encoder_backend"] == "quanto-qint4" and report["text_encoder"]["cosine"] > 0.8
    assert {p.name for p in out.iterdir()} >= {"manifest.json", "Wan2.1_VAE.pth", "umt5-xxl",
                                               "models_clip_open-clip-xlm-roberta-large-vit-huge-14-onlyvisual.pth"}
    res = CliRunner().invoke(app, ["inspect", str(out)])
    assert res.exit_code == 0 and "quantized" in res.output, res.output
    model = load_dit(out)
    assert model.blocks[0].ffn[0].weight.dtype == (torch.float8_e4m3fn if dit == "fp8" else torch.int8)


def test_save_load_roundtrip_is_bit_exact(source, tmp_path):
    out = tmp_path / "q"
    quantize_checkpoint(source, out, dit="int8", text_encoder="bf16", log=lambda _: None)
    a, b = load_dit(out).state_dict(), load_dit(out).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


def test_refusals_write_nothing(source, tmp_path):
    out = tmp_path / "q"
    quantize_checkpoint(source, out, dit="fp8", text_encoder="bf16", log=lambda _: None)
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = [
        (dict(src=out, out=tmp_path / "again"), "already quantized"),
        (dict(src=source, out=out), "already exists"),
        (dict(src=source, out=tmp_path / "x", dit="fp4"), "fp4"),
        (dict(src=source, out=tmp_path / "x", text_encoder="q3"), "q3"),
        (dict(src=source, out=tmp_path / "x", dit="int8", export="comfy"), "--export comfy"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            quantize_checkpoint(**{"dit": "fp8", "text_encoder": "bf16", **kwargs}, log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("quant,dit", [("mxfp8", "fp8"), ("int8_convrot", "int8"), ("mxfp8", "int8")])
def test_quantize_accepts_comfy_8bit_repacks(tmp_path, quant, dit):
    """Comfy-Org's mxfp8 / int8_convrot files as a source: `inspect` names them, `quantize` writes what `load_dit`
    makes of the file directly (its own scheme) or requantizes from its dequantized weights (another scheme); the
    weight errors it reports are what the conversion added."""
    from scail2_lite.quantize.comfy_quant import dequantize_mxfp8
    from scail2_lite.quantize.schemes import dequantize, is_quantized_name, relative_error
    from scail2_lite.quantize.store import load_quantized
    from scail2_lite.synth import tiny_config, write_dit

    src = write_dit(tmp_path / "comfy", tiny_config(), f"comfy-{quant}", seed=2)
    res = CliRunner().invoke(app, ["inspect", str(src)])
    assert res.exit_code == 0 and f"comfy-{quant}" in res.output, res.output
    out = tmp_path / "q"
    res = CliRunner().invoke(app, ["quantize", str(src), "-o", str(out), "--dit", dit, "--text-encoder", "bf16"])
    assert res.exit_code == 0, res.output
    manifest, state = load_quantized(out)
    errors = json.loads((out / "fidelity.json").read_text())["weight_errors"]
    direct = load_dit(src, dtype=torch.float32).state_dict()
    linears = [k for k in direct if is_quantized_name(k)]
    assert manifest["dit"]["scheme"] == dit and set(errors) == set(linears)
    for name in linears:
        layer = name.removesuffix(".weight")
        got = dequantize(state[name], state[f"{layer}.scale"], smooth=state.get(f"{layer}.smooth"))
        if (quant, dit) != ("mxfp8", "int8"):  # the file's own scheme: the same conversion as loading it
            assert torch.equal(state[name].view(torch.uint8), direct[name].view(torch.uint8)), name
            assert errors[name] < (1e-4 if dit == "fp8" else 0.02), (name, errors[name])
        else:
            from safetensors.torch import load_file

            raw = load_file(src)
            prefix = "model.diffusion_model."
            theirs = dequantize_mxfp8(raw[prefix + name], raw[prefix + layer + ".weight_scale"])
            assert errors[name] == pytest.approx(relative_error(theirs, got), rel=1e-4) and errors[name] < 0.02
