"""The `scail2-lite` command line: thin Typer commands over the Python API, errors as one line + exit 2."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console

from .errors import UserError

app = typer.Typer(
    name="scail2-lite",
    help="Run SCAIL-2 character animation on consumer GPUs: quantize, generate, profile.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def user_errors(fn: Callable) -> Callable:
    """Turn UserError (and Ctrl-C) into one red line and a non-zero exit instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130) from None

    return wrapper


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
    dit: str = typer.Option("fp8", "--dit", help="DiT block Linears: fp8, int8 or bf16"),
    text_encoder: str = typer.Option("nf4", "--text-encoder", help="umT5 at load time: bf16, int8 or nf4"),
    compute: str = typer.Option("auto", "--compute", help="matmul path: auto, fp8, int8 or dequant"),
    force: bool = typer.Option(False, "--force", help="replace an existing output folder"),
    export: Optional[str] = typer.Option(None, "--export", help="comfy: also write a ComfyUI fp8_scaled file"),
) -> None:
    """Quantize the DiT to FP8/INT8 (streamed, bounded RAM), copy the other components, report the fidelity."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from . import formats
    from .quantize.comfy import export_comfy, from_comfy_fp8
    from .quantize.linear import check_compute
    from .quantize.report import FidelityReport
    from .quantize.schemes import QuantizeError, check_scheme
    from .quantize.store import is_quantized_folder, write_quantized
    from .quantize.text_encoder import text_encoder_backend

    try:
        check_scheme(dit)
        text_encoder_backend(text_encoder, "cpu")
        if compute != "auto" and dit != "bf16":
            check_compute(compute, dit)
        if export not in (None, "comfy") or (export == "comfy" and dit != "fp8"):
            raise UserError("--export comfy is the only export and needs --dit fp8")
        if out.exists() and not force:
            raise UserError(f"output {out} already exists; pass --force to replace it")
        fmt = formats.detect_format(src)
        if fmt == "quantized" or is_quantized_folder(src):
            raise UserError(f"{src} is already quantized; quantize from the original checkpoint")
        dit_file = formats.find_dit(src)
        shapes = {k: v for k, v in formats.read_shapes(src).items() if not k.endswith((".scale_weight", ".scale_input"))}
        config, _ = formats.read_config(src, shapes)
        formats.check_keys(shapes, config, src)
        root = Path(src) if Path(src).is_dir() else dit_file.parent
        parts = {name: root / name for name in ("Wan2.1_VAE.pth", _CLIP_FILE, "umt5-xxl") if (root / name).exists()}
        if len(parts) < 3:
            console.print(f"[yellow]note:[/yellow] {root} lacks {3 - len(parts)} of VAE, CLIP, umt5-xxl/; the output "
                          "will hold only what was found")
        sources = _dit_files(dit_file)
        tensors = formats.iter_tensors(src)
        with Progress(*Progress.get_default_columns()[:1], BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      console=console) as bar:
            task = bar.add_task(f"quantizing DiT to {dit}", total=sum(p.stat().st_size for p in sources))
            result = write_quantized(
                from_comfy_fp8(tensors) if fmt == "comfy-fp8_scaled" else tensors, out, dit,
                config=config.to_dict(), sources=sources, expected_shapes=formats.wan_shapes(config),
                copy_files=parts, force=force, progress=lambda n: bar.advance(task, n),
                text_encoder={"scheme": text_encoder, "file": "umt5-xxl", "stored": "bf16",
                              "quantized_at_load": text_encoder != "bf16"},
            )
            bar.update(task, completed=bar.tasks[0].total)  # container overhead is not tensor bytes
        report = FidelityReport(dit, result.weight_errors, result.kept_if_quantized,
                                text_encoder_scheme=text_encoder)
        if fmt != "comfy-fp8_scaled":
            report.dit_forward = _forward_check(src, out, config, None if compute == "auto" else compute)
        if export == "comfy":
            comfy_path = out.parent / f"{out.name}.comfy_fp8_scaled.safetensors"
            report.comfy_export_errors = export_comfy(out, comfy_path)
            console.print(f"wrote {comfy_path}")
    except QuantizeError as e:
        raise UserError(str(e)) from None
    report.save(out)
    console.print(report.table())
    console.print(f"wrote {out}")


_CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14-onlyvisual.pth"


def _dit_files(dit_file: Path) -> list[Path]:
    """The files holding the DiT tensors (the shards of an index), for the progress total and fingerprints."""
    if dit_file.name.endswith(".index.json"):
        import json

        return [dit_file.parent / f for f in sorted(set(json.loads(dit_file.read_text())["weight_map"].values()))]
    return [dit_file]


def _forward_check(src: Path, out: Path, config, compute: Optional[str]) -> Optional[dict]:
    """One DiT forward on random conditioning, quantized folder vs the bf16 source; skipped when both copies
    do not fit (the 14B model: measured on the GPU by the lead's benchmark instead)."""
    import torch

    from .loader import load_dit
    from .model import SCAIL2Model
    from .quantize.linear import swap_linears
    from .quantize.report import compare
    from .quantize.store import linear_schemes, load_quantized

    from .formats import wan_shapes

    params = sum(torch.Size(s).numel() for s in wan_shapes(config).values())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    budget = torch.cuda.mem_get_info()[0] / 3.5 if device == "cuda" else 1e9
    if params > budget:
        console.print("[yellow]note:[/yellow] DiT forward check skipped (model too large for this machine)")
        return None
    ref = load_dit(src, dtype=torch.bfloat16, device=device)
    manifest, state = load_quantized(out, device)
    with torch.device("meta"):
        model = SCAIL2Model(config)
    swap_linears(model, linear_schemes(manifest), compute)
    model.load_state_dict(state, strict=True, assign=True)
    g = torch.Generator().manual_seed(0)
    t_lat, h, w = 2, 8, 8

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    inputs = (rand(1, 16, t_lat, h, w), rand(1, 16, t_lat, h // 2, w // 2), rand(1, 28, t_lat, h // 2, w // 2),
              rand(1, 16, 1, h, w), rand(1, 28, 1 + t_lat, h, w), torch.tensor([700.0], device=device),
              rand(1, 16, config.text_dim), rand(1, 257, config.clip_dim))
    with torch.no_grad():
        return compare(ref(*inputs, replace_flag=False), model.eval()(*inputs, replace_flag=False))


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
    load_opts = {k: kwargs.pop(k) for k in ("text_encoder", "vae_tile", "loras", "device")}
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               _SecondsPerIt(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        loading = bar.add_task("loading the DiT", total=None)
        pipe = Pipeline.from_pretrained(model, **load_opts)
        bar.update(loading, description="DiT loaded", total=1, completed=1)
        result = pipe(**kwargs, output=output, progress=bar)
    if save_frames is not None:
        media.save_frames(save_frames, result.frames)
    if preview:
        from .pipeline import load_inputs  # noqa: F401  (inputs are re-read at full size for the preview)

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
    image: Path = typer.Option(..., "--image", help="reference image of the character"),
    mask_image: Path = typer.Option(..., "--mask-image", help="colour-coded reference mask, same size as the image"),
    pose: Path = typer.Option(..., "--pose", help="driving video (mp4/webm/mov/gif or a folder of frames)"),
    mask_video: Path = typer.Option(..., "--mask-video", help="colour-coded driving mask video, same frame count"),
    prompt: str = typer.Option("", "--prompt", help="what the video shows"),
    negative_prompt: str = typer.Option("", "--negative-prompt", help="unconditional branch of CFG"),
    replace: bool = typer.Option(False, "--replace", help="replace the character in the driving video"),
    size: str = typer.Option("512p", "--size", help="512p or 704p (orientation follows the driving video)"),
    width: Optional[int] = typer.Option(None, "--width", help="explicit width (multiple of 32), with --height"),
    height: Optional[int] = typer.Option(None, "--height", help="explicit height (multiple of 32), with --width"),
    frames: Optional[int] = typer.Option(None, "--frames", help="use only the first N driving frames"),
    steps: int = typer.Option(40, "--steps"),
    shift: float = typer.Option(5.0, "--shift"),
    guidance: float = typer.Option(5.0, "--guidance", help="CFG scale; 1 skips the unconditional branch"),
    solver: str = typer.Option("unipc", "--solver", help="unipc, dpm++, euler or lcm"),
    seed: int = typer.Option(0, "--seed"),
    segment_len: int = typer.Option(81, "--segment-len", help="frames per segment (4k+1)"),
    segment_overlap: int = typer.Option(5, "--segment-overlap", help="history frames carried between segments"),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help="bf16, int8 or nf4 (default: as quantized)"),
    vae_tile: Optional[int] = typer.Option(None, "--vae-tile", help="VAE tile size in pixels (default: untiled)"),
    lora: list[str] = typer.Option([], "--lora", help="LoRA file, optionally PATH:STRENGTH; repeatable"),
    device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu (default: cuda if available)"),
    output: Path = typer.Option(Path("scail2.mp4"), "-o", "--output", help="mp4 to write"),
    save_frames: Optional[Path] = typer.Option(None, "--save-frames", help="also save PNG frames in this folder"),
    preview: bool = typer.Option(False, "--preview", help="also write a side-by-side reference | driving | result"),
) -> None:
    """Animate the reference character with the driving video (or replace the character in it)."""
    if (width is None) != (height is None):
        raise UserError("give both --width and --height, or neither")
    _run_generation(
        model, output, save_frames=save_frames, preview=preview,
        image=image, mask_image=mask_image, pose=pose, mask_video=mask_video, prompt=prompt,
        negative_prompt=negative_prompt, replace=replace, size=(width, height) if width else size, frames=frames,
        steps=steps, shift=shift, guidance=guidance, solver=solver, seed=seed, segment_len=segment_len,
        segment_overlap=segment_overlap, text_encoder=text_encoder, vae_tile=vae_tile, loras=_lora_args(lora),
        device=device,
    )


@app.command()
@user_errors
def demo(
    output: Path = typer.Option(Path("demo.mp4"), "-o", "--output", help="mp4 to write"),
    steps: int = typer.Option(8, "--steps"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Run the whole pipeline on a tiny synthetic checkpoint (made once, cached): no download, CPU is enough."""
    from .synth import cached_demo_folder

    folder = cached_demo_folder(progress=lambda what: console.print(f"making the demo checkpoint: {what}"))
    inputs = folder / "inputs"
    _run_generation(
        folder, output, save_frames=None, preview=False,
        image=inputs / "ref.png", mask_image=inputs / "ref_mask.png", pose=inputs / "driving.mp4",
        mask_video=inputs / "driving_mask.mp4", prompt="a person dancing", negative_prompt="",
        replace=False, size=(DEMO_SIZE, DEMO_SIZE), frames=None, steps=steps, shift=5.0, guidance=5.0,
        solver="unipc", seed=seed, segment_len=81, segment_overlap=5, text_encoder=None, vae_tile=None,
        loras=[], device=None,
    )


DEMO_SIZE = 128


def main() -> None:
    app(prog_name="scail2-lite")


if __name__ == "__main__":
    sys.exit(main())
