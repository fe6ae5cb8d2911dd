"""Attention backends on the CPU: the fp8 backend's scale logic (through its emulation), `auto`, and ownership."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scail2_lite import attention as attn
from scail2_lite import attention_fp8
from scail2_lite.errors import UserError
from scail2_lite.config import PRESETS
from scail2_lite.offload.planner import block_activation_stages, load_profile


def exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(seed: int, length: int = 384, heads: int = 4, dim: int = 64) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, length, heads, dim, generator=g) for _ in range(3))


def test_emulated_fp8_attention_error_is_bounded_and_keys_offsets_are_smoothed_away() -> None:
    q, k, v = inputs(0)
    base = rel(attention_fp8.emulate(q, k, v), exact(q, k, v))
    assert 0.01 < base < 0.09  # e4m3 rounding of q, k, v, the probabilities and the output (the device measured 0.06)
    # A large per-channel key offset (trained keys have them) leaves the softmax unchanged; without the smoothing
    # e4m3 would keep ~1/8 of the offset as its step and the error would be far above the base one.
    offset = 40 * torch.randn(k.shape[2:], generator=torch.Generator().manual_seed(1))
    shifted = rel(attention_fp8.emulate(q, k + offset, v), exact(q, k + offset, v))
    assert shifted < 1.5 * base


def test_fp8_scales_never_overflow_and_use_the_range() -> None:
    q, k, v = inputs(2)
    k = k + 5
    v = v * 1e4  # the output's scale is v's: |O| <= absmax(v) holds at any magnitude
    k_mean, sq, sk, sv = attention_fp8.scales(q, k, v)
    for x, scale, mean in ((q, sq, None), (k, sk, k_mean), (v, sv, None)):
        before = x.clone()
        q8 = attention_fp8.quantize_reference(x, scale, mean)
        assert torch.equal(x, before)  # float32 inputs are not scaled in place
        values = q8.float()
        assert values.abs().max() <= attention_fp8.FP8_MAX and torch.isfinite(values).all()
        if mean is None:  # the absmax lands near the top of e4m3's range (k's scale is a bound: |k| + |mean|)
            assert values.abs().max() > 0.9 * attention_fp8.FP8_MAX
        back = values / scale + (0 if mean is None else mean)
        assert rel(back, x) < 0.04  # e4m3: 3 mantissa bits
    out = attention_fp8.emulate(q, k, v)
    assert torch.isfinite(out).all() and rel(out, exact(q, k, v)) < 0.09


def test_auto_resolves_to_sdpa_without_a_usable_fp8_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    assert attn.resolve("sdpa") == "sdpa"
    if not torch.cuda.is_available():
        assert attn.resolve("auto") == "sdpa"
        with pytest.raises(UserError, match="needs a CUDA GPU"):
            attn.resolve("fp8")
    monkeypatch.setattr(attention_fp8, "usable", lambda: True)
    monkeypatch.setattr(attn, "_capability", lambda: (9, 0))  # auto picks per architecture: a Hopper
    assert attn.resolve("auto") == "fp8"
    with pytest.raises(UserError, match="unknown attention backend"):
        attn.resolve("fp16")


def test_fp8_on_cpu_tensors_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention_fp8, "check_available", lambda: None)  # as on a GPU machine
    q, k, v = inputs(3, length=attn.QUANTIZED_MIN_KEYS // 8)
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        attn.attention(q, k, v, attn.resolve("fp8"))


def test_self_attention_takes_its_inputs_over() -> None:
    q, k, v = inputs(4)
    qkv = [q, k, v]
    out = attn.self_attention(qkv)
    assert qkv == [] and torch.equal(out, attn.attention(q, k, v))


def test_profiles_default_to_auto_and_fp8_costs_no_activation_memory() -> None:
    assert load_profile("16gb").attention == "auto"
    config = PRESETS["tiny"]
    sizes = {name: max(block_activation_stages(config, 4096, 1024, 1024, name).values())
             for name in ("sdpa", "auto", "fp8", "sage")}
    assert sizes["auto"] == sizes["fp8"] == sizes["sdpa"] < sizes["sage"]


def test_a_kernel_cudnn_cannot_build_is_one_line_and_auto_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    class Frontend:  # stands in for cudnn-frontend on a GPU/shape it has no kernel for
        class data_type:
            FP8_E4M3 = FLOAT = None

        @staticmethod
        def pygraph(**kwargs: object) -> None:
            raise RuntimeError("no engine\nsecond line")

    monkeypatch.setattr(attention_fp8, "_cudnn", lambda: Frontend)
    monkeypatch.setattr(attention_fp8, "_handle", lambda device: None)
    monkeypatch.setattr(attention_fp8, "check_available", lambda: None)
    with pytest.raises(UserError, match=r"^cuDNN has no FP8 attention kernel for this GPU/shape \(no engine\); use"):
        attention_fp8._graph(torch.Size((1, 64, 2, 16)), 64, torch.device("cpu"))
    attention_fp8.usable.cache_clear()
    try:
        assert not attention_fp8.usable() and attn.resolve("auto") == "sdpa"
    finally:
        attention_fp8.usable.cache_clear()
