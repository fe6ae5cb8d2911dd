"""Issue 6/7 targets on the FULL pipeline (umT5 NF4, CLIP, VAE encode, DiT steps, VAE decode) at the real 14B
geometry and 81 frames, on a synthetic FP8 checkpoint, in one device call.

Run on the GPU machine (H100 80 GB, 64 GB disk), ~8-9 minutes:
    PYTHONUNBUFFERED=1 PYTHONPATH=$PWD python benchmarks/bench_pipeline.py --workdir /tmp/scail2_bench --keep
Proof run of the same code on a CPU (tiny model, ~1-2 minutes):
    python benchmarks/bench_pipeline.py --tiny
Issue 8's long runs (stage 6, one call each; the machine and its /tmp may be gone between calls, so each call
rebuilds the folder with stages 1-2, ~50 s, and the second compares against the first's saved latents):
    PYTHONUNBUFFERED=1 PYTHONPATH=$PWD python benchmarks/bench_pipeline.py --stages 1,2,6 --size 512p
    PYTHONUNBUFFERED=1 PYTHONPATH=$PWD python benchmarks/bench_pipeline.py --stages 1,2,6 --size 512p \
        --cache magcache --reference .carry/latents_512p_40steps_g5_unipc_off.pt
(the first call's $OUT/latents_512p_40steps_g5_unipc_off.pt carried into the second; `--keep` lets a second call on
the same warm machine skip stages 1-2.)
Prints elapsed-seconds progress lines and a markdown table per stage; with $OUT set, writes $OUT/pipeline.json
(and a VRAM-timeline PNG per run) after every stage and before every VAE decode, so a timeout keeps what finished.

Stages (`--stages`, each guarded: a failure is logged and recorded, the next stage still runs):
1. Synthetic encoders, tokenizer and inputs in <workdir>/src: umT5-XXL, CLIP and VAE state dicts drawn on the
   device with `_synthfull.device_synth_tensor` (synth's recipe; umT5 on a CPU takes minutes), saved under synth's
   file names and dtypes through the inverse converters; `synth.write_tokenizer`, `synth.write_inputs` (512x896,
   81 frames at full scale).
2. The DiT straight into the FP8 folder <workdir>/fp8: `write_quantized` on tensors drawn on the device one at a
   time (bf16, synth's recipe). No bf16 DiT is written: its 33 GB shards + 12.8 GB of encoders + the 17 GB FP8
   folder would not fit the 64 GB disk. The encoders are hard-linked into the folder (`place`), umT5 recorded
   as NF4. Stages 1-2 are skipped when <workdir> already holds a complete folder (a second call with --keep).
3. 704p x 81 frames, 2 steps with CFG, on an emulated 16 GiB card (_cards.py: the allocator capped at the card
   minus the measured CUDA context minus a 0.5 GB desktop reserve, `vram_budget` = the card's total; the planner
   picks the profile): per phase seconds, peak allocated / reserved, NVML's process total, RSS,
   the planner's prediction beside each phase, seconds per step. Targets: peak allocated <= 8 GB, reserved <= 9 GB.
4. The same 704p run under `--light-profile` (default 8gb: every block streamed) and the same cap, then with
   every block resident, uncapped (if the time left allows): latents bit-identical across profiles
   (torch.equal), the memory difference, and offload overhead s/step(streamed) / s/step(resident) (target
   <= 1.02). These runs stop after the final latents (no VAE decode: stage 3 measured it).
5. 512p x 81 frames, 2 steps, on an emulated 8 GiB card: peak allocated (target <= 4.5 GB). If
   the time left is short, the frame count is reduced (recorded) so the call finishes.
6. Long run (issue 8): one full pipeline run at `--size` (512p) x 81 frames, `--profile` (default 16gb) under a
   16 GiB card, `--steps` (40) with `--guidance` (5.0), `--solver` (unipc), `--cache` off|teacache|magcache
   (`--cache-threshold`; `--fast` makes the defaults the fast preset). Prints total seconds (the pipeline call, end
   to end: encoders, VAE encode, DiT steps, VAE decode; the text encoder only when no earlier stage of the call
   encoded the prompts: run it alone, as above), DiT seconds, s/step (their mean), DiT forwards computed/skipped (the
   StepCache stats in the run's settings), peak allocated. Saves segment 0's final latents (fp32) with the run's
   seconds and settings to $OUT/latents_<tag>.pt (the current directory without $OUT), first when the steps end
   (seconds None: a call that times out in the decode keeps them), then complete. With `--reference FILE` (such a
   file from an earlier call, loaded with weights_only) it prints this run's relative error and cosine vs those
   latents, the settings that differ, and the reference's total / DiT seconds over this run's (the speed-up).
One Pipeline object serves every run (the FP8 DiT is loaded once); prompts are encoded by the first run only
(its "text encoder" phase is the measurement; later runs reuse the embeddings, marked `text_encoder_cached`).
Seconds per step in stages 3-5: the minimum over the 2 steps (the first step of a run includes kernel warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cards import Emulator, memory_row  # noqa: E402
from _synthfull import device_synth_tensor  # noqa: E402
from _workdir import input_files  # noqa: E402

from scail2_lite import synth  # noqa: E402
from scail2_lite.config import (  # noqa: E402
    DEFAULT_GUIDANCE,
    DEFAULT_SHIFT,
    DEFAULT_STEPS,
    LIGHTX2V_4STEP_PRESET,
    SEGMENT_LEN,
    SEGMENT_OVERLAP,
    DiTConfig,
)
from scail2_lite.errors import UserError  # noqa: E402
from scail2_lite.quantize.report import compare  # noqa: E402
from scail2_lite.sampling import make_scheduler  # noqa: E402
from scail2_lite.stepcache import CACHE_MODES, DEFAULT_THRESHOLDS  # noqa: E402

GB = 1e9
T0 = time.perf_counter()
PROMPT = "a person dancing in a sunlit studio"
STEPS = 2
GUIDANCE = 5.0
SOLVER = "unipc"
TARGETS = {"704p_peak_allocated": 8e9, "704p_peak_reserved": 9e9, "512p_peak_allocated": 4.5e9,
           "offload_overhead_704p": 1.02}


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def gb(x: float | None) -> str:
    return "-" if x is None else f"{x / GB:.2f}"


class Results:
    """The JSON record, rewritten (atomically) after every update so a timed-out call keeps what finished."""

    def __init__(self, out: Path | None, name: str = "pipeline.json") -> None:
        self.out, self.name = out, name
        self.data: dict = {"device": None, "torch": torch.__version__, "command": sys.argv, "targets": TARGETS,
                           "stages": {}}

    def put(self, key: str, value: object) -> None:
        self.data["stages"][key] = value
        if self.out is not None:
            path = self.out / self.name
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(self.data, indent=1, default=str))
            os.replace(tmp, path)


@dataclass
class Setup:
    """Everything that differs between the full-size GPU run and the tiny CPU proof run."""

    tiny: bool
    device: torch.device
    scale: str
    config: DiTConfig
    seed: int
    size_704: str | tuple[int, int]  # pipeline `size`: a preset, or (width, height) for the tiny run
    size_512: str | tuple[int, int]
    frames: int
    profile_704: str | None  # None: the planner picks (needs CUDA); forced in the tiny run
    profile_512: str | None
    light_profile: str
    deadline: float
    text_encoder: str = "nf4"  # the umT5 the runs load: nf4 quantized at load, or bf16 streamed (quantize's default)


@dataclass
class State:
    """What stages hand on: the pipeline (loaded once), the latents per run, measured seconds for budgeting."""

    pipe: object = None
    emulator: Emulator | None = None  # made before anything touches CUDA (None on CPU)
    encoded_by: str | None = None
    latents: dict | None = None
    seconds: dict | None = None


# ---------------------------------------------------------------- stage 1: encoders, tokenizer, inputs


def _draw(build: Callable[[], torch.nn.Module], to_original: Callable[[dict], dict], seed: int, namespace: str,
          dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """synth._synth_from_module with the values drawn on `device` (shapes from a meta-device module)."""
    with torch.device("meta"):
        module = build()
    shapes = {k: tuple(v.shape) for k, v in to_original(module.state_dict()).items()}
    return {k: device_synth_tensor(k, s, seed, namespace, device).to(dtype).cpu() for k, s in shapes.items()}


def _save(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def stage_sources(s: Setup, src: Path, res: Results) -> str:
    """umT5 (bf16), CLIP (fp16, + head and log_scale) and VAE (fp32) under synth's names, tokenizer, inputs."""
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionModel, UMT5EncoderModel

    from scail2_lite.encoders import clip_config, clip_hf_to_openclip, umt5_config, umt5_hf_to_wan
    from scail2_lite.vae import vae_config, vae_diffusers_to_wan

    record: dict = {"folder": str(src), "seconds": {}}
    shutil.rmtree(src, ignore_errors=True)

    def timed(part: str, fn: Callable[[], object]) -> None:
        t = time.perf_counter()
        fn()
        record["seconds"][part] = round(time.perf_counter() - t, 2)
        log(f"stage 1: {part} in {record['seconds'][part]:.1f} s")

    def umt5() -> None:
        _save(_draw(lambda: UMT5EncoderModel(umt5_config(s.scale)), umt5_hf_to_wan, s.seed, "umt5", torch.bfloat16,
                    s.device), src / synth.UMT5_FILE)

    def clip() -> None:
        cfg = clip_config(s.scale)
        sd = _draw(lambda: CLIPVisionModel(cfg), clip_hf_to_openclip, s.seed, "clip", torch.float16, s.device)
        head = (cfg.hidden_size, 32 if s.tiny else 1024)  # open-clip's projection, as synth writes it
        sd["visual.head"] = synth.synth_tensor("visual.head", head, s.seed, "clip").half()
        sd["log_scale"] = synth.synth_tensor("log_scale", (), s.seed, "clip")
        _save(sd, src / synth.CLIP_FILE)

    def vae() -> None:
        _save(_draw(lambda: AutoencoderKLWan(**vae_config(s.scale)), vae_diffusers_to_wan, s.seed, "vae",
                    torch.float32, s.device), src / synth.VAE_FILE)

    timed("umT5 (drawn on the device, saved bf16)", umt5)
    timed("CLIP", clip)
    timed("VAE", vae)
    timed("tokenizer", lambda: synth.write_tokenizer(src / "umt5-xxl", min(1000, umt5_config(s.scale).vocab_size)))
    timed("inputs (ref, masks, driving videos)", lambda: synth.write_inputs(src / "inputs", s.scale, as_frames=True))
    record["bytes"] = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    (src / ".complete").write_text("ok\n")
    res.put("1_sources", record)
    rows = "\n".join(f"| {k} | {v:.1f} |" for k, v in record["seconds"].items())
    return f"### Stage 1: synthetic encoders and inputs ({gb(record['bytes'])} GB)\n| part | s |\n|---|---|\n{rows}"


