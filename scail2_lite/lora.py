"""LoRA files for the Wan/SCAIL-2 DiT: read the formats people download, map their keys to Wan names, merge.

One place holds the format knowledge, both directions: the reader (`load_lora`) and the synthetic writer
(`make_synthetic_lora`) share the same name tables.

Conventions (checked against ComfyUI's `comfy/lora.py` key map and diffusers'
`_convert_non_diffusers_wan_lora_to_diffusers`):
- low rank: `X.lora_down.weight` / `X.lora_up.weight` (kohya, ComfyUI, LightX2V) or `X.lora_A[.adapter].weight` /
  `X.lora_B[.adapter].weight` (PEFT, diffusers); delta = scale * up @ down, scale = alpha / rank when `X.alpha`
  exists, else 1 (diffusers folds alpha into the matrices).
- full deltas: `X.diff` (the weight, or the raw parameter such as `blocks.N.modulation`), `X.diff_b` (the bias),
  `blocks.N.diff_m` (LightX2V: the block's modulation), `X.lora_B.bias` (PEFT `lora_bias`, diffusers' name for
  `diff_b`).
- module names: Wan (`blocks.0.self_attn.q`), diffusers (`blocks.0.attn1.to_q`), or either flattened with
  underscores after `lora_unet_` (musubi/kohya; `lora_unet__` in VideoX-Fun files), behind any of the prefixes
  `diffusion_model.`, `model.diffusion_model.`, `transformer.`, `base_model.model.` (PEFT).
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

LoraFormat = Literal["kohya", "peft", "diffusers", "comfy"]

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
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
# (module, kind): kind is down/up (low rank), alpha, diff (weight or raw parameter), diff_b (bias), diff_m (modulation)
_SUFFIX_RE = re.compile(
    r"^(?P<module>.+?)\.(?:(?P<lr>lora_down|lora_up|lora_A|lora_B)(?:\.[A-Za-z0-9_-]+)?\.(?P<wb>weight|bias)"
    r"|(?P<other>alpha|diff|diff_b|diff_m))$"
)
# Linears inside a block: what LoRA trainers target by default.
BLOCK_LINEARS = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img",
    "ffn.0", "ffn.2",
)  # fmt: skip


def wan_to_diffusers(module: str) -> str | None:
    """Diffusers name of a Wan module (or raw parameter) name; None where diffusers has no counterpart."""
    m = _BLOCK_RE.match(module)
    if m:
        rest = _BLOCK_TO_DIFFUSERS.get(m.group(2))
        return f"blocks.{m.group(1)}.{rest}" if rest else None
    return _TOP_TO_DIFFUSERS.get(module, module if module.startswith("patch_embedding") else None)


def _flat(name: str) -> str:
    return name.replace(".", "_")


@dataclass
class LoraUpdate:
    """One change to one model parameter: a low-rank pair (delta = scale * up @ down) or a full delta `diff`."""

    target: str
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    scale: float = 1.0
    diff: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return 0 if self.down is None else self.down.shape[0]

    def delta(self, shape: torch.Size, device: torch.device | str | None = None) -> torch.Tensor:
        """The full fp32 delta for a parameter of `shape` (conv LoRAs: down holds the kernel, up is 1x1)."""
        if self.diff is not None:
            return self.diff.to(device=device, dtype=torch.float32).reshape(shape)
        up = self.up.to(device=device, dtype=torch.float32).reshape(self.up.shape[0], -1)
        down = self.down.to(device=device, dtype=torch.float32).reshape(self.rank, -1)
        return (up @ down).mul_(self.scale).reshape(shape)


@dataclass
class LoRA:
    """A LoRA file mapped onto the model: its updates by target and what matched (for the user's report)."""

    name: str
    updates: list[LoraUpdate]
    matched_keys: int
    unmatched: list[str] = field(default_factory=list)

    def to(self, device: torch.device | str) -> "LoRA":
        """A copy with every tensor on `device` (e.g. kept on the GPU beside a block streamer)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        ups = [LoraUpdate(u.target, move(u.up), move(u.down), u.scale, move(u.diff)) for u in self.updates]
        return LoRA(self.name, ups, self.matched_keys, list(self.unmatched))

    def report(self, show: int = 8) -> str:
        """One line: how much matched and which keys did not (the first few)."""
        total = self.matched_keys + len(self.unmatched)
        line = f"LoRA {self.name}: {self.matched_keys}/{total} keys matched -> {len(self.updates)} updates"
        if self.unmatched:
            more = f" (+{len(self.unmatched) - show} more)" if len(self.unmatched) > show else ""
            line += f"; not matched: {', '.join(self.unmatched[:show])}{more}"
        return line


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """`PATH[:STRENGTH]` -> (path, strength). Only a trailing `:number` is a strength (Windows paths keep `C:`)."""
    m = re.match(r"^(?P<path>.*):(?P<s>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)$", arg)
    path, strength = (m.group("path"), float(m.group("s"))) if m else (arg, 1.0)
    head, sep, tail = arg.rpartition(":")
    if not m and sep and len(head) > 1 and not Path(arg).exists():  # `C:\x` is a drive, not a strength
        raise UserError(f"--lora {arg!r}: {tail!r} is not a strength (a number such as 0.8), and no file "
                        f"{arg!r} exists")
    if not path or not math.isfinite(strength):
        raise UserError(f"--lora {arg!r}: expected PATH or PATH:STRENGTH, e.g. my_lora.safetensors:0.8")
    return path, strength


def read_lora_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a LoRA file: safetensors, or a `.pt/.pth/.bin/.ckpt` pickle only if `weights_only` accepts it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
            raise UserError(f"LoRA {path}: not a readable safetensors file ({e})") from None
    if path.suffix not in (".pt", ".pth", ".bin", ".ckpt"):
        raise UserError(f"LoRA {path}: unknown file type {path.suffix!r} (expected .safetensors, .pt or .pth)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe pickle"
        raise UserError(f"LoRA {path}: refused, the pickle needs more than plain tensors ({first})") from None
    except Exception as e:  # zip/EOF errors from a damaged file
        raise UserError(f"LoRA {path}: cannot be read as a PyTorch file ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"LoRA {path}: expected a dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _peft_alpha(path: Path) -> float | None:
    """PEFT keeps alpha in `adapter_config.json` beside `adapter_model.safetensors`, not in the tensors."""
    cfg_path = path.with_name("adapter_config.json")
    if not cfg_path.is_file():
        return None
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("alpha_pattern"):
        raise UserError(f"{cfg_path}: per-module alpha_pattern is not supported; merge the adapter with PEFT first")
    alpha = cfg.get("lora_alpha")
    return float(alpha) if alpha is not None else None


def _alias_table(model_shapes: dict[str, torch.Size]) -> dict[str, str]:
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
            table["lora_unet_" + _flat(n)] = m
            table["lora_unet__" + _flat(n)] = m
    return table


def _strip_prefix(module: str) -> str:
    for p in _PREFIXES:
        if module.startswith(p):
            return module[len(p) :]
    return module


def _target(module: str, kind: str, model_shapes: dict[str, torch.Size]) -> str | None:
    """The model parameter a (resolved module, kind) pair changes, or None when the model has no such tensor."""
    if kind == "diff_m":
        candidates = [f"{module}.modulation"]
    elif kind in ("diff_b", "bias"):
        candidates = [f"{module}.bias"]
    else:
        candidates = [f"{module}.weight", module] if kind == "diff" else [f"{module}.weight"]
    return next((c for c in candidates if c in model_shapes), None)


def _shape_error(name: str, key: str, what: str, target: str, shape: torch.Size) -> UserError:
    return UserError(
        f"LoRA {name}: {key} {what} does not fit {target} {tuple(shape)}"
        " (a LoRA for another base model, e.g. T2V or 1.3B, or a damaged file)"
    )


def load_lora_state(
    state: dict[str, torch.Tensor],
    model_shapes: dict[str, torch.Size],
    name: str = "lora",
    default_alpha: float | None = None,
) -> LoRA:
    """Map a LoRA state dict onto the model's parameters (`model_shapes`: Wan name -> shape), checking shapes."""
    aliases = _alias_table(model_shapes)
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = defaultdict(dict)
    unmatched: list[str] = []
    for key, t in state.items():
        m = _SUFFIX_RE.match(key)
        if m is None:
            unmatched.append(key)
            continue
        raw = _strip_prefix(m.group("module"))
        module = aliases.get(raw)
        if module is None:
            unmatched.append(key)
            continue
        if m.group("lr"):
            lr, wb = m.group("lr"), m.group("wb")
            kind = "bias" if wb == "bias" else ("down" if lr in ("lora_down", "lora_A") else "up")
            if wb == "bias" and lr in ("lora_down", "lora_A"):
                unmatched.append(key)  # PEFT never writes a lora_A bias; nothing in the model to put it on
                continue
        else:
            kind = m.group("other")
        groups[module][kind] = (key, t)

    updates: list[LoraUpdate] = []
    matched = 0
    for module, g in sorted(groups.items()):
        if ("up" in g) != ("down" in g):
            have, miss = ("up", "down") if "up" in g else ("down", "up")
            raise UserError(f"LoRA {name}: {g[have][0]} has no matching {miss} matrix (a damaged file?)")
        if "up" in g:
            target = _target(module, "weight", model_shapes)
            (up_key, up), (down_key, down) = g["up"], g["down"]
            if target is None:
                unmatched += [up_key, down_key] + ([g["alpha"][0]] if "alpha" in g else [])
            else:
                shape = model_shapes[target]
                rank = down.shape[0]
                if up.shape[1] != rank:
                    raise UserError(
                        f"LoRA {name}: rank mismatch at {up_key}: up {tuple(up.shape)} vs down {tuple(down.shape)}"
                    )
                if up.shape[0] != shape[0] or down[0].numel() != math.prod(shape[1:]) or up[0].numel() != rank:
                    what = f"(up {tuple(up.shape)}, down {tuple(down.shape)})"
                    raise _shape_error(name, down_key, what, target, shape)
                alpha = float(g["alpha"][1].item()) if "alpha" in g else default_alpha
                scale = alpha / rank if alpha is not None else 1.0
                updates.append(LoraUpdate(target, up=up, down=down, scale=scale))
                matched += 2 + ("alpha" in g)
        elif "alpha" in g:
            unmatched.append(g["alpha"][0])
        for kind in ("diff", "diff_b", "bias", "diff_m"):
            if kind not in g:
                continue
            key, t = g[kind]
            target = _target(module, kind, model_shapes)
            if target is None:
                unmatched.append(key)
                continue
            if t.numel() != math.prod(model_shapes[target]):
                raise _shape_error(name, key, str(tuple(t.shape)), target, model_shapes[target])
            updates.append(LoraUpdate(target, diff=t))
            matched += 1
    if not updates:
        sample = ", ".join(sorted(state)[:3])
        raise UserError(f"LoRA {name}: none of its {len(state)} keys matches the SCAIL-2/Wan DiT (keys: {sample} ...)")
    return LoRA(name, updates, matched, sorted(unmatched))


def load_lora(path: str | Path, model_shapes: dict[str, torch.Size]) -> LoRA:
    """Read a LoRA file and map it onto the model (see `load_lora_state`); its report says what matched."""
    path = Path(path)
    return load_lora_state(read_lora_file(path), model_shapes, path.name, default_alpha=_peft_alpha(path))


# ---------------------------------------------------------------------------------------------------------------
# Merging


def summed_delta(
    updates: list[tuple[LoraUpdate, float]], shape: torch.Size, device: torch.device | str | None = None
) -> torch.Tensor:
    """Sum of strength * delta over several LoRAs' updates of one parameter, in fp32."""
    total = torch.zeros(shape, dtype=torch.float32, device=device)
    for u, s in updates:
        total.add_(u.delta(shape, device), alpha=s)
    return total


def merge_tensor(name: str, tensor: torch.Tensor, index: dict[str, list[tuple[LoraUpdate, float]]]) -> torch.Tensor:
    """`tensor` with every LoRA update for `name` added in fp32, cast back; unchanged when nothing targets it.

    For streaming writers (`quantize --lora`): build `index` once with `lora_index(loras)`.
    """
    ups = index.get(name)
    if not ups:
        return tensor
    merged = tensor.to(torch.float32) + summed_delta(ups, tensor.shape, tensor.device)
    return merged.to(tensor.dtype)


def lora_index(loras: Iterable[tuple[LoRA, float]]) -> dict[str, list[tuple[LoraUpdate, float]]]:
    """Updates of several (LoRA, strength) pairs grouped by target parameter name."""
    out: dict[str, list[tuple[LoraUpdate, float]]] = defaultdict(list)
    for lora, strength in loras:
        for u in lora.updates:
            out[u.target].append((u, strength))
    return dict(out)


def _check_targets(index: dict[str, list], names: Iterable[str], where: str) -> None:
    missing = sorted(set(index) - set(names))
    if missing:
        raise UserError(f"LoRA targets {missing[0]} (and {len(missing) - 1} more) but {where} has no such tensor")


def merge_into_state_dict(state: dict[str, torch.Tensor], loras: list[tuple[LoRA, float]]) -> dict[str, torch.Tensor]:
    """Add the LoRAs to a full-precision state dict in place (fp32 accumulate, cast back) and return it."""
    index = lora_index(loras)
    _check_targets(index, state, "the state dict")
    for name in index:
        state[name] = merge_tensor(name, state[name], index)
    return state


@torch.no_grad()
def merge_into_model(model: nn.Module, loras: list[tuple[LoRA, float]]) -> nn.Module:
    """Add the LoRAs to an unquantized (bf16/fp32) model's parameters in place."""
    params = dict(model.named_parameters())
    index = lora_index(loras)
    _check_targets(index, params, "the model")
    for name in index:
        p = params[name]
        p.copy_(merge_tensor(name, p.data, index))
    return model


# ---------------------------------------------------------------------------------------------------------------
# Already-quantized weights: (a) dequantize -> add -> requantize, (b) a low-rank side path beside the matmul

_QUANT_SCHEME_OF_DTYPE = {torch.int8: "int8", torch.float8_e4m3fn: "fp8"}


def merge_quantized(
    qweight: torch.Tensor, scale: torch.Tensor, delta: torch.Tensor, smooth: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(int8|fp8 weight, per-row fp32 scale, int8's column factors) + fp32 delta -> requantized weight with new
    per-row scales and column factors (same scheme and stored layout, int8 rotated; factors None for fp8)."""
    from .quantize.schemes import dequantize, quantize_linear

    scheme = _QUANT_SCHEME_OF_DTYPE.get(qweight.dtype)
    if scheme is None:
        raise ValueError(f"merge_quantized: {qweight.dtype} is not a quantized storage dtype")
    return quantize_linear(dequantize(qweight, scale, smooth=smooth).add_(delta.to(qweight.device)), scheme)


def merge_block(
    block_state: dict[str, torch.Tensor],
    index: dict[str, list[tuple[LoraUpdate, float]]],
    prefix: str = "",
) -> dict[str, torch.Tensor]:
    """A block's tensors with the LoRAs merged, for a streamer that merges as blocks arrive.

    `block_state` keys are relative to `prefix` (e.g. prefix "blocks.7.", key "self_attn.q.weight"). Quantized
    weights (int8/fp8 storage) are dequantized, merged in fp32 and requantized with fresh per-row scales and
    column factors (QuantLinear's `<layer>.scale` and `<layer>.smooth`); other tensors are merged in fp32 and
    cast back. Returns a new dict (inputs untouched).
    """
    out = dict(block_state)
    for key, t in block_state.items():
        ups = index.get(prefix + key)
        if not ups:
            continue
        if t.dtype in _QUANT_SCHEME_OF_DTYPE:
            layer = key.removesuffix("weight")
            q, scale, smooth = merge_quantized(t, block_state[layer + "scale"], summed_delta(ups, t.shape, t.device),
                                               block_state.get(layer + "smooth"))
            out[key], out[layer + "scale"] = q, scale
            if smooth is not None:
                out[layer + "smooth"] = smooth
        else:
            out[key] = merge_tensor(prefix + key, t, index)
    return out


class LoraSidePath(nn.Module):
    """`base(x) + (x @ down.T) @ up.T`: a LoRA beside a (quantized) linear, leaving its weights untouched.

    Several LoRAs are stacked along the rank dimension with their scale * strength folded into `up`, so the side
    path costs two thin matmuls whatever the number of LoRAs. `set_factors` swaps them per streamed block.
    """

    def __init__(self, base: nn.Module, down: torch.Tensor, up: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("down", down, persistent=False)
        self.register_buffer("up", up, persistent=False)

    def set_factors(self, down: torch.Tensor, up: torch.Tensor) -> None:
        self.down, self.up = down, up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if getattr(self.base, "input_gelu", False):  # the FFN's GELU was folded into the quantized base
            x = F.gelu(x, approximate="tanh")
        side = (x.to(self.down.dtype) @ self.down.T) @ self.up.T
        return y + side.to(y.dtype)


def side_factors(
    updates: list[tuple[LoraUpdate, float]],
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the low-rank updates of one Linear into (down (R, in), up (out, R)), scale * strength folded into up."""
    downs = [u.down.to(device=device, dtype=torch.float32) for u, _ in updates]
    ups = [u.up.to(device=device, dtype=torch.float32) * (u.scale * s) for u, s in updates]
    return torch.cat(downs).to(dtype), torch.cat(ups, dim=1).to(dtype)


@torch.no_grad()
def apply_side_path(
    module: nn.Module,
    index: dict[str, list[tuple[LoraUpdate, float]]],
    prefix: str = "",
    dtype: torch.dtype = torch.bfloat16,
) -> nn.Module:
    """Wrap every Linear-like child of `module` (named `prefix` + child) that a low-rank update targets in a
    `LoraSidePath`; full deltas (`diff`, biases, norms, modulation) are merged into unquantized parameters directly.
    A full delta on a quantized weight has no side path: merge that file with `merge_block` or `quantize --lora`.
    """
    children = dict(module.named_modules())
    params = {**dict(module.named_parameters()), **dict(module.named_buffers())}  # QuantLinear: buffers
    for target, ups in index.items():
        if not target.startswith(prefix):
            continue
        rel = target[len(prefix) :]
        low_rank = [(u, s) for u, s in ups if u.diff is None]
        full = [(u, s) for u, s in ups if u.diff is not None]
        if full:
            if rel not in params or params[rel].dtype in _QUANT_SCHEME_OF_DTYPE:
                raise UserError(f"LoRA full delta for {target} needs a merge into the weights (use quantize --lora)")
            params[rel].add_(summed_delta(full, params[rel].shape, params[rel].device).to(params[rel].dtype))
        if low_rank:
            mod_name = rel.removesuffix(".weight")
            child = children.get(mod_name)
            if child is None or not rel.endswith(".weight"):
                raise UserError(f"LoRA low-rank update for {target}: the model has no such layer here")
            down, up = side_factors(low_rank, dtype, child.weight.device)
            parent_name, _, attr = mod_name.rpartition(".")
            parent = children[parent_name] if parent_name else module
            setattr(parent, attr, LoraSidePath(child, down, up))
    return module


# ---------------------------------------------------------------------------------------------------------------
# Synthetic LoRA files in each format (the synthetic checkpoint maker and the tests use these)


def _lora_key(module: str, fmt: LoraFormat, part: str) -> str:
    """Key of `part` (down, up, alpha, diff, diff_b, diff_m) for a Wan module in a file of format `fmt`."""
    if fmt == "kohya":
        return f"lora_unet_{_flat(module)}.{ {'down': 'lora_down.weight', 'up': 'lora_up.weight'}.get(part, part)}"
    if fmt == "comfy":
        return f"diffusion_model.{module}.{ {'down': 'lora_down.weight', 'up': 'lora_up.weight'}.get(part, part)}"
    names = {"down": "lora_A.weight", "up": "lora_B.weight", "diff_b": "lora_B.bias"}
    if fmt == "peft":
        return f"base_model.model.{module}.{names[part]}"
    return f"transformer.{wan_to_diffusers(module)}.{names[part]}"


def make_synthetic_lora(
    model_shapes: dict[str, torch.Size],
    fmt: LoraFormat,
    rank: int = 4,
    seed: int = 0,
    targets: tuple[str, ...] = BLOCK_LINEARS,
    include_diffs: bool = False,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor]:
    """A LoRA state dict for the model of `model_shapes`, laid out as real files of `fmt` are.

    `targets` are block-relative Linear names (`self_attn.q`) or top-level ones (`head.head`, `patch_embedding`).
    Every format encodes the same effective deltas for a given seed (kohya/comfy carry alpha = rank / 2; PEFT and
    diffusers files have no alpha, so that 0.5 is folded into up, exactly). `include_diffs` adds full deltas the
    way LightX2V files do: biases of the targeted layers in every format (`diff_b`, or PEFT's `lora_B.bias`), and
    for kohya/comfy also `norm3` weight+bias, q/k RMSNorm weights and the block modulation (`diff_m`).
    """
    if fmt not in ("kohya", "peft", "diffusers", "comfy"):
        raise UserError(f"unknown LoRA format {fmt!r}; choose kohya, peft, diffusers or comfy")
    g = torch.Generator().manual_seed(seed)
    alpha_in_file = fmt in ("kohya", "comfy")
    out: dict[str, torch.Tensor] = {}

    def rand(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    blocks = sorted({int(k.split(".")[1]) for k in model_shapes if k.startswith("blocks.")})
    modules = [f"blocks.{b}.{t}" for b in blocks for t in targets] + list(targets)
    modules = [m for m in modules if f"{m}.weight" in model_shapes]
    if not modules:
        raise UserError(f"make_synthetic_lora: none of the targets {targets} is in the model")
    for m in modules:
        shape = model_shapes[f"{m}.weight"]
        fan_in = math.prod(shape[1:])
        down = rand(rank, *shape[1:], std=fan_in**-0.5)
        up = rand(shape[0], rank, *([1] * (len(shape) - 2)), std=rank**-0.5)
        out[_lora_key(m, fmt, "down")] = down.to(dtype)
        if alpha_in_file:
            out[_lora_key(m, fmt, "up")] = up.to(dtype)
            out[_lora_key(m, fmt, "alpha")] = torch.tensor(rank / 2, dtype=dtype)
        else:
            out[_lora_key(m, fmt, "up")] = (up.to(dtype) * 0.5).to(dtype)
        if include_diffs and f"{m}.bias" in model_shapes:
            out[_lora_key(m, fmt, "diff_b")] = rand(*model_shapes[f"{m}.bias"], std=0.02).to(dtype)
    if include_diffs and alpha_in_file:
        for b in blocks:
            for norm in ("norm3", "self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_k_img"):
                m = f"blocks.{b}.{norm}"
                out[_lora_key(m, fmt, "diff")] = rand(*model_shapes[f"{m}.weight"], std=0.02).to(dtype)
                if f"{m}.bias" in model_shapes:
                    out[_lora_key(m, fmt, "diff_b")] = rand(*model_shapes[f"{m}.bias"], std=0.02).to(dtype)
            modulation = rand(*model_shapes[f"blocks.{b}.modulation"], std=0.02)
            out[_lora_key(f"blocks.{b}", fmt, "diff_m")] = modulation.to(dtype)
    return out
