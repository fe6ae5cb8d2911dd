"""`generate` and `demo`: progress bars over the pipeline, then a summary of what was written."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..attention import kernel_name
from ..config import DEFAULT_GUIDANCE, DEFAULT_NEGATIVE_PROMPT, DEFAULT_SHIFT, DEFAULT_STEPS, SEGMENT_LEN, SEGMENT_OVERLAP
from ..errors import UserError
from ..inputs import InputFiles
from ..settings import GenerationSettings, MemorySettings
from . import LORA_FULL_PATCHES_HELP, app, console, lora_args, user_errors


class _SecondsPerIt:
    """Progress column: seconds per completed step, over the time spent in steps only (the pipeline reports it in
    the task's `step_seconds` field; the VAE decodes between segments do not count)."""

    def __new__(cls):
        from rich.progress import ProgressColumn
        from rich.text import Text

        class Column(ProgressColumn):
            def render(self, task) -> Text:
                busy = task.fields.get("step_seconds")
                if not task.completed or not busy:
                    return Text("")
                return Text(f"{busy / task.completed:.2f} s/it")

        return Column()


def _run_generation(model: Path, files: InputFiles, prompt: str, negative_prompt: str,
                    settings: GenerationSettings, memory: MemorySettings, loras: list,
                    output: Path, save_frames: Optional[Path] = None, preview: bool = False) -> None:
    """Shared by `generate` and `demo`: load, generate into `output` with progress bars, print the summary."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.progress import TimeRemainingColumn

    from .. import media
    from ..pipeline import Pipeline

    if output.suffix.lower() != ".mp4":
        raise UserError(f"-o {output}: the output must be an .mp4 file")
    if not output.parent.is_dir():
        raise UserError(f"-o {output}: folder {output.parent} does not exist")
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               _SecondsPerIt(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        loading = bar.add_task("loading the DiT", total=None)
        pipe = Pipeline.from_pretrained(model, memory, loras=loras)
        bar.update(loading, description="DiT loaded", total=1, completed=1)
        for lora, strength in pipe.loras:
            console.print(lora.report(strength), highlight=False, markup=False)
        result = pipe(files, prompt, negative_prompt, settings, output=output, progress=bar,
                      keep_frames=save_frames is not None or preview)
    if save_frames is not None:
        media.save_frames(save_frames, result.frames)
    if preview:  # the inputs are read again at the output size, next to the result
        ref = media.read_image(files.image)
        drive, _ = media.read_video(files.pose, size=result.size, max_frames=result.num_frames)
        preview_path = output.with_name(output.stem + "_preview.mp4")
        frames = media.side_by_side(media.resize_crop(ref, result.size, "bicubic"), drive, result.frames)
        media.write_video(preview_path, frames, result.fps)
    _summary(result, preview_path if preview else None)


def _summary(result, preview: Optional[Path]) -> None:
    from rich.table import Table

    for w in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}", highlight=False, markup=False)
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
    console.print(", ".join(f"{k} {v}" for k, v in result.settings.items() if v is not None), highlight=False,
                  markup=False)
    console.print(f"self-attention: {kernel_name(result.settings['attention'])}", highlight=False, markup=False)
    console.print(f"wrote {result.output} ({result.num_frames} frames, {result.fps:g} fps)"
                  + (f" and {preview}" if preview else ""), highlight=False, markup=False)


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
    negative_prompt: str = typer.Option(DEFAULT_NEGATIVE_PROMPT, "--negative-prompt",
                                        help="unconditional branch of CFG"),
    replace: bool = typer.Option(False, "--replace", help="replace the character in the driving video"),
    size: str = typer.Option("512p", "--size", help="512p or 704p (orientation follows the driving video)"),
    width: Optional[int] = typer.Option(None, "--width", help="explicit width (multiple of 32), with --height"),
    height: Optional[int] = typer.Option(None, "--height", help="explicit height (multiple of 32), with --width"),
    frames: Optional[int] = typer.Option(None, "--frames", help="use only the first N driving frames"),
    preset: Optional[str] = typer.Option(None, "--preset", help="fast: 4 steps, no CFG, lcm, shift 5 (for the "
                                         "LightX2V 4-step distilled LoRA); explicit flags still win"),
    steps: Optional[int] = typer.Option(None, "--steps", help=f"denoising steps \\[default: {DEFAULT_STEPS}]"),
    shift: Optional[float] = typer.Option(None, "--shift", help=f"sigma shift \\[default: {DEFAULT_SHIFT}]"),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="CFG scale; 1 skips the unconditional "
                                             f"branch \\[default: {DEFAULT_GUIDANCE}]"),
    solver: Optional[str] = typer.Option(None, "--solver", help="unipc, dpm++, euler or lcm \\[default: unipc]"),
    seed: int = typer.Option(0, "--seed"),
    segment_len: int = typer.Option(SEGMENT_LEN, "--segment-len", help="frames per segment (4k+1)"),
    segment_overlap: int = typer.Option(SEGMENT_OVERLAP, "--segment-overlap",
                                        help="history frames carried between segments"),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help="bf16, int8 or nf4 (default: as quantized)"),
    vae_tile: Optional[int] = typer.Option(None, "--vae-tile", help="VAE tile size in pixels, 0 = untiled "
                                           "(default: the memory profile's)"),
    profile: Optional[str] = typer.Option(None, "--profile", help="memory profile name or .toml (default: the "
                                          "fastest that fits this GPU and RAM; see `scail2-lite profile`)"),
    vram_budget: Optional[float] = typer.Option(None, "--vram-budget", help="GB of VRAM the run may use"),
    attention: Optional[str] = typer.Option(None, "--attention", help="auto, sdpa, flash, cudnn, "
                                            "efficient, math, sage, fp8 or int8 (default: the profile's; auto = by "
                                            "GPU: cuDNN fp8 on Hopper, our int8 kernel on Ampere, Ada and RTX 50xx, "
                                            "where it builds; else sdpa)"),
    lora: list[str] = typer.Option([], "--lora", help="LoRA file, optionally PATH:STRENGTH; repeatable (what "
                                   "matched and what was skipped is printed)"),
    lora_full_patches: bool = typer.Option(False, "--lora-full-patches", help=LORA_FULL_PATCHES_HELP),
    cache: str = typer.Option("off", "--cache", help="skip DiT forwards that change little: teacache, magcache "
                              "or off (judge quality on your own videos)"),
    cache_threshold: Optional[float] = typer.Option(None, "--cache-threshold", help="higher skips more "
                                                    "\\[default: teacache 0.20, magcache 0.12]"),
    device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu (default: cuda if available)"),
    prompt_cache: bool = typer.Option(True, "--prompt-cache/--no-prompt-cache", help="reuse the prompt embeddings "
                                      "of an earlier run with the same text encoder (kept in the user cache folder)"),
    output: Path = typer.Option(Path("scail2.mp4"), "-o", "--output", help="mp4 to write"),
    save_frames: Optional[Path] = typer.Option(None, "--save-frames", help="also save PNG frames in this folder"),
    preview: bool = typer.Option(False, "--preview", help="also write a side-by-side reference | driving | result"),
) -> None:
    """Animate the reference character with the driving video (or replace the character in it)."""
    from ..prepare.folder import generate_files

    files, replace, notes = generate_files(inputs, image, mask_image, pose, mask_video, replace)
    for note in notes:
        console.print(f"[yellow]warning:[/yellow] {note}", highlight=False)
    if (width is None) != (height is None):
        raise UserError("give both --width and --height, or neither")
    settings = GenerationSettings.build(
        preset, size=(width, height) if width else size, frames=frames, steps=steps, shift=shift, guidance=guidance,
        solver=solver, seed=seed, segment_len=segment_len, segment_overlap=segment_overlap, cache=cache,
        cache_threshold=cache_threshold, replace=replace)
    memory = MemorySettings(device=device, profile=profile, attention=attention, text_encoder=text_encoder,
                            vae_tile=vae_tile, vram_budget=None if vram_budget is None else _gb(vram_budget),
                            prompt_cache=prompt_cache)
    _run_generation(model, files, prompt, negative_prompt, settings, memory, lora_args(lora, lora_full_patches),
                    output, save_frames, preview)


def _gb(value: float) -> int:
    if not value > 0:
        raise UserError(f"--vram-budget must be a positive number of GB, got {value:g}")
    return int(value * 1e9)


@app.command()
@user_errors
def demo(
    output: Path = typer.Option(Path("demo.mp4"), "-o", "--output", help="mp4 to write"),
    preset: Optional[str] = typer.Option(None, "--preset", help="fast: the 4-step, no-CFG path"),
    steps: Optional[int] = typer.Option(None, "--steps", help="denoising steps \\[default: 8, fast: 4]"),
    seed: int = typer.Option(0, "--seed"),
    device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu (default: cuda if available)"),
) -> None:
    """Run the whole pipeline on a tiny synthetic checkpoint (made once, cached): no download, CPU is enough."""
    from ..synth import cached_demo_folder

    if steps is None and preset is None:
        steps = DEMO_STEPS
    settings = GenerationSettings.build(preset, size=(DEMO_SIZE, DEMO_SIZE), steps=steps, seed=seed)
    folder = cached_demo_folder(progress=lambda what: console.print(f"making the demo checkpoint: {what}"))
    inputs = folder / "inputs"
    files = InputFiles(inputs / "ref.png", inputs / "ref_mask.png", inputs / "driving.mp4",
                       inputs / "driving_mask.mp4")
    _run_generation(folder, files, "a person dancing", DEFAULT_NEGATIVE_PROMPT, settings, MemorySettings(device=device),
                    [], output)


DEMO_SIZE = 128
DEMO_STEPS = 8
