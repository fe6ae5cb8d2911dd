"""Checkpoint formats: key contract, SAT mapping, every format to the same state dict, clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import rss_file, run_model

from scail2_lite import formats, synth
from scail2_lite.config import PRESETS
from scail2_lite.errors import UserError
from scail2_lite.loader import load_dit
from scail2_lite.model import SCAIL2Model

CFG = synth.tiny_config()


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return dict(synth.dit_tensors(CFG, seed=3))


def _with_config(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CFG.to_dict()))
    return folder


@pytest.mark.parametrize("preset", ["tiny", "scail2-14b"])
def test_key_contract_matches_model(preset: str) -> None:
    config = PRESETS[preset]
    with torch.device("meta"):
        model = SCAIL2Model(config)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == formats.wan_shapes(config)


def test_key_contract_matches_reference_list(oracle: Path) -> None:
    contract = json.loads((oracle / "key_contract.json").read_text())["dit"]
    torch_names = {k.replace(".layers.", ".") for k in contract}
    assert torch_names == set(formats.wan_shapes(PRESETS["scail2-14b"]))
    assert len(torch_names) == 1307


def _inputs(config) -> dict:
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    t_, h, w = 2, 8, 8
    return dict(
        x=r(1, 16, t_, h, w), pose_latents=r(1, 16, t_, h // 2, w // 2),
        driving_masks=(r(1, 28, t_, h // 2, w // 2) > 0).float(), ref_latents=r(1, 16, 1, h, w),
        ref_masks=(r(1, 28, 1 + t_, h, w) > 0).float(), t=torch.tensor([700.0]), context=r(1, 7, config.text_dim),
        clip_fea=r(1, 257, config.clip_dim),
    )


def test_sat_and_wan_files_give_the_same_forward(tmp_path: Path) -> None:
    synth.write_dit(_with_config(tmp_path / "sat"), CFG, "sat", seed=3)
    wan = synth.write_dit(_with_config(tmp_path / "wan"), CFG, "wan", seed=3)
    assert formats.detect_format(tmp_path / "sat") == "sat" and formats.detect_format(wan) == "wan"
    outs = []
    for path in (tmp_path / "sat", wan):
        model = load_dit(path, dtype=torch.float32)
        with torch.no_grad():
            outs.append(run_model(model, _inputs(CFG)))
    assert outs[0].abs().max() > 0
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def _comfy(reference: dict, dtype: torch.dtype) -> dict:
    return {formats.COMFY_PREFIX + k: v.to(dtype) for k, v in reference.items()}


def test_every_format_reads_to_the_same_state_dict(tmp_path: Path, reference: dict) -> None:
    ref = {k: v.clone() for k, v in reference.items()}
    paths = {
        "sat": synth.write_dit(tmp_path / "sat", CFG, "sat", seed=3),
        "wan": synth.write_dit(tmp_path / "wan", CFG, "wan", seed=3),
        "sharded": synth.write_dit(tmp_path / "sharded", CFG, "wan", seed=3, shard_bytes=100_000),
    }
    wangp = {k.replace("patch_embedding_pose.", "pose_patch_embedding.").replace(
        "patch_embedding_mask.", "mask_patch_embedding."): v for k, v in ref.items()}
    save_file(wangp, tmp_path / "wangp.safetensors")
    paths["wangp"] = tmp_path / "wangp.safetensors"
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        save_file(_comfy(ref, dtype), tmp_path / f"comfy_{dtype}.safetensors")
        paths[f"comfy {dtype}"] = tmp_path / f"comfy_{dtype}.safetensors"
    assert len(json.loads(paths["sharded"].read_text())["weight_map"]) == 91
    assert len(set(json.loads(paths["sharded"].read_text())["weight_map"].values())) > 1
    for label, path in paths.items():
        expected_format = label.split()[0]
        assert formats.detect_format(path) == expected_format, label
        sd = formats.read_state_dict(path)
        assert sd.keys() == ref.keys(), label
        for k, v in ref.items():
            torch.testing.assert_close(sd[k].float(), v.to(sd[k].dtype).float(), rtol=0, atol=0, msg=f"{label} {k}")
        cast = formats.read_state_dict(path, dtype=torch.bfloat16)
        assert all(t.dtype == torch.bfloat16 for t in cast.values())


def test_folder_resolution_and_config(tmp_path: Path) -> None:
    synth.write_dit(_with_config(tmp_path), CFG, "sat", seed=0)
    assert formats.find_dit(tmp_path) == tmp_path / "model" / "1" / formats.SAT_FILE
    config, source = formats.read_config(tmp_path / "model" / "1" / formats.SAT_FILE)
    assert config == CFG and source.endswith("config.json")
    (tmp_path / "config.json").unlink()
    config, source = formats.read_config(tmp_path, formats.read_shapes(tmp_path))
    assert config == CFG and source == "tensor shapes"
    info = formats.describe(tmp_path)
    assert (info["format"], info["tensors"], info["problems"]) == ("sat", 91, [])
    assert info["parameters"] == sum(v.numel() for v in synth.dit_tensors(CFG, 0) for v in [v[1]])


def test_fp8_scaled_is_detected_and_exposed_raw(tmp_path: Path, reference: dict) -> None:
    sd = {formats.COMFY_PREFIX + k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v.half() for k, v in reference.items()}
    sd |= {formats.COMFY_PREFIX + k[:-len("weight")] + "scale_weight": torch.tensor(0.5)
           for k, v in reference.items() if v.ndim == 2}
    sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(sd, tmp_path / "fp8.safetensors")
    assert formats.detect_format(tmp_path / "fp8.safetensors") == "comfy-fp8_scaled"
    names = dict(formats.iter_tensors(tmp_path / "fp8.safetensors"))
    assert names["blocks.0.ffn.0.weight"].dtype == torch.float8_e4m3fn
    assert "blocks.0.ffn.0.scale_weight" in names and "scaled_fp8" not in names
    info = formats.describe(tmp_path / "fp8.safetensors")
    assert info["problems"] == [] and info["scale_tensors"] == info["dtypes"]["float8_e4m3fn"]
    # Loads without conversion: block Linears stay FP8 (QuantLinear, per-tensor scale broadcast per channel),
    # other FP8 tensors are dequantized because we keep those layers in high precision.
    model = load_dit(tmp_path / "fp8.safetensors", dtype=torch.float32)
    ffn = model.blocks[0].ffn[0]
    assert type(ffn).__name__ == "QuantLinear" and ffn.scheme == "fp8"
    assert torch.equal(ffn.weight.view(torch.uint8), names["blocks.0.ffn.0.weight"].view(torch.uint8))
    assert torch.equal(ffn.scale, torch.full_like(ffn.scale, 0.5))
    text = names["text_embedding.0.weight"].float() * 0.5
    assert torch.equal(model.text_embedding[0].weight, text)


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


def test_truncated_safetensors_is_one_line_error(tmp_path: Path) -> None:
    path = synth.write_dit(tmp_path, CFG, "wan", seed=0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as err:
        formats.read_state_dict(path)
    assert "truncated" in _one_line(err)


def test_missing_key_is_named(tmp_path: Path, reference: dict) -> None:
    sd = {k: v for k, v in reference.items() if k != "blocks.1.cross_attn.k_img.bias"}
    save_file(sd, tmp_path / "dit.safetensors")
    _with_config(tmp_path)
    with pytest.raises(UserError) as err:
        load_dit(tmp_path / "dit.safetensors")
    assert "missing 1 keys: blocks.1.cross_attn.k_img.bias" in _one_line(err)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"module": {"x": torch.zeros(2)}, "payload": _Evil(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UserError) as err:
        formats.read_state_dict(tmp_path / "evil.pt")
    assert "refused" in _one_line(err)
    assert not marker.exists()


def test_numpy_globals_are_allowed(tmp_path: Path) -> None:
    import numpy as np

    sd = {formats.COMFY_PREFIX + k: v for k, v in synth.dit_tensors(CFG, 0)}
    torch.save({"module": sd, "iteration": np.array([1])}, tmp_path / "np.pt")
    assert len(formats.read_state_dict(tmp_path / "np.pt")) == 91


@pytest.mark.parametrize("positional", [True, False])
def test_weight_files_read_and_map_without_copies(tmp_path: Path, monkeypatch, positional: bool) -> None:
    """Reads are right with positional reads and where the OS has none (Windows: seek and read under the lock)."""
    if not positional:
        monkeypatch.delattr(os, "preadv", raising=False)
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int8), "c": torch.randn(4).to(torch.bfloat16)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    files = formats.WeightFiles([path])
    for key, t in tensors.items():
        out = torch.empty(t.numel() * t.element_size(), dtype=torch.uint8)
        files.read_into(key, out)
        assert torch.equal(out.view(t.dtype).view(t.shape), t)
        assert torch.equal(files.view(key), t)
    files.check("a", torch.float32, (3, 5), "x")
    with pytest.raises(UserError, match="expects torch.float16"):
        files.check("a", torch.float16, (3, 5), "x")
    with pytest.raises(UserError, match="missing"):
        files.check("zz", torch.float32, (1,), "x")
    files.close()
    path.write_bytes(path.read_bytes()[:-8])  # truncated: the last tensor ends past the end of the file
    last = max(files.index, key=lambda k: files.index[k][1])
    with pytest.raises(UserError, match="truncated"):
        formats.WeightFiles([path]).read_into(last, torch.empty(files.index[last][2], dtype=torch.uint8))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux resident-set accounting")
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_iter_tensors_hands_pages_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    """A reader that keeps its file mapped (one safetensors handle per file, the whole mmap'd SAT pickle) would
    keep every page it read resident; iter_tensors gives them back every RELEASE_BYTES, views staying valid."""
    tensors = {f"blocks.{i}.ffn.0.weight": torch.randn(2**20) for i in range(24)}  # 24 x 4 MB
    path = tmp_path / f"dit{suffix}"
    save_file(tensors, path) if suffix == ".safetensors" else torch.save({"module": tensors}, path)

    def grown(release: int) -> tuple[int, dict[str, torch.Tensor]]:
        monkeypatch.setattr(formats.read, "RELEASE_BYTES", release)
        before, held = rss_file(), {}
        for name, t in formats.iter_tensors(path):
            held[name] = t
            float(t.sum())  # reads every page of it
        return rss_file() - before, held

    kept, _ = grown(2**60)
    released, held = grown(8 * 2**20)
    assert kept > 80e6 and released < 24e6
    assert held.keys() == tensors.keys() and all(torch.equal(held[k], t) for k, t in tensors.items())


@pytest.mark.parametrize("quant", ["mxfp8", "int8_convrot"])
def test_comfy_8bit_repacks_are_named_and_load_into_our_layouts(tmp_path: Path, reference: dict, quant: str) -> None:
    """Comfy-Org's mxfp8 / int8_convrot single files (written by the synth tool in ComfyUI's comfy_quant
    convention) load directly: mxfp8 into our FP8 layout, int8_convrot requantized into our INT8 layout."""
    from safetensors import safe_open

    from scail2_lite.loader import describe_model
    from scail2_lite.quantize.comfy_quant import dequantize_int8_convrot, dequantize_mxfp8, parse_config
    from scail2_lite.quantize.schemes import dequantize, is_quantized_name, relative_error

    path = synth.write_dit(_with_config(tmp_path), CFG, f"comfy-{quant}", seed=3)
    assert formats.detect_format(tmp_path) == f"comfy-{quant}"
    info = formats.describe(path)
    linears = [k for k in reference if is_quantized_name(k)]
    assert info["problems"] == [] and info["tensors"] == len(reference) and info["scale_tensors"] == 2 * len(linears)
    scheme = "fp8" if quant == "mxfp8" else "int8"
    assert describe_model(tmp_path).dit_scheme == scheme
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["_quantization_metadata"])["layers"]
        raw = {k.removeprefix(formats.COMFY_PREFIX): f.get_tensor(k) for k in f.keys()}
    assert len(meta) == len(linears) and parse_config(raw["blocks.0.ffn.2.comfy_quant"])["format"] == (
        "mxfp8" if quant == "mxfp8" else "int8_tensorwise")
    model = load_dit(path, dtype=torch.float32)
    state = model.state_dict()
    for name in linears:
        layer = name.removesuffix(".weight")
        q, s = raw[name], raw[f"{layer}.weight_scale"]
        if quant == "mxfp8":
            theirs = dequantize_mxfp8(q, s)  # checked element by element in test_quantize
        else:
            theirs = dequantize_int8_convrot(q, s, parse_config(raw[f"{layer}.comfy_quant"])["convrot_groupsize"])
        module = model.get_submodule(layer)
        assert type(module).__name__ == "QuantLinear" and module.scheme == scheme
        ours = dequantize(state[name], state[f"{layer}.scale"], smooth=state.get(f"{layer}.smooth"))
        # mxfp8 -> per-row fp8: exact but for values pushed below e4m3's normal range; int8: one more rounding
        assert relative_error(theirs, ours) < (1e-4 if quant == "mxfp8" else 0.02), name
        assert relative_error(reference[name], ours) < (0.04 if quant == "mxfp8" else 0.03), name
    for name, t in reference.items():
        if not is_quantized_name(name):
            assert torch.equal(state[name], t.to(torch.bfloat16).float()), name
    ref_model = load_dit(synth.write_dit(_with_config(tmp_path / "wan"), CFG, "wan", seed=3), dtype=torch.float32)
    with torch.no_grad():
        got, want = run_model(model, _inputs(CFG)), run_model(ref_model, _inputs(CFG))
    assert relative_error(want, got) < 0.05
