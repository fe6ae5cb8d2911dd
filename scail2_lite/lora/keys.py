"""Key names of every LoRA layout people download, both directions: file key -> (Wan module, part), and the
synthetic writer's Wan module -> file key.

Layouts (checked against ComfyUI's `comfy/lora.py` key map, diffusers' `_convert_non_diffusers_wan_lora_to_diffusers`
and upstream SCAIL-2's `convert_lora.py`):
- kohya / ComfyUI / LightX2V / upstream `convert_lora.py` output: `X.lora_down.weight`, `X.lora_up.weight`,
  optional `X.alpha`; full patches `X.diff` (a weight, or a raw parameter such as `blocks.N.modulation`),
  `X.diff_b` (the bias), `blocks.N.diff_m` (LightX2V: the block's modulation).
- PEFT / diffusers: `X.lora_A[.adapter].weight`, `X.lora_B[.adapter].weight`, `X.lora_B.bias` (= `diff_b`).
- SCAIL-2's own SAT files (`bias-aware-dpo-lora.pt`, `relighting-lora.pt`): `transformer.layers.N.<module>.
  lora_layer[.i].{down,up}.weight` (and `.diff_b`), one sub-LoRA per projection of a fused qkv / kv layer.
Module names: Wan (`blocks.0.self_attn.q`), diffusers (`blocks.0.attn1.to_q`), or either flattened with underscores
after `lora_unet_` (musubi/kohya; `lora_unet__` in VideoX-Fun files), behind any of the prefixes in `PREFIXES`.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

import torch

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.")

# Wan block-relative module name -> diffusers name (WanTransformer3DModel).
_BLOCK_TO_DIFFUSERS = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "norm3": "norm2",  # Wan runs norm1, norm3, norm2; diffusers renumbers the affine cross-attention norm to norm2
    "modulation": "scale_shift_table",
}
# Wan top-level module name -> diffusers name.
_TOP_TO_DIFFUSERS = {
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
# (module, part): part is lora_down/up/A/B (low rank), alpha, diff (weight or raw parameter), diff_b, diff_m
_SUFFIX_RE = re.compile(
    r"^(?P<module>.+?)\.(?:(?P<lr>lora_down|lora_up|lora_A|lora_B)(?:\.[A-Za-z0-9_-]+)?\.(?P<wb>weight|bias)"
    r"|(?P<other>alpha|diff|diff_b|diff_m))$"
)
# SCAIL-2's SAT LoRA files: (SAT module, sub-LoRA index) -> Wan block-relative module (SPEC section 7's table).
SAT_LORA_MODULES = {
    ("attention.query_key_value", "0"): "self_attn.q",
    ("attention.query_key_value", "1"): "self_attn.k",
    ("attention.query_key_value", "2"): "self_attn.v",
    ("attention.dense", None): "self_attn.o",
    ("cross_attention.query", None): "cross_attn.q",
    ("cross_attention.key_value", "0"): "cross_attn.k",
    ("cross_attention.key_value", "1"): "cross_attn.v",
    ("cross_attention.dense", None): "cross_attn.o",
    ("mlp.dense_h_to_4h", None): "ffn.0",
    ("mlp.dense_4h_to_h", None): "ffn.2",
}
_SAT_LORA_RE = re.compile(
    r"^(?:model\.diffusion_model\.)?transformer\.layers\.(?P<layer>\d+)\.(?P<module>.+?)\.lora_layer"
    r"(?:\.(?P<index>\d+))?\.(?P<part>down\.weight|up\.weight|diff_b)$"
)
_SAT_PARTS = {"down.weight": "down", "up.weight": "up", "diff_b": "diff_b"}
# Linears inside a block: what LoRA trainers target by default.
BLOCK_LINEARS = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img",
    "ffn.0", "ffn.2",
)  # fmt: skip
# The Linears SCAIL-2's own LoRAs adapt (no k_img/v_img: SPEC section 7).
SAT_LORA_LINEARS = tuple(SAT_LORA_MODULES.values())


def wan_to_diffusers(module: str) -> str | None:
    """Diffusers name of a Wan module (or raw parameter) name; None where diffusers has no counterpart."""
    m = _BLOCK_RE.match(module)
    if m:
        rest = _BLOCK_TO_DIFFUSERS.get(m.group(2))
        return f"blocks.{m.group(1)}.{rest}" if rest else None
    return _TOP_TO_DIFFUSERS.get(module, module if module.startswith("patch_embedding") else None)


def flat(name: str) -> str:
    return name.replace(".", "_")


def alias_table(model_shapes: dict[str, torch.Size]) -> dict[str, str]:
    """Every spelling a LoRA may use for a model module -> the Wan module (or raw parameter) name."""
    modules = {k.rsplit(".", 1)[0] for k in model_shapes if k.endswith((".weight", ".bias"))}
    raw = {k for k in model_shapes if not k.endswith((".weight", ".bias"))}  # modulation tensors
    modules |= raw | {k.rsplit(".", 1)[0] for k in raw}  # and their owners, for LightX2V's `blocks.N.diff_m`
    table: dict[str, str] = {}
    for m in modules:
        names = [m]
        d = wan_to_diffusers(m)
        if d:
            names.append(d)
        for n in names:
            table[n] = m
            table["lora_unet_" + flat(n)] = m
            table["lora_unet__" + flat(n)] = m
    return table


def strip_prefix(module: str) -> str:
    for p in PREFIXES:
        if module.startswith(p):
            return module[len(p) :]
    return module


def parse_key(key: str, aliases: dict[str, str]) -> tuple[str, str] | None:
    """(Wan module, part) of a file key, or None when it names nothing in the model. Parts: down, up (low rank),
    alpha, bias (PEFT's `lora_B.bias`, i.e. a `diff_b`), diff, diff_b, diff_m."""
    m = _SAT_LORA_RE.match(key)
    if m:
        wan = SAT_LORA_MODULES.get((m["module"], m["index"]))
        module = f"blocks.{m['layer']}.{wan}" if wan else None
        return (module, _SAT_PARTS[m["part"]]) if module in aliases else None
    m = _SUFFIX_RE.match(key)
    if m is None:
        return None
    module = aliases.get(strip_prefix(m.group("module")))
    if module is None:
        return None
    if not m.group("lr"):
        return module, m.group("other")
    if m.group("wb") == "bias":  # PEFT never writes a lora_A bias: nothing in the model to put it on
        return (module, "diff_b") if m.group("lr") in ("lora_up", "lora_B") else None
    return module, "down" if m.group("lr") in ("lora_down", "lora_A") else "up"


# ---------------------------------------------------------------- the other direction: synthetic files

LoraLayout = Literal["kohya", "comfy", "peft", "diffusers", "wan", "sat"]
LAYOUTS: tuple[str, ...] = get_args(LoraLayout)


def file_key(module: str, layout: LoraLayout, part: str) -> str:
    """Key of `part` (down, up, alpha, diff, diff_b, diff_m) for a Wan module in a file of `layout`. "wan" is
    upstream `convert_lora.py`'s output (and ComfyUI's repacks of SCAIL-2's LoRAs): ComfyUI names, no alpha."""
    kohya = {"down": "lora_down.weight", "up": "lora_up.weight"}
    if layout == "kohya":
        return f"lora_unet_{flat(module)}.{kohya.get(part, part)}"
    if layout in ("comfy", "wan"):
        return f"diffusion_model.{module}.{kohya.get(part, part)}"
    if layout == "sat":
        return _sat_key(module, part)
    names = {"down": "lora_A.weight", "up": "lora_B.weight", "diff_b": "lora_B.bias"}
    if layout == "peft":
        return f"base_model.model.{module}.{names[part]}"
    return f"transformer.{wan_to_diffusers(module)}.{names[part]}"


def _sat_key(module: str, part: str) -> str:
    m = _BLOCK_RE.match(module)
    sat = next(((s, i) for (s, i), w in SAT_LORA_MODULES.items() if m and w == m.group(2)), None)
    if sat is None:
        raise ValueError(f"SCAIL-2's SAT LoRAs have no module for {module}")
    index = f".{sat[1]}" if sat[1] is not None else ""
    tail = {"down": "down.weight", "up": "up.weight", "diff_b": "diff_b"}[part]
    return f"model.diffusion_model.transformer.layers.{m.group(1)}.{sat[0]}.lora_layer{index}.{tail}"
