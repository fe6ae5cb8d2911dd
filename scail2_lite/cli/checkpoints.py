"""Checkpoint commands: inspect a file, write a synthetic one, quantize one."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from . import LORA_FULL_PATCHES_HELP, app, console, lora_args, user_errors


@app.command()
@user_errors
def inspect(path: str = typer.Argument(..., help="checkpoint file, index, or SCAIL-2 folder")) -> None:
    """Show a DiT checkpoint's format, tensor and parameter counts, dtypes, config and key problems."""
    from rich.table import Table

    from ..formats import describe

    info = describe(path)
    table = Table(show_header=False, box=None)
    table.add_row("format", info["format"])
    table.add_row("file", info["file"])
    table.add_row("tensors", f"{info['tensors']:,}" + (f" (+{info['scale_tensors']} scales)" if info["scale_tensors"] else ""))
    table.add_row("parameters", f"{info['parameters']:,} ({info['parameters'] / 1e9:.2f} B)")
    table.add_row("dtypes", ", ".join(f"{k} x{v}" for k, v in info["dtypes"].items()))
    cfg = info["config"]
    table.add_row("config", f"dim {cfg['dim']}, {cfg['num_layers']} layers, {cfg['num_heads']} heads ({info['config_source']})")
    table.add_row("keys", "[green]ok[/green]" if not info["problems"] else "[red]" + "; ".join(info["problems"]) + "[/red]")
    Console().print(table)


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
    console.print(f"wrote {folder} (inputs in {folder / 'inputs'})")


@app.command()
@user_errors
def quantize(
    src: Path = typer.Argument(..., help="SCAIL-2 folder or DiT checkpoint (SAT .pt, Wan/ComfyUI safetensors, index)"),
    out: Path = typer.Option(..., "-o", "--out", help="quantized folder to write (self-contained)"),
    dit: str = typer.Option("fp8", "--dit", help="DiT block Linears: fp8 (fastest on RTX 40xx/50xx), int8 (closest "
                            "to bf16, fast on RTX 30xx too) or bf16"),
    text_encoder: str = typer.Option("nf4", "--text-encoder", help="umT5 at load time: nf4 (smallest: 4.4 GB "
                                     "of GPU memory while encoding), int8 (closest to bf16: 5.2 GB) or bf16 (9.8 GB)"),
    compute: str = typer.Option("auto", "--compute", help="matmul path: auto, fp8, int8 or dequant"),
    force: bool = typer.Option(False, "--force", help="replace an existing output folder"),
    export: Optional[str] = typer.Option(None, "--export", help="comfy: also write a ComfyUI fp8_scaled file"),
    lora: list[str] = typer.Option([], "--lora", help="LoRA to merge (fp32) before quantizing: PATH[:STRENGTH]; "
                                   "repeatable"),
    lora_full_patches: bool = typer.Option(False, "--lora-full-patches", help=LORA_FULL_PATCHES_HELP),
) -> None:
    """Quantize the DiT to FP8/INT8 (streamed, bounded RAM), copy the other components, report the fidelity."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from ..quantize_checkpoint import quantize_checkpoint

    bar = Progress(*Progress.get_default_columns()[:1], BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   console=console)
    task = bar.add_task(f"quantizing DiT to {dit}", total=None)

    def advance(done: int, total: int) -> None:
        if not bar.live.is_started:  # shown once the checks have passed: bad input stays a single line
            bar.start()
        bar.update(task, completed=done, total=total)

    try:
        report = quantize_checkpoint(
            src, out, dit=dit, text_encoder=text_encoder, compute=None if compute == "auto" else compute,
            loras=lora_args(lora, lora_full_patches), export=export, force=force, progress=advance,
            log=lambda msg: console.print(msg, highlight=False),
        )
    finally:
        bar.stop()
    console.print(report.table())
    console.print(f"wrote {out}")
