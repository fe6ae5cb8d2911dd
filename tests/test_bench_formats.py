"""bench_formats: each peer format as its tool quantizes it (checked against the tool's own code where it runs on
a CPU, else against its documented byte layout through the `gguf` package's dequantizer), and the benchmark's
table at a small scale."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import peer_formats as P  # noqa: E402


def heavy(rows: int = 32, cols: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) / torch.rand(rows, cols, generator=g).clamp_min(0.05).sqrt()
    w[:, 3] *= 8
    return (w * 0.02).to(torch.bfloat16).float()


def test_q8_0_matches_gguf_bit_for_bit():
    gguf = pytest.importorskip("gguf")
    from gguf import quants

    w = heavy()
    ref = quants.dequantize(quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0),
                            gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(ref, P.q8_0(w).numpy())


def _u8(a) -> np.ndarray:
    return np.asarray(a, dtype=np.int64).astype(np.uint8)


def _f16_bytes(t: torch.Tensor) -> np.ndarray:
    return t.reshape(-1, 1).numpy().astype(np.float16).view(np.uint8)


def _pack_k_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """llama.cpp's 12-byte 6-bit scale/min packing of Q4_K and Q5_K."""
    s = np.zeros((ls.shape[0], 12), dtype=np.int64)
    s[:, 0:4], s[:, 4:8] = ls[:, :4], lm[:, :4]
    s[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    s[:, 0:4] |= (ls[:, 4:] >> 4) << 6
    s[:, 4:8] |= (lm[:, 4:] >> 4) << 6
    return _u8(s)


def pack_q4_k(w: torch.Tensor) -> np.ndarray:
    L, _, _, d, dmin, ls, lm = P._qk_asym(w, 15, -1.0, 20)
    L = L.reshape(-1, 4, 2, 32).numpy().astype(np.int64)
    qs = _u8(L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)
    sc = _pack_k_scales(ls.numpy().astype(np.int64), lm.numpy().astype(np.int64))
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), sc, qs], axis=1)


def pack_q5_k(w: torch.Tensor) -> np.ndarray:
    L, _, _, d, dmin, ls, lm = P._qk_asym(w, 31, -0.5, 15)
    L = L.reshape(-1, 4, 2, 32).numpy().astype(np.int64)
    qs = _u8((L[:, :, 0] & 15) | ((L[:, :, 1] & 15) << 4)).reshape(-1, 128)
    high = (L >> 4).reshape(-1, 8, 32)  # bit 4 of chunk c's two halves -> bits 2c, 2c+1
    qh = _u8(sum(high[:, k] << k for k in range(8)))
    sc = _pack_k_scales(ls.numpy().astype(np.int64), lm.numpy().astype(np.int64))
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), sc, qh, qs], axis=1)


def pack_q6_k(w: torch.Tensor) -> np.ndarray:
    L, _, d, sc = P._q6k(w)
    L = (L.reshape(-1, 2, 4, 32).numpy().astype(np.int64) + 32)
    ql = np.concatenate([(L[:, :, 0] & 15) | ((L[:, :, 2] & 15) << 4), (L[:, :, 1] & 15) | ((L[:, :, 3] & 15) << 4)],
                        axis=2).reshape(-1, 128)
    qh = sum((L[:, :, k] >> 4) << (2 * k) for k in range(4)).reshape(-1, 64)
    scales = sc.reshape(-1, 16).numpy().astype(np.int8).view(np.uint8)
    return np.concatenate([_u8(ql), _u8(qh), scales, _f16_bytes(d.reshape(-1))], axis=1)


@pytest.mark.parametrize("name, pack, fn", [("Q4_K", pack_q4_k, P.q4_k), ("Q5_K", pack_q5_k, P.q5_k),
                                            ("Q6_K", pack_q6_k, P.q6_k)])
def test_k_quants_round_trip_through_gguf(name, pack, fn):
    """Our K-quant codes packed in llama.cpp's block layout and decoded by the gguf package equal our own
    dequantized weight, and the error sits where the format's bits put it."""
    gguf = pytest.importorskip("gguf")
    from gguf import quants

    w = heavy(cols=1024)
    blocks = pack(w)
    qtype = getattr(gguf.GGMLQuantizationType, name)
    assert blocks.shape[1] == gguf.GGML_QUANT_SIZES[qtype][1]
    decoded = quants.dequantize(blocks.reshape(w.shape[0], -1), qtype)
    ours = fn(w).numpy()
    np.testing.assert_allclose(decoded, ours, rtol=1e-6, atol=1e-7)
    err = float(np.linalg.norm(ours - w.numpy()) / np.linalg.norm(w.numpy()))
    assert {"Q6_K": 0.01 < err < 0.04, "Q5_K": 0.02 < err < 0.07, "Q4_K": 0.05 < err < 0.14}[name], err


