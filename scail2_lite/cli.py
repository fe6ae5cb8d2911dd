"""The `scail2-lite` command line: thin Typer commands over the Python API, errors as one line + exit 2."""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console

from .errors import UserError
from .prepare.command import prepare_command
from .quantize.schemes import QuantizeError

app = typer.Typer(
    name="scail2-lite",
    help="Run SCAIL-2 character animation on consumer GPUs: quantize, generate, profile.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
# Streaming blocks through fixed slots while activations come and go fragments the caching allocator: growable
# segments keep reserved memory near allocated (read when CUDA first allocates, so setting it here is in time).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
# diffusers and transformers import optional backends that log load failures irrelevant to us (torchao's CUDA
# extensions, bitsandbytes' CPU kernels download): keep the terminal for our own messages.
_NOISY = ("torchao", "bitsandbytes", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")
for _noisy in _NOISY:
    logging.getLogger(_noisy).setLevel(logging.ERROR)


def user_errors(fn: Callable) -> Callable:
    """Turn UserError (and Ctrl-C) into one red line and a non-zero exit instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, QuantizeError) as e:
            console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(UserError.exit_code) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130) from None

    return wrapper


app.command("prepare")(user_errors(prepare_command))


@app.command()
@user_errors
def inspect(path: str = typer.Argument(..., help="checkpoint file, index, or SCAIL-2 folder")) -> None:
    """Show a DiT checkpoint's format, tensor and parameter counts, dtypes, config and key problems."""
    from rich.table import Table

    from .formats import describe

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
    fmt: str = typer.Option("sat", "--format", help="DiT file format: sat, wan or comfy"),
    seed: int = typer.Option(0, help="same seed, same bytes"),
) -> None:
    """Write a synthetic SCAIL-2 checkpoint folder and a matching input set (no download needed)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from .synth import synth as write

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
) -> None:
    """Quantize the DiT to FP8/INT8 (streamed, bounded RAM), copy the other components, report the fidelity."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from .convert import quantize_checkpoint

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
            loras=_lora_args(lora), export=export, force=force, progress=advance,
            log=lambda msg: console.print(msg, highlight=False),
        )
    finally:
        bar.stop()
    console.print(report.table())
    console.print(f"wrote {out}")


def _lora_args(loras: list[str]) -> list[tuple[str, float]]:
    from .lora import parse_lora_arg

    return [parse_lora_arg(a) for a in loras]


class _SecondsPerIt:
    """Progress column showing seconds per completed step (the unit people compare samplers by)."""

    def __new__(cls):
        from rich.progress import ProgressColumn
        from rich.text import Text

        class Column(ProgressColumn):
            def render(self, task) -> Text:
                if not task.completed or not task.elapsed or task.total in (None, 1):
                    return Text("")
                return Text(f"{task.elapsed / task.completed:.2f} s/it")

        return Column()