# ---------------------------------------------------------------- stage 2: the FP8 folder


def stage_quantize(s: Setup, src: Path, dst: Path, res: Results) -> str:
    """The DiT drawn tensor by tensor on the device (bf16) and streamed through `write_quantized` to FP8."""
    from scail2_lite.formats import wan_shapes
    from scail2_lite.quantize.store import write_quantized

    shapes = wan_shapes(s.config)
    drawn = {"seconds": 0.0, "bytes": 0}

    def tensors():
        for name, shape in shapes.items():
            t = time.perf_counter()
            x = device_synth_tensor(name, shape, s.seed, "dit", s.device).to(torch.bfloat16)
            drawn["seconds"] += time.perf_counter() - t
            drawn["bytes"] += x.numel() * 2
            yield name, x

    copies = {name: src / name for name in (synth.VAE_FILE, synth.CLIP_FILE, "umt5-xxl")}
    start = time.perf_counter()
    result = write_quantized(
        tensors(), dst, "fp8", config=s.config.to_dict(), expected_shapes=shapes, copy_files=copies, force=True,
        text_encoder={"scheme": "nf4", "file": "umt5-xxl", "stored": "bf16", "quantized_at_load": True})
    seconds = time.perf_counter() - start
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
    linked = (dst / synth.VAE_FILE).stat().st_ino == (src / synth.VAE_FILE).stat().st_ino
    folder_bytes = sum(p.stat().st_size for p in dst.glob("dit-*.safetensors"))
    errors = list(result.weight_errors.values())
    record = {"folder": str(dst), "seconds": round(seconds, 2), "draw_seconds": round(drawn["seconds"], 2),
              "source_bf16_bytes": drawn["bytes"], "fp8_dit_bytes": folder_bytes, "encoders_hard_linked": linked,
              "max_weight_error": max(errors) if errors else None,
              "disk_free_after": shutil.disk_usage(dst).free}
    res.put("2_quantize", record)
    log(f"stage 2: FP8 folder written in {seconds:.1f} s ({gb(folder_bytes)} GB DiT, encoders hard-linked: {linked})")
    return (f"### Stage 2: DiT to FP8\n| s (drawing part) | bf16 GB in | fp8 DiT GB | max weight error | "
            f"encoders hard-linked |\n|---|---|---|---|---|\n| {seconds:.1f} ({drawn['seconds']:.1f}) | "
            f"{gb(drawn['bytes'])} | {gb(folder_bytes)} | {record['max_weight_error']:.4f} | {linked} |")


