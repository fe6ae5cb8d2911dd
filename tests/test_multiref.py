"""Multi-reference (SPEC section 6): the DiT against the `dit_multiref` fixture in both modes (weights as loaded
and from the SAT file), the RoPE positions of every segment, the conditions' checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_model
from test_model import TOL, fixture_inputs, fixture_model, load_fixture_weights, load_npy, tiny_config

from scail2_lite import synth
from scail2_lite.errors import UserError
from scail2_lite.loader import load_dit
from scail2_lite.rope import axis_lanes, rope_freqs, rope_tables

FOLDER = "dit_multiref"


def extra_inputs(folder: Path) -> dict[str, torch.Tensor]:
    return {"additional_ref_latents": load_npy(folder / "in_extra_ref_latents.npy")[None],
            "additional_ref_masks": load_npy(folder / "in_extra_ref_masks.npy")[None]}


def check_both_modes(model: torch.nn.Module, folder: Path) -> None:
    inputs, extras = fixture_inputs(folder), extra_inputs(folder)
    for replace in (False, True, False):  # the cached RoPE tables must follow the mode
        with torch.no_grad():
            out = run_model(model, inputs, replace, **extras)
        expected = load_npy(folder / ("out_replace.npy" if replace else "out_anim.npy"))
        assert out.dtype == torch.float32 and out.shape == (1, *expected.shape)
        assert (out[0] - expected).abs().max().item() <= TOL, f"replace_flag={replace}"


def test_multiref_parity(oracle: Path) -> None:
    check_both_modes(fixture_model(oracle / FOLDER), oracle / FOLDER)


def test_multiref_parity_from_the_sat_file(oracle: Path, tmp_path: Path) -> None:
    folder = oracle / FOLDER
    config = tiny_config(json.loads((folder / "meta.json").read_text()))
    path = synth.write_sat(tmp_path, load_fixture_weights(folder), config.num_layers)
    check_both_modes(load_dit(path, config=config, dtype=torch.float32).eval(), folder)


def test_extra_references_move_the_output_and_their_order_matters(oracle: Path) -> None:
    """Without the extra references the model is the dit_attn one (same weights and inputs); with them the video
    changes; swapping two extra references changes it again (their t positions differ)."""
    folder = oracle / FOLDER
    model, inputs, extras = fixture_model(folder), fixture_inputs(folder), extra_inputs(folder)
    with torch.no_grad():
        plain = run_model(model, inputs)
        multi = run_model(model, inputs, **extras)
        swapped = run_model(model, inputs, **{k: v.flip(2) for k, v in extras.items()})
    assert (plain[0] - load_npy(oracle / "dit_attn" / "out_anim.npy")).abs().max().item() <= TOL
    assert (multi - plain).abs().max() > 1e-3 and (swapped - multi).abs().max() > 1e-4


@pytest.mark.parametrize("replace", [False, True])
def test_rope_positions_follow_the_table(replace: bool) -> None:
    """Every token's (t, h, w) position, read back from the gathered table, is SPEC section 6's."""
    head_dim, n, (f, h, w) = 32, 3, (2, 4, 6)
    cos, _ = rope_freqs(head_dim, (f, h, w), replace, extra_refs=n)
    table, _ = rope_tables(head_dim)
    pt, ph, _ = (lanes // 2 for lanes in axis_lanes(head_dim))
    b = 0 if replace else 1
    href = 120 if replace else 0
    expected = [(k, href + i, j) for k in range(n) for i in range(h) for j in range(w)]
    expected += [(n, href + i, j) for i in range(h) for j in range(w)]
    expected += [(n + b + t, i, j) for t in range(f) for i in range(h) for j in range(w)]
    assert cos.shape[0] == len(expected) + f * (h // 2) * (w // 2)
    for row, (tp, hp, wp) in zip(cos, expected):
        want = torch.cat([table[tp, :pt], table[hp, pt : pt + ph], table[wp, pt + ph :]]).float()
        torch.testing.assert_close(row, want, rtol=0, atol=0)
    # pose: 2x2 pooled rows of the video grid at w + 120, same t as the video
    pose = cos[len(expected):].view(f, h // 2, w // 2, -1)
    t_cols = table[n + b : n + b + f, :pt].float()
    torch.testing.assert_close(pose[:, 0, 0, :pt], t_cols)
    w_cols = table[120:122, pt + ph :].float().mean(0)
    torch.testing.assert_close(pose[0, 0, 0, pt + ph :], w_cols)


def test_no_extra_references_is_the_three_segment_table() -> None:
    for replace in (False, True):
        plain = rope_freqs(32, (2, 4, 4), replace)
        zero = rope_freqs(32, (2, 4, 4), replace, extra_refs=0)
        assert all(torch.equal(a, b) for a, b in zip(plain, zero))


def test_conditions_check_the_extra_references(oracle: Path) -> None:
    folder = oracle / FOLDER
    model, inputs, extras = fixture_model(folder), fixture_inputs(folder), extra_inputs(folder)
    bad = [
        ({"additional_ref_latents": extras["additional_ref_latents"]}, "both or neither"),
        ({**extras, "additional_ref_masks": extras["additional_ref_masks"][:, :, :1]}, "additional_ref_masks must be"),
        ({**extras, "additional_ref_latents": extras["additional_ref_latents"][..., :4]}, "additional_ref_latents must"),
    ]
    for given, message in bad:
        with pytest.raises(UserError, match=message):
            run_model(model, inputs, **given)
