"""A LoRA file mapped onto the model: which parameter each tensor changes, what is applied, what is skipped and why.

Low-rank pairs give delta = scale * up @ down with scale = alpha / rank when the file has `X.alpha` (kohya,
ComfyUI; PEFT's alpha comes from `adapter_config.json`), else 1: upstream SCAIL-2 reads no alpha, and its own
files carry none. Which full-tensor patches are added is the merge rule of `LoraFile.full_patches`.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Union

import torch

from ..errors import UserError
from .files import LoraFile, as_lora_file, peft_alpha, read_lora_file
from .keys import alias_table, parse_key

SKIP_RULE = ("full-tensor patches skipped by upstream's rule (it merges low-rank pairs and their diff_b only; "
             "--lora-full-patches adds these)")
SKIP_SHAPE = "shaped for another model, skipped"


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
    """A LoRA file mapped onto the model: its updates by target and the match report (applied keys, keys skipped
    by reason, keys that name nothing in the model)."""

    name: str
    updates: list[LoraUpdate]
    matched_keys: int
    unmatched: list[str] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "LoRA":
        """A copy with every tensor on `device` (e.g. kept on the GPU beside a block streamer)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        ups = [LoraUpdate(u.target, move(u.up), move(u.down), u.scale, move(u.diff)) for u in self.updates]
        return LoRA(self.name, ups, self.matched_keys, list(self.unmatched), dict(self.skipped))

    @property
    def total_keys(self) -> int:
        return self.matched_keys + len(self.unmatched) + sum(len(v) for v in self.skipped.values())

    def report(self, strength: float | None = None) -> str:
        """What was applied, then one indented line per kind of skipped key and for keys that matched nothing; keys
        that differ only in their block number are listed once, with a count (`blocks.*.diff_m (x40)`)."""
        low_rank = sum(u.diff is None for u in self.updates)
        biases = sum(u.diff is not None and u.target.endswith(".bias") for u in self.updates)
        kinds = [(low_rank, "low-rank"), (biases, "bias deltas"), (len(self.updates) - low_rank - biases,
                                                                    "full-tensor patches")]
        at = f" at strength {strength:g}" if strength is not None else ""
        lines = [f"LoRA {self.name}{at}: {self.matched_keys}/{self.total_keys} keys applied ("
                 + ", ".join(f"{n} {what}" for n, what in kinds if n) + ")"]
        for reason, keys in self.skipped.items():
            lines.append(f"  {len(keys)} {reason}: {_grouped(keys)}")
        if self.unmatched:
            lines.append(f"  {len(self.unmatched)} not matched (no such tensor in the SCAIL-2 DiT): "
                         f"{_grouped(self.unmatched)}")
        return "\n".join(lines)


_LAYER_NUMBER = re.compile(r"(?<=blocks\.)\d+(?=\.)|(?<=blocks_)\d+(?=_)|(?<=layers\.)\d+(?=\.)")


def _grouped(keys: list[str], show: int = 24) -> str:
    """Keys that differ only in their layer number once, as a pattern with * and a count, in first-seen order."""
    first: dict[str, str] = {}
    counts: Counter[str] = Counter()
    for k in keys:
        pattern = _LAYER_NUMBER.sub("*", k)
        first.setdefault(pattern, k)
        counts[pattern] += 1
    items = [f"{p} (x{n})" if n > 1 else first[p] for p, n in counts.items()]
    return ", ".join(items[:show]) + (f" (+{len(items) - show} more)" if len(items) > show else "")


