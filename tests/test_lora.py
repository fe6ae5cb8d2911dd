"""LoRA loading, key mapping and merging on the tiny SCAIL2Model: every format, every merge path."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from conftest import run_model
from safetensors.torch import save_file

from scail2_lite.config import DiTConfig
from scail2_lite.errors import UserError
from scail2_lite.lora import (
    BLOCK_LINEARS,
    I2V_IN_CHANNELS,
    SKIP_RULE,
    SKIP_SHAPE,
    LoraFile,
    LoraSidePath,
    apply_side_path,
    load_lora,
    load_lora_state,
    lora_index,
    make_lightx2v_lora,
    make_synthetic_lora,
    merge_block,
    merge_into_model,
    merge_into_state_dict,
    parse_lora_arg,
    read_lora_file,
    resolve_loras,
)
from scail2_lite.model import SCAIL2Model
from scail2_lite.quantize.linear import swap_linears
from scail2_lite.quantize.schemes import dequantize, quantize_linear, relative_error, rotate_columns

FORMATS = ("kohya", "comfy", "peft", "diffusers", "wan")
CFG = replace(DiTConfig.preset("tiny"), clip_dim=32)


@pytest.fixture(scope="module")
def model() -> SCAIL2Model:
    torch.manual_seed(0)
    return SCAIL2Model(CFG).eval()


@pytest.fixture(scope="module")
def shapes(model: SCAIL2Model) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items()}


def _inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    T, H, W = 2, 8, 8

    def r(*s):
        return torch.randn(*s, generator=g)

    return dict(
        x=r(1, 16, T, H, W), pose_latents=r(1, 16, T, H // 2, W // 2), driving_masks=r(1, 28, T, H // 2, W // 2),
        ref_latents=r(1, 16, 1, H, W), ref_masks=r(1, 28, 1 + T, H, W), t=torch.tensor([500.0]),
        context=r(1, 7, CFG.text_dim), clip_fea=r(1, 257, CFG.clip_dim),
    )  # fmt: skip


@torch.no_grad()
def _forward(m: SCAIL2Model) -> torch.Tensor:
    return run_model(m, _inputs())


def _predicted(base: dict[str, torch.Tensor], raw: dict[str, torch.Tensor], strength: float,
               full_patches: bool = True) -> dict[str, torch.Tensor]:
    """Weights predicted by hand from a comfy-format file: W + strength * alpha/rank * up @ down (alpha 1 per rank
    without `.alpha`), diffs added (upstream's rule, `full_patches` False: only the `diff_b` of a paired layer)."""
    out = {k: v.clone().float() for k, v in base.items()}
    for key, t in raw.items():
        mod = key.removeprefix("diffusion_model.")
        paired = key.replace(".diff_b", ".lora_down.weight") in raw
        if key.endswith(".lora_down.weight"):
            mod = mod.removesuffix(".lora_down.weight")
            up = raw[key.replace("lora_down", "lora_up")].float()
            down = t.float()
            alpha_key = key.replace("lora_down.weight", "alpha")
            alpha = raw[alpha_key].item() if alpha_key in raw else down.shape[0]
            w = out[f"{mod}.weight"]
            d = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(w.shape)
            out[f"{mod}.weight"] = w + strength * alpha / down.shape[0] * d
        elif not full_patches and not (key.endswith(".diff_b") and paired):
            continue
        elif key.endswith(".diff_b"):
            out[mod.removesuffix(".diff_b") + ".bias"] += strength * t.float()
        elif key.endswith(".diff"):
            out[mod.removesuffix(".diff") + ".weight"] += strength * t.float()
        elif key.endswith(".diff_m"):
            target = mod.removesuffix(".diff_m") + ".modulation"
            out[target] += strength * t.float().reshape(out[target].shape)
    return out


def test_every_format_maps_to_the_same_wan_updates(shapes):
    ref = load_lora_state(make_synthetic_lora(shapes, "comfy", rank=4, seed=3, include_diffs=True), shapes,
                          full_patches=True)
    ref_deltas = {u.target: u.delta(shapes[u.target]) for u in ref.updates}
    for fmt in FORMATS:
        raw = make_synthetic_lora(shapes, fmt, rank=4, seed=3, include_diffs=True)
        lora = load_lora_state(raw, shapes, fmt, full_patches=True)
        assert not lora.unmatched and not lora.skipped, lora.report()
        low_rank = {u.target for u in lora.updates if u.diff is None}
        assert low_rank == {f"blocks.{b}.{t}.weight" for b in range(CFG.num_layers) for t in BLOCK_LINEARS}
        for u in lora.updates:
            assert torch.equal(u.delta(shapes[u.target]), ref_deltas[u.target]), (fmt, u.target)


def test_merge_equals_prediction_and_changes_output_as_predicted(model, shapes):
    targets = BLOCK_LINEARS + ("head.head", "patch_embedding", "time_projection.1")
    raw = make_synthetic_lora(shapes, "comfy", rank=4, seed=5, targets=targets, include_diffs=True)
    lora = load_lora_state(raw, shapes, full_patches=True)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merge_into_model(copy.deepcopy(model), [(lora, 0.7)])
    predicted = _predicted(base, raw, 0.7)
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, predicted[k], rtol=0, atol=1e-6, msg=k)
    assert any(not torch.equal(merged.state_dict()[k], base[k]) for k in ("patch_embedding.weight", "head.head.weight"))
    by_hand = copy.deepcopy(model)
    by_hand.load_state_dict(predicted)
    out_merged, out_base = _forward(merged), _forward(model)
    torch.testing.assert_close(out_merged, _forward(by_hand), rtol=0, atol=1e-5)
    assert (out_merged - out_base).abs().max() > 1e-2


