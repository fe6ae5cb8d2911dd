"""`profile`: where memory goes, planned per phase and per card, and with --run measured against the plan."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console

from ..config import DEFAULT_GUIDANCE
from ..errors import UserError
from . import app, console, user_errors

if TYPE_CHECKING:
    from ..loader import ModelDescription


def _bytes(b: Optional[int]) -> str:
    """Bytes as GB (1e9, the unit of --vram) or MB for the tiny model; '-' when not measured."""
    if b is None:
        return "-"
    return f"{b / 1e9:.2f} GB" if b >= 1e8 else f"{b / 1e6:.1f} MB"


def _error_cell(e: Optional[float]) -> str:
    from ..profiling import TOLERANCE

    if e is None:
        return "-"
    return f"[{'green' if abs(e) <= TOLERANCE else 'red'}]{e:+.1%}[/]"


def _decode_tiles(p) -> str:
    """How a plan's VAE decode is cut, and why (the quickest cut that fits, or --vae-tile)."""
    return p.vae_decode.describe(p.height, p.width) + (" (--vae-tile)" if p.vae_tile is not None else "")


def _encode_tiles(p) -> str:
    """How a plan's VAE encodes are tiled: --vae-tile's, else by each input's size (`encode_tiling`)."""
    from ..offload.planner import vae_encode_inputs
    from ..vae_tiles import encode_tiling

    if p.vae_tile is not None:
        return (f"in {p.vae_tile} px tiles" if p.vae_tile else "untiled") + " (--vae-tile)"
    inputs = vae_encode_inputs(p.height, p.width, p.frames)
    tiled = {name: t for name, size in inputs.items() if (t := encode_tiling(*size)) is not None}
    if not tiled:
        return "untiled"
    return "untiled except " + ", ".join(f"the {name} ({t.height} px tiles)" for name, t in tiled.items())