# ---------------------------------------------------------------- pipeline runs


class _StopAfterLatents(Exception):
    """Raised from `on_latents` to end a run before the VAE decode (the runs that compare DiT steps only)."""


def _pipeline(s: Setup, st: State, dst: Path, res: Results):
    """The Pipeline, loaded once. Its prompt cache lives in the work folder and starts empty, so umT5 runs (and is
    measured) by the first run only."""
    if st.pipe is not None:
        return st.pipe
    from scail2_lite.pipeline import Pipeline
    from scail2_lite.settings import MemorySettings

    os.environ["XDG_CACHE_HOME"] = str(dst.parent / "cache")
    shutil.rmtree(dst.parent / "cache" / "scail2-lite" / "prompts", ignore_errors=True)
    t = time.perf_counter()
    pipe = Pipeline.from_pretrained(dst, MemorySettings(device=str(s.device), text_encoder=s.text_encoder))
    seconds = time.perf_counter() - t
    log(f"FP8 DiT loaded to RAM in {seconds:.1f} s")
    res.data["load_seconds"] = round(seconds, 2)
    st.pipe = pipe
    return pipe


def run_case(s: Setup, st: State, dst: Path, src: Path, res: Results, key: str, *, size, frames: int,
             profile: str | None, card_gib: float | None, decode: bool,
             sampling: dict | None = None, after_steps: Callable[[torch.Tensor], None] | None = None,
             attention: str | None = None) -> dict:
    """One pipeline call with a PhaseRecorder; returns (and records) its report with the plan comparison.
    `card_gib`: emulate a card of that many GiB (_cards.py: allocator cap = card - measured context - desktop
    reserve; the planner gets the card's total as `vram_budget`); None: the whole GPU.
    `sampling` overrides the pipeline keywords steps/guidance/solver (default: the module's) and adds cache ones;
    `after_steps` gets segment 0's final latents (CPU) before the VAE decode; `attention` the self-attention
    backend (None: the profile's). A run that decodes writes its mp4 to WORKDIR/videos/KEY.mp4."""
    from scail2_lite.offload.card import card_bytes

    from scail2_lite import conditioning as cond
    from scail2_lite.inputs import InputFiles, load_inputs
    from scail2_lite.profiling import PhaseRecorder, run_report
    from scail2_lite.settings import GenerationSettings, MemorySettings

    vram_budget = card_bytes(card_gib) if card_gib else None
    pipe = _pipeline(s, st, dst, res).with_memory(MemorySettings(
        text_encoder=s.text_encoder, profile=profile, vram_budget=vram_budget, attention=attention))
    inputs = load_inputs(InputFiles(**input_files(src / "inputs")), size=size, frames=frames)
    h, w = inputs.size
    a, b = cond.segment_plan(inputs.frames, SEGMENT_LEN, SEGMENT_OVERLAP)[0]
    cap = st.emulator.cap(card_gib) if st.emulator is not None else None
    plan = pipe.make_plan(h, w, b - a)
    log(f"{key}: {w}x{h}x{inputs.frames}, profile {plan.profile.name if plan else 'none'} "
        f"({plan.resident_blocks if plan else '-'} resident), "
        f"card {card_gib} GiB, allocator cap {gb(cap)} GB, decode {decode}")
    recorder = PhaseRecorder(s.device, interval=0.1)

    cached = st.encoded_by is not None
    sampling = {"steps": STEPS, "guidance": GUIDANCE, "solver": SOLVER, **(sampling or {})}
    settings = {"size": f"{w}x{h}", "frames": inputs.frames, **sampling, "profile_asked": profile,
                "card_gib": card_gib, "vram_budget": vram_budget, "memory_cap": cap, "decode": decode,
                "attention": attention,
                "text_encoder_cached": cached, "dit": "fp8", "text_encoder": s.text_encoder, "device": str(s.device)}
    latents: list[torch.Tensor] = []

    def step_seconds() -> list[float]:
        return [round(e - t, 3) for name, t, e in recorder.intervals if name == "dit steps"]

    def report(status: str) -> dict:
        rep = run_report(recorder.to_json(), plan, settings, step_seconds(), sys.argv)
        # Out-of-memory re-plans change the profile: the pipeline notes each in the recorder, the report says so.
        rep["status"], rep["fallbacks"] = status, [what for _, what in recorder.events]
        rep["measured"].pop("timeline")  # the PNG holds it; keeps the JSON small
        return rep

    def on_latents(segment: int, z: torch.Tensor) -> None:
        latents.append(z.cpu())
        if after_steps is not None and segment == 0:
            after_steps(latents[0])
        res.put(key, report("steps done, VAE decode running" if decode else "steps done"))
        log(f"{key}: steps {step_seconds()} s")
        if not decode:
            raise _StopAfterLatents

    # a run that decodes writes its mp4 as a user's does (its wait for the encoder is the "video write" phase)
    output = dst.parent / "videos" / f"{key}.mp4" if decode else None
    if output is not None:
        output.parent.mkdir(exist_ok=True)
    t = time.perf_counter()
    result = None
    try:
        result = pipe(inputs, PROMPT, settings=GenerationSettings(seed=s.seed, **sampling), recorder=recorder,
                      on_latents=on_latents, keep_frames=False, output=output)
    except _StopAfterLatents:
        pass
    finally:
        if st.emulator is not None:
            st.emulator.cap(None)
    wall = time.perf_counter() - t
    if not cached:
        st.encoded_by = key
    st.latents[key] = latents[0]
    rep = report("complete")
    rep["wall_seconds"] = round(wall, 2)
    if result is not None:
        rep["pipeline_settings"] = result.settings
    steps = rep["step_seconds"]
    rep["seconds_per_step"] = min(steps) if steps else None
    phases = rep["measured"]["phases"]
    rep["peak_allocated"] = max((p["peak_allocated"] or 0) for p in phases.values()) or None
    rep["peak_reserved"] = max((p["peak_reserved"] or 0) for p in phases.values()) or None
    totals = [st.emulator.process_total(p["peak_nvml_used"]) for p in phases.values()] if st.emulator else []
    rep["peak_process_total"] = max((t for t in totals if t is not None), default=None)
    if os.environ.get("OUT"):
        try:
            recorder.plot(Path(os.environ["OUT"]) / f"{key}.png", plan, title=key)
        except Exception as e:  # noqa: BLE001 (the plot is a convenience; the numbers are in the JSON)
            log(f"{key}: no plot ({e})")
    res.put(key, rep)
    st.seconds[key] = {name: p["seconds"] for name, p in phases.items()}
    log(f"{key}: done in {wall:.1f} s, s/step {rep['seconds_per_step']}, peak allocated {gb(rep['peak_allocated'])} "
        f"GB, reserved {gb(rep['peak_reserved'])} GB, NVML process total {gb(rep['peak_process_total'])} GB, "
        f"fallbacks {rep['fallbacks'] or 'none'}")
    return rep


