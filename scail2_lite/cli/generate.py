"""`generate` and `demo`: progress bars over the pipeline, then a summary of what was written."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..attention import kernel_name
from ..config import (
    DEFAULT_GUIDANCE,
    DEFAULT_NEGATIVE_PROMPT,
    DEFAULT_SHIFT,
    DEFAULT_SOLVER,
    DEFAULT_STEPS,
    GENERATION_PRESETS,
    SEGMENT_LEN,
    SEGMENT_OVERLAP,
)
from ..errors import UserError
from ..inputs import InputFiles, backgrounds
from ..settings import GenerationSettings, MemorySettings
from . import LORA_FULL_PATCHES_HELP, app, console, lora_args, user_errors, warn


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


def _preset_help() -> str:
    """Each preset's recipe and the distill LoRA file it expects (from config.GENERATION_PRESETS)."""
    names: dict[int, list[str]] = {}
    for name, recipe in GENERATION_PRESETS.items():
        names.setdefault(id(recipe), []).append(name)
    parts = []
    for name, recipe in GENERATION_PRESETS.items():
        aliases = names[id(recipe)]
        if name != aliases[0]:
            continue
        alias = f" (alias: {', '.join(aliases[1:])})" if len(aliases) > 1 else ""
        parts.append(f"{name}{alias}: {recipe.steps} steps, shift {recipe.shift:g}, guidance {recipe.guidance:g}, "
                     f"{recipe.solver}, for --lora {recipe.lora}")
    return "; ".join(parts)


PRESET_HELP = _preset_help()


def _run_generation(model: Path, files: InputFiles, prompt: str, negative_prompt: str,
                    settings: GenerationSettings, memory: MemorySettings, loras: list,
                    output: Path, save_frames: Optional[Path] = None, preview: bool = False,
                    prepared: Optional[Path] = None) -> None:
    """Shared by `generate` and `demo`: check the outputs, load, generate into `output` with progress bars,
    print the summary."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.progress import TimeRemainingColumn

    from .. import distributed, media
    from ..pipeline import Pipeline

    main = distributed.is_main_process()
    console.quiet = not main  # under torchrun rank 0 speaks for all (errors excepted: cli.error)
    preview_path = _check_outputs(model, files, settings, loras, output, save_frames, preview, prepared)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               _SecondsPerIt(), TimeElapsedColumn(), TimeRemainingColumn())
    if (note := settings.preset_warning([lora.path for lora in loras])) is not None:
        console.print(f"[yellow]warning:[/yellow] {note}", highlight=False, markup=False)  # before minutes of loading
    with Progress(*columns, console=console) as bar:
        loading = bar.add_task("loading the DiT", total=None)
        pipe = Pipeline.from_pretrained(model, memory, loras=loras)
        bar.update(loading, description="DiT loaded", total=1, completed=1)
        for lora, strength in pipe.loras:
            console.print(lora.report(strength), highlight=False, markup=False)
        result = pipe(files, prompt, negative_prompt, settings, output=output, progress=bar,
                      keep_frames=main and (save_frames is not None or preview))
    if not main:
        return
    if save_frames is not None:
        media.save_frames(save_frames, result.frames)
    if preview_path is not None:  # the inputs are read again at the output size, next to the result
        bg = backgrounds(settings.replace)
        ref = media.read_image(files.image, bg["image"])
        drive, _ = media.read_video(files.pose, size=result.size, max_frames=result.num_frames,
                                    background=bg["pose"])
        frames = media.side_by_side(media.resize_crop(ref, result.size), drive, result.frames)
        media.write_video(preview_path, frames, result.fps)
    _summary(result, preview_path)


# Output size estimates for the disk-space check: H.264 at crf 17 stays well under 0.1 byte per pixel on
# natural video, 0.25 also covers noise; PNG frames are bounded by raw RGB.
MP4_BYTES_PER_PIXEL = 0.25
PNG_BYTES_PER_PIXEL = 3


def _check_outputs(model: Path, files: InputFiles, settings: GenerationSettings, loras: list,
                   output: Path, save_frames: Optional[Path], preview: bool,
                   prepared: Optional[Path]) -> Optional[Path]:
    """Before any loading: every output apart from every input (and from each other), in a writable place with
    room for it. Returns the preview's path (None without --preview)."""
    from .. import media, outputs

    if output.suffix.lower() != ".mp4":
        raise UserError(f"-o {output}: the output must be an .mp4 file")
    preview_path = output.with_name(output.stem + "_preview.mp4") if preview else None
    written = {"-o": output, "--preview": preview_path, "--save-frames": save_frames}
    read = {"MODEL": model, "--inputs": prepared, "--image": files.image, "--mask-image": files.mask_image,
            "--pose": files.pose, "--mask-video": files.mask_video, **{f"--lora {lo.path}": lo.path for lo in loras}}
    outputs.check_separate(written, read)
    for flag, path in written.items():
        outputs.check_separate({flag: path}, {f: p for f, p in written.items() if f != flag})
    h, w = media.output_size(settings.size, media.video_size(files.pose))
    frames = media.frame_count(files.pose)
    pixels = (min(frames, settings.frames) if settings.frames else frames) * h * w
    outputs.check_file_target(output, "-o", int(pixels * MP4_BYTES_PER_PIXEL))
    if preview_path is not None:
        outputs.check_file_target(preview_path, "--preview", int(3 * pixels * MP4_BYTES_PER_PIXEL))
    if save_frames is not None:
        outputs.check_folder_target(save_frames, "--save-frames", pixels * PNG_BYTES_PER_PIXEL)
    return preview_path