def _run_generation(model: Path, output: Path, *, save_frames: Optional[Path], preview: bool, **kwargs) -> None:
    """Shared by `generate` and `demo`: load, generate into `output` with progress bars, print the summary."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.progress import TimeRemainingColumn

    from . import media
    from .pipeline import Pipeline

    if output.suffix.lower() != ".mp4":
        raise UserError(f"-o {output}: the output must be an .mp4 file")
    if not output.parent.is_dir():
        raise UserError(f"-o {output}: folder {output.parent} does not exist")
    load_opts = {k: kwargs.pop(k) for k in ("text_encoder", "vae_tile", "loras", "device", "profile", "vram_budget",
                                            "attention")}
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               _SecondsPerIt(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        loading = bar.add_task("loading the DiT", total=None)
        pipe = Pipeline.from_pretrained(model, **load_opts)
        bar.update(loading, description="DiT loaded", total=1, completed=1)
        result = pipe(**kwargs, output=output, progress=bar, keep_frames=save_frames is not None or preview)
    if save_frames is not None:
        media.save_frames(save_frames, result.frames)
    if preview:  # the inputs are read again at the output size, next to the result
        ref = media.read_image(kwargs["image"])
        drive, _ = media.read_video(kwargs["pose"], size=result.size, max_frames=result.num_frames)
        preview_path = output.with_name(output.stem + "_preview.mp4")
        frames = media.side_by_side(media.resize_crop(ref, result.size, "bicubic"), drive, result.frames)
        media.write_video(preview_path, frames, result.fps)
    _summary(result, preview_path if preview else None)


def _summary(result, preview: Optional[Path]) -> None:
    from rich.table import Table

    for w in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)
    table = Table(title="scail2-lite generate", show_header=True)
    table.add_column("phase")
    table.add_column("seconds", justify="right")
    table.add_column("peak VRAM", justify="right")
    for phase, secs in result.seconds.items():
        peak = result.peak_vram.get(phase)
        table.add_row(phase, f"{secs:.1f}", f"{peak / 2**30:.2f} GiB" if peak is not None else "-")
    steps = result.step_seconds
    if steps:
        table.add_row("per step", f"{sum(steps) / len(steps):.2f}", "")
    console.print(table)
    console.print(", ".join(f"{k} {v}" for k, v in result.settings.items()), highlight=False)
    console.print(f"wrote {result.output} ({result.num_frames} frames, {result.fps:g} fps)"
                  + (f" and {preview}" if preview else ""))


@app.command()
@user_errors
def generate(
    model: Path = typer.Argument(..., help="SCAIL-2 folder (official download or `scail2-lite quantize` output)"),
    image: Optional[Path] = typer.Option(None, "--image", help="reference image of the character"),
    mask_image: Optional[Path] = typer.Option(None, "--mask-image", help="colour-coded reference mask, same size as "
                                              "the image"),
    pose: Optional[Path] = typer.Option(None, "--pose", help="driving video (mp4/webm/mov/gif or a folder of frames)"),
    mask_video: Optional[Path] = typer.Option(None, "--mask-video", help="colour-coded driving mask video, same frame "
                                              "count"),
    inputs: Optional[Path] = typer.Option(None, "--inputs", help="folder made by `scail2-lite prepare`: its four "
                                          "files and mode (a file flag given replaces its entry)"),
    prompt: str = typer.Option("", "--prompt", help="what the video shows"),
    negative_prompt: str = typer.Option("", "--negative-prompt", help="unconditional branch of CFG"),
    replace: bool = typer.Option(False, "--replace", help="replace the character in the driving video"),
    size: str = typer.Option("512p", "--size", help="512p or 704p (orientation follows the driving video)"),
    width: Optional[int] = typer.Option(None, "--width", help="explicit width (multiple of 32), with --height"),
    height: Optional[int] = typer.Option(None, "--height", help="explicit height (multiple of 32), with --width"),
    frames: Optional[int] = typer.Option(None, "--frames", help="use only the first N driving frames"),
    preset: Optional[str] = typer.Option(None, "--preset", help="fast: 4 steps, no CFG, lcm, shift 5 (for the "
                                         "LightX2V 4-step distilled LoRA); explicit flags still win"),
    steps: Optional[int] = typer.Option(None, "--steps", help="denoising steps [default: 40]"),
    shift: Optional[float] = typer.Option(None, "--shift", help="sigma shift [default: 5.0]"),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="CFG scale; 1 skips the unconditional "
                                             "branch [default: 5.0]"),
    solver: Optional[str] = typer.Option(None, "--solver", help="unipc, dpm++, euler or lcm [default: unipc]"),
    seed: int = typer.Option(0, "--seed"),
    segment_len: int = typer.Option(81, "--segment-len", help="frames per segment (4k+1)"),
    segment_overlap: int = typer.Option(5, "--segment-overlap", help="history frames carried between segments"),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help="bf16, int8 or nf4 (default: as quantized)"),
    vae_tile: Optional[int] = typer.Option(None, "--vae-tile", help="VAE tile size in pixels, 0 = untiled "
                                           "(default: the memory profile's)"),
    profile: Optional[str] = typer.Option(None, "--profile", help="memory profile name or .toml (default: the "
                                          "fastest that fits this GPU and RAM; see `scail2-lite profile`)"),
    vram_budget: Optional[float] = typer.Option(None, "--vram-budget", help="GB of VRAM the run may use"),
    attention: Optional[str] = typer.Option(None, "--attention", help="auto, sdpa, flash, cudnn, "
                                            "efficient, math, sage or fp8 (default: the profile's; auto = fp8 where "
                                            "installed and supported, else sdpa)"),
    lora: list[str] = typer.Option([], "--lora", help="LoRA file, optionally PATH:STRENGTH; repeatable"),
    cache: str = typer.Option("off", "--cache", help="skip DiT forwards that change little: teacache, magcache "
                              "or off (judge quality on your own videos)"),
    cache_threshold: Optional[float] = typer.Option(None, "--cache-threshold", help="higher skips more "
                                                    "[default: teacache 0.20, magcache 0.12]"),
    device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu (default: cuda if available)"),
    output: Path = typer.Option(Path("scail2.mp4"), "-o", "--output", help="mp4 to write"),
    save_frames: Optional[Path] = typer.Option(None, "--save-frames", help="also save PNG frames in this folder"),
    preview: bool = typer.Option(False, "--preview", help="also write a side-by-side reference | driving | result"),
) -> None:
    """Animate the reference character with the driving video (or replace the character in it)."""
    from .prepare.folder import generate_files

    image, mask_image, pose, mask_video, replace, notes = generate_files(inputs, image, mask_image, pose,
                                                                         mask_video, replace)
    for note in notes:
        console.print(f"[yellow]warning:[/yellow] {note}", highlight=False)
    if (width is None) != (height is None):
        raise UserError("give both --width and --height, or neither")
    if vram_budget is not None and vram_budget <= 0:
        raise UserError(f"--vram-budget must be a positive number of GB, got {vram_budget:g}")
    steps, shift, guidance, solver = _sampling_settings(preset, steps, shift, guidance, solver)
    _run_generation(
        model, output, save_frames=save_frames, preview=preview,
        image=image, mask_image=mask_image, pose=pose, mask_video=mask_video, prompt=prompt,
        negative_prompt=negative_prompt, replace=replace, size=(width, height) if width else size, frames=frames,
        steps=steps, shift=shift, guidance=guidance, solver=solver, seed=seed, segment_len=segment_len,
        segment_overlap=segment_overlap, cache=cache, cache_threshold=cache_threshold,
        text_encoder=text_encoder, vae_tile=vae_tile, loras=_lora_args(lora),
        device=device, profile=profile, vram_budget=int(vram_budget * 1e9) if vram_budget else None,
        attention=attention,
    )


def _sampling_settings(preset: Optional[str], steps: Optional[int], shift: Optional[float],
                       guidance: Optional[float], solver: Optional[str]) -> tuple[int, float, float, str]:
    """Explicit flags, else the preset's values, else upstream's defaults."""
    from .config import DEFAULT_GUIDANCE, DEFAULT_SHIFT, DEFAULT_STEPS, GENERATION_PRESETS

    if preset is not None and preset not in GENERATION_PRESETS:
        raise UserError(f"unknown --preset {preset!r}; choose one of {', '.join(GENERATION_PRESETS)}")
    base = {"steps": DEFAULT_STEPS, "shift": DEFAULT_SHIFT, "guidance": DEFAULT_GUIDANCE, "solver": "unipc"}
    base.update(GENERATION_PRESETS.get(preset, {}))
    given = {"steps": steps, "shift": shift, "guidance": guidance, "solver": solver}
    merged = {k: given[k] if given[k] is not None else base[k] for k in base}
    return merged["steps"], merged["shift"], merged["guidance"], merged["solver"]


@app.command()
@user_errors
def demo(
    output: Path = typer.Option(Path("demo.mp4"), "-o", "--output", help="mp4 to write"),
    preset: Optional[str] = typer.Option(None, "--preset", help="fast: the 4-step, no-CFG path"),
    steps: Optional[int] = typer.Option(None, "--steps", help="denoising steps [default: 8, fast: 4]"),
    seed: int = typer.Option(0, "--seed"),
    device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu (default: cuda if available)"),
) -> None:
    """Run the whole pipeline on a tiny synthetic checkpoint (made once, cached): no download, CPU is enough."""
    from .synth import cached_demo_folder

    steps, shift, guidance, solver = _sampling_settings(preset, steps or (None if preset else 8), None, None, None)
    folder = cached_demo_folder(progress=lambda what: console.print(f"making the demo checkpoint: {what}"))
    inputs = folder / "inputs"
    _run_generation(
        folder, output, save_frames=None, preview=False,
        image=inputs / "ref.png", mask_image=inputs / "ref_mask.png", pose=inputs / "driving.mp4",
        mask_video=inputs / "driving_mask.mp4", prompt="a person dancing", negative_prompt="",
        replace=False, size=(DEMO_SIZE, DEMO_SIZE), frames=None, steps=steps, shift=shift, guidance=guidance,
        solver=solver, seed=seed, segment_len=81, segment_overlap=5, text_encoder=None, vae_tile=None,
        loras=[], device=device, profile=None, vram_budget=None, attention=None,
    )


DEMO_SIZE = 128


def _bytes(b: Optional[int]) -> str:
    """Bytes as GB (1e9, the unit of --vram) or MB for the tiny model; '-' when not measured."""
    if b is None:
        return "-"
    return f"{b / 1e9:.2f} GB" if b >= 1e8 else f"{b / 1e6:.1f} MB"


def _error_cell(e: Optional[float]) -> str:
    from .profiling import TOLERANCE

    if e is None:
        return "-"
    return f"[{'green' if abs(e) <= TOLERANCE else 'red'}]{e:+.1%}[/]"


def _print_plan(out: Console, chosen, no_fit: Optional[str], cards: dict, table_plans: list, vram: int,
                ram: int) -> None:
    """Plan mode's printout: the chosen profile and why, its phases, the cards it fits, every profile here."""
    from rich.table import Table

    from .profiling import reserved_bytes

    if chosen is None:
        out.print(f"[red]no profile fits[/red] a {vram / 1e9:g} GB card with {ram / 1e9:.0f} GB RAM: {no_fit}",
                  highlight=False)
    else:
        p = chosen.profile
        out.print(f"profile [bold]{p.name}[/bold] ({p.description}): {chosen.reason}"
                  + ("" if chosen.fits else " [red](does not fit)[/red]"), highlight=False)
        out.print(f"DiT {chosen.quantization}: {chosen.resident_blocks} blocks resident, {chosen.streamed_blocks} "
                  f"streamed from {'pinned RAM' if p.weight_source == 'pinned' else 'the mapped file'} "
                  f"({'layer by layer' if p.stream_unit == 'layer' else f'{p.prefetch} ahead'}); "
                  f"encoders {p.encoders}; VAE tile {p.vae_tile or 'none'}", highlight=False)
        table = Table(title=f"predicted peaks per phase ({chosen.tokens:,} tokens)")
        for col in ("phase", "VRAM allocated", "VRAM reserved", "RAM"):
            table.add_column(col, justify="left" if col == "phase" else "right")
        for name, mem in chosen.phases.items():
            table.add_row(name, _bytes(mem.vram), _bytes(reserved_bytes(mem.vram)), _bytes(mem.ram))
        table.add_row("[bold]peak[/bold]", _bytes(chosen.peak_vram), _bytes(chosen.peak_vram_reserved),
                      _bytes(chosen.peak_ram))
        out.print(table)
    fits = [f"{gb} GB ({p.profile.name})" for gb, p in cards.items() if p is not None]
    out.print("fits on: " + (", ".join(fits) if fits else "none of " + ", ".join(f"{gb} GB" for gb in cards))
              + f" [dim](with {ram / 1e9:.0f} GB RAM)[/dim]", highlight=False)
    table = Table(title=f"every profile on a {vram / 1e9:g} GB card")
    for col in ("profile", "DiT", "resident", "streamed", "VRAM", "reserved", "RAM", "fits"):
        table.add_column(col, justify="left" if col in ("profile", "DiT", "fits") else "right")
    for p in table_plans:
        why = "yes" if p.fits else "no: " + " and ".join(
            w for w, bad in (("VRAM", p.peak_vram_reserved > p.vram_budget), ("RAM", p.peak_ram > p.ram_available))
            if bad)
        table.add_row(p.profile.name, p.quantization, str(p.resident_blocks), str(p.streamed_blocks),
                      _bytes(p.peak_vram), _bytes(p.peak_vram_reserved), _bytes(p.peak_ram),
                      f"[green]{why}[/green]" if p.fits else f"[red]{why}[/red]")
    out.print(table)


