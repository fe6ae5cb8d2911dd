"""Synthetic checkpoints: complete HF layout, deterministic, trained-looking weights, CLI synth + inspect."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from scail2_lite import encoders, formats, synth
from scail2_lite.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "SCAIL-2"
    result = runner.invoke(app, ["synth", "-o", str(out), "--scale", "tiny", "--seed", "5"])
    assert result.exit_code == 0, result.output
    return out


def test_cli_synth_then_inspect(folder: Path) -> None:
    result = runner.invoke(app, ["inspect", str(folder)])
    assert result.exit_code == 0, result.output
    assert "sat" in result.output and "ok" in result.output and "187,008" in result.output


def test_inspect_bad_file_is_one_line_exit_2(tmp_path: Path) -> None:
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    result = runner.invoke(app, ["inspect", str(tmp_path / "junk.safetensors")])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "error" in result.output


def test_layout_dtypes_and_loaders(folder: Path) -> None:
    assert (folder / "model" / "latest").read_text().strip() == "1"
    assert json.loads((folder / "config.json").read_text())["clip_dim"] == 64
    umt5 = encoders.load_pth(folder / synth.UMT5_FILE)
    clip = encoders.load_pth(folder / synth.CLIP_FILE)
    vae = torch.load(folder / synth.VAE_FILE, weights_only=True)
    assert {v.dtype for v in umt5.values()} == {torch.bfloat16}
    assert {v.dtype for k, v in clip.items() if k != "log_scale"} == {torch.float16} and "visual.head" in clip
    assert {v.dtype for v in vae.values()} == {torch.float32}
    assert encoders.build_umt5(umt5).config.d_model == synth.tiny_config().text_dim
    assert encoders.build_clip(clip).config.hidden_size == synth.tiny_config().clip_dim


def test_tokenizer_loads_offline(folder: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder / "umt5-xxl", local_files_only=True)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("A woman dances in a studio").input_ids
    assert ids[-1] == 1 and 2 not in ids and max(ids) < encoders.umt5_config("tiny").vocab_size


def test_inputs_are_colour_coded(folder: Path) -> None:
    ref = np.asarray(Image.open(folder / "inputs" / "ref.png"))
    mask = np.asarray(Image.open(folder / "inputs" / "ref_mask.png"))
    assert ref.shape == mask.shape and ref.shape[0] % 32 == 0 and ref.shape[1] % 32 == 0
    colours = {tuple(c) for c in mask.reshape(-1, 3)}
    assert {(255, 255, 255), (0, 0, 255), (255, 0, 0)} <= colours  # animation mode: identities on white
    with av.open(str(folder / "inputs" / "driving_mask.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    with av.open(str(folder / "inputs" / "driving.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == len(frames) == 17
    f = frames[8].astype(int)
    blue = (f[..., 2] > 200) & (f[..., 0] < 60) & (f[..., 1] < 60)
    red = (f[..., 0] > 200) & (f[..., 2] < 60) & (f[..., 1] < 60)
    black = f.sum(-1) < 60
    assert blue.mean() > 0.02 and red.mean() > 0.02 and black.mean() > 0.5


def test_same_seed_same_bytes(tmp_path: Path, folder: Path) -> None:
    again = synth.synth(tmp_path / "again", scale="tiny", seed=5)
    for rel in ("model/1/" + formats.SAT_FILE, synth.UMT5_FILE, synth.CLIP_FILE, synth.VAE_FILE):
        a, b = torch.load(folder / rel, weights_only=True), torch.load(again / rel, weights_only=True)
        a, b = a.get("module", a), b.get("module", b)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
    one = synth.write_dit(tmp_path / "w1", synth.tiny_config(), "wan", seed=5)
    two = synth.write_dit(tmp_path / "w2", synth.tiny_config(), "wan", seed=5)
    other = synth.write_dit(tmp_path / "w3", synth.tiny_config(), "wan", seed=6)
    assert one.read_bytes() == two.read_bytes() != other.read_bytes()


def _excess_kurtosis(x: torch.Tensor) -> float:
    x = x.double().flatten()
    z = (x - x.mean()) / x.std()
    return float((z**4).mean() - 3)


def test_weights_look_trained() -> None:
    w = synth.synth_tensor("blocks.0.ffn.0.weight", (512, 1024), seed=0)
    col_rms = w.pow(2).mean(0).sqrt()
    outliers = col_rms > 4 * col_rms.median()
    assert 0 < int(outliers.sum()) <= 16  # a few outlier input channels
    body = w[:, ~outliers]
    assert _excess_kurtosis(body) > 1.5  # heavy tails beyond the outliers (Gaussian: 0)
    assert abs(float(body.std()) * 1024**0.5 - 1) < 0.15  # trained-init scale, 1/sqrt(fan_in)
    norm = synth.synth_tensor("blocks.0.self_attn.norm_q.weight", (1024,), seed=0)
    assert abs(float(norm.mean()) - 1) < 0.02
    modulation = synth.synth_tensor("blocks.0.modulation", (1, 6, 1024), seed=0)
    assert float(modulation.abs().mean()) < 0.05