def _print_plan(out: Console, chosen, no_fit: Optional[str], cards: dict, table_plans: list, vram: int,
                ram: int) -> None:
    """Plan mode's printout: the chosen profile and why, its phases, the cards it fits, every profile here."""
    from rich.table import Table

    from ..offload.planner import tokens


    if chosen is None:
        out.print(f"[red]no profile fits[/red] a {vram / 1e9:.2f} GB card with {ram / 1e9:.0f} GB RAM: {no_fit}",
                  highlight=False)
    else:
        p = chosen.profile
        out.print(f"profile [bold]{p.name}[/bold] ({p.description}): {chosen.reason}"
                  + ("" if chosen.fits else " [red](does not fit)[/red]"), highlight=False)
        out.print(f"DiT {chosen.quantization}: {chosen.resident_blocks} blocks resident, {chosen.streamed_blocks} "
                  f"streamed from {'pinned RAM' if p.weight_source == 'pinned' else 'the mapped file'} "
                  f"({'layer by layer' if p.stream_unit == 'layer' else f'{p.prefetch} ahead'}); "
                  f"{chosen.attention} self-attention; VAE encode {_encode_tiles(chosen)}; VAE decode "
                  f"{_decode_tiles(chosen)}"
                  + ("; the pinned buffer fills beside the encoders" if chosen.overlap_placement else ""),
                  highlight=False)
        out.print(f"allocator budget {_bytes(chosen.vram_budget)}: the card less {_bytes(chosen.outside_allocator)} "
                  "of CUDA context and a desktop reserve", highlight=False)
        table = Table(title=f"predicted peaks per phase ({chosen.tokens:,} tokens)")
        for col in ("phase", "VRAM allocated", "VRAM reserved", "process total (NVML)", "RAM"):
            table.add_column(col, justify="left" if col == "phase" else "right")
        extra = chosen.tokens - tokens(chosen.config, chosen.height, chosen.width, chosen.frames)
        for name, mem in chosen.phases.items():
            label = name
            if name == "dit_step" and chosen.extra_refs:  # the only phase that sees the extra references
                label += f" (+{extra:,} tokens: {chosen.extra_refs} extra ref{'s' if chosen.extra_refs > 1 else ''})"
            table.add_row(label, _bytes(mem.vram), _bytes(mem.reserved), _bytes(chosen.process_total(name)),
                          _bytes(mem.ram))
        table.add_row("[bold]peak[/bold]", _bytes(chosen.peak_vram), _bytes(chosen.peak_vram_reserved),
                      _bytes(chosen.peak_process_total), _bytes(chosen.peak_ram))
        out.print(table)
    fits = [f"{gb} GB ({p.profile.name}, decode {_decode_tiles(p)})"  # GB as sold: GiB
            for gb, p in cards.items() if p is not None]
    out.print("fits on: " + (", ".join(fits) if fits else "none of " + ", ".join(f"{gb} GB" for gb in cards))
              + f" [dim](with {ram / 1e9:.0f} GB RAM)[/dim]", highlight=False)
    table = Table(title=f"every profile on a {vram / 1e9:.2f} GB card")
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

    from ..profiling import TOLERANCE

    phases = report["measured"]["phases"]
    rows = {r["phase"]: r for r in report["comparison"]}
    cuda = any(s["peak_allocated"] is not None for s in phases.values())
    table = Table(title=f"measured ({report['measured']['device_name']}) vs predicted")
    cols = ["phase", "seconds"]
    if cuda:
        cols += ["allocated", "predicted", "error", "reserved", "predicted", "error", "NVML used", "predicted"]
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
                      _bytes(s["peak_nvml_used"]), _bytes(r.get("predicted_process_total"))]
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
    frames: Optional[int] = typer.Option(None, "--frames", help="frames per segment to plan for \\[default: 81]; "
                                         "with --run: use only the first N driving frames"),
    extra_refs: int = typer.Option(0, "--extra-refs", help="extra reference images to plan for (multi-reference: "
                                   "each adds one reference frame of tokens, +3.7% at 81 frames)"),
    vram: Optional[float] = typer.Option(None, "--vram", help="the card to plan for, in GB as sold (16 = 16 GiB), "
                                         "e.g. 8, 12, 16, 24; its CUDA context and a desktop reserve come off it "
                                         "\\[default: this GPU as the driver reports it]; with --run the process is "
                                         "capped as that card would be"),
    ram: Optional[float] = typer.Option(None, "--ram", help="GB of RAM to plan for \\[default: available RAM]"),
    profile_name: Optional[str] = typer.Option(None, "--profile", help="memory profile name or .toml \\[default: "
                                               "the fastest that fits]"),
    weights: Optional[str] = typer.Option(None, "--weights", help="plan with the DiT in bf16, fp8 or int8 "
                                          "\\[default: the model's]"),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help="plan with umT5 in nf4, int8 or bf16 "
                                               "\\[default: the model's]"),
    vae_tile: Optional[int] = typer.Option(None, "--vae-tile", help="plan the VAE decode in square tiles of this "
                                           "many pixels, 0 = untiled \\[default: the quickest cut that fits]"),
    gpus: int = typer.Option(1, "--gpus", help="plan one rank of a run over N GPUs of this size (torchrun): its "
                             "share of the tokens under Ulysses, every weight, 1/N of --ram"),
    parallel: str = typer.Option("auto", "--parallel", help="the split of --gpus: auto, cfg or ulysses (as generate)"),
    guidance: float = typer.Option(DEFAULT_GUIDANCE, "--guidance", help="with --gpus: 1 = no CFG branch to split"),
    run: bool = typer.Option(False, "--run", help="run the pipeline and measure each phase against the plan"),
    steps: int = typer.Option(2, "--steps", help="denoising steps of --run"),
    image: Optional[Path] = typer.Option(None, "--image", help="reference image \\[default: MODEL/inputs/ref.png]"),
    mask_image: Optional[Path] = typer.Option(None, "--mask-image", help="\\[default: MODEL/inputs/ref_mask.png]"),
    pose: Optional[Path] = typer.Option(None, "--pose", help="driving video \\[default: MODEL/inputs/driving.mp4]"),
    mask_video: Optional[Path] = typer.Option(None, "--mask-video", help="\\[default: MODEL/inputs/driving_mask.mp4]"),
    device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu for --run (default: cuda if available)"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the report as JSON (only when asked)"),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="PNG of memory over time with phase bands "
                                             "(--run; only when asked)"),
) -> None:
    """Show where memory goes: the plan per phase and the cards it fits; with --run, measured against the plan."""
    from .. import profiling
    from ..config import SIZES
    from ..loader import describe_model
    from ..distributed import layout
    from ..offload.card import DeviceMemory, card_bytes, detect
    from ..offload.planner import GB, available_ram, plan

    if extra_refs < 0:
        raise UserError(f"--extra-refs must be 0 or more, got {extra_refs}")
    if (model is None) == (synthetic is None):
        raise UserError("give a MODEL folder or --synthetic full|tiny (one of them)")
    if (width is None) != (height is None):
        raise UserError("give both --width and --height, or neither")
    if width is None and size not in SIZES:
        raise UserError(f"unknown size {size!r}; choose one of {', '.join(SIZES)} or give --width/--height")
    from .. import outputs

    written = {"--json": json_path, "--plot": plot_path}
    outputs.check_separate(written, {"MODEL": model, "--image": image, "--mask-image": mask_image, "--pose": pose,
                                     "--mask-video": mask_video})
    for flag, path in written.items():
        if path is not None:
            outputs.check_file_target(path, flag)
    for flag, value in (("--vram", vram), ("--ram", ram)):
        if value is not None and value <= 0:
            raise UserError(f"{flag} must be a positive number of GB, got {value:g}")
    if gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {gpus}")
    if vae_tile is not None:
        from ..settings import MemorySettings

        MemorySettings(vae_tile=vae_tile)  # its checks: 0 or more, a multiple of 8
    if run and gpus > 1:
        raise UserError("--run measures this process alone; --gpus only plans (run generate under torchrun)")
    if run:
        if synthetic == "full":
            raise UserError("--run needs weights: write them with `scail2-lite synth --scale full --format wan -o DIR`"
                            " and pass DIR as MODEL")
        if ram is not None or weights is not None or text_encoder is not None or extra_refs or vae_tile is not None:
            raise UserError("--ram, --weights, --text-encoder, --extra-refs and --vae-tile only plan; --run uses this "
                            "machine, the model and the inputs as they are")
        if steps < 1:
            raise UserError(f"--steps must be at least 1, got {steps}")
        if synthetic is not None:
            from ..synth import cached_demo_folder, dit_config

            dit_config(synthetic)  # validates the scale name
            model = cached_demo_folder(progress=lambda what: console.print(f"making the demo checkpoint: {what}"))
        _profile_run(model, size=(width, height) if width else size, frames=frames, vram=vram,
                     profile_name=profile_name, steps=steps, files=(image, mask_image, pose, mask_video), device=device,
                     json_path=json_path, plot_path=plot_path)
        return
    if plot_path is not None:
        raise UserError("--plot draws measured memory: add --run")
    target = describe_model(model) if model is not None else _synthetic_model(synthetic)
    target = dataclasses.replace(target, dit_scheme=weights or target.dit_scheme,
                                 text_encoder=text_encoder or target.text_encoder)
    if synthetic is not None:  # 8-bit weights of a geometry: planned as our quantized folder, blocks mapped
        target = dataclasses.replace(target, mappable=target.dit_scheme != "bf16")
    h, w = (height, width) if width else SIZES[size]
    n_frames = frames if frames is not None else 81
    gpu = DeviceMemory.card(card_bytes(vram)) if vram is not None else detect()
    if gpu is None:
        raise UserError("no CUDA GPU here: pass --vram GB (e.g. 8, 12, 16, 24) to plan for a card")
    vram_bytes = gpu.total
    host_ram = int(ram * GB) if ram is not None else available_ram()
    ram_bytes = host_ram // gpus  # ranks on one host share its RAM
    cfg, sequence = layout(parallel if gpus > 1 else "off", gpus, guidance != 1.0, target.config.num_heads)
    chosen, no_fit = None, None
    try:
        chosen = plan(target.config, h, w, n_frames, gpu, ram_bytes, profile=profile_name,
                      weights=target.dit_scheme, text_encoder=target.text_encoder, mappable=target.mappable,
                      extra_refs=extra_refs, sequence_split=sequence, vae_tile=vae_tile)
    except UserError as e:
        if str(e).startswith("no profile fits"):
            no_fit = str(e)
        else:
            raise
    cards = profiling.fits_on(target, h, w, n_frames, ram_bytes, extra_refs=extra_refs, sequence_split=sequence)
    table_plans = profiling.all_profiles(target, h, w, n_frames, gpu, ram_bytes, extra_refs, sequence)
    out = Console()
    out.print(f"model: {target.source}; DiT {target.dit_scheme}, umT5 {target.text_encoder}", highlight=False,
              markup=False)
    extras = f", {extra_refs} extra reference{'s' if extra_refs > 1 else ''}" if extra_refs else ""
    out.print(f"run: {w}x{h}, {n_frames} frames per segment{extras}; card: {vram_bytes / GB:.2f} GB VRAM"
              f" ({f'{vram:g} GB card as sold' if vram is not None else f'{gpu.free / GB:.2f} GB free now'}), "
              f"{ram_bytes / GB:.1f} GB RAM"
              f" ({'given' if ram is not None else 'available now'})", highlight=False)
    if gpus > 1:
        split = " x ".join((["CFG branches over 2"] if cfg == 2 else [])
                           + ([f"tokens over {sequence} (Ulysses)"] if sequence > 1 else []))
        out.print(f"per rank of {gpus} GPUs: {split}; each GPU holds every weight and "
                  f"{'1/' + str(sequence) if sequence > 1 else 'all'} of one branch's activations, "
                  f"and {ram_bytes / GB:.1f} GB of the host's RAM", highlight=False)
    _print_plan(out, chosen, no_fit, cards, table_plans, vram_bytes, ram_bytes)
    if json_path is not None:
        profiling.write_json(json_path, {
            "version": profiling.REPORT_VERSION, "model": target.source, "weights": target.dit_scheme,
            "text_encoder": target.text_encoder, "height": h, "width": w, "frames": n_frames,
            "extra_refs": extra_refs, "vram": vram_bytes, "ram": ram_bytes, "gpus": gpus, "cfg_split": cfg,
            "sequence_split": sequence, "plan": profiling.plan_to_json(chosen) if chosen else None,
            "no_fit": no_fit, "fits_on": {str(gb): p.profile.name if p else None for gb, p in cards.items()},
            "profiles": [profiling.plan_to_json(p) for p in table_plans],
        })
        console.print(f"wrote {json_path}", highlight=False, markup=False)


