"""SCAIL2Model parity with the reference fixtures (fp32), plus the structural contracts other modules rely on."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import conditions, load_npy, run_model

from scail2_lite.config import DiTConfig
from scail2_lite.blocks import I2VCrossAttention, Kernels, SCAIL2Block, SelfAttention
from scail2_lite.model import SCAIL2Model
from scail2_lite.rope import apply_rope, rope_freqs, rope_tables

TOL = 1e-4


def mlx_to_torch(name: str) -> str:
    """MLX fixture naming -> PyTorch: Sequential children `X.layers.N.` are `X.N.`."""
    return re.sub(r"\.layers\.(\d+)\.", r".\1.", name)


def load_fixture_weights(folder: Path) -> dict[str, torch.Tensor]:
    """`w_<key>.npy` files (`.` written `__`, convs channels-last) -> a PyTorch state dict."""
    state = {}
    for path in sorted(folder.glob("w_*.npy")):
        tensor = load_npy(path)
        if tensor.ndim == 5:  # Conv3d (O, kT, kH, kW, I) -> (O, I, kT, kH, kW)
            tensor = tensor.permute(0, 4, 1, 2, 3)
        state[mlx_to_torch(path.stem[2:].replace("__", "."))] = tensor.contiguous()
    return state


def tiny_config(meta: dict) -> DiTConfig:
    keys = ("dim", "ffn_dim", "freq_dim", "text_dim", "num_heads", "num_layers", "in_dim", "mask_dim", "out_dim")
    return DiTConfig(**{k: meta[k] for k in keys}, patch_size=tuple(meta["patch_size"]), text_len=meta["text_len"])


def fixture_model(folder: Path) -> SCAIL2Model:
    model = SCAIL2Model(tiny_config(json.loads((folder / "meta.json").read_text())))
    model.load_state_dict(load_fixture_weights(folder), strict=True)
    return model.eval()


def fixture_inputs(folder: Path) -> dict[str, torch.Tensor]:
    """The fixture's single-sample inputs with a batch dimension added (context and clip already batched/unbatched)."""
    names = ("x", "pose_latents", "driving_masks", "ref_latents", "ref_masks")
    inputs = {n: load_npy(folder / f"in_{n}.npy")[None] for n in names}
    inputs["t"] = load_npy(folder / "in_t.npy")
    inputs["context"] = load_npy(folder / "in_context.npy")[None]
    inputs["clip_fea"] = load_npy(folder / "in_clip_fea.npy")
    return inputs


@pytest.mark.parametrize("folder", ["dit", "dit_attn"])
def test_dit_parity(oracle: Path, folder: str) -> None:
    """Both modes on one model, animation twice: the cached RoPE tables must follow the mode."""
    model = fixture_model(oracle / folder)
    inputs = fixture_inputs(oracle / folder)
    for replace in (False, True, False):
        with torch.no_grad():
            out = run_model(model, inputs, replace)
        expected = load_npy(oracle / folder / ("out_replace.npy" if replace else "out_anim.npy"))
        assert out.dtype == torch.float32 and out.shape == (1, *expected.shape)
        assert (out[0] - expected).abs().max().item() <= TOL, f"replace_flag={replace}"


def test_rope_tables_and_rotation(oracle: Path) -> None:
    meta = json.loads((oracle / "rope" / "meta.json").read_text())
    cos, sin = rope_tables(meta["headDim"])
    assert torch.allclose(cos.float(), load_npy(oracle / "rope" / "freqs_cos.npy"), atol=1e-6)
    assert torch.allclose(sin.float(), load_npy(oracle / "rope" / "freqs_sin.npy"), atol=1e-6)
    x = load_npy(oracle / "rope" / "x.npy")
    grid = (meta["F"], meta["H"], meta["W"])
    for replace, name in ((False, "out_anim"), (True, "out_replace")):
        cos, sin = rope_freqs(meta["headDim"], grid, replace)
        assert cos.shape == (meta["seq"], meta["halfD"])
        out = apply_rope(x, cos, sin)
        assert (out - load_npy(oracle / "rope" / f"{name}.npy")).abs().max().item() <= 1e-6


