"""Issue 23 in one device call: do the plans fit real cards (NVML's process total, not just the allocator), and
where does the time outside the DiT steps go.

Run on the GPU machine from the repository root (~6-8 minutes on an H100; `--budget` seconds at most):
    PYTHONUNBUFFERED=1 PYTHONPATH=$PWD python benchmarks/bench_cards.py
Proof run of the same code on a CPU (tiny model, no NVML, no cards: ~2 minutes):
    python benchmarks/bench_cards.py --tiny
Parts longer than one call run detached (`--detach NAME`: a `setsid` child writing to WORKDIR/detached/NAME/) and
are collected by a later call (`--collect NAME --wait SECONDS`: waits for the child's result, copies it to $OUT).

Every card is emulated by `_cards.Emulator` (allocator cap = card - measured CUDA context - 0.5 GB desktop
reserve; the planner gets the card's total as `--vram-budget` does). Parts, each guarded (a failure is recorded,
the next part runs); `$OUT/cards.json` is rewritten after each run, so a timeout keeps what finished:
1. bench_pipeline's stages 1-2: synthetic encoders, inputs and the FP8 14B folder (skipped when --workdir has them).
2. The VAE decode alone on latents of the pose video read at 704p (640x352, `--vae-frames` frames): fp32 vs bf16,
   untiled vs 256 px tiles: seconds, peak allocated, and the error of bf16 against fp32 beside the error the tiles'
   seams make (tiled fp32 against untiled fp32). bf16 may be the default only where its error is the smaller.
3. The headline: `--preset fast` (4 steps lcm, no CFG) 704p x 81 on a 16 GiB card, end to end, per phase seconds.
   Every run loads umT5 as `quantize` writes it by default (bf16, streamed block by block through the GPU).
4. The card table: 512p and 704p x 81 on 8, 12, 16, 24 GiB cards, planner's choice, 1 fast step each (the peak
   of a step does not depend on how many run) with the VAE decode: per run the plan, peak allocated, reserved,
   NVML's process total against the card's size less the desktop reserve, OOM fallbacks. A card the planner
   refuses is recorded with its message. Runs are ordered by interest and skipped when the budget runs out.
5. `decode` / `encode` / `trace` (no model folder needed): _vae_decode.py, the VAE decode at the 704p output size
   in each tiling the planner may choose against its prediction; the 704p encodes in the old 256 px tiles and
   untiled as now; the CPU traces of the decode's and encode's tensors per pixel.
6. `scaling`: 81, 161, 321 frames (`--scaling-frames`) at 704p, fast preset, 16 GiB card, end to end: seconds per
   frame and peak memory (target: 321 frames <= 4.1x the time of 81, the same peak). The driving video is the
   synthetic one played forwards and backwards to the length asked.
7. `long`: one 40-step CFG (upstream's sampler) 704p x 81 run on a 16 GiB card, end to end (~1000 s: detach it).
8. `latents` (issue 19): 2 steps (unipc, CFG 5) at 704p x 81 on the whole GPU under each `--latents-backends`
   self-attention, the final latents against SDPA's: relative error and cosine (~40 s per backend).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_pipeline as bp  # noqa: E402
from _cards import GB, Emulator  # noqa: E402
from _vae_decode import decode_part, encode_part, trace_part  # noqa: E402
from _workdir import input_files  # noqa: E402

from scail2_lite import synth  # noqa: E402
from scail2_lite.config import GENERATION_PRESETS  # noqa: E402
from scail2_lite.errors import UserError  # noqa: E402
from scail2_lite.offload.card import card_bytes  # noqa: E402

log = bp.log
gb = bp.gb
# (size, card GiB), most telling first: the cards where fit is tight come before the roomy ones.
SCALING_FRAMES = "81,161,321"
CASES: tuple[tuple[str, int], ...] = (("512p", 8), ("704p", 8), ("704p", 12), ("512p", 12), ("704p", 24),
                                      ("512p", 16), ("512p", 24))


def vae_part(s: bp.Setup, src: Path, res: bp.Results, frames: int) -> str:
    """fp32 vs bf16, untiled vs 256 px tiles, on latents of the pose video as the pipeline reads it at 704p (half
    the output resolution: 640x352)."""
    from scail2_lite.inputs import InputFiles, load_inputs
    from scail2_lite.quantize.report import compare
    from scail2_lite.vae import load_vae

    inputs = load_inputs(InputFiles(**input_files(src / "inputs")), size=s.size_704, frames=frames)
    vae = load_vae(src / synth.VAE_FILE, device=s.device)
    vae.set_tiling(None if s.tiny else 256)
    z = vae.encode(inputs.pose[None].to(s.device))
    cuda = s.device.type == "cuda"
    tile = 32 if s.tiny else 256
    out: dict[str, torch.Tensor] = {}
    rows = []
    record: dict = {"latents": list(z.shape), "frames": frames, "size": list(inputs.size)}
    for name, tiled, dtype in (("fp32 untiled", False, None), ("bf16 untiled", False, torch.bfloat16),
                               ("fp32 tiled", True, None), ("bf16 tiled", True, torch.bfloat16)):
        vae.set_tiling(tile if tiled else None)
        for attempt in ("warm-up", "timed"):  # the first pass includes cuDNN's algorithm search
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            frames_out = torch.cat([g.cpu() for g in vae.decode_frames(z, dtype)], dim=2)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t
            if attempt == "warm-up":
                first = seconds
        peak = torch.cuda.max_memory_allocated() if cuda else None
        out[name] = frames_out
        record[name] = {"seconds": round(seconds, 3), "first_seconds": round(first, 3), "peak_allocated": peak,
                        "seconds_per_frame": seconds / frames_out.shape[2]}
        rows.append(f"| {name} | {first:.2f} | {seconds:.2f} | {seconds / frames_out.shape[2] * 1000:.0f} | "
                    f"{gb(peak)} |")
        log(f"VAE {name}: {seconds:.2f} s (first {first:.2f} s), peak {gb(peak)} GB")
    errors = {
        "bf16 vs fp32 (untiled)": compare(out["fp32 untiled"], out["bf16 untiled"]),
        "bf16 vs fp32 (tiled)": compare(out["fp32 tiled"], out["bf16 tiled"]),
        "tile seams: fp32 tiled vs fp32 untiled": compare(out["fp32 untiled"], out["fp32 tiled"]),
        "bf16 tiled vs fp32 untiled": compare(out["fp32 untiled"], out["bf16 tiled"]),
    }
    record["errors"] = errors
    record["bf16_below_seams"] = errors["bf16 vs fp32 (untiled)"]["rel_error"] < errors[
        "tile seams: fp32 tiled vs fp32 untiled"]["rel_error"]
    res.put("vae_decode", record)
    err_rows = "\n".join(f"| {k} | {v['rel_error']:.2e} | {v['max_abs']:.3f} | {v['cosine']:.6f} |"
                         for k, v in errors.items())
    del vae
    return (f"### VAE decode alone: {z.shape[-1] * 8}x{z.shape[-2] * 8} x {frames} frames ({z.shape[2]} latent "
            f"frames)"
            f"\n| variant | first s | s | ms/frame | peak alloc GB |\n|---|---|---|---|---|\n" + "\n".join(rows)
            + "\n\n| comparison | relative error | max abs | cosine |\n|---|---|---|---|\n" + err_rows
            + f"\n\nbf16 error below the tiles' seam error: {record['bf16_below_seams']}")


def fast(steps: int) -> dict:
    return {**GENERATION_PRESETS["fast"].settings(), "steps": steps}


def headline(s: bp.Setup, st: bp.State, dst: Path, src: Path, res: bp.Results) -> str:
    """Fast preset 704p x 81 on a 16 GiB card, end to end, every phase timed."""
    rep = bp.run_case(s, st, dst, src, res, "704p_16GiB_fast", size=s.size_704, frames=s.frames, profile=s.profile_704,
                      card_gib=16 if s.device.type == "cuda" else None, decode=True, sampling=fast(4))
    phases = rep["measured"]["phases"]
    steps = phases.get("dit steps", {}).get("seconds", 0.0)
    outside = sum(p["seconds"] for p in phases.values()) - steps
    rep["outside_steps_seconds"] = round(outside, 2)
    placement = overlap_line(rep)
    res.put("704p_16GiB_fast", rep)
    return (bp.phase_table("Headline: --preset fast, 704p x 81, 16 GiB card, planner's choice", rep, st.emulator)
            + f"\n\nend to end {rep['wall_seconds']:.1f} s; DiT steps {steps:.1f} s; outside the steps "
              f"{outside:.1f} s (targets: <= 70 s end to end, <= 15 s outside the steps); in no phase "
              f"{rep['wall_seconds'] - steps - outside:.1f} s\n" + placement)


def overlap_line(rep: dict) -> str:
    """The DiT placement's visible cost (its phase: the main thread's wait for the worker that read and page-locked
    the streamed blocks beside the encoders, then the device side) beside what the worker took; recorded in `rep`."""
    beside = rep["measured"].get("background", {}).get("dit placement (host side)")
    visible = rep["measured"]["phases"].get("dit placement", {}).get("seconds")
    if beside is None or visible is None:
        return (f"DiT placement {visible or 0:.1f} s, after the encoders (plan's overlap_placement: "
                f"{(rep['plan'] or {}).get('overlap_placement')})")
    rep["placement_overlap"] = {"visible_seconds": visible, "host_side_seconds": beside["seconds"],
                                "waited_seconds": beside["waited"]}
    return (f"DiT placement {visible:.1f} s visible (target <= 2 s): its host side took {beside['seconds'] or 0:.1f} s "
            f"on a worker beside the encoders, of which the main thread waited {beside['waited']:.1f} s; the rest of "
            f"the phase ({visible - beside['waited']:.1f} s) is the device side (resident blocks, slots); the release "
            "after the steps is its own phase")


def card_table(s: bp.Setup, st: bp.State, dst: Path, src: Path, res: bp.Results, cases, deadline: float) -> str:
    """One fast step per (size, card), with the decode; the fit measured as NVML counts it."""
    rows = []
    seconds_by_size: dict[str, float] = {}
    done = res.data["stages"].get("704p_16GiB_fast")
    if done is not None:
        seconds_by_size["704p"] = done["wall_seconds"] * 0.6  # one step of four, plus the phases around them
    for size, card in cases:
        key = f"{size}_{card}GiB"
        guess = seconds_by_size.get(size, 60.0 if size == "704p" else 30.0)
        if time.perf_counter() + guess + 10 > deadline:
            log(f"{key}: skipped ({deadline - time.perf_counter():.0f} s left, needs ~{guess:.0f} s)")
            rows.append(f"| {size} | {card} | not run (device time) | | | | | | | |")
            continue
        limit = card_bytes(card) - (st.emulator.desktop if st.emulator else 0)
        try:
            rep = bp.run_case(s, st, dst, src, res, key, size=s.size_704 if size == "704p" else s.size_512,
                              frames=s.frames, profile=None if s.device.type == "cuda" else s.profile_704,
                              card_gib=card if s.device.type == "cuda" else None, decode=True, sampling=fast(1))
        except UserError as e:
            log(f"{key}: {e}")
            res.put(key, {"no_fit": str(e)})
            rows.append(f"| {size} | {card} | planner: {e} | | | | | | | |")
            continue
        seconds_by_size[size] = rep["wall_seconds"]
        plan = rep["plan"] or {}
        total = rep.get("peak_process_total")
        fits = "-" if total is None else ("yes" if total <= limit else "**no**")
        rows.append(f"| {size} | {card} | {plan.get('profile', '-')} ({plan.get('resident_blocks', '-')} resident), "
                    f"decode {(rep.get('pipeline_settings') or {}).get('vae_decode', '-')} | "
                    f"{gb(rep['settings']['memory_cap'])} | {gb(rep['peak_allocated'])} | {gb(rep['peak_reserved'])} | "
                    f"{gb(total)} | {gb(plan.get('peak_process_total'))} | {limit / GB:.2f} | {fits} | "
                    f"{', '.join(rep['fallbacks']) or 'none'} |")
        print("\n" + bp.phase_table(key, rep, st.emulator) + "\n", flush=True)
    return ("### Emulated cards: 1 fast step + VAE decode, planner's choice\n"
            "| size | card GiB | plan | allocator cap GB | peak alloc GB | peak reserved GB | NVML process total GB "
            "| predicted GB | card - desktop GB | fits | OOM fallbacks |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
            + "\n".join(rows))


def long_inputs(src: Path, work: Path, frames: int) -> Path:
    """A source folder whose inputs are stage 1's with the driving video and its mask `frames` long (played forwards
    and backwards, as links to stage 1's frames)."""
    folder = work / f"src_{frames}"
    inputs = folder / "inputs"
    if (inputs / ".complete").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    inputs.mkdir(parents=True)
    for item in (src / "inputs").iterdir():
        if item.name not in ("driving", "driving_mask"):
            (inputs / item.name).symlink_to(item.resolve())
    for name in ("driving", "driving_mask"):
        given = sorted((src / "inputs" / name).iterdir())
        cycle = given + given[-2:0:-1]
        (inputs / name).mkdir()
        for i in range(frames):
            (inputs / name / f"{i:04d}.png").symlink_to(cycle[i % len(cycle)].resolve())
    (inputs / ".complete").touch()
    return folder