def _synthetic_model(scale: str) -> ModelDescription:
    """The geometry of the synthetic checkpoints (`full` = the 14B model), planned with a bf16 DiT and 4-bit umT5
    unless --weights / --text-encoder say otherwise."""
    from ..loader import ModelDescription
    from ..synth import dit_config

    config = dit_config(scale)
    return ModelDescription(Path(f"synthetic-{scale}"), "synthetic", config, "bf16", "nf4",
                            source=f"synthetic {scale} ({config.num_layers} blocks, dim {config.dim})")


def _profile_run(model: Path, *, size, frames: Optional[int], vram: Optional[float], profile_name: Optional[str],
                 steps: int, files: tuple, device: Optional[str], json_path: Optional[Path],
                 plot_path: Optional[Path]) -> None:
    """`profile --run`: load, run `steps` steps with a PhaseRecorder, compare with the pipeline's own plan."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from .. import profiling
    from ..conditioning import segment_plan
    from ..inputs import InputFiles, load_inputs
    from ..loader import describe_model
    from ..offload import card
    from ..offload.planner import available_ram, plan
    from ..pipeline import Pipeline, parse_device
    from ..settings import GenerationSettings, MemorySettings

    inputs_dir = model / "inputs"
    defaults = ("ref.png", "ref_mask.png", "driving.mp4", "driving_mask.mp4")
    paths = [given or inputs_dir / name for given, name in zip(files, defaults)]
    for flag, p in zip(("--image", "--mask-image", "--pose", "--mask-video"), paths):
        if not p.exists():
            raise UserError(f"{p} not found: pass {flag}")
    dev = parse_device(device)
    budget = card.card_bytes(vram) if vram is not None else None
    if budget is not None and dev.type == "cuda":
        card.emulate(dev, budget)  # the allocator capped as that card would leave it
    recorder = profiling.PhaseRecorder(dev)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as bar:
        loading = bar.add_task("loading the DiT", total=None)
        with recorder("load"):
            pipe = Pipeline.from_pretrained(model, MemorySettings(device=str(dev), profile=profile_name,
                                                                  vram_budget=budget))
        bar.update(loading, description="loaded", total=1, completed=1)
        with recorder("inputs"):
            inputs = load_inputs(InputFiles(*paths), size=size, frames=frames)
        h, w = inputs.size
        first = segment_plan(inputs.frames)[0]
        predicted = pipe.make_plan(h, w, first[1] - first[0])
        if predicted is None and budget is not None:  # CPU: predict for the card asked for, to compare RAM
            target = describe_model(model)
            predicted = plan(target.config, h, w, first[1] - first[0], card.DeviceMemory.card(budget), available_ram(),
                             profile=profile_name, weights=target.dit_scheme, text_encoder=target.text_encoder,
                             mappable=target.mappable)
        result = pipe(inputs, "a person dancing", settings=GenerationSettings(steps=steps), keep_frames=False,
                      progress=bar, recorder=recorder)
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
    written = []
    if json_path is not None:
        profiling.write_json(json_path, report)
        written.append(str(json_path))
    if plot_path is not None:
        try:
            recorder.plot(plot_path, predicted, title=f"scail2-lite profile: {w}x{h}, {result.num_frames} frames, "
                                                      f"{steps} steps ({measured['device_name']})")
            written.append(str(plot_path))
        except UserError as e:
            console.print(f"no plot: {e}", highlight=False, markup=False)
    if written:
        console.print(f"wrote {' and '.join(written)}", highlight=False, markup=False)