def test_rope_modes_differ() -> None:
    """Guards against a shift table that ignores the mode (the fixture outputs would catch it too, less directly)."""
    anim = rope_freqs(32, (2, 4, 4), False)[0]
    repl = rope_freqs(32, (2, 4, 4), True)[0]
    assert not torch.equal(anim, repl)


def test_patch_embedding(oracle: Path) -> None:
    folder = oracle / "patchembed"
    meta = json.loads((folder / "meta.json").read_text())
    config = DiTConfig(dim=meta["dim"], ffn_dim=16, freq_dim=8, text_dim=8, num_heads=1, num_layers=0)
    model = SCAIL2Model(config)
    for name, conv in (("latent", model.patch_embedding), ("mask", model.patch_embedding_mask)):
        conv.weight.data = load_npy(folder / f"{name}_weight.npy").permute(0, 4, 1, 2, 3).contiguous()
        conv.bias.data = load_npy(folder / f"{name}_bias.npy")
        with torch.no_grad():
            out = conv(load_npy(folder / f"{name}_x.npy")).permute(0, 2, 3, 4, 1)
        assert (out - load_npy(folder / f"{name}_out.npy")).abs().max().item() <= 1e-5


def test_i2v_cross_attention(oracle: Path) -> None:
    folder = oracle / "i2vcross"
    meta = json.loads((folder / "meta.json").read_text())
    module = I2VCrossAttention(meta["dim"], meta["heads"], eps=1e-6, img_len=meta["imgLen"])
    module.load_state_dict(load_fixture_weights(folder), strict=True)
    with torch.no_grad():
        out = module(load_npy(folder / "x.npy"), module.kv(load_npy(folder / "context.npy")), "sdpa")
    assert (out - load_npy(folder / "out.npy")).abs().max().item() <= 1e-5


def test_state_dict_matches_key_contract(oracle: Path) -> None:
    contract = json.loads((oracle / "key_contract.json").read_text())["dit"]
    with torch.device("meta"):
        model = SCAIL2Model(DiTConfig.preset("scail2-14b"))
    assert sorted(model.state_dict()) == sorted(mlx_to_torch(k) for k in contract)
    assert len(contract) == 1307
    n_params = sum(p.numel() for p in model.parameters())
    assert 16.3e9 < n_params < 16.5e9  # SPEC: about 16.4 B


def test_block_structure_for_streaming_and_quantization() -> None:
    """Blocks are a ModuleList of SCAIL2Block whose Linears are plain nn.Linear attributes (swappable by name)."""
    model = SCAIL2Model(DiTConfig.preset("tiny"))
    assert isinstance(model.blocks, torch.nn.ModuleList)
    assert all(isinstance(b, SCAIL2Block) for b in model.blocks)
    linears = {n for n, m in model.blocks[0].named_modules() if isinstance(m, torch.nn.Linear)}
    expected = {f"self_attn.{p}" for p in "qkvo"} | {f"cross_attn.{p}" for p in ("q", "k", "v", "o", "k_img", "v_img")}
    assert linears == expected | {"ffn.0", "ffn.2"}
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())


def test_blocks_called_once_in_order_with_swapped_linear(oracle: Path) -> None:
    """A streamer hooks each block; a quantizer swaps Linears by name. Both must see every block call."""
    model = fixture_model(oracle / "dit_attn")
    inputs = fixture_inputs(oracle / "dit_attn")
    with torch.no_grad():
        reference = run_model(model, inputs, False)
    calls: list[int] = []
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda _m, _a, i=i: calls.append(i))

    class Doubling(torch.nn.Module):
        def __init__(self, inner: torch.nn.Linear) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * self.inner(x)

    model.blocks[1].self_attn.v = Doubling(model.blocks[1].self_attn.v)
    with torch.no_grad():
        swapped = run_model(model, inputs, False)
    assert calls == list(range(len(model.blocks)))
    assert not torch.allclose(swapped, reference)


def test_chunking_is_exact(oracle: Path) -> None:
    model = fixture_model(oracle / "dit_attn")
    inputs = fixture_inputs(oracle / "dit_attn")
    with torch.no_grad():
        whole = run_model(model, inputs, True)
        # 37 does not divide the 56 tokens: exercises the ragged last chunk
        chunked = run_model(model, inputs, True, Kernels(attn_chunk=29, ffn_chunk=37))
    assert torch.equal(whole, chunked)