def _summary(result, preview: Optional[Path]) -> None:
    from rich.table import Table

    for w in result.warnings:
        warn(w)
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
    total = sum(result.seconds.values())
    table.add_row("outside the steps", f"{total - result.seconds.get('dit steps', 0.0):.1f}", "")
    table.add_row("[bold]total[/bold]", f"{total:.1f}", "")
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
    inputs: Optional[Path] = typer.Option(None, "--inputs", help="folder made by `scail2-lite prepare`: its "
                                          "files and mode (a file flag given replaces its entry)"),
    additional_ref_image: list[Path] = typer.Option([], "--additional-ref-image", help="(beta) extra reference "
                                                    "view (a background, the character from another side); "
                                                    "repeatable, paired by position with --additional-ref-mask"),
    additional_ref_mask: list[Path] = typer.Option([], "--additional-ref-mask", help="(beta) mask of the extra "
                                                   "reference at the same position: a background view white over "
                                                   "the visible background, a character view its colour on black"),
    prompt: str = typer.Option("", "--prompt", help="what the video shows"),
    negative_prompt: str = typer.Option(DEFAULT_NEGATIVE_PROMPT, "--negative-prompt",
                                        help="unconditional branch of CFG (upstream: empty)"),
    replace: bool = typer.Option(False, "--replace", help="replace the character in the driving video"),
    composite_reference: bool = typer.Option(False, "--composite-reference", help="with --replace: paint the "
                                             "reference black outside its mask before encoding it, as ComfyUI does "
                                             "(upstream encodes it as given)"),
    size: str = typer.Option("512p", "--size", help="512p or 704p (orientation follows the reference image, as "
                             "upstream; a square one gives landscape)"),
    width: Optional[int] = typer.Option(None, "--width", help="explicit width (multiple of 32), with --height"),
    height: Optional[int] = typer.Option(None, "--height", help="explicit height (multiple of 32), with --width"),
    frames: Optional[int] = typer.Option(None, "--frames", help="use only the first N driving frames"),
    preset: Optional[str] = typer.Option(None, "--preset", help=f"{PRESET_HELP}; explicit flags still win"),
    steps: Optional[int] = typer.Option(None, "--steps", help=f"denoising steps \\[default: {DEFAULT_STEPS}]"),
    shift: Optional[float] = typer.Option(None, "--shift", help="sigma shift (ComfyUI workflows often use 5) "
                                          f"\\[default: {DEFAULT_SHIFT:g}, upstream's]"),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="CFG scale; 1 skips the unconditional "
                                             f"branch \\[default: {DEFAULT_GUIDANCE}]"),
    solver: Optional[str] = typer.Option(None, "--solver", help="unipc, dpm++, euler or lcm "
                                         f"\\[default: {DEFAULT_SOLVER}]"),
    seed: int = typer.Option(0, "--seed"),
    segment_len: int = typer.Option(SEGMENT_LEN, "--segment-len", help="frames per segment (4k+1)"),
    segment_overlap: int = typer.Option(SEGMENT_OVERLAP, "--segment-overlap",
                                        help="history frames carried between segments"),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help="bf16, int8 or nf4 (default: as quantized; "
                                          "a folder storing umT5 in nf4/int8 runs only that)"),
    vae_tile: Optional[int] = typer.Option(None, "--vae-tile", help="VAE tile size in pixels, 0 = untiled "
                                           "(default: encode untiled up to 704p, decode in the quickest cut that "
                                           "fits the card, see `scail2-lite profile`)"),
    profile: Optional[str] = typer.Option(None, "--profile", help="memory profile name or .toml (default: the "
                                          "fastest that fits this GPU and RAM; see `scail2-lite profile`)"),
    vram_budget: Optional[float] = typer.Option(None, "--vram-budget", help="plan for a card of this size in GB "
                                                "as sold (16 = 16 GiB), less its CUDA context and a desktop reserve"),
    vae_dtype: Optional[str] = typer.Option(None, "--vae-dtype", help="VAE decode precision: fp32 or bf16 "
                                            "\[default: fp32]"),
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
    parallel: str = typer.Option("auto", "--parallel", help="under `torchrun --nproc-per-node N`: cfg (the two CFG "
                                 "branches side by side), ulysses (the tokens split, N dividing 40), auto (cfg when "
                                 "guidance > 1 and N even, with ulysses inside each half; else ulysses) or off"),
    prompt_cache: bool = typer.Option(True, "--prompt-cache/--no-prompt-cache", help="reuse the prompt embeddings "
                                      "of an earlier run with the same text encoder (kept in the user cache folder)"),
    output: Path = typer.Option(Path("scail2.mp4"), "-o", "--output", help="mp4 to write"),
    save_frames: Optional[Path] = typer.Option(None, "--save-frames", help="also save PNG frames in this folder"),
    preview: bool = typer.Option(False, "--preview", help="also write a side-by-side reference | driving | result"),
) -> None:
    """Animate the reference character with the driving video (or replace the character in it)."""
    from ..distributed import is_main_process
    from ..prepare.folder import generate_files

    console.quiet = not is_main_process()
    files, replace, notes = generate_files(inputs, image, mask_image, pose, mask_video, replace,
                                           additional_ref_image, additional_ref_mask)
    for note in notes:
        warn(note)
    if (width is None) != (height is None):
        raise UserError("give both --width and --height, or neither")
    settings = GenerationSettings.build(
        preset, size=(width, height) if width else size, frames=frames, steps=steps, shift=shift, guidance=guidance,
        solver=solver, seed=seed, segment_len=segment_len, segment_overlap=segment_overlap, cache=cache,
        cache_threshold=cache_threshold, replace=replace, composite_reference=composite_reference)
    memory = MemorySettings(device=device, profile=profile, attention=attention, text_encoder=text_encoder,
                            vae_tile=vae_tile, vram_budget=None if vram_budget is None else _gb(vram_budget),
                            vae_dtype=vae_dtype, prompt_cache=prompt_cache, parallel=parallel)
    _run_generation(model, files, prompt, negative_prompt, settings, memory, lora_args(lora, lora_full_patches),
                    output, save_frames, preview, inputs)