def phase_table(key: str, rep: dict, emulator: Emulator | None) -> str:
    """Markdown: per phase measured vs predicted; memory as allocated | reserved | NVML's process total."""
    plan = rep["plan"]
    card_gib = rep["settings"].get("card_gib")
    head = (f"### {key}: {rep['settings']['size']}x{rep['settings']['frames']}, profile "
            f"{plan['profile'] if plan else '-'} ({plan['resident_blocks'] if plan else '-'} resident blocks, VAE "
            f"decode {(rep.get('pipeline_settings') or {}).get('vae_decode', '-')}), "
            f"card {'whole GPU' if card_gib is None else f'{card_gib} GiB'} (allocator cap "
            f"{gb(rep['settings']['memory_cap'])} GB); s/step {rep['step_seconds']}; "
            f"fallbacks {rep['fallbacks'] or 'none'}\n")
    rows = ["| phase | s | peak alloc GB | predicted GB | error | peak reserved GB | predicted GB | NVML process "
            "total GB | predicted GB | RSS GB |", "|---|---|---|---|---|---|---|---|---|---|"]
    compared = {r["phase"]: r for r in rep["comparison"]}
    for name, p in rep["measured"]["phases"].items():
        c = compared.get(name)
        cached = name == "text encoder" and rep["settings"]["text_encoder_cached"]
        err = "-" if c is None or c["error_allocated"] is None or cached else f"{c['error_allocated']:+.0%}"
        alloc, reserved, total = memory_row(p, emulator)
        rows.append(f"| {name}{' (cached)' if cached else ''} | {p['seconds']:.1f} | {alloc} | "
                    f"{gb(c['predicted_allocated']) if c else '-'} | {err} | {reserved} | "
                    f"{gb(c['predicted_reserved']) if c else '-'} | {total} | "
                    f"{gb(c.get('predicted_process_total')) if c else '-'} | {gb(p['peak_rss'])} |")
    return head + "\n".join(rows)


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> dict | None:
    if a is None or b is None:
        return None
    return {"equal": bool(torch.equal(a, b)), "max_abs_diff": float((a - b).abs().max())}