def _print_measured(out: Console, report: dict) -> None:
    """`profile --run`'s printout: measured vs predicted per phase, and the verdict on the planner."""
    from rich.table import Table

    from .profiling import TOLERANCE

    phases = report["measured"]["phases"]
    rows = {r["phase"]: r for r in report["comparison"]}
    cuda = any(s["peak_allocated"] is not None for s in phases.values())
    table = Table(title=f"measured ({report['measured']['device_name']}) vs predicted")
    cols = ["phase", "seconds"]
    if cuda:
        cols += ["allocated", "predicted", "error", "reserved", "predicted", "error", "NVML used"]
    cols += ["RSS", "predicted", "error"]
    for col in cols:
        table.add_column(col, justify="left" if col == "phase" else "right")
    for name, s in phases.items():
        r = rows.get(name, {})
        cells = [name, f"{s['seconds']:.2f}"]
        if cuda:
            cells += [_bytes(s["peak_allocated"]), _bytes(r.get("predicted_allocated")),
                      _error_cell(r.get("error_allocated")), _bytes(s["peak_reserved"]),
                      _bytes(r.get("predicted_reserved")), _error_cell(r.get("error_reserved")),
                      _bytes(s["peak_nvml_used"])]
        cells += [_bytes(s["peak_rss"]), _bytes(r.get("predicted_ram")), _error_cell(r.get("error_ram"))]
        table.add_row(*cells)
    out.print(table)
    steps = report["step_seconds"]
    if steps:
        out.print(f"{len(steps)} steps, {sum(steps) / len(steps):.2f} s per step", highlight=False)
    out.print(report["measured"]["nvml"], highlight=False)
    worst = report["max_abs_error_allocated"]
    if worst is not None:
        verdict = "[green]within[/green]" if report["within_tolerance"] else "[red]not within[/red]"
        out.print(f"planner {verdict} {TOLERANCE:.0%} of the measured peak allocated on every phase "
                  f"(worst {worst:.1%})", highlight=False)