def _gb(value: float) -> int:
    if not value > 0:
        raise UserError(f"--vram-budget must be a positive number of GB, got {value:g}")
    from ..offload.card import card_bytes

    return card_bytes(value)


@app.command()
@user_errors
def demo(
    output: Path = typer.Option(Path("demo.mp4"), "-o", "--output", help="mp4 to write"),
    preset: Optional[str] = typer.Option(None, "--preset", help="a sampling recipe (see `generate --help`); the "
                                         "demo checkpoint has no distill LoRA, so it only shows the path runs"),
    steps: Optional[int] = typer.Option(None, "--steps", help="denoising steps \\[default: 8, or the preset's]"),
    seed: int = typer.Option(0, "--seed"),
    device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu (default: cuda if available)"),
    multi_ref: bool = typer.Option(False, "--multi-ref", help="also pass the demo's two extra reference views (a "
                                   "background and the character alone: multi-reference)"),
) -> None:
    """Run the whole pipeline on a tiny synthetic checkpoint (made once, cached): no download, CPU is enough."""
    from ..synth import EXTRA_REFERENCES, cached_demo_folder

    if steps is None and preset is None:
        steps = DEMO_STEPS
    settings = GenerationSettings.build(preset, size=(DEMO_SIZE, DEMO_SIZE), steps=steps, seed=seed)
    folder = cached_demo_folder(progress=lambda what: console.print(f"making the demo checkpoint: {what}"))
    inputs = folder / "inputs"
    extras = tuple((inputs / image, inputs / mask) for image, mask in EXTRA_REFERENCES) if multi_ref else ()
    files = InputFiles(inputs / "ref.png", inputs / "ref_mask.png", inputs / "driving.mp4",
                       inputs / "driving_mask.mp4", extras)
    _run_generation(folder, files, "a person dancing", DEFAULT_NEGATIVE_PROMPT, settings, MemorySettings(device=device),
                    [], output)


DEMO_SIZE = 128
DEMO_STEPS = 8
