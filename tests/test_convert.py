"""`scail2-lite quantize` end to end on a tiny synthetic checkpoint: fp8/int8 DiT, 4-bit umT5, inspect, refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from scail2_lite.cli import app
from scail2_lite.quantize_checkpoint import quantize_checkpoint
from scail2_lite.errors import UserError
from scail2_lite.loader import load_dit
from scail2_lite.quantize.mixed import MixedPrecision
from scail2_lite.synth import synth

# Tiny-model bounds (documented in RESULTS.md's spirit: the full model is measured on the GPU): a 2-block DiT
# loses ~1.6% (fp8) / ~1.3% (int8) in one forward; the tiny umT5 (d_model 48: not rotated) keeps cosine 0.99 in
# int8; in NF4 it stays bf16 (48-value rows are not whole NF4 blocks: text_encoder.NF4_BLOCK). NF4's codes and
# error are tested on 128- and 256-wide encoders (test_quantize.py).
FORWARD_BOUND = {"fp8": 0.05, "int8": 0.05}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return synth(tmp_path_factory.mktemp("src") / "scail2", scale="tiny", fmt="sat", seed=1)


@pytest.mark.parametrize("dit,te", [("fp8", "nf4"), ("int8", "int8")])
def test_quantize_then_inspect_and_load(source, tmp_path, dit, te):
    out = tmp_path / f"q-{dit}"
    res = CliRunner().invoke(app, ["quantize", str(source), "-o", str(out), "--dit", dit, "--text-encoder", te])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "fidelity.json").read_text())
    assert report["dit_forward"]["rel_error"] < FORWARD_BOUND[dit]
    backend = {"nf4": "bitsandbytes-nf4", "int8": "quanto-qint8"}[te]
    assert report["text_encoder_backend"] == backend and report["text_encoder"]["cosine"] > 0.8
    _check_stored_text_encoder(source, out, te)
    assert {p.name for p in out.iterdir()} >= {"manifest.json", "Wan2.1_VAE.pth", "umt5-xxl",
                                               "models_clip_open-clip-xlm-roberta-large-vit-huge-14-onlyvisual.pth"}
    res = CliRunner().invoke(app, ["inspect", str(out)])
    assert res.exit_code == 0 and "quantized" in res.output, res.output
    mask = os.umask(0)
    os.umask(mask)
    written = [p for p in out.rglob("*.safetensors")]
    assert written and {p.name: oct(p.stat().st_mode & 0o777) for p in written} == \
        {p.name: oct(0o666 & ~mask) for p in written}  # safetensors alone makes 0600 files
    model = load_dit(out)
    assert model.blocks[0].ffn[0].weight.dtype == (torch.float8_e4m3fn if dit == "fp8" else torch.int8)


def _check_stored_text_encoder(source: Path, out: Path, te: str) -> None:
    """The folder stores umT5 as `te` codes (no bf16 file), says so in the manifest, and the pipeline's prompt
    embeddings are bit for bit those of quantizing the source's bf16 file at load; asking for another scheme at
    generate time is one line, exit 2."""
    from scail2_lite.encoders import UMT5_DIR, UMT5_FILE, encode_text, load_text_encoder
    from scail2_lite.pipeline import Pipeline
    from scail2_lite.quantize.text_encoder import quantize_block

    record = json.loads((out / "manifest.json").read_text())["text_encoder"]
    assert record["scheme"] == record["stored"] == te and record["quantized_at_load"] is False
    assert not (out / UMT5_DIR / UMT5_FILE).exists()
    assert sum(p.stat().st_size for p in (out / UMT5_DIR).iterdir()) < \
        sum(p.stat().st_size for p in (source / UMT5_DIR).iterdir())
    prompts = ["a woman dancing"]
    pipe = Pipeline.from_pretrained(out, device="cpu", prompt_cache=False)
    tokenizer, at_load = load_text_encoder(source / UMT5_DIR, quantize=lambda block: quantize_block(block, te))
    expected = [t.float() for t in encode_text(tokenizer, at_load, prompts)]
    assert all(torch.equal(a, b) for a, b in zip(pipe.encode_prompts(prompts), expected))
    other = "int8" if te == "nf4" else "bf16"
    with pytest.raises(UserError, match=f"stores umT5 quantized to {te}"):
        Pipeline.from_pretrained(out, device="cpu", text_encoder=other)
    i = source / "inputs"
    res = CliRunner().invoke(app, ["generate", str(out), "--image", str(i / "ref.png"), "--mask-image",
                                   str(i / "ref_mask.png"), "--pose", str(i / "driving.mp4"), "--mask-video",
                                   str(i / "driving_mask.mp4"), "--device", "cpu", "--text-encoder", other,
                                   "-o", str(out.parent / "x.mp4")])
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1 and f"not --text-encoder {other}" in errors[0], res.output


def test_old_folder_quantizes_text_encoder_at_load(source, tmp_path):
    """A folder from before stored encoders (the bf16 file and `quantized_at_load`) loads as it did: its
    recorded scheme quantizes the bf16 file at load, and any --text-encoder may be asked for."""
    from scail2_lite.encoders import UMT5_DIR, UMT5_FILE, encode_text, load_text_encoder
    from scail2_lite.loader import describe_model
    from scail2_lite.pipeline import Pipeline
    from scail2_lite.quantize.text_encoder import quantize_block

    out = tmp_path / "old"
    quantize_checkpoint(source, out, dit="fp8", text_encoder="bf16", log=lambda _: None)
    assert (out / UMT5_DIR / UMT5_FILE).is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["text_encoder"] = {"scheme": "nf4", "file": UMT5_DIR, "stored": "bf16", "quantized_at_load": True}
    (out / "manifest.json").write_text(json.dumps(manifest))
    model = describe_model(out)
    assert (model.text_encoder, model.text_encoder_stored) == ("nf4", "bf16")
    assert model.with_text_encoder("int8").text_encoder == "int8"
    prompts = ["a man waves"]
    tokenizer, at_load = load_text_encoder(out / UMT5_DIR, quantize=lambda block: quantize_block(block, "nf4"))
    expected = [t.float() for t in encode_text(tokenizer, at_load, prompts)]
    got = Pipeline.from_pretrained(out, device="cpu", prompt_cache=False).encode_prompts(prompts)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_interrupted_text_encoder_store_leaves_nothing(source, tmp_path, monkeypatch):
    """Ctrl-C while umT5 is being stored quantized: neither the folder nor any staging folder is left."""
    import scail2_lite.quantize_checkpoint as qc

    def interrupted(src, dest, scheme, device, progress):
        (dest / "umt5-nf4-block00.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(qc, "write_quantized_text_encoder", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(source, tmp_path / "q", dit="fp8", text_encoder="nf4", log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


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


def test_mixed_precision_keeps_edges_and_sensitive_layers(source, tmp_path):
    """--keep edges / sensitive: the chosen block Linears are stored in --keep-as, within --keep-share of the
    parameters, recorded in the manifest and the report, and load as that format."""
    out = tmp_path / "edges"
    res = CliRunner().invoke(app, ["quantize", str(source), "-o", str(out), "--dit", "fp8", "--keep", "edges",
                                   "--keep-as", "int8", "--keep-share", "0.5"])
    assert res.exit_code == 0, res.output
    kept = json.loads((out / "manifest.json").read_text())["dit"]["kept"]
    assert kept and {n.split(".")[1] for n in kept} == {"0"} and set(kept.values()) == {"int8"}
    model = load_dit(out)
    assert model.blocks[0].ffn[0].weight.dtype == torch.int8
    assert model.blocks[1].ffn[0].weight.dtype == torch.float8_e4m3fn

    out = tmp_path / "sensitive"
    report = quantize_checkpoint(source, out, dit="fp8", text_encoder="bf16", log=lambda _: None,
                                 mixed=MixedPrecision("sensitive", "bf16", 0.3))
    sens = report.sensitivity
    assert len(sens) == 2 * 12 and all(v > 0 for v in sens.values())
    kept = {n.removesuffix(".weight") for n in report.kept_layers}
    model = load_dit(out)
    sizes = {n: model.get_submodule(n).weight.numel() for n in sens}
    assert sum(sizes[n] for n in kept) <= 0.3 * sum(sizes.values())
    assert max(sens, key=sens.get) in kept  # the most sensitive Linear fits the share here
    assert all(model.get_submodule(n).weight.dtype == torch.bfloat16 for n in kept)
    assert report.dit_forward["rel_error"] < FORWARD_BOUND["fp8"]


def test_mixed_precision_refusals(source, tmp_path):
    res = CliRunner().invoke(app, ["quantize", str(source), "-o", str(tmp_path / "x"), "--dit", "int8", "--keep",
                                   "edges", "--keep-as", "int8"])
    assert res.exit_code == 2 and "already stores them" in res.output
    res = CliRunner().invoke(app, ["quantize", str(source), "-o", str(tmp_path / "x"), "--keep", "middle"])
    assert res.exit_code == 2 and "--keep" in res.output
    assert not (tmp_path / "x").exists()


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
