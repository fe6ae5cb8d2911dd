"""The Wan key contract: every DiT tensor's name and shape, and how other formats' names map onto it."""

from __future__ import annotations

import re
import math
from pathlib import Path

from ..config import DiTConfig
from ..errors import UserError

COMFY_PREFIX = "model.diffusion_model."
SAT_FILE = "fsdp2_rank_0000_checkpoint.pt"
FP8_MARKER = "scaled_fp8"
# Tensors beside a quantized weight in ComfyUI files (fp8_scaled; the comfy_quant convention) and in our folders:
# not model tensors, no key of the contract.
AUX_SUFFIXES = (".scale_weight", ".scale_input", ".weight_scale", ".input_scale", ".comfy_quant", ".scale", ".smooth")
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool",
}


def wan_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Wan-named SCAIL-2 DiT and its shape (1307 tensors for the 14B model)."""
    d, f, p = config.dim, config.ffn_dim, tuple(config.patch_size)
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out: int, inp: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp), (out,)

    for name, cin in (("patch_embedding", config.in_dim), ("patch_embedding_pose", config.in_dim),
                      ("patch_embedding_mask", config.mask_dim)):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (d, cin, *p), (d,)
    linear("text_embedding.0", d, config.text_dim)
    linear("text_embedding.2", d, d)
    linear("time_embedding.0", d, config.freq_dim)
    linear("time_embedding.2", d, d)
    linear("time_projection.1", 6 * d, d)
    c = config.clip_dim
    shapes["img_emb.proj.0.weight"], shapes["img_emb.proj.0.bias"] = (c,), (c,)
    linear("img_emb.proj.1", c, c)
    linear("img_emb.proj.3", d, c)
    shapes["img_emb.proj.4.weight"], shapes["img_emb.proj.4.bias"] = (d,), (d,)
    for i in range(config.num_layers):
        b = f"blocks.{i}"
        shapes[f"{b}.modulation"] = (1, 6, d)
        for proj in "qkvo":
            linear(f"{b}.self_attn.{proj}", d, d)
        for proj in ("q", "k", "v", "o", "k_img", "v_img"):
            linear(f"{b}.cross_attn.{proj}", d, d)
        for norm in ("self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k",
                     "cross_attn.norm_k_img"):
            shapes[f"{b}.{norm}.weight"] = (d,)
        shapes[f"{b}.norm3.weight"], shapes[f"{b}.norm3.bias"] = (d,), (d,)
        linear(f"{b}.ffn.0", f, d)
        linear(f"{b}.ffn.2", d, f)
    shapes["head.modulation"] = (1, 2, d)
    linear("head.head", config.out_dim * math.prod(p), d)
    return shapes


def short_list(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def key_problems(shapes: dict[str, tuple[int, ...]], config: DiTConfig) -> list[str]:
    """Missing, unexpected and mis-shaped keys against the config's contract, one short phrase each."""
    expected = wan_shapes(config)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if tuple(shapes[k]) != expected[k])
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys: {short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys: {short_list(unexpected)}")
    if wrong:
        shown = [f"{k} {tuple(shapes[k])} instead of {expected[k]}" for k in wrong]
        problems.append(f"{len(wrong)} keys with the wrong shape: {short_list(shown, 3)}")
    return problems


def check_keys(shapes: dict[str, tuple[int, ...]], config: DiTConfig, source: Path | str) -> None:
    """Strict key check: raise one line naming what is missing, unexpected or mis-shaped."""
    problems = key_problems(shapes, config)
    if problems:
        raise UserError(f"{source} does not match the DiT config: {'; '.join(problems)}")


# ---------------------------------------------------------------- SAT -> Wan names

_SAT_RENAMES: list[tuple[re.Pattern, str]] = [
    (re.compile(p), r) for p, r in [
        (r"transformer\.layers\.(\d+)\.attention\.dense\.", r"blocks.\1.self_attn.o."),
        (r"transformer\.layers\.(\d+)\.cross_attention\.query\.", r"blocks.\1.cross_attn.q."),
        (r"transformer\.layers\.(\d+)\.cross_attention\.dense\.", r"blocks.\1.cross_attn.o."),
        (r"transformer\.layers\.(\d+)\.post_cross_attention_layernorm\.", r"blocks.\1.norm3."),
        (r"transformer\.layers\.(\d+)\.mlp\.dense_h_to_4h\.", r"blocks.\1.ffn.0."),
        (r"transformer\.layers\.(\d+)\.mlp\.dense_4h_to_h\.", r"blocks.\1.ffn.2."),
        (r"mixins\.adaln_layer\.adaLN_modulations\.(\d+)$", r"blocks.\1.modulation"),
        (r"mixins\.adaln_layer\.query_layernorm_list\.(\d+)\.", r"blocks.\1.self_attn.norm_q."),
        (r"mixins\.adaln_layer\.key_layernorm_list\.(\d+)\.", r"blocks.\1.self_attn.norm_k."),
        (r"mixins\.adaln_layer\.cross_query_layernorm_list\.(\d+)\.", r"blocks.\1.cross_attn.norm_q."),
        (r"mixins\.adaln_layer\.cross_key_layernorm_list\.(\d+)\.", r"blocks.\1.cross_attn.norm_k."),
        (r"mixins\.adaln_layer\.clip_feature_key_layernorm_list\.(\d+)\.", r"blocks.\1.cross_attn.norm_k_img."),
        (r"mixins\.final_layer\.adaLN_modulation$", r"head.modulation"),
        (r"mixins\.final_layer\.linear\.", r"head.head."),
        (r"mixins\.patch_embed\.proj\.", r"patch_embedding."),
        (r"mixins\.patch_embed\.proj_pose\.", r"patch_embedding_pose."),
        (r"mixins\.patch_embed\.proj_mask\.", r"patch_embedding_mask."),
        (r"time_embed\.(\d+)\.", r"time_embedding.\1."),
        (r"adaln_projection\.(\d+)\.", r"time_projection.\1."),
        (r"text_embedding\.(\d+)\.", r"text_embedding.\1."),
        (r"clip_proj\.proj\.(\d+)\.", r"img_emb.proj.\1."),
    ]
]
# Fused SAT tensors, split along dim 0 into these Wan projections.
_SAT_SPLITS: list[tuple[re.Pattern, str, tuple[str, ...]]] = [
    (re.compile(r"transformer\.layers\.(\d+)\.attention\.query_key_value\.(weight|bias)$"), "self_attn", ("q", "k", "v")),
    (re.compile(r"transformer\.layers\.(\d+)\.cross_attention\.key_value\.(weight|bias)$"), "cross_attn", ("k", "v")),
    (re.compile(r"mixins\.adaln_layer\.clip_feature_key_value_list\.(\d+)\.(weight|bias)$"), "cross_attn",
     ("k_img", "v_img")),
]
WANGP_RENAMES = {"pose_patch_embedding.": "patch_embedding_pose.", "mask_patch_embedding.": "patch_embedding_mask."}


def to_wan_names(name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], int, int]]:
    """Map one source key to Wan keys: [(wan_name, shape, split_index, n_splits)]; SAT fused tensors split."""
    name = name.removeprefix(COMFY_PREFIX)
    for pattern, attn, parts in _SAT_SPLITS:
        m = pattern.match(name)
        if m:
            if shape[0] % len(parts):
                raise UserError(f"SAT tensor {name} has {shape[0]} rows, not divisible into {'/'.join(parts)}")
            part_shape = (shape[0] // len(parts), *shape[1:])
            return [(f"blocks.{m[1]}.{attn}.{p}.{m[2]}", part_shape, i, len(parts)) for i, p in enumerate(parts)]
    for pattern, repl in _SAT_RENAMES:
        if pattern.match(name):
            return [(pattern.sub(repl, name, count=1), shape, 0, 1)]
    for old, new in WANGP_RENAMES.items():
        if name.startswith(old):
            return [(new + name[len(old):], shape, 0, 1)]
    return [(name, shape, 0, 1)]
