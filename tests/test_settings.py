"""settings.py and config.py: the defaults are upstream's (SPEC section 8), the presets are the published recipes,
presets warn without their LoRA, `composite_reference` is replacement-only; the CLI and the Python API agree."""

from __future__ import annotations

import inspect

import pytest
from typer.testing import CliRunner

from scail2_lite import config
from scail2_lite.cli import app
from scail2_lite.errors import UserError
from scail2_lite.pipeline import Pipeline
from scail2_lite.settings import GenerationSettings

# SPEC section 8 (upstream wan-branch `generate.py` `_parse_args`/`_validate_args`, README "Useful sampling options"
# and "LoRA Integrations"), written out here so that a change of ours cannot move both sides at once.
SPEC_DEFAULTS = dict(steps=40, shift=3.0, guidance=5.0, solver="unipc", segment_len=81, segment_overlap=5)
SPEC_NEGATIVE_PROMPT = ""
SPEC_FPS = 16
SPEC_LIGHTX2V = dict(steps=8, shift=1.0, guidance=1.0, solver="unipc")
SPEC_LIGHTX2V_LORA = "lightx2v_I2V_14B_480p_cfg_step_distill_rank128_bf16.safetensors"


def test_defaults_are_upstream_spec_section_8():
    s = GenerationSettings()
    assert {k: getattr(s, k) for k in SPEC_DEFAULTS} == SPEC_DEFAULTS
    assert config.DEFAULT_FPS == SPEC_FPS and s.fps is None  # None = the driving video's fps (16 for frame folders)
    assert s.uses_cfg and not s.replace and not s.composite_reference and s.preset is None
    # Built from CLI flags left unset (None), the same values.
    assert GenerationSettings.build(None, steps=None, shift=None, guidance=None, solver=None) == s


def test_every_path_uses_the_empty_negative_prompt():
    assert config.DEFAULT_NEGATIVE_PROMPT == SPEC_NEGATIVE_PROMPT
    assert inspect.signature(Pipeline.__call__).parameters["negative_prompt"].default == SPEC_NEGATIVE_PROMPT
    from scail2_lite.cli.generate import generate

    option = inspect.signature(generate).parameters["negative_prompt"].default
    assert option.default == SPEC_NEGATIVE_PROMPT


def test_lightx2v_preset_is_upstreams_recipe_and_explicit_values_win():
    s = GenerationSettings.build("lightx2v")
    assert {k: getattr(s, k) for k in SPEC_LIGHTX2V} == SPEC_LIGHTX2V and s.preset == "lightx2v"
    assert not s.uses_cfg  # one DiT pass per step
    assert config.GENERATION_PRESETS["lightx2v"].lora == SPEC_LIGHTX2V_LORA
    assert GenerationSettings.build("lightx2v", steps=6, shift=None).steps == 6
    four = GenerationSettings.build("lightx2v-4step")
    assert (four.steps, four.shift, four.guidance, four.solver) == (4, 5.0, 1.0, "lcm")
    fast = GenerationSettings.build("fast")  # the old name of the 4-step recipe still works
    assert fast.with_changes(preset="lightx2v-4step") == four
    with pytest.raises(UserError, match="unknown --preset 'turbo'"):
        GenerationSettings.build("turbo")


@pytest.mark.parametrize("preset", ["lightx2v", "lightx2v-4step", "fast"])
def test_preset_warns_without_a_distill_lora(preset):
    s = GenerationSettings.build(preset)
    lora = config.GENERATION_PRESETS[preset].lora
    warning = s.preset_warning([])
    assert warning is not None and "no LoRA is loaded" in warning and lora in warning
    other = s.preset_warning(["model/bias-aware-dpo-lora.pt"])
    assert other is not None and "bias-aware-dpo-lora.pt" in other
    assert s.preset_warning([f"/loras/{lora}"]) is None
    assert s.preset_warning(["my_Lightx2v_rank64.safetensors", "dpo.pt"]) is None
    assert GenerationSettings().preset_warning([]) is None  # no preset, no recipe to miss


def test_composite_reference_is_replacement_only():
    assert GenerationSettings(replace=True, composite_reference=True).composite_reference
    with pytest.raises(UserError, match="--composite-reference applies to replacement mode"):
        GenerationSettings(composite_reference=True)


def test_cli_help_names_each_presets_lora_and_the_defaults():
    res = CliRunner().invoke(app, ["generate", "--help"], env={"COLUMNS": "400", "TERM": "dumb"})
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    for name, recipe in config.GENERATION_PRESETS.items():
        assert name in text and recipe.lora in text
    assert "--composite-reference" in text and "default: 3," in text


def test_cli_warns_before_loading_when_a_preset_has_no_lora(tmp_path, monkeypatch):
    """The warning comes before the (minutes long) DiT load, from the same check the pipeline records."""
    import scail2_lite.pipeline as pipeline

    def stop(*args, **kwargs):
        raise UserError("stopped before loading")

    import torch

    from scail2_lite import media

    monkeypatch.setattr(pipeline.Pipeline, "from_pretrained", stop)
    (tmp_path / "model").mkdir()
    media.save_frames(tmp_path / "frames", torch.zeros(3, 5, 32, 32))  # outputs are checked against real inputs
    frame = next((tmp_path / "frames").iterdir())
    args = ["generate", str(tmp_path / "model"), "--image", str(frame), "--mask-image", str(frame),
            "--pose", str(tmp_path / "frames"), "--mask-video", str(tmp_path / "frames"), "--preset", "lightx2v",
            "-o", str(tmp_path / "out.mp4")]
    res = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "stopped before loading" in text
    assert text.index("--preset lightx2v") < text.index("stopped before loading")
    assert "no LoRA is loaded" in text