def _target(module: str, part: str, model_shapes: dict[str, torch.Size]) -> str | None:
    """The model parameter a (module, part) changes, or None when the model has no such tensor."""
    if part == "diff_m":
        candidates = [f"{module}.modulation"]
    elif part == "diff_b":
        candidates = [f"{module}.bias"]
    else:
        candidates = [f"{module}.weight", module] if part == "diff" else [f"{module}.weight"]
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
    full_patches: bool = False,
) -> LoRA:
    """Map a LoRA state dict onto the model's parameters (`model_shapes`: Wan name -> shape).

    A low-rank pair that does not fit a block Linear is an error (a LoRA for another base model); anything else
    that does not fit (e.g. a patch-embedding entry made for Wan-I2V's 36 input channels) is skipped and listed."""
    aliases = alias_table(model_shapes)
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = defaultdict(dict)
    unmatched: list[str] = []
    for key, t in state.items():
        parsed = parse_key(key, aliases)
        if parsed is None:
            unmatched.append(key)
            continue
        module, part = parsed
        if part in groups[module]:
            raise UserError(f"LoRA {name}: {key} and {groups[module][part][0]} both set {part} of {module}")
        groups[module][part] = (key, t)

    updates: list[LoraUpdate] = []
    skipped: dict[str, list[str]] = defaultdict(list)
    matched = 0
    for module, g in sorted(groups.items()):
        if ("up" in g) != ("down" in g):
            have, miss = ("up", "down") if "up" in g else ("down", "up")
            raise UserError(f"LoRA {name}: {g[have][0]} has no matching {miss} matrix (a damaged file?)")
        paired = False
        if "up" in g:
            (up_key, up), (down_key, down) = g["up"], g["down"]
            keys = [up_key, down_key] + ([g["alpha"][0]] if "alpha" in g else [])
            target = _target(module, "weight", model_shapes)
            if target is None:
                unmatched += keys
            else:
                shape, rank = model_shapes[target], down.shape[0]
                if up.shape[1] != rank:
                    raise UserError(
                        f"LoRA {name}: rank mismatch at {up_key}: up {tuple(up.shape)} vs down {tuple(down.shape)}"
                    )
                what = f"(up {tuple(up.shape)}, down {tuple(down.shape)})"
                if up.shape[0] != shape[0] or down[0].numel() != math.prod(shape[1:]) or up[0].numel() != rank:
                    if module.startswith("blocks."):
                        raise _shape_error(name, down_key, what, target, shape)
                    skipped[SKIP_SHAPE] += [f"{k} {what} vs {target} {tuple(shape)}" for k in keys]
                else:
                    alpha = float(g["alpha"][1].item()) if "alpha" in g else default_alpha
                    scale = alpha / rank if alpha is not None else 1.0
                    updates.append(LoraUpdate(target, up=up, down=down, scale=scale))
                    matched += len(keys)
                    paired = True
        elif "alpha" in g:
            unmatched.append(g["alpha"][0])
        for part in ("diff_b", "diff", "diff_m"):
            if part not in g:
                continue
            key, t = g[part]
            target = _target(module, part, model_shapes)
            if target is None:
                unmatched.append(key)
            elif not (full_patches or (part == "diff_b" and paired)):
                skipped[SKIP_RULE].append(key)
            elif t.numel() != math.prod(model_shapes[target]):
                skipped[SKIP_SHAPE].append(f"{key} {tuple(t.shape)} vs {target} {tuple(model_shapes[target])}")
            else:
                updates.append(LoraUpdate(target, diff=t))
                matched += 1
    if not updates:
        if skipped:
            why = "; ".join(f"{len(v)} {k}" for k, v in skipped.items())
            raise UserError(f"LoRA {name}: nothing to apply: {why}")
        sample = ", ".join(sorted(state)[:3])
        raise UserError(f"LoRA {name}: none of its {len(state)} keys matches the SCAIL-2/Wan DiT (keys: {sample} ...)")
    return LoRA(name, updates, matched, sorted(unmatched), {k: sorted(v) for k, v in skipped.items()})


def load_lora(path: str | Path, model_shapes: dict[str, torch.Size], full_patches: bool = False) -> LoRA:
    """Read a LoRA file and map it onto the model (see `load_lora_state`); its report says what matched."""
    path = Path(path)
    return load_lora_state(read_lora_file(path), model_shapes, path.name, default_alpha=peft_alpha(path),
                           full_patches=full_patches)


LoraSource = Union[LoraFile, tuple[Union[str, Path, "LoRA"], float]]


def resolve_loras(items: Iterable[LoraSource], model_shapes: dict[str, torch.Size]) -> list[tuple[LoRA, float]]:
    """(LoRA, strength) pairs from `LoraFile`s, (path, strength) pairs (upstream's rule) or already mapped
    (LoRA, strength) pairs: every LoRA file is read and checked against the model here, before any work."""
    out: list[tuple[LoRA, float]] = []
    for item in items:
        if not isinstance(item, LoraFile) and isinstance(item[0], LoRA):
            out.append((item[0], float(item[1])))
            continue
        spec = as_lora_file(item)
        out.append((load_lora(spec.path, model_shapes, spec.full_patches), spec.strength))
    return out
