"""Checkpoint commands: inspect a file, write a synthetic one, quantize one."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ..errors import UserError
from . import LORA_FULL_PATCHES_HELP, app, console, lora_args, user_errors


@app.command()
@user_errors
def inspect(path: str = typer.Argument(..., help="checkpoint file, index, or SCAIL-2 folder")) -> None:
    """Show a DiT checkpoint's format, tensor and parameter counts, dtypes, config and key problems."""
    from rich.markup import escape
    from rich.table import Table

    from ..formats import describe

    info = describe(path)
    table = Table(show_header=False, box=None)
    table.add_row("format", info["format"])
    table.add_row("file", escape(str(info["file"])))
    table.add_row("tensors", f"{info['tensors']:,}" + (f" (+{info['scale_tensors']} scales)" if info["scale_tensors"] else ""))
    table.add_row("parameters", f"{info['parameters']:,} ({_count(info['parameters'])})")
    table.add_row("dtypes", ", ".join(f"{k} x{v}" for k, v in info["dtypes"].items()))
    cfg = info["config"]
    table.add_row("config", f"dim {cfg['dim']}, {cfg['num_layers']} layers, {cfg['num_heads']} heads ({info['config_source']})")
    table.add_row("keys", "[green]ok[/green]" if not info["problems"] else "[red]" + escape("; ".join(info["problems"])) + "[/red]")
    Console().print(table)


def _count(n: int) -> str:
    """A parameter count in the unit that shows it: 14.29 B, 187.0 M, 52.3 k."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.{2 if unit == 'B' else 1}f} {unit}"
    return str(n)


@app.command()
@user_errors
def synth(
    out: str = typer.Option(..., "-o", "--out", help="folder to write (Hugging Face SCAIL-2 layout + inputs/)"),
    scale: str = typer.Option("tiny", help="tiny (seconds, CPU) or full (the real 14B geometry, ~33 GB)"),
    fmt: str = typer.Option("sat", "--format", help="DiT file format: sat, wan, comfy (fp16), comfy-mxfp8 or "
                            "comfy-int8_convrot (Comfy-Org's 8-bit repacks)"),
    seed: int = typer.Option(0, help="same seed, same bytes"),
) -> None:
    """Write a synthetic SCAIL-2 checkpoint folder and a matching input set (no download needed)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from ..synth import synth as write

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("synth", total=None)
        folder = write(out, scale=scale, fmt=fmt, seed=seed,
                       progress=lambda what: bar.update(task, description=f"writing {what}"))
    console.print(f"wrote {folder} (inputs in {folder / 'inputs'})", highlight=False, markup=False)


@app.command()
@user_errors
def quantize(
    src: Path = typer.Argument(..., help="SCAIL-2 folder or DiT checkpoint (SAT .pt, Wan/ComfyUI safetensors, index)"),
    out: Path = typer.Option(..., "-o", "--out", help="quantized folder to write (self-contained)"),
    dit: str = typer.Option("fp8", "--dit", help="DiT block Linears: fp8 (fastest on RTX 40xx/50xx), int8 (closest "
                            "to bf16, fast on RTX 30xx too) or bf16"),
    text_encoder: str = typer.Option("bf16", "--text-encoder", help="umT5: bf16 (lossless, streamed through the GPU "
                                     "block by block: about one block of GPU memory), int8 or nf4 (stored "
                                     "quantized in place of the bf16 file: smaller folder and RAM, no re-quantizing "
                                     "at load; for machines where those are the limit)"),
    compute: str = typer.Option("auto", "--compute", help="matmul path: auto, fp8, int8 or dequant"),
    force: bool = typer.Option(False, "--force", help="replace an existing output folder"),
    export: Optional[str] = typer.Option(None, "--export", help="comfy: also write a ComfyUI fp8_scaled file"),
    lora: list[str] = typer.Option([], "--lora", help="LoRA to merge (fp32) before quantizing: PATH[:STRENGTH]; "
                                   "repeatable"),
    lora_full_patches: bool = typer.Option(False, "--lora-full-patches", help=LORA_FULL_PATCHES_HELP),
    keep: str = typer.Option("none", "--keep", help="mixed precision: keep some block Linears in --keep-as: none, "
                             "edges (first/last blocks inwards) or sensitive (the Linears whose quantization alone "
                             "costs the DiT forward most; measured on the bf16 DiT, needs it to fit the GPU)"),
    keep_as: str = typer.Option("bf16", "--keep-as", help="format of the kept Linears: bf16 or int8"),
    keep_share: float = typer.Option(0.05, "--keep-share", help="most of the block Linear parameters kept (0-1)"),
) -> None:
    """Quantize the DiT to FP8/INT8 (streamed, bounded RAM), copy the other components, report the fidelity."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from ..quantize.mixed import MixedPrecision
    from ..quantize.schemes import QuantizeError
    from ..quantize_checkpoint import quantize_checkpoint

    try:
        mixed = MixedPrecision(keep, keep_as, keep_share)
    except QuantizeError as e:
        raise UserError(str(e)) from None

    bar = Progress(*Progress.get_default_columns()[:1], BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   console=console)
    what = f"DiT to {dit}" + (f", umT5 to {text_encoder}" if text_encoder != "bf16" else "")
    task = bar.add_task(f"quantizing {what}", total=None)

    def advance(done: int, total: int) -> None:
        if not bar.live.is_started:  # shown once the checks have passed: bad input stays a single line
            bar.start()
        bar.update(task, completed=done, total=total)

    try:
        report = quantize_checkpoint(
            src, out, dit=dit, text_encoder=text_encoder, compute=None if compute == "auto" else compute,
            loras=lora_args(lora, lora_full_patches), export=export, mixed=mixed, force=force, progress=advance,
            log=lambda msg: console.print(msg, highlight=False, markup=False),
        )
    finally:
        bar.stop()
    console.print(report.table())
    console.print(f"wrote {out}", highlight=False, markup=False)
