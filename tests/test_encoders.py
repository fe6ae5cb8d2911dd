"""umT5 and CLIP: converters vs the 14B key contract, CLIP parity with the oracle, umT5 vs a hand-written T5."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionModel, PreTrainedTokenizerFast, UMT5EncoderModel

from conftest import load_npy, rss_file
from scail2_lite import encoders as E
from scail2_lite.errors import UserError


def _contract(oracle, name: str) -> set[str]:
    """Contract keys in PyTorch naming (the oracle writes `X.N` as `X.layers.N` and Wan's `ffn.gate.0` as gate_proj)."""
    keys = json.loads((oracle / "key_contract.json").read_text())[name]
    return {k.replace(".layers.", ".").replace(".gate_proj.", ".gate.0.") for k in keys}


# ------------------------------------------------------------------------------------------------ umT5


def test_umt5_converter_covers_full_contract(oracle):
    contract = _contract(oracle, "umt5")
    assert len(contract) == 242
    with torch.device("meta"):
        model = UMT5EncoderModel(E.umt5_config("full"))
    hf = model.state_dict()
    wan = E.umt5_hf_to_wan(hf)
    assert set(wan) == contract
    back = E.umt5_wan_to_hf(wan)
    assert set(back) == set(hf)
    assert all(back[k].shape == hf[k].shape for k in hf)
    cfg = E.umt5_config_from_state_dict(wan)
    full = E.umt5_config("full")
    for field in ("vocab_size", "d_model", "d_ff", "num_heads", "d_kv", "num_layers", "relative_attention_num_buckets"):
        assert getattr(cfg, field) == getattr(full, field), field
    assert cfg.dense_act_fn == "gelu_new" and cfg.is_gated_act


def test_umt5_converter_rejects_unknown_key():
    with pytest.raises(UserError, match="unexpected key"):
        E.umt5_wan_to_hf({"blocks.0.attn.x.weight": torch.zeros(1)})


def _random_wan_umt5(vocab: int = 64) -> dict[str, torch.Tensor]:
    cfg = E.umt5_config("tiny")
    cfg.vocab_size = vocab
    model = UMT5EncoderModel(cfg)
    sd = E.umt5_hf_to_wan(model.state_dict())
    g = torch.Generator().manual_seed(1)
    out = {}
    for k, t in sd.items():
        if "norm" in k:
            out[k] = 1.0 + 0.2 * torch.randn(t.shape, generator=g)
        elif "pos_embedding" in k:
            out[k] = torch.randn(t.shape, generator=g)  # order-1 biases so the bucket layout matters
        else:
            out[k] = torch.randn(t.shape, generator=g) / math.sqrt(t.shape[-1])
    return out


def _bucket(rel: torch.Tensor, buckets: int = 32, max_dist: int = 128) -> torch.Tensor:
    """T5 bidirectional relative-position bucket of (key - query)."""
    half = buckets // 2
    out = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    large = exact + (torch.log(rel.float().clamp(min=1) / exact) / math.log(max_dist / exact) * (half - exact)).long()
    return out + torch.where(rel < exact, rel, large.clamp(max=half - 1))


def _reference_umt5(sd: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Wan's T5 encoder written out: RMSNorm, unscaled attention + per-layer relative bias, gated GELU-tanh FFN."""

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    x = sd["token_embedding.weight"][ids]
    n = ids.shape[0]
    pos = torch.arange(n)
    buckets = _bucket(pos[None, :] - pos[:, None])
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(layers):
        p = lambda name: sd[f"blocks.{i}.{name}.weight"]  # noqa: E731
        heads = p("pos_embedding.embedding").shape[1]
        h = rms(x, p("norm1"))
        q, k, v = (
            (h @ p(f"attn.{c}").T).view(n, heads, -1).transpose(0, 1) for c in "qkv"
        )
        bias = p("pos_embedding.embedding")[buckets].permute(2, 0, 1)
        att = torch.softmax(q @ k.transpose(1, 2) + bias, dim=-1) @ v
        x = x + att.transpose(0, 1).reshape(n, -1) @ p("attn.o").T
        h = rms(x, p("norm2"))
        gate = F.gelu(h @ p("ffn.gate.0").T, approximate="tanh")
        x = x + (gate * (h @ p("ffn.fc1").T)) @ p("ffn.fc2").T
    return rms(x, sd["norm.weight"])


def _tiny_tokenizer(folder, words: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(folder)


def test_umt5_matches_handwritten_t5_and_trims(tmp_path):
    words = [f"w{i}" for i in range(40)]
    _tiny_tokenizer(tmp_path, words)
    sd = _random_wan_umt5()
    torch.save(sd, tmp_path / E.UMT5_FILE)
    tokenizer, model = E.load_text_encoder(tmp_path, dtype=torch.float32)
    prompts = ["w1 w5 w7 w30 w2", "w9   w3 &amp;"]  # second: whitespace collapsed, "&" unknown
    out = E.encode_text(tokenizer, model, prompts, text_len=16)
    assert [o.shape for o in out] == [(6, 48), (4, 48)]
    ids = [[4, 8, 10, 33, 5, 1], [12, 6, 2, 1]]
    for o, row in zip(out, ids):
        ref = _reference_umt5(sd, torch.tensor(row))
        torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-4)


def test_load_text_encoder_names_missing_file(tmp_path):
    with pytest.raises(UserError, match=E.UMT5_FILE):
        E.load_text_encoder(tmp_path)


def test_umt5_tiny_config_width_matches_tiny_dit():
    from scail2_lite.config import PRESETS

    assert E.umt5_config("tiny").d_model == PRESETS["tiny"].text_dim
    assert E.umt5_config("tiny").vocab_size == E.TINY_VOCAB


# ------------------------------------------------------------------------------------------------ CLIP


def test_clip_converter_covers_full_contract(oracle):
    contract = _contract(oracle, "clip")
    assert len(contract) == 393
    with torch.device("meta"):
        model = CLIPVisionModel(E.clip_config("full"))
    hf = {k: v for k, v in model.state_dict().items()}
    oc = E.clip_hf_to_openclip(hf)
    assert set(oc) == contract - {"visual.head", "log_scale"}
    oc |= {"visual.head": torch.empty(1280, 1024, device="meta"), "log_scale": torch.empty((), device="meta")}
    oc["textual.token_embedding.weight"] = torch.empty(8, 8, device="meta")
    back = E.clip_openclip_to_hf(oc)
    assert set(back) == set(hf)
    assert all(back[k].shape == hf[k].shape for k in hf)
    cfg = E.clip_config_from_state_dict(oc)
    full = E.clip_config("full")
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size"):
        assert getattr(cfg, field) == getattr(full, field), field
    assert cfg.patch_size == 14 and cfg.hidden_act == "gelu" and cfg.layer_norm_eps == 1e-5


def _oracle_clip_weights(folder) -> dict[str, torch.Tensor]:
    sd = {}
    for f in folder.glob("w_*.npy"):
        key = "visual." + f.stem[2:].replace("__", ".").replace(".layers.", ".")
        t = load_npy(f)
        if key == "visual.patch_embedding.weight":
            t = t.permute(0, 3, 1, 2)  # oracle conv weights are channels-last
        sd[key] = t
    return sd


def test_clip_tower_matches_oracle(oracle, tmp_path):
    folder = oracle / "clip"
    meta = json.loads((folder / "meta.json").read_text())
    sd = _oracle_clip_weights(folder)
    torch.save(sd, tmp_path / "clip.pth")
    model = E.load_clip(tmp_path / "clip.pth", dtype=torch.float32)
    assert model.config.num_attention_heads == meta["num_heads"]
    assert model.config.num_hidden_layers == meta["num_layers"]
    x = load_npy(folder / "x.npy")
    out = model(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(out, load_npy(folder / "out.npy"), atol=1e-5, rtol=1e-4)
    # the converter is an exact inverse on the real layout (minus the unused head)
    back = E.clip_hf_to_openclip(E.clip_openclip_to_hf(sd))
    assert set(back) == set(sd) - {"visual.head"}
    assert all(torch.equal(back[k], sd[k]) for k in back)


def test_clip_preprocess_matches_oracle(oracle):
    folder = oracle / "clippre"
    image = load_npy(folder / "pre_in.npy").permute(1, 0, 2, 3)  # Wan keeps (C, T, H, W)
    torch.testing.assert_close(E.clip_preprocess(image), load_npy(folder / "pre_out.npy"), atol=1e-5, rtol=1e-5)


def test_tiny_clip_yields_257_tokens():
    model = CLIPVisionModel(E.clip_config("tiny")).eval()
    out = E.encode_image(model, torch.rand(2, 3, 64, 48) * 2 - 1)
    assert out.shape == (2, 257, 64)


def test_clip_preprocess_rejects_bad_shape():
    with pytest.raises(UserError, match="B, 3, H, W"):
        E.clip_preprocess(torch.zeros(3, 10, 10))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux resident-set accounting")
def test_file_pages_are_given_back_and_tensors_stay_intact(tmp_path) -> None:
    from scail2_lite.formats.pickles import load_pth
    from scail2_lite.formats import FilePages

    weights = {"w": torch.randn(64, 1024, 1024 // 4)}  # 64 MB
    path = tmp_path / "w.pth"
    torch.save(weights, path)
    sd = load_pth(path)
    pages = FilePages([path])
    assert pages.ranges
    before = rss_file()
    assert torch.equal(sd["w"], weights["w"])  # reads every page
    touched = rss_file()
    pages.drop()
    assert touched - before > 48e6 and touched - rss_file() > 48e6
    assert torch.equal(sd["w"], weights["w"])  # faulted back in from the page cache, unchanged


def test_streamed_umt5_is_bit_identical_and_keeps_blocks_in_ram():
    """The default text-encoder path: blocks stay in RAM, their parameters point at a device copy only during
    their own forward, and the embeddings equal the resident model's bit for bit."""
    from scail2_lite.encoders import build_umt5, stream_blocks, umt5_config
    from scail2_lite.synth import umt5_tensors

    cfg = umt5_config("tiny")
    resident = build_umt5(umt5_tensors(cfg, 3))
    streamed = stream_blocks(build_umt5(umt5_tensors(cfg, 3)), "cpu")
    host = [{n: p.data_ptr() for n, p in b.named_parameters()} for b in streamed.encoder.block]
    ids = torch.randint(3, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        a = resident(input_ids=ids, attention_mask=mask).last_hidden_state
        b = streamed(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(a, b)
    for block, h in zip(streamed.encoder.block, host):  # one copy-in and one copy-back hook per block, and
        assert len(block._forward_pre_hooks) == 1 and len(block._forward_hooks) == 1  # the RAM tensors stay
        assert all(p.data_ptr() == h[n] for n, p in block.named_parameters())