def scaling(s: bp.Setup, st: bp.State, dst: Path, src: Path, work: Path, res: bp.Results,
            frame_counts: list[int]) -> str:
    """Fast preset at 704p on a 16 GiB card for each frame count, end to end: seconds per frame, peak memory."""
    rows, first = [], None
    for n in frame_counts:
        if time.perf_counter() + (first or 60.0) * n / frame_counts[0] > s.deadline:
            rows.append(f"| {n} | not run (budget) | | | | | | |")
            continue
        rep = bp.run_case(s, st, dst, long_inputs(src, work, n), res, f"scaling_{n}", size=s.size_704, frames=n,
                          profile=s.profile_704, card_gib=16 if s.device.type == "cuda" else None, decode=True,
                          sampling=fast(4))
        wall = rep["wall_seconds"]
        first = first or wall
        phases = rep["measured"]["phases"]
        decode = phases.get("vae decode", {}).get("seconds")
        rows.append(f"| {n} | {wall:.1f} | {wall / n:.3f} | {wall / first:.2f} | "
                    f"{decode if decode is None else round(decode, 1)} | {gb(rep['peak_allocated'])} | "
                    f"{gb(rep['peak_reserved'])} | {gb(rep['peak_process_total'])} |")
        print("\n" + bp.phase_table(f"scaling_{n}", rep, st.emulator) + "\n", flush=True)
    return ("### Scaling: --preset fast, 704p, 16 GiB card, end to end (target: the last <= 4.1x the first, same "
            "peak)\n| frames | s | s/frame | x first | VAE decode s | peak alloc GB | peak reserved GB | NVML "
            "process total GB |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))


def latents_part(s: bp.Setup, st: bp.State, dst: Path, src: Path, res: bp.Results, backends: list[str]) -> str:
    """Issue 19: the full synthetic model's latents after 2 steps (bench_pipeline's sampling: unipc, CFG 5) at 704p x
    81 on the whole GPU, one run per self-attention backend, each against SDPA's (the first run). Only the attention
    differs between runs: the same folder, inputs, seed and plan."""
    from scail2_lite.attention import kernel_name

    rows, reference = [], None
    for name in ["sdpa", *(b for b in backends if b != "sdpa")]:
        key = f"latents_{name}"
        rep = bp.run_case(s, st, dst, src, res, key, size=s.size_704, frames=s.frames, profile=s.profile_704,
                          card_gib=None, decode=False, attention=name)
        z = st.latents[key].double()
        reference = z if reference is None else reference
        rel = float((z - reference).norm() / reference.norm())
        cosine = float(torch.nn.functional.cosine_similarity(z.flatten(), reference.flatten(), dim=0))
        res.put(f"{key}_vs_sdpa", {"relative_error": rel, "cosine": cosine, "kernel": kernel_name(name)})
        rows.append(f"| {kernel_name(name)} | {rep['seconds_per_step']:.2f} | {rel:.2e} | {cosine:.6f} |")
    return (f"### Latents after {bp.STEPS} steps ({bp.SOLVER}, CFG {bp.GUIDANCE}), {s.frames} frames at "
            f"{s.size_704}, the whole device: each self-attention backend against SDPA\n| self-attention | s/step | rel. "
            "error vs sdpa | cosine vs sdpa |\n|---|---|---|---|\n" + "\n".join(rows))


def long_run(s: bp.Setup, st: bp.State, dst: Path, src: Path, res: bp.Results) -> str:
    """Upstream's sampling (40 steps unipc, CFG 5) at 704p x 81 on a 16 GiB card, end to end."""
    from scail2_lite.config import DEFAULT_GUIDANCE, DEFAULT_SOLVER, DEFAULT_STEPS

    steps = 2 if s.tiny else DEFAULT_STEPS
    sampling = {"steps": steps, "guidance": DEFAULT_GUIDANCE, "solver": DEFAULT_SOLVER}
    rep = bp.run_case(s, st, dst, src, res, "long_704p_40_steps", size=s.size_704, frames=s.frames,
                      profile=s.profile_704, card_gib=16 if s.device.type == "cuda" else None, decode=True,
                      sampling=sampling)
    steps_s = rep["measured"]["phases"].get("dit steps", {}).get("seconds", 0.0)
    return (bp.phase_table(f"Long run: {steps} steps {DEFAULT_SOLVER}, CFG {DEFAULT_GUIDANCE}, 704p x 81, 16 GiB "
                           "card", rep, st.emulator)
            + f"\n\nend to end {rep['wall_seconds']:.1f} s; DiT steps {steps_s:.1f} s "
              f"({steps_s / steps:.1f} s per step with both CFG branches)")


def private_code(dst: Path) -> Path:
    """Copy the benchmarks and the package, as pyproject's package-dir maps it, into `dst` (links resolved). A
    detached child imports from this copy: the device machine re-syncs the working tree for every call and drops
    untracked files (the `scail2_lite/quantize` link of a PYTHONPATH setup), mid-run for a child of an earlier
    call."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    mapping = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    shutil.rmtree(dst, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(root / "benchmarks", dst / "benchmarks", ignore=ignore)
    for package, folder in sorted(mapping.items()):  # parents before their mapped subpackages
        target = dst.joinpath(*package.split("."))
        if not target.exists():  # already inside its parent's copy where a link put it there
            shutil.copytree(root / folder, target, ignore=ignore)
    return dst


def detach(args: list[str], work: Path, name: str) -> None:
    """Start this script again, from a private copy of the code, as a `setsid` child with `args` (no --detach),
    writing its results and log to WORKDIR/detached/NAME/ and `done` there when it ends; returns at once."""
    import subprocess

    folder = work / "detached" / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    code = private_code(folder / "code")
    log_file = open(folder / "log.txt", "w")
    cmd = [sys.executable, str(code / "benchmarks" / Path(__file__).name), *args, "--keep", "--done-file",
           str(folder / "done")]
    path = os.pathsep.join(p for p in (str(code), os.environ.get("PYTHONPATH")) if p)
    child = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                             env={**os.environ, "OUT": str(folder), "PYTHONUNBUFFERED": "1", "PYTHONPATH": path})
    log(f"detached {name}: pid {child.pid}, {' '.join(cmd)}; collect with --collect {name} --wait SECONDS")


def collect(work: Path, name: str, wait: float) -> None:
    """Wait up to `wait` seconds for a detached part to finish, then copy its files to $OUT; print its log tail."""
    folder = work / "detached" / name
    if not folder.is_dir():
        raise SystemExit(f"nothing detached as {name} in {work}")
    end = time.perf_counter() + wait
    while not (folder / "done").exists() and time.perf_counter() < end:
        time.sleep(5)
    finished = (folder / "done").exists()
    out = os.environ.get("OUT")
    if out:
        for f in folder.iterdir():
            if f.is_file():
                shutil.copy2(f, Path(out) / f.name)
    tail = (folder / "log.txt").read_text().splitlines()[-60:]
    print("\n".join(tail), flush=True)
    log(f"{name}: {'finished' if finished else f'still running after {wait:.0f} s'}")


def prefill_prompt(s: bp.Setup, st: bp.State, dst: Path, res: bp.Results) -> str:
    """Without bitsandbytes (NF4 umT5) on the device: the prompt is encoded once by the bf16 umT5 and stored in the
    NF4 prompt cache, so every run's text encoder phase is a cache hit (marked "cached" in the tables)."""
    from scail2_lite.cache import PromptCache, file_identity
    from scail2_lite.settings import MemorySettings

    pipe = bp._pipeline(s, st, dst, res)
    t = time.perf_counter()
    embeddings = pipe.with_memory(MemorySettings(text_encoder="bf16")).encode_prompts([bp.PROMPT])
    files = sorted(f for f in pipe.folder.umt5.iterdir() if f.is_file())
    PromptCache(file_identity(files), "nf4").put([bp.PROMPT], embeddings)
    st.encoded_by = "bf16 prefill"
    seconds = time.perf_counter() - t
    res.put("prompt_prefill", {"seconds": seconds, "why": "bitsandbytes missing on the device"})
    return (f"bitsandbytes is not installed here: the prompt was encoded once by the bf16 umT5 ({seconds:.1f} s) "
            "and every run reads it from the prompt cache (text encoder phase: cached)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/scail2_bench_pipeline"))
    ap.add_argument("--keep", action="store_true", help="keep the work dir (a later call reuses the folder)")
    ap.add_argument("--tiny", action="store_true", help="CPU proof run on the tiny model")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds this call may take")
    ap.add_argument("--vae-frames", type=int, default=21, help="frames of the VAE-alone comparison (4k+1)")
    ap.add_argument("--parts", default="vae,headline,cards", help="comma list of vae, headline, cards, decode, "
                    "encode, trace, scaling, long, latents")
    ap.add_argument("--scaling-frames", default=SCALING_FRAMES, help="frame counts of the scaling part (4k+1)")
    ap.add_argument("--decode-size", default="704p", help="the decode part's output size (81 frames)")
    ap.add_argument("--cards", help="the card table's cases as SIZE:GIB, comma-separated (default: every case)")
    ap.add_argument("--latents-backends", default="int8,fp8", help="the latents part's backends beside sdpa "
                    "(with --tiny: math)")
    ap.add_argument("--detach", metavar="NAME", help="run the parts as a setsid child in WORKDIR/detached/NAME")
    ap.add_argument("--collect", metavar="NAME", help="wait for a detached part (--wait) and copy its results to $OUT")
    ap.add_argument("--wait", type=float, default=480.0, help="seconds --collect waits at most")
    ap.add_argument("--done-file", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.collect:
        collect(args.workdir, args.collect, args.wait)
        return
    if args.detach:
        argv = sys.argv[1:]
        i = argv.index("--detach")
        detach(argv[:i] + argv[i + 2:], args.workdir, args.detach)
        return
    try:
        run(args)
    finally:
        if args.done_file is not None:  # a detached child says it ended, results or not
            args.done_file.touch()


def run(args: argparse.Namespace) -> None:
    tiny = args.tiny
    device = torch.device("cpu" if tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny on a CPU")
    s = bp.Setup(tiny=tiny, device=device, scale="tiny" if tiny else "full", config=synth.dit_config(
        "tiny" if tiny else "full"), seed=0, size_704=(128, 128) if tiny else "704p",
        size_512=(64, 64) if tiny else "512p", frames=17 if tiny else 81, profile_704="16gb" if tiny else None,
        profile_512="12gb" if tiny else None, light_profile="8gb", deadline=bp.T0 + args.budget, text_encoder="bf16")
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    res = bp.Results(out, "cards.json")
    st = bp.State(latents={}, seconds={})
    if device.type == "cuda":  # before anything touches CUDA
        st.emulator = Emulator.start(device)
        log(st.emulator.describe())
        res.data["emulation"] = st.emulator.describe()
    res.data["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    src, dst = work / "src", work / "fp8"
    from scail2_lite.quantize.store import is_quantized_folder

    tables: list[str] = []
    parts = {p.strip() for p in args.parts.split(",")}
    if "trace" in parts:
        bp.guarded("decode trace", lambda: trace_part(tiny, res), res, tables)
    if "decode" in parts:
        bp.guarded("decode", lambda: decode_part(tiny, device, st.emulator, res, s.deadline, args.decode_size),
                   res, tables)
    if "encode" in parts:
        bp.guarded("encode", lambda: encode_part(tiny, device), res, tables)
    if not parts & {"vae", "headline", "cards", "scaling", "long", "latents"}:
        parts = set()
    elif not (src / ".complete").is_file():
        bp.guarded("stage 1", lambda: bp.stage_sources(s, src, res), res, tables)
    if parts and (src / ".complete").is_file() and not is_quantized_folder(dst):
        bp.guarded("stage 2", lambda: bp.stage_quantize(s, src, dst, res), res, tables)
    if (parts & {"headline", "cards", "scaling", "long", "latents"} and is_quantized_folder(dst) and not tiny
            and s.text_encoder == "nf4" and importlib.util.find_spec("bitsandbytes") is None):
        bp.guarded("prompt prefill", lambda: prefill_prompt(s, st, dst, res), res, tables)
    if "vae" in parts and (src / ".complete").is_file():
        bp.guarded("VAE decode", lambda: vae_part(s, src, res, 9 if tiny else args.vae_frames), res, tables)
    if is_quantized_folder(dst):
        if "headline" in parts:
            bp.guarded("headline", lambda: headline(s, st, dst, src, res), res, tables)
        if "cards" in parts:
            cases = [(size, int(gib)) for size, gib in (c.split(":") for c in args.cards.split(","))] \
                if args.cards else CASES[:2] if tiny else CASES
            bp.guarded("cards", lambda: card_table(s, st, dst, src, res, cases, s.deadline), res, tables)
        if "scaling" in parts:
            counts = [int(n) for n in args.scaling_frames.split(",")]
            if tiny and args.scaling_frames == SCALING_FRAMES:
                counts = [17, 33, 65]
            bp.guarded("scaling", lambda: scaling(s, st, dst, src, work, res, counts), res, tables)
        if "long" in parts:
            bp.guarded("long", lambda: long_run(s, st, dst, src, res), res, tables)
        if "latents" in parts:
            backends = ["math"] if tiny else [b.strip() for b in args.latents_backends.split(",")]
            bp.guarded("latents", lambda: latents_part(s, st, dst, src, res, backends), res, tables)
    if st.emulator is not None:
        tables.insert(0, st.emulator.describe())
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print("\n## Results\n", flush=True)
    print("\n\n".join(tables), flush=True)
    if out is not None:
        (out / "tables.md").write_text("\n\n".join(tables) + "\n")
    log("done")


if __name__ == "__main__":
    main()
