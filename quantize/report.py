"""Fidelity report: per-layer weight errors, DiT forward and umT5 embedding agreement with bf16, as JSON + table.

The DiT and umT5 forwards are run by the caller (quantize/ does not import the model); this module only
compares tensors and formats the result.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.table import Table

REPORT_NAME = "fidelity.json"
# Where our formats stand against the ones other tools store (benchmarks/bench_formats.py, RESULTS.md): shown
# under every report so a user reads the numbers above against the peers'.
STANDING = ("Side by side with ComfyUI fp8/fp8_scaled/mxfp8/int8_convrot, WanGP quanto int8, GGUF and bitsandbytes "
            "NF4 on the same synthetic weights: README 'Fidelity against other formats'. Absolute errors there come "
            "from synthetic weights; the ranking is what carries over.")


def compare(reference: torch.Tensor, output: torch.Tensor) -> dict[str, float]:
    """Relative Frobenius error, cosine similarity and max abs difference of `output` against `reference`."""
    r = reference.detach().to(torch.float64).flatten()
    o = output.detach().to(torch.float64).flatten()
    rn, on = r.norm(), o.norm()
    return {
        "rel_error": float((o - r).norm() / rn) if rn > 0 else float((o - r).norm()),
        "cosine": float(r @ o / (rn * on)) if rn > 0 and on > 0 else float(torch.equal(r, o)),
        "max_abs": float((o - r).abs().max()) if r.numel() else 0.0,
    }


def layer_kind(name: str) -> str:
    """`blocks.17.ffn.0.weight` -> `ffn.0`: groups per-layer errors across the blocks."""
    return re.sub(r"^blocks\.\d+\.", "", name).removesuffix(".weight")


@dataclass
class FidelityReport:
    """Everything measured for one quantized folder; `dit_forward`/`text_encoder` are `compare` dicts."""

    dit_scheme: str
    weight_errors: dict[str, float]
    kept_if_quantized: dict[str, dict[str, float]] = field(default_factory=dict)
    dit_forward: dict[str, float] | None = None
    text_encoder_scheme: str | None = None
    text_encoder_backend: str | None = None
    text_encoder: dict[str, float] | None = None
    comfy_export_errors: dict[str, float] | None = None
    kept_layers: dict[str, str] = field(default_factory=dict)  # mixed precision: weight name -> int8 / bf16
    mixed: dict | None = None  # the MixedPrecision asked for
    sensitivity: dict[str, float] | None = None  # Linear -> forward error when it alone is quantized

    def by_kind(self, exclude: set[str] = frozenset()) -> dict[str, dict[str, float]]:
        """Mean and max weight error per layer kind (q, k, ffn.0, ...) over the blocks (`exclude`: weight names
        left out, e.g. the layers mixed precision kept)."""
        groups: dict[str, list[float]] = {}
        for name, err in self.weight_errors.items():
            if name in exclude:
                continue
            groups.setdefault(layer_kind(name), []).append(err)
        return {k: {"mean": sum(v) / len(v), "max": max(v), "layers": len(v)} for k, v in sorted(groups.items())}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["weight_error_by_kind"] = self.by_kind()
        return d

    def save(self, folder: str | Path) -> Path:
        """Write `fidelity.json` beside the manifest (temporary name, then rename)."""
        path = Path(folder) / REPORT_NAME
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)
        return path

    def table(self) -> Table:
        """Rich summary: error per layer kind, what kept layers would lose, end-to-end agreement."""
        t = Table(title=f"fidelity ({self.dit_scheme} DiT)", caption=STANDING)
        t.add_column("what")
        t.add_column("mean rel. error", justify="right")
        t.add_column("max rel. error", justify="right")
        t.add_column("cosine", justify="right")
        kept = set(self.kept_layers)
        for kind, s in self.by_kind(exclude=kept).items():
            t.add_row(f"{kind} ({s['layers']} layers)", f"{s['mean']:.4f}", f"{s['max']:.4f}", "")
        if kept:
            schemes = ", ".join(sorted(set(self.kept_layers.values())))
            t.add_row(f"kept as {schemes} ({self.mixed['strategy'] if self.mixed else 'mixed'}: {len(kept)} "
                      "Linears)", "", "", "")
        if self.kept_if_quantized:
            errs = [v["error"] for v in self.kept_if_quantized.values()]
            t.add_row(f"kept high, if quantized ({len(errs)} tensors)", f"{sum(errs) / len(errs):.4f}",
                      f"{max(errs):.4f}", "")
        if self.comfy_export_errors:
            errs = list(self.comfy_export_errors.values())
            t.add_row("ComfyUI export (added)", f"{sum(errs) / len(errs):.4f}", f"{max(errs):.4f}", "")
        if self.dit_forward is not None:
            t.add_row("DiT forward vs bf16", f"{self.dit_forward['rel_error']:.4f}", "",
                      f"{self.dit_forward['cosine']:.5f}")
        if self.text_encoder is not None:
            t.add_row(f"umT5 {self.text_encoder_scheme} ({self.text_encoder_backend}) vs bf16",
                      f"{self.text_encoder['rel_error']:.4f}", "", f"{self.text_encoder['cosine']:.5f}")
        return t