def test_strengths_and_several_loras_add(shapes):
    state = {k: torch.randn(s) for k, s in shapes.items()}
    raw1 = make_synthetic_lora(shapes, "comfy", rank=4, seed=1, include_diffs=True)
    raw2 = make_synthetic_lora(shapes, "comfy", rank=2, seed=2)
    l1, l2 = load_lora_state(raw1, shapes, full_patches=True), load_lora_state(raw2, shapes)
    merged = merge_into_state_dict(dict(state), [(l1, 0.5), (l2, -1.0)])
    p1, p2 = _predicted(state, raw1, 0.5), _predicted(state, raw2, -1.0)
    for k in state:
        torch.testing.assert_close(merged[k], p1[k] + p2[k] - state[k], rtol=0, atol=1e-5, msg=k)


def test_diffs_are_applied_to_norms_biases_and_modulation(shapes):
    raw = make_synthetic_lora(shapes, "kohya", rank=4, seed=7, include_diffs=True)
    state = {k: torch.zeros(s) for k, s in shapes.items()}
    merged = merge_into_state_dict(dict(state), [(load_lora_state(raw, shapes, full_patches=True), 2.0)])
    for wan, key in [
        ("blocks.1.norm3.weight", "lora_unet_blocks_1_norm3.diff"),
        ("blocks.1.norm3.bias", "lora_unet_blocks_1_norm3.diff_b"),
        ("blocks.0.cross_attn.norm_k_img.weight", "lora_unet_blocks_0_cross_attn_norm_k_img.diff"),
        ("blocks.0.ffn.2.bias", "lora_unet_blocks_0_ffn_2.diff_b"),
        ("blocks.1.modulation", "lora_unet_blocks_1.diff_m"),
    ]:
        torch.testing.assert_close(merged[wan], 2.0 * raw[key].float().reshape(shapes[wan]), rtol=0, atol=0)


def test_lightx2v_style_raw_parameter_diff_and_diffusers_names(shapes):
    state = {
        "diffusion_model.blocks.0.modulation.diff": torch.ones(shapes["blocks.0.modulation"]),
        "model.diffusion_model.head.modulation.diff": torch.ones(shapes["head.modulation"]),
        "transformer.blocks.1.norm2.diff": torch.ones(shapes["blocks.1.norm3.weight"]),
        "transformer.condition_embedder.time_proj.lora_B.bias": torch.ones(shapes["time_projection.1.bias"]),
        "lora_unet__blocks_0_cross_attn_k_img.diff_b": torch.ones(shapes["blocks.0.cross_attn.k_img.bias"]),
    }
    targets = sorted(u.target for u in load_lora_state(state, shapes, full_patches=True).updates)
    assert targets == [
        "blocks.0.cross_attn.k_img.bias", "blocks.0.modulation", "blocks.1.norm3.weight", "head.modulation",
        "time_projection.1.bias",
    ]  # fmt: skip