def stage_704(s: Setup, st: State, dst: Path, src: Path, res: Results) -> str:
    rep = run_case(s, st, dst, src, res, "3_704p_16GB", size=s.size_704, frames=s.frames, profile=s.profile_704,
                   card_gib=16 if s.device.type == "cuda" else None, decode=True)
    ok = None if rep["peak_allocated"] is None else {
        "peak_allocated_le_8GB": rep["peak_allocated"] <= TARGETS["704p_peak_allocated"],
        "peak_reserved_le_9GB": rep["peak_reserved"] <= TARGETS["704p_peak_reserved"]}
    rep["targets_met"] = ok
    res.put("3_704p_16GB", rep)
    return phase_table("Stage 3 (704p, 16 GB card, planner's choice)", rep, st.emulator) + f"\n\ntargets: {ok}"


def stage_profiles(s: Setup, st: State, dst: Path, src: Path, res: Results) -> str:
    """The light profile under the same cap, then (time allowing) all blocks resident uncapped."""
    cuda = s.device.type == "cuda"
    light = run_case(s, st, dst, src, res, "4_704p_light", size=s.size_704, frames=s.frames,
                     profile=s.light_profile, card_gib=16 if cuda else None, decode=False)
    out = [phase_table(f"Stage 4a (704p, profile {s.light_profile}, 16 GB card, no decode)", light, st.emulator)]
    runs = {"3_704p_16GB": res.data["stages"].get("3_704p_16GB"), "4_704p_light": light}
    needed = 1.3 * sum(st.seconds["4_704p_light"].values()) + 30
    left = s.deadline - time.perf_counter()
    if left > needed:
        resident = run_case(s, st, dst, src, res, "4_704p_resident", size=s.size_704, frames=s.frames,
                            profile="resident", card_gib=None, decode=False)
        runs["4_704p_resident"] = resident
        out.append(phase_table("Stage 4b (704p, every block resident, uncapped, no decode)", resident, st.emulator))
    else:
        log(f"stage 4: resident run skipped ({left:.0f} s left, needs ~{needed:.0f} s); run --stages 4 again")
    summary: dict = {"latents_equal": {}, "overhead": {}, "peaks": {}}
    base = st.latents.get("4_704p_light")
    for key in runs:
        if key != "4_704p_light" and key in st.latents:
            summary["latents_equal"][f"{key} vs 4_704p_light"] = _same(st.latents[key], base)
    resident = runs.get("4_704p_resident")
    for key, rep in runs.items():
        if rep is None or "peak_allocated" not in rep:
            continue
        dit = rep["measured"]["phases"].get("dit steps", {})
        summary["peaks"][key] = {"profile": rep["plan"]["profile"] if rep["plan"] else None,
                                 "dit_peak_allocated": dit.get("peak_allocated"),
                                 "dit_peak_reserved": dit.get("peak_reserved"),
                                 "seconds_per_step": rep["seconds_per_step"]}
        if resident is not None and key != "4_704p_resident" and resident["seconds_per_step"]:
            summary["overhead"][key] = rep["seconds_per_step"] / resident["seconds_per_step"]
    res.put("4_summary", summary)
    rows = ["| run | profile | DiT peak alloc GB | DiT peak reserved GB | s/step | overhead vs resident |",
            "|---|---|---|---|---|---|"]
    for key, p in summary["peaks"].items():
        ratio = summary["overhead"].get(key)
        rows.append(f"| {key} | {p['profile']} | {gb(p['dit_peak_allocated'])} | {gb(p['dit_peak_reserved'])} | "
                    f"{p['seconds_per_step']} | {'-' if ratio is None else f'{ratio:.3f}'} |")
    eq = "; ".join(f"{k}: {v}" for k, v in summary["latents_equal"].items())
    out.append("### Stage 4 summary (target overhead <= 1.02)\n" + "\n".join(rows) + f"\n\nlatents: {eq}")
    return "\n\n".join(out)