def test_k_quant_search_beats_plain_min_max():
    """make_qkx2_quants' search must find better scales than the first min/max guess (that is its job)."""
    w = heavy(cols=512)
    x = w.reshape(-1, 8, 32)
    weights = x.abs() + (x * x).mean(-1, keepdim=True).sqrt()
    s0, m0 = P._make_qkx2(x, weights, 15, -1.0, 0.1, 0)
    s1, m1 = P._make_qkx2(x, weights, 15, -1.0, 0.1, 20)

    def err(s, m):
        L = torch.round((x + m[..., None]) / s[..., None]).clamp(0, 15)
        return float((weights * (s[..., None] * L - m[..., None] - x) ** 2).sum())

    assert err(s1, m1) < 0.95 * err(s0, m0)


def test_nf4_matches_bitsandbytes_cpu():
    bf = pytest.importorskip("bitsandbytes.functional")
    w = heavy().to(torch.bfloat16)
    try:
        q, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    except (RuntimeError, NotImplementedError) as e:  # pragma: no cover - a build without the CPU path
        pytest.skip(f"bitsandbytes has no CPU 4-bit path here: {e}")
    assert torch.equal(bf.dequantize_4bit(q, state).float(), P.nf4(w))
    assert torch.allclose(torch.tensor(P.NF4_CODE), bf.get_4bit_type("nf4", device="cpu").cpu())


def test_quanto_int8_matches_optimum_quanto():
    quanto = pytest.importorskip("optimum.quanto")
    w = heavy().to(torch.bfloat16)
    q = quanto.quantize_weight(w, qtype=quanto.qint8, axis=0, scale=quanto.absmax_scale(w, quanto.qint8, axis=0))
    assert torch.equal(q.dequantize().float(), P.quanto_int8(w))


def test_eight_bit_formats_invert_their_layout():
    """Rotation-based and block-scaled formats: exact where no rounding happens, and orthonormal rotations."""
    h = P.regular_hadamard(256)
    assert torch.allclose(h @ h.T, torch.eye(256), atol=1e-5) and torch.allclose(h, h.T)
    grid = torch.tensor([[1.0, -2.0, 0.5, 0.25] * 8] * 2)  # powers of two: exact in every 8-bit float format
    assert torch.equal(P.mxfp8(grid), grid) and torch.equal(P.fp8_cast(grid), grid)
    w = heavy()
    errs = {n: float((f.fn(w) - w).norm() / w.norm()) for n, f in P.PEER_FORMATS.items() if f.fn is not None}
    assert errs["comfy int8_convrot"] < errs["quanto int8 (WanGP)"]  # the rotation helps heavy tails
    assert errs["gguf Q8_0"] < errs["gguf Q6_K"] < errs["gguf Q5_K"] < errs["gguf Q4_K"]
    assert P.PEER_FORMATS["gguf Q4_K"].bits(64, 512) == 4.5 and P.PEER_FORMATS["gguf Q4_K"].bits(64, 48) == 16


def test_bench_formats_table_small_scale(tmp_path):
    """The benchmark's umT5 stage end to end on the CPU at a small scale: every row measured, and the rotation
    our int8 adds beats plain per-channel INT8 on the heavy-tailed weights (the ranking the full run reports)."""
    import bench_formats

    data = bench_formats.main(["--tiny", "--skip", "dit,mild", "--json", str(tmp_path / "f.json")])
    rows = data["umt5"]["variants"]
    assert len(rows) == 9 and all("embeddings_rel_error" in r for r in rows.values())
    assert rows["ours int8 (rotated quanto int8)"]["embeddings_rel_error"] < \
        rows["quanto int8 (WanGP)"]["embeddings_rel_error"]
    assert rows["gguf Q4_K_M"]["bits_per_weight"] > 4.5  # the Q6_K layers of the _M mix
    assert (tmp_path / "f.json").is_file()