@app.command()
@user_errors
def profile(
    model: Optional[Path] = typer.Argument(None, help="SCAIL-2 folder or checkpoint (or use --synthetic)"),
    synthetic: Optional[str] = typer.Option(None, "--synthetic", help="plan for a model geometry without its "
                                            "weights: full (14B) or tiny; with --run, tiny uses the demo checkpoint"),
    size: str = typer.Option("512p", "--size", help="512p or 704p"),
    width: Optional[int] = typer.Option(None, "--width", help="explicit width (multiple of 32), with --height"),
    height: Optional[int] = typer.Option(None, "--height", help="explicit height (multiple of 32), with --width"),
    frames: Optional[int] = typer.Option(None, "--frames", help="frames per segment to plan for [default: 81]; "
                                         "with --run: use only the first N driving frames"),
    vram: Optional[float] = typer.Option(None, "--vram", help="GB (1e9 bytes) of VRAM to plan for, e.g. 8, 12, 16, "
                                         "24 [default: this GPU's free VRAM]; with --run the process is capped to it"),
    ram: Optional[float] = typer.Option(None, "--ram", help="GB of RAM to plan for [default: available RAM]"),
    profile_name: Optional[str] = typer.Option(None, "--profile", help="memory profile name or .toml [default: "
                                               "the fastest that fits]"),
    weights: Optional[str] = typer.Option(None, "--weights", help="plan with the DiT in bf16, fp8 or int8 "
                                          "[default: the model's]"),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help="plan with umT5 in 4bit, int8 or bf16 "
                                               "[default: the model's]"),
    run: bool = typer.Option(False, "--run", help="run the pipeline and measure each phase against the plan"),
    steps: int = typer.Option(2, "--steps", help="denoising steps of --run"),
    image: Optional[Path] = typer.Option(None, "--image", help="reference image [default: MODEL/inputs/ref.png]"),
    mask_image: Optional[Path] = typer.Option(None, "--mask-image", help="[default: MODEL/inputs/ref_mask.png]"),
    pose: Optional[Path] = typer.Option(None, "--pose", help="driving video [default: MODEL/inputs/driving.mp4]"),
    mask_video: Optional[Path] = typer.Option(None, "--mask-video", help="[default: MODEL/inputs/driving_mask.mp4]"),
    device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu for --run (default: cuda if available)"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the report as JSON [default with --run: "
                                             "profile.json]"),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="PNG of memory over time with phase bands "
                                             "(--run) [default: profile.png]"),
) -> None:
    """Show where memory goes: the plan per phase and the cards it fits; with --run, measured against the plan."""
    import dataclasses

    from . import profiling
    from .config import SIZES
    from .planner import GB, detect_memory, plan

    if (model is None) == (synthetic is None):
        raise UserError("give a MODEL folder or --synthetic full|tiny (one of them)")
    if (width is None) != (height is None):
        raise UserError("give both --width and --height, or neither")
    if width is None and size not in SIZES:
        raise UserError(f"unknown size {size!r}; choose one of {', '.join(SIZES)} or give --width/--height")
    for flag, value in (("--vram", vram), ("--ram", ram)):
        if value is not None and value <= 0:
            raise UserError(f"{flag} must be a positive number of GB, got {value:g}")
    if run:
        if synthetic == "full":
            raise UserError("--run needs weights: write them with `scail2-lite synth --scale full --format wan -o DIR`"
                            " and pass DIR as MODEL")
        if ram is not None or weights is not None or text_encoder is not None:
            raise UserError("--ram, --weights and --text-encoder only plan; --run uses this machine and the model "
                            "as is")
        if steps < 1:
            raise UserError(f"--steps must be at least 1, got {steps}")
        if synthetic is not None:
            from .synth import cached_demo_folder, dit_config

            dit_config(synthetic)  # validates the scale name
            model = cached_demo_folder(progress=lambda what: console.print(f"making the demo checkpoint: {what}"))
        _profile_run(model, size=(width, height) if width else size, frames=frames, vram=vram,
                     profile_name=profile_name, steps=steps, files=(image, mask_image, pose, mask_video), device=device,
                     json_path=json_path or Path("profile.json"), plot_path=plot_path or Path("profile.png"))
        return
    if plot_path is not None:
        raise UserError("--plot draws measured memory: add --run")
    target = profiling.model_target(model) if model is not None else profiling.synthetic_target(synthetic)
    target = dataclasses.replace(target, weights=weights or target.weights,
                                 text_encoder=text_encoder or target.text_encoder)
    h, w = (height, width) if width else SIZES[size]
    n_frames = frames if frames is not None else 81
    free, _, ram_free = detect_memory()
    if vram is None and not free:
        raise UserError("no CUDA GPU here: pass --vram GB (e.g. 8, 12, 16, 24) to plan for a card")
    vram_bytes = int(vram * GB) if vram is not None else free
    ram_bytes = int(ram * GB) if ram is not None else ram_free
    chosen, no_fit = None, None
    try:
        chosen = plan(target.config, h, w, n_frames, vram_bytes, ram_bytes, profile=profile_name,
                      weights=target.weights, text_encoder=target.text_encoder, mappable=target.mappable)
    except UserError as e:
        if str(e).startswith("no profile fits"):
            no_fit = str(e)
        else:
            raise
    cards = profiling.fits_on(target, h, w, n_frames, ram_bytes)
    table_plans = profiling.all_profiles(target, h, w, n_frames, vram_bytes, ram_bytes)
    out = Console()
    out.print(f"model: {target.source}; DiT {target.weights}, umT5 {target.text_encoder}", highlight=False)
    out.print(f"run: {w}x{h}, {n_frames} frames per segment; card: {vram_bytes / GB:g} GB VRAM"
              f" ({'given' if vram is not None else 'free now'}), {ram_bytes / GB:.1f} GB RAM"
              f" ({'given' if ram is not None else 'available now'})", highlight=False)
    for note in target.notes:
        out.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    _print_plan(out, chosen, no_fit, cards, table_plans, vram_bytes, ram_bytes)
    if json_path is not None:
        profiling.write_json(json_path, {
            "version": profiling.REPORT_VERSION, "model": target.source, "weights": target.weights,
            "text_encoder": target.text_encoder, "height": h, "width": w, "frames": n_frames,
            "vram": vram_bytes, "ram": ram_bytes, "plan": profiling.plan_to_json(chosen) if chosen else None,
            "no_fit": no_fit, "fits_on": {str(gb): p.profile.name if p else None for gb, p in cards.items()},
            "profiles": [profiling.plan_to_json(p) for p in table_plans],
        })
        console.print(f"wrote {json_path}")