def test_unmatched_keys_are_reported(shapes):
    raw = make_synthetic_lora(shapes, "comfy", rank=4, seed=0)
    raw["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 8)
    raw["diffusion_model.blocks.99.self_attn.q.lora_down.weight"] = torch.zeros(4, 64)
    raw["diffusion_model.blocks.99.self_attn.q.lora_up.weight"] = torch.zeros(64, 4)
    lora = load_lora_state(raw, shapes, "x.safetensors")
    assert lora.unmatched == sorted(k for k in raw if "lora_te_" in k or "blocks.99" in k)
    assert lora.matched_keys == len(raw) - 3
    report = lora.report(0.5)
    assert report.startswith(f"LoRA x.safetensors at strength 0.5: {len(raw) - 3}/{len(raw)} keys applied")
    assert "\n  3 not matched (no such tensor in the SCAIL-2 DiT): diffusion_model.blocks.99" in report


def test_nothing_matching_is_an_error(shapes):
    with pytest.raises(UserError, match="none of its 2 keys"):
        load_lora_state({"lora_te_a.lora_down.weight": torch.zeros(1), "foo": torch.zeros(1)}, shapes, "t5.safetensors")


def test_wrong_base_model_and_rank_mismatch_name_key_and_shapes(shapes):
    small = {k: torch.Size([32 if d == 64 else d for d in s]) for k, s in shapes.items()}  # a "1.3B" geometry
    raw = make_synthetic_lora(small, "comfy", rank=4, seed=0)
    with pytest.raises(UserError, match=r"blocks\.0\.cross_attn\.k\.lora_down\.weight \(up \(32, 4\), down \(4, 32\)\)"
                       r" does not fit blocks\.0\.cross_attn\.k\.weight \(64, 64\)"):  # fmt: skip
        load_lora_state(raw, shapes)
    raw = make_synthetic_lora(shapes, "comfy", rank=4, seed=0)
    raw["diffusion_model.blocks.0.ffn.0.lora_down.weight"] = torch.zeros(3, 64)
    with pytest.raises(UserError, match=r"rank mismatch at \S+blocks\.0\.ffn\.0\.lora_up\.weight: up \(128, 4\) vs"):
        load_lora_state(raw, shapes)


def test_files_pickles_and_lora_args(tmp_path, shapes):
    raw = make_synthetic_lora(shapes, "diffusers", rank=4, seed=0)
    save_file(raw, tmp_path / "a.safetensors")
    torch.save(raw, tmp_path / "b.pt")
    a, b = load_lora(tmp_path / "a.safetensors", shapes), load_lora(tmp_path / "b.pt", shapes)
    assert [u.target for u in a.updates] == [u.target for u in b.updates] and a.name == "a.safetensors"

    torch.save({"w": torch.zeros(1), "evil": _NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="refused"):
        load_lora(tmp_path / "evil.pt", shapes)

    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    save_file(make_synthetic_lora(shapes, "peft", rank=4, seed=0), peft_dir / "adapter_model.safetensors")
    (peft_dir / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    assert {u.scale for u in load_lora(peft_dir / "adapter_model.safetensors", shapes).updates} == {2.0}

    assert parse_lora_arg("x.safetensors") == ("x.safetensors", 1.0)
    assert parse_lora_arg("x.safetensors:0.8") == ("x.safetensors", 0.8)
    assert parse_lora_arg(r"C:\loras\a:b.safetensors:-1.5e-1") == (r"C:\loras\a:b.safetensors", -0.15)
    assert parse_lora_arg(r"C:\loras\x.safetensors") == (r"C:\loras\x.safetensors", 1.0)
    with pytest.raises(UserError):
        parse_lora_arg(":0.5")


class _NotATensor:
    pass


def test_side_path_equals_dense_merge(model, shapes):
    loras = [(load_lora_state(make_synthetic_lora(shapes, "peft", rank=4, seed=s, include_diffs=True), shapes), w)
             for s, w in ((1, 0.8), (2, 0.5))]  # fmt: skip
    merged = merge_into_model(copy.deepcopy(model), loras)
    side = copy.deepcopy(model)
    index = lora_index(loras)
    for i, block in enumerate(side.blocks):
        apply_side_path(block, index, prefix=f"blocks.{i}.", dtype=torch.float32)
    assert isinstance(side.blocks[1].ffn[2], LoraSidePath) and side.blocks[1].ffn[2].down.shape == (8, 128)
    torch.testing.assert_close(_forward(side), _forward(merged), rtol=1e-4, atol=1e-4)

    # beside QuantLinear (weight-only dequant path on CPU): equals the dense merge into the dequantized weights
    quant, dense = copy.deepcopy(model), copy.deepcopy(model)
    names = {f"blocks.{i}.{t}": "int8" for i in range(CFG.num_layers) for t in BLOCK_LINEARS}
    swap_linears(quant, names, compute="dequant")
    for name in names:
        q = quant.get_submodule(name)
        dense.get_submodule(name).weight.data.copy_(dequantize(q.weight, q.scale, smooth=q.smooth))
        dense.get_submodule(name).bias.data.copy_(q.bias.float())
    merge_into_model(dense, loras)
    for i, block in enumerate(quant.blocks):
        apply_side_path(block, index, prefix=f"blocks.{i}.", dtype=torch.float32)
    torch.testing.assert_close(_forward(quant), _forward(dense), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_requantized_merge_within_quantization_error(model, shapes, scheme):
    lora = load_lora_state(make_synthetic_lora(shapes, "comfy", rank=4, seed=9, include_diffs=True), shapes)
    index = lora_index([(lora, 1.0)])
    ref = merge_into_model(copy.deepcopy(model), [(lora, 1.0)])
    direct_q, merged_q = copy.deepcopy(ref), copy.deepcopy(model)
    for i, block in enumerate(model.blocks):
        prefix = f"blocks.{i}."
        state: dict[str, torch.Tensor] = {}
        for k, v in block.state_dict().items():
            if k.endswith(".weight") and k.split(".")[0] in ("self_attn", "cross_attn", "ffn") and v.ndim == 2:
                layer = k.removesuffix("weight")
                state[k], state[layer + "scale"], smooth = quantize_linear(v, scheme)
                if smooth is not None:
                    state[layer + "smooth"] = smooth
            else:
                state[k] = v
        out = merge_block(state, index, prefix)
        assert set(out) == set(state) and out["ffn.0.weight"].dtype == state["ffn.0.weight"].dtype
        assert ("ffn.0.smooth" in out) == (scheme == "int8")
        for k, v in out.items():
            layer = k.removesuffix("weight")
            if k.endswith((".scale", ".smooth")):
                continue
            exact = ref.state_dict()[prefix + k]
            if layer + "scale" in out:
                deq = dequantize(v, out[layer + "scale"], smooth=out.get(layer + "smooth"))
                base_deq = dequantize(state[k], state[layer + "scale"], smooth=state.get(layer + "smooth"))
                # requantization adds at most one rounding step: half a step (int8) or 2^-4 relative (fp8 e4m3)
                expected = base_deq + (exact - block.state_dict()[k])
                step = out[layer + "scale"][:, None]
                if scheme == "int8":  # int8 rounds in its stored basis: columns / factors, rotated
                    err = rotate_columns((deq - expected) / out[layer + "smooth"]).abs()
                    assert (err <= step * 0.5 * 1.0001 + 1e-6).all(), k
                else:
                    bound = expected.abs() * 2**-4 + step * 2**-9
                    assert ((deq - expected).abs() <= bound * 1.0001 + 1e-7).all(), k
                merged_q.state_dict()[prefix + k].copy_(deq)
                q, scale, smooth = quantize_linear(exact, scheme)
                direct_q.state_dict()[prefix + k].copy_(dequantize(q, scale, smooth=smooth))
            else:
                torch.testing.assert_close(v, exact, rtol=0, atol=1e-6)
                merged_q.state_dict()[prefix + k].copy_(v)
    for k in ("head.head.weight", "patch_embedding.weight"):
        assert torch.equal(merged_q.state_dict()[k], ref.state_dict()[k])
    # yardstick: quantizing the float-merged weights once (what `quantize --lora` does); requantizing rounds twice
    quant_err = relative_error(_forward(ref), _forward(direct_q))
    merged_err = relative_error(_forward(ref), _forward(merged_q))
    assert 0 < merged_err <= 2 * quant_err, (merged_err, quant_err)


# ---- SCAIL-2's own LoRAs (SAT pickles), upstream's converter output, LightX2V's distill LoRA as people have it ----

# SPEC section 7's table, written out independently of the loader's: SAT module (+ sub-LoRA index) -> Wan module.
_SAT_TO_WAN = {
    "attention.query_key_value.lora_layer.0": "self_attn.q", "attention.query_key_value.lora_layer.1": "self_attn.k",
    "attention.query_key_value.lora_layer.2": "self_attn.v", "attention.dense.lora_layer": "self_attn.o",
    "cross_attention.query.lora_layer": "cross_attn.q", "cross_attention.key_value.lora_layer.0": "cross_attn.k",
    "cross_attention.key_value.lora_layer.1": "cross_attn.v", "cross_attention.dense.lora_layer": "cross_attn.o",
    "mlp.dense_h_to_4h.lora_layer": "ffn.0", "mlp.dense_4h_to_h.lora_layer": "ffn.2",
}  # fmt: skip


def _convert_lora_by_hand(sat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What upstream `convert_lora.py` writes: `diffusion_model.blocks.N.<wan>.lora_down/lora_up.weight`, `diff_b`."""
    out = {}
    for key, t in sat.items():
        rest = key.removeprefix("model.diffusion_model.transformer.layers.")
        layer, _, rest = rest.partition(".")
        for suffix, new in ((".down.weight", ".lora_down.weight"), (".up.weight", ".lora_up.weight"),
                            (".diff_b", ".diff_b")):
            if rest.endswith(suffix):
                out[f"diffusion_model.blocks.{layer}.{_SAT_TO_WAN[rest.removesuffix(suffix)]}{new}"] = t
    assert len(out) == len(sat)
    return out


def test_sat_dpo_lora_loads_safely_and_merges_with_upstreams_rule(model, shapes, tmp_path):
    import numpy as np

    sat = make_synthetic_lora(shapes, "sat", rank=4, seed=11, dtype=torch.float32)
    assert "model.diffusion_model.transformer.layers.1.attention.query_key_value.lora_layer.2.up.weight" in sat
    assert "model.diffusion_model.transformer.layers.0.mlp.dense_4h_to_h.lora_layer.down.weight" in sat
    assert len(sat) == CFG.num_layers * 10 * 2  # 10 modules per layer, like the DPO file's 800 = 40 x 10 x 2
    sat["model.diffusion_model.transformer.layers.0.cross_attention.key_value.lora_layer.1.diff_b"] = torch.full(
        (CFG.dim,), 0.25)  # convert_lora maps a diff_b too; upstream adds it to the paired layer's bias
    # as the SAT trainer saves it: tensors under "module", beside an iteration and NumPy's RNG state
    torch.save({"module": sat, "iteration": 3, "np_rng_state": np.random.RandomState(0).get_state()},
               tmp_path / "bias-aware-dpo-lora.pt")
    with pytest.raises(Exception, match="weights_only|Unsupported global"):  # plain weights_only needs the allow-list
        torch.load(tmp_path / "bias-aware-dpo-lora.pt", weights_only=True)
    lora = load_lora(tmp_path / "bias-aware-dpo-lora.pt", shapes)
    assert lora.matched_keys == len(sat) and not lora.unmatched and not lora.skipped, lora.report()
    torch.save({"module": sat}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # older torch.save
    assert read_lora_file(tmp_path / "legacy.pt").keys() == sat.keys()
    assert {u.scale for u in lora.updates} == {1.0}  # no alpha, no rank factor
    assert not any("img" in u.target for u in lora.updates)

    merged = merge_into_model(copy.deepcopy(model), [(lora, 0.8)])
    expected = _predicted(model.state_dict(), _convert_lora_by_hand(sat), 0.8, full_patches=False)
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=1e-6, msg=k)
    bias = "blocks.0.cross_attn.v.bias"
    torch.testing.assert_close(merged.state_dict()[bias], model.state_dict()[bias] + 0.2, rtol=0, atol=1e-6)

    # upstream convert_lora.py's safetensors output, and ComfyUI's bf16 repack of it: the same updates
    converted = _convert_lora_by_hand(sat)
    save_file(converted, tmp_path / "converted.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in converted.items()}, tmp_path / "repack_bf16.safetensors")
    deltas = {u.target: u.delta(shapes[u.target]) for u in lora.updates}
    for name, tol in (("converted.safetensors", 0.0), ("repack_bf16.safetensors", 1e-2)):  # bf16: ~0.4% off
        other = load_lora(tmp_path / name, shapes)
        assert other.matched_keys == len(sat) and not other.skipped and not other.unmatched
        for u in other.updates:
            assert relative_error(deltas[u.target], u.delta(shapes[u.target])) <= tol, (name, u.target)


def test_lightx2v_lora_with_the_36_channel_entry(model, shapes):
    raw = make_lightx2v_lora(shapes, rank=4, seed=2)
    pe = "diffusion_model.patch_embedding.diff"
    assert raw[pe].shape == (CFG.dim, I2V_IN_CHANNELS, 1, 2, 2) and shapes["patch_embedding.weight"][1] == 20
    full_keys = [k for k in raw if k.endswith((".diff", ".diff_m"))]
    unpaired_b = [k for k in raw if k.endswith(".diff_b") and k.replace(".diff_b", ".lora_down.weight") not in raw]
    assert "diffusion_model.blocks.0.cross_attn.norm_k_img.diff" in full_keys and "diffusion_model.blocks.1.diff_m" in raw

    # upstream's rule (the default): pairs and their diff_b merged, every other patch skipped and listed
    lora = load_lora_state(raw, shapes, "lightx2v.safetensors")
    assert lora.skipped == {SKIP_RULE: sorted(full_keys + unpaired_b)} and not lora.unmatched
    assert {u.target for u in lora.updates if u.diff is None} == {
        f"blocks.{b}.{t}.weight" for b in range(CFG.num_layers) for t in BLOCK_LINEARS}
    report = lora.report(1.0)
    skipped_line = report.splitlines()[1]
    assert skipped_line.startswith(f"  {len(full_keys) + len(unpaired_b)} full-tensor patches skipped by upstream's")
    assert f"diffusion_model.blocks.*.diff_m (x{CFG.num_layers})" in skipped_line and pe in skipped_line
    merged = merge_into_model(copy.deepcopy(model), [(lora, 1.0)])
    expected = _predicted(model.state_dict(), raw, 1.0, full_patches=False)
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=1e-6, msg=k)
    assert torch.equal(merged.state_dict()["patch_embedding.weight"], model.state_dict()["patch_embedding.weight"])

    # ComfyUI's rule (--lora-full-patches): the patches that fit are added, the 36-channel one is skipped, no error
    full = load_lora_state(raw, shapes, "lightx2v.safetensors", full_patches=True)
    assert full.skipped == {SKIP_SHAPE: [f"{pe} (64, 36, 1, 2, 2) vs patch_embedding.weight (64, 20, 1, 2, 2)"]}
    merged = merge_into_model(copy.deepcopy(model), [(full, 1.0)])
    expected = _predicted(model.state_dict(), {k: v for k, v in raw.items() if k != pe}, 1.0)
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=1e-6, msg=k)
    assert "1 shaped for another model, skipped: " + pe in full.report()


def test_wrong_shape_outside_the_blocks_is_skipped_and_nothing_to_apply_is_an_error(shapes):
    raw = make_synthetic_lora(shapes, "comfy", rank=4, seed=0, targets=("ffn.0",))
    raw["diffusion_model.patch_embedding.lora_down.weight"] = torch.zeros(4, I2V_IN_CHANNELS, 1, 2, 2)
    raw["diffusion_model.patch_embedding.lora_up.weight"] = torch.zeros(CFG.dim, 4, 1, 1, 1)
    lora = load_lora_state(raw, shapes)
    assert [u.target for u in lora.updates] == ["blocks.0.ffn.0.weight", "blocks.1.ffn.0.weight"]
    assert len(lora.skipped[SKIP_SHAPE]) == 2 and lora.skipped[SKIP_SHAPE][0].startswith(
        "diffusion_model.patch_embedding.lora_down.weight (up (64, 4, 1, 1, 1), down (4, 36, 1, 2, 2)) vs")
    only_patches = {"diffusion_model.blocks.0.norm3.diff": torch.zeros(CFG.dim)}
    with pytest.raises(UserError, match="nothing to apply: 1 full-tensor patches skipped by upstream's rule"):
        load_lora_state(only_patches, shapes, "patches.safetensors")
    assert load_lora_state(only_patches, shapes, full_patches=True).updates[0].target == "blocks.0.norm3.weight"


def test_lora_files_choose_the_rule_and_resolve(tmp_path, shapes):
    save_file(make_lightx2v_lora(shapes, rank=4, seed=0), tmp_path / "lx.safetensors")
    assert LoraFile.parse(f"{tmp_path / 'lx.safetensors'}:0.5", full_patches=True) == LoraFile(
        tmp_path / "lx.safetensors", 0.5, True)
    mapped = resolve_loras([LoraFile(tmp_path / "lx.safetensors", 0.5, True), (tmp_path / "lx.safetensors", 2.0)],
                           shapes)
    (full, s1), (upstream, s2) = mapped
    assert (s1, s2) == (0.5, 2.0) and len(full.updates) > len(upstream.updates)
    assert resolve_loras([(upstream, 0.3)], shapes)[0] == (upstream, 0.3)  # already mapped: kept
    assert set(read_lora_file(tmp_path / "lx.safetensors")) == set(make_lightx2v_lora(shapes, rank=4, seed=0))