def stage_512(s: Setup, st: State, dst: Path, src: Path, res: Results) -> str:
    """512p under an 8 GB cap; frames reduced (and recorded) only if the time left would not cover 81."""
    frames, decode = s.frames, True
    ref = st.seconds.get("3_704p_16GB")
    if ref is not None and not s.tiny:
        left = s.deadline - time.perf_counter()

        def estimate(f: int) -> float:  # 512p has ~0.35x the 704p DiT cost and ~0.51x the decoded pixels
            return (0.35 * ref.get("dit steps", 0) + 0.51 * ref.get("vae decode", 0)) * f / 81 + 40

        frames = next((f for f in (81, 61, 41, 21) if estimate(f) < left), 21)
        if frames != s.frames:
            log(f"stage 5: {left:.0f} s left; 81 frames would need ~{estimate(81):.0f} s: using {frames} frames")
    rep = run_case(s, st, dst, src, res, "5_512p_8GB", size=s.size_512, frames=frames, profile=s.profile_512,
                   card_gib=8 if s.device.type == "cuda" else None, decode=decode)
    ok = None if rep["peak_allocated"] is None else {
        "peak_allocated_le_4.5GB": rep["peak_allocated"] <= TARGETS["512p_peak_allocated"]}
    rep["targets_met"] = ok
    res.put("5_512p_8GB", rep)
    return (phase_table(f"Stage 5 (512p, 8 GB card, planner's choice, {frames} frames)", rep, st.emulator)
            + f"\n\ntargets: {ok}")


# ---------------------------------------------------------------- stage 6: one long run, compared across calls


@dataclass
class LongRun:
    """Stage 6's options (see the module doc)."""

    size: str  # "512p" or "704p": the label; the tiny run maps it to its own small size
    profile: str
    steps: int
    guidance: float
    solver: str
    cache: str
    cache_threshold: float | None  # resolved to the mode's default in main, None with the cache off
    reference: Path | None
    reference_data: dict | None  # loaded in main (`load_reference`), so a bad file fails before stages 1-2

    def tag(self) -> str:
        """File-name tag: every setting that changes the latents or the time."""
        th = "" if self.cache_threshold is None else f"{self.cache_threshold:g}"
        return f"{self.size}_{self.steps}steps_g{self.guidance:g}_{self.solver}_{self.cache}{th}"


def _forwards(rep: dict) -> tuple[int, int] | None:
    """(computed, skipped) DiT forwards: the StepCache stats the pipeline wrote into its settings; with the cache
    off every branch of every step ran."""
    settings = rep.get("pipeline_settings") or {}
    if settings.get("cache", "off") != "off":
        m = re.search(r"skipped (\d+)/(\d+)", settings["cache"])
        return None if m is None else (int(m[2]) - int(m[1]), int(m[1]))
    branches = 1 if rep["settings"]["guidance"] == 1 else 2
    return len(rep["step_seconds"]) * branches, 0