def _profile_run(model: Path, *, size, frames: Optional[int], vram: Optional[float], profile_name: Optional[str],
                 steps: int, files: tuple, device: Optional[str], json_path: Path, plot_path: Path) -> None:
    """`profile --run`: load, run `steps` steps with a PhaseRecorder, compare with the pipeline's own plan."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from . import profiling
    from .conditioning import segment_plan
    from .pipeline import Pipeline, load_inputs, parse_device
    from .planner import GB, detect_memory, plan

    inputs_dir = model / "inputs"
    defaults = ("ref.png", "ref_mask.png", "driving.mp4", "driving_mask.mp4")
    paths = [given or inputs_dir / name for given, name in zip(files, defaults)]
    for flag, p in zip(("--image", "--mask-image", "--pose", "--mask-video"), paths):
        if not p.exists():
            raise UserError(f"{p} not found: pass {flag}")
    dev = parse_device(device)
    budget = int(vram * GB) if vram is not None else None
    if budget is not None and dev.type == "cuda":
        total = torch.cuda.get_device_properties(dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total))  # emulate the smaller card
    recorder = profiling.PhaseRecorder(dev)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as bar:
        loading = bar.add_task("loading the DiT", total=None)
        with recorder("load"):
            pipe = Pipeline.from_pretrained(model, device=dev, profile=profile_name, vram_budget=budget)
        bar.update(loading, description="loaded", total=1, completed=1)
        with recorder("inputs"):
            inputs = load_inputs(*paths, size=size, frames=frames)
        h, w = inputs.size
        first = segment_plan(inputs.frames)[0]
        predicted = pipe.make_plan(h, w, first[1] - first[0])
        if predicted is None and budget is not None:  # CPU: predict for the card asked for, to compare RAM
            target = profiling.model_target(model)
            predicted = plan(target.config, h, w, first[1] - first[0], budget, detect_memory()[2],
                             profile=profile_name, weights=target.weights, text_encoder=target.text_encoder,
                             mappable=target.mappable)
        result = pipe(inputs, prompt="a person dancing", steps=steps, keep_frames=False, progress=bar,
                      recorder=recorder)
    measured = recorder.to_json()
    report = profiling.run_report(measured, predicted, result.settings, result.step_seconds, sys.argv)
    if result.settings.get("out_of_memory_fallbacks"):
        console.print(f"[yellow]note:[/yellow] out of memory, re-planned: {result.settings['out_of_memory_fallbacks']}"
                      " (predictions are for the first plan)")
    out = Console()
    if predicted is not None:
        out.print(f"profile [bold]{predicted.profile.name}[/bold]: {predicted.reason or 'as given'}; "
                  f"{predicted.resident_blocks} blocks resident, {predicted.streamed_blocks} streamed", highlight=False)
    _print_measured(out, report)
    profiling.write_json(json_path, report)
    try:
        recorder.plot(plot_path, predicted, title=f"scail2-lite profile: {w}x{h}, {result.num_frames} frames, "
                                                  f"{steps} steps ({measured['device_name']})")
        console.print(f"wrote {json_path} and {plot_path}")
    except UserError as e:
        console.print(f"wrote {json_path}; no plot: {e}")


def main() -> None:
    app(prog_name="scail2-lite")


if __name__ == "__main__":
    sys.exit(main())