@pytest.mark.parametrize("chunk", [7, 64])
def test_v_takes_the_storage_of_h(chunk: int) -> None:
    """h, q, k and v never coexist (the planner counts 6 bytes per element there, not 8): v is projected into h's
    storage chunk by chunk, each chunk read before it is overwritten, with the values of a separate projection."""
    torch.manual_seed(0)
    attn = SelfAttention(32, 4, 1e-6)
    h = torch.randn(1, 50, 32)
    expected = torch.cat([attn.v(h[:, s : s + chunk]) for s in range(0, 50, chunk)], 1).unflatten(-1, (4, -1))
    angles = torch.rand(50, 4) * 6.28
    q, k, v = attn(h, (angles.cos(), angles.sin()), chunk)
    assert v.data_ptr() == h.data_ptr() and q.data_ptr() != h.data_ptr() != k.data_ptr()
    torch.testing.assert_close(v, expected, rtol=0, atol=0)


def test_embedded_tokens_are_contiguous_in_both_dtypes(oracle: Path) -> None:
    """The CUDA fused kernels read tokens with unit feature stride; a float32 model once got a transposed view."""
    inputs = fixture_inputs(oracle / "dit")
    for dtype in (torch.float32, torch.bfloat16):
        model = fixture_model(oracle / "dit").to(dtype)
        with torch.no_grad():
            tokens = model.embed(inputs["x"], inputs["t"], conditions(inputs)).x
        assert tokens.dtype == torch.float32 and tokens.is_contiguous(), dtype


def test_batch_equals_single_calls(oracle: Path) -> None:
    model = fixture_model(oracle / "dit_attn")
    one = fixture_inputs(oracle / "dit_attn")
    two = {k: torch.cat([v, v.flip(-1) if k != "t" else v * 0.5]) for k, v in one.items()}
    with torch.no_grad():
        batched = run_model(model, two)
        singles = [run_model(model, {k: v[i : i + 1] for k, v in two.items()}) for i in range(2)]
    assert torch.allclose(batched, torch.cat(singles), atol=1e-5, rtol=0)


def test_history_mask_changes_output_through_its_channels_only(oracle: Path) -> None:
    model = fixture_model(oracle / "dit_attn")
    inputs = fixture_inputs(oracle / "dit_attn")
    zeros = torch.zeros(1, 4, *inputs["x"].shape[2:])
    history = zeros.clone()
    history[:, :, 0] = 1.0
    with torch.no_grad():
        plain = run_model(model, inputs, False)
        with_zeros = run_model(model, inputs, False, history_mask=zeros)
        with_history = run_model(model, inputs, False, history_mask=history)
    assert torch.equal(plain, with_zeros)
    assert with_history.shape == plain.shape
    assert (with_history - plain).abs().max().item() > 1e-3


def test_context_padding_is_internal(oracle: Path) -> None:
    """Zero-padding the text context by the caller (e.g. to batch CFG branches) changes nothing."""
    model = fixture_model(oracle / "dit")
    inputs = fixture_inputs(oracle / "dit")
    padded = dict(inputs, context=torch.nn.functional.pad(inputs["context"], (0, 0, 0, 20)))
    with torch.no_grad():
        assert torch.equal(run_model(model, inputs, False), run_model(model, padded))


def test_bf16_model_runs_close_to_fp32(oracle: Path) -> None:
    model = fixture_model(oracle / "dit_attn")
    inputs = fixture_inputs(oracle / "dit_attn")
    with torch.no_grad():
        ref = run_model(model, inputs, False)
        out = run_model(model.to(torch.bfloat16), inputs)
    assert model.blocks[0].modulation.dtype == torch.bfloat16
    assert out.dtype == torch.float32
    assert (out - ref).abs().max().item() < 0.02 * ref.abs().max().item()  # measured 0.43%


def test_bad_shapes_raise_user_error(oracle: Path) -> None:
    from scail2_lite.errors import UserError

    model = fixture_model(oracle / "dit")
    inputs = fixture_inputs(oracle / "dit")
    with pytest.raises(UserError, match="pose_latents"):
        run_model(model, dict(inputs, pose_latents=inputs["pose_latents"][..., :2]))
    with pytest.raises(UserError, match="text context"):
        run_model(model, dict(inputs, context=torch.zeros(1, 600, 48)))