def load_reference(path: Path) -> dict:
    """A latents file written by stage 6 (weights_only: it came back from another machine)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (missing, truncated or not a weights-only pickle: one message)
        raise ValueError(f"--reference {path}: cannot load it ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not torch.is_tensor(data.get("latents")) or "settings" not in data:
        raise ValueError(f"--reference {path}: not a latents file written by stage 6")
    return data


def _compare(z: torch.Tensor, ref: dict, seconds: dict) -> dict:
    """This run's final latents and times vs a reference file's: relative error, cosine, settings that differ,
    reference seconds / these seconds."""
    r = ref["latents"]
    out: dict = {"differs": {k: (v, seconds["settings"].get(k)) for k, v in ref["settings"].items()
                             if seconds["settings"].get(k) != v}}
    if r.shape != z.shape:
        out["error"] = f"latent shapes differ: reference {tuple(r.shape)}, this run {tuple(z.shape)}"
        return out
    c = compare(r, z)
    out.update(relative_error=c["rel_error"], cosine=c["cosine"], max_abs_diff=c["max_abs"])
    for part in ("total", "dit"):
        mine, theirs = seconds.get(part), (ref.get("seconds") or {}).get(part)
        out[f"{part}_seconds_ratio"] = theirs / mine if mine and theirs else None
    return out


def stage_long(s: Setup, st: State, dst: Path, src: Path, res: Results, lr: LongRun) -> str:
    """One end-to-end run (see the module doc); its latents file lets a later call compare against it."""
    reference = lr.reference_data
    tag = lr.tag()
    key = f"6_{tag}"
    path = (res.out or Path.cwd()) / f"latents_{tag}.pt"
    cuda = s.device.type == "cuda"
    sampling = {"steps": lr.steps, "guidance": lr.guidance, "solver": lr.solver, "cache": lr.cache,
                "cache_threshold": lr.cache_threshold}
    settings = {**sampling, "size": lr.size, "profile": lr.profile, "seed": s.seed, "frames": s.frames,
                "scale": s.scale, "card_gib": 16 if cuda else None,
                "text_encoder_cached": st.encoded_by is not None}

    def save(z: torch.Tensor, seconds: dict | None) -> None:
        _save({"latents": z.float(), "seconds": seconds, "settings": settings}, path)
        log(f"{key}: latents saved to {path} ({'complete' if seconds else 'steps done, decode running'})")

    rep = run_case(s, st, dst, src, res, key, size=s.size_512 if lr.size == "512p" else s.size_704,
                   frames=s.frames, profile=lr.profile, card_gib=16 if cuda else None, decode=True,
                   sampling=sampling, after_steps=lambda z: save(z, None))
    phases = rep["measured"]["phases"]
    dit = phases.get("dit steps", {}).get("seconds")
    steps = rep["step_seconds"]
    seconds = {"total": rep["wall_seconds"], "dit": dit, "per_step_mean": dit / len(steps) if dit else None,
               "per_step_min": min(steps) if steps else None, "load": res.data.get("load_seconds"),
               "phases": {name: p["seconds"] for name, p in phases.items()}}
    z = st.latents[key]
    save(z, seconds)
    forwards = _forwards(rep)
    rep["long_run"] = {"tag": tag, "latents_file": str(path), "seconds": seconds, "forwards": forwards,
                       "profile_used": (rep.get("pipeline_settings") or {}).get("profile")}
    th = "" if lr.cache == "off" else f" {lr.cache_threshold:g}"
    computed, skipped = forwards if forwards else ("-", "-")
    per_step = "-" if seconds["per_step_mean"] is None else f"{seconds['per_step_mean']:.2f}"
    encoders = "CLIP (umT5 cached by an earlier stage)" if settings["text_encoder_cached"] else "encoders"
    out = [f"### Stage 6: long run `{tag}` ({rep['settings']['size']}, {rep['settings']['card_gib']} GiB card, "
           f"{encoders}, VAE encode and decode included)\n"
           "| size | frames | profile | steps | guidance | solver | cache | forwards computed | skipped | s/step | "
           "DiT s | total s | peak alloc GB |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
           f"| {lr.size} | {rep['settings']['frames']} | {rep['long_run']['profile_used'] or lr.profile} | "
           f"{lr.steps} | {lr.guidance:g} | {lr.solver} | {lr.cache}{th} | {computed} | {skipped} | {per_step} | "
           f"{'-' if dit is None else f'{dit:.1f}'} | {seconds['total']:.1f} | {gb(rep['peak_allocated'])} |"]
    if reference is not None:
        cmp = _compare(z, reference, {**seconds, "settings": settings})
        rep["long_run"]["vs_reference"] = {"file": str(lr.reference), **cmp}
        differs = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in cmp["differs"].items()) or "none"
        if "error" in cmp:
            out.append(f"vs `{lr.reference.name}`: not comparable ({cmp['error']}); settings differing: {differs}")
        else:
            def ratio(x: float | None) -> str:
                return "-" if x is None else f"{x:.2f}x"

            out.append(f"### vs reference `{lr.reference.name}` (settings differing: {differs})\n"
                       "| relative error | cosine | max abs diff | reference total s / this | "
                       "reference DiT s / this |\n"
                       f"|---|---|---|---|---|\n| {cmp['relative_error']:.3e} | {cmp['cosine']:.6f} | "
                       f"{cmp['max_abs_diff']:.3e} | {ratio(cmp['total_seconds_ratio'])} | "
                       f"{ratio(cmp['dit_seconds_ratio'])} |")
    res.put(key, rep)
    return "\n\n".join(out)


# ---------------------------------------------------------------- driver


def guarded(name: str, fn: Callable[[], str], res: Results, tables: list[str]) -> bool:
    """Run one stage; a failure is logged and recorded and the next stage still runs."""
    log(f"{name}: start")
    try:
        table = fn()
    except Exception as e:  # noqa: BLE001 (every stage is independent)
        traceback.print_exc()
        res.put(f"{name}_error", {"error": f"{type(e).__name__}: {e}"})
        log(f"{name}: FAILED ({type(e).__name__}: {e})")
        return False
    print(f"\n{table}\n", flush=True)
    tables.append(table)
    log(f"{name}: done")
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stages", default="1,2,3,4,5", help="comma list of stages to run (1-6; 6 is not a default)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/scail2_bench_pipeline"))
    ap.add_argument("--keep", action="store_true", help="keep the work dir (a later call reuses the folder)")
    ap.add_argument("--tiny", action="store_true", help="CPU proof run on the tiny model")
    ap.add_argument("--light-profile", default="8gb", help="stage 4's forced low-memory profile")
    ap.add_argument("--profile", default=None, help="force this profile in stages 3, 5 and 6 (default: the "
                    "planner's in 3 and 5, 16gb in 6)")
    ap.add_argument("--budget", type=float, default=555.0, help="seconds this call may take (stage 4b/5 adapt)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fast", action="store_true", help="the --preset fast sampling (4 steps, no CFG, lcm) instead "
                    "of 2 steps with CFG; also stage 6's defaults)")
    long = ap.add_argument_group("stage 6 (long run)")
    long.add_argument("--size", choices=("512p", "704p"), default="512p")
    long.add_argument("--steps", type=int, default=None, help="default 40 (--fast: 4)")
    long.add_argument("--guidance", type=float, default=None, help="default 5.0 (--fast: 1)")
    long.add_argument("--solver", default=None, help="default unipc (--fast: lcm)")
    long.add_argument("--cache", choices=CACHE_MODES, default="off")
    long.add_argument("--cache-threshold", type=float, default=None, help="default: the mode's (stepcache.py)")
    long.add_argument("--reference", type=Path, default=None,
                      help="a latents_<tag>.pt from an earlier stage-6 call to compare against")
    args = ap.parse_args()
    base = LIGHTX2V_4STEP_PRESET.settings() if args.fast else {"steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE,
                                                                "solver": "unipc"}
    if args.cache == "off" and args.cache_threshold is not None:
        ap.error("--cache-threshold needs --cache teacache or magcache")
    try:
        reference = load_reference(args.reference) if args.reference is not None else None
    except ValueError as e:
        ap.error(str(e))
    long_run = LongRun(size=args.size, profile=args.profile or "16gb",
                       steps=args.steps if args.steps is not None else base["steps"],
                       guidance=args.guidance if args.guidance is not None else base["guidance"],
                       solver=args.solver or base["solver"], cache=args.cache,
                       cache_threshold=None if args.cache == "off" else (
                           args.cache_threshold if args.cache_threshold is not None
                           else DEFAULT_THRESHOLDS[args.cache]),
                       reference=args.reference, reference_data=reference)
    try:  # a bad solver or step count fails now, not after stages 1-2
        make_scheduler(long_run.solver, long_run.steps, DEFAULT_SHIFT)
    except UserError as e:
        ap.error(str(e))
    if args.fast:
        global STEPS, GUIDANCE, SOLVER
        STEPS, GUIDANCE, SOLVER = base["steps"], base["guidance"], base["solver"]
    stages = {int(x) for x in args.stages.split(",") if x.strip()}
    tiny = args.tiny
    device = torch.device("cpu" if tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny on a CPU")
    s = Setup(tiny=tiny, device=device, scale="tiny" if tiny else "full", config=synth.dit_config(
        "tiny" if tiny else "full"), seed=args.seed, size_704=(128, 128) if tiny else "704p",
        size_512=(64, 64) if tiny else "512p", frames=17 if tiny else 81, profile_704="16gb" if tiny else args.profile,
        profile_512="12gb" if tiny else args.profile, light_profile=args.light_profile, deadline=T0 + args.budget)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    res = Results(out)
    res.data["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    res.data["scale"] = s.scale
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    src, dst = work / "src", work / "fp8"
    log(f"device {res.data['device']}, torch {torch.__version__}, workdir {work} "
        f"({gb(shutil.disk_usage(work).free)} GB free), stages {sorted(stages)}")
    from scail2_lite.quantize.store import is_quantized_folder

    st = State(latents={}, seconds={})
    if device.type == "cuda":  # before anything touches CUDA: NVML's baseline and the context are measured first
        st.emulator = Emulator.start(device)
        log(st.emulator.describe())
        res.data["emulation"] = st.emulator.describe()
    tables: list[str] = []
    have_src = (src / ".complete").is_file()
    have_fp8 = have_src and is_quantized_folder(dst)
    if 1 in stages and not have_src:
        have_src = guarded("stage 1", lambda: stage_sources(s, src, res), res, tables)
    elif 1 in stages:
        log("stage 1: skipped, the work dir holds complete sources")
    if 2 in stages and have_src and not have_fp8:
        have_fp8 = guarded("stage 2", lambda: stage_quantize(s, src, dst, res), res, tables)
    elif 2 in stages:
        log(f"stage 2: skipped ({'the FP8 folder exists' if have_fp8 else 'no sources'})")
    runs = [(3, "stage 3", stage_704), (4, "stage 4", stage_profiles), (5, "stage 5", stage_512),
            (6, "stage 6", lambda *a: stage_long(*a, long_run))]
    for number, name, fn in runs:
        if number not in stages:
            continue
        if not have_fp8:
            log(f"{name}: skipped, no FP8 folder in {work}")
            continue
        guarded(name, lambda fn=fn: fn(s, st, dst, src, res), res, tables)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
        log(f"removed {work}")
    print("\n## Results\n", flush=True)
    print("\n\n".join(tables), flush=True)
    log("done")


if __name__ == "__main__":
    main()
