"""The SCAIL-2 pipeline (SPEC section 4): encoders -> conditioning -> denoising steps -> VAE decode, in segments.

One code path for the Python API and the CLI:

    pipe = Pipeline.from_pretrained("SCAIL-2/")          # or a quantized folder; MemorySettings(...) optional
    files = InputFiles("ref.png", "ref_mask.png", "driving.mp4", "mask.mp4")
    result = pipe(files, "a person dancing", settings=GenerationSettings(size="704p"), output="out.mp4")

Memory order, so that a 16 GB card never holds two big things at once: umT5 runs and is released, then CLIP,
then the VAE encodes the conditions (and stays, it is small), then the DiT runs every step of a segment, then the
VAE decodes that segment straight into the video writer. While the encoders run, a worker thread reads the DiT's
streamed blocks into pinned RAM when the RAM plan has room for it then (offload/placement.py). CFG branches run one
after the other with batch 1: it bounds activation memory and makes the numbers independent of the memory profile.
"""

from __future__ import annotations

import dataclasses
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from rich.progress import Progress

from . import conditioning as cond
from . import media
from .cache import PromptCache, file_identity
from .config import DEFAULT_NEGATIVE_PROMPT
from .distributed import Ranks, Split
from .encoders import CLIP_FILE, UMT5_DIR, encode_image, encode_text, load_clip, load_text_encoder
from .errors import UserError
from .formats import wan_shapes
from .inputs import InputFiles, Inputs, load_inputs
from .loader import ModelDescription, describe_model
from .lora import LoRA, LoraSource, resolve_loras
from .model import LATENT_CHANNELS, Conditions
from .offload.card import DeviceMemory
from .offload.placement import DitPlacement, out_of_memory, release_cached_memory
from .offload.planner import Plan
from .profiling import PhaseRecorder
from .progress import PhaseProgress
from .sampling import cfg, make_scheduler
from .settings import GenerationSettings, MemorySettings
from .stepcache import StepCache
from .vae import VAE_FILE, WanVAE, load_vae
from .vae_tiles import DecodeCut, Tiling, encode_tiling, from_setting
from .write_behind import WriteBehind

# Streaming blocks through fixed slots while activations come and go fragments the caching allocator: growable
# segments keep reserved memory near allocated. Read when CUDA first allocates, so it is set on import, for the
# Python API and the CLI alike (a value the user exported wins).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


@dataclass
class Result:
    """What a generation produced: the frames (unless streamed to a file only), timings and memory."""

    frames: torch.Tensor | None  # (3, T, H, W) in [-1, 1]; None when `keep_frames=False`
    num_frames: int
    fps: float
    size: tuple[int, int]
    seconds: dict[str, float]
    step_seconds: list[float]
    peak_vram: dict[str, int]
    settings: dict
    warnings: list[str]
    output: Path | None = None


def _check_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise UserError(f"the checkpoint folder is missing the {what}: {path}")
    return path


@dataclass(frozen=True)
class ModelFolder:
    """Where each component lives in a SCAIL-2 download (or in our quantized folder, which keeps the layout)."""

    root: Path

    @property
    def vae(self) -> Path:
        return _check_file(self.root / VAE_FILE, "VAE")

    @property
    def clip(self) -> Path:
        return _check_file(self.root / CLIP_FILE, "CLIP image encoder")

    @property
    def umt5(self) -> Path:
        return _check_file(self.root / UMT5_DIR, "umT5 text encoder folder")

    def check(self) -> None:
        """Fail early, naming the first missing component, before any minute-long loading starts."""
        if not self.root.is_dir():
            raise UserError(f"checkpoint folder not found: {self.root}")
        self.vae, self.clip, self.umt5  # noqa: B018 (each property raises if its file is missing)


class Pipeline:
    """SCAIL-2 generation. Build with `from_pretrained`; call with the user's inputs."""

    def __init__(self, folder: ModelFolder, dit: torch.nn.Module, model: ModelDescription, memory: MemorySettings,
                 device: torch.device, loras: tuple[tuple[LoRA, float], ...] = (), ranks: Ranks | None = None) -> None:
        self.folder = folder
        self.loras = loras  # merged into `dit`, with their match reports
        self.dit = dit
        self.model = model  # what the checkpoint is (after LoRAs: not mappable); text_encoder = the scheme used
        self.memory = memory
        self.device = device
        self.ranks = ranks or Ranks(device=device)  # the processes making this video (distributed.py)
        self._vae: WanVAE | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, memory: MemorySettings | None = None, *,
                        loras: Sequence[LoraSource] = (), dtype: torch.dtype = torch.bfloat16,
                        **memory_fields: object) -> "Pipeline":
        """Load a SCAIL-2 folder (official layout, or a `scail2-lite quantize` output).

        The DiT is loaded to CPU RAM; each call places it (all on the GPU, or streamed block by block) with the
        memory plan that fits the size asked for. `memory` (or its fields as keywords: `device="cpu"`,
        `profile="16gb"`, ...) says where and how; the encoders are loaded when needed and released after use.
        `loras`: `LoraFile`s (file, strength, merge rule) or (file, strength) pairs; `Pipeline.loras` keeps them
        mapped, each with its match report (`LoRA.report`).
        """
        from .loader import load_dit

        memory = (memory or MemorySettings()).with_changes(**memory_fields) if memory_fields else (
            memory or MemorySettings())
        folder = ModelFolder(Path(path))
        folder.check()
        ranks = Ranks.join(memory.parallel, parse_device(memory.device))
        device = ranks.device
        model = describe_model(folder.root).with_text_encoder(memory.text_encoder)
        # On a GPU the blocks of a quantized folder stay in the mapped shards until placed (the streamer reads
        # them from the files, a resident placement copies them to the GPU): RAM holds only the non-block layers.
        # Not with LoRAs: they are merged into the RAM copy, the shards hold the weights without them.
        mapped = tuple(resolve_loras(loras, {k: torch.Size(v) for k, v in wan_shapes(model.config).items()}))
        if mapped:
            model = model.without_mapping()
        dit = load_dit(folder.root, dtype=dtype, device="cpu", loras=mapped,
                       map_blocks=device.type == "cuda" and model.mappable)
        return cls(folder, dit, model, memory, device, mapped, ranks)

    # ---- phases ------------------------------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str]) -> list[torch.Tensor]:
        """umT5 on the prompts (or their embeddings from the prompt cache); the encoder leaves memory before
        returning (11 GB in bf16, in RAM: its blocks visit the GPU one at a time)."""
        from .quantize.text_encoder import quantize_block

        scheme = self.model.text_encoder
        cache = None
        if self.memory.prompt_cache:
            files = sorted(p for p in self.folder.umt5.iterdir() if p.is_file())
            cache = PromptCache(file_identity(files), scheme)
            if (hit := cache.get(prompts)) is not None:
                return hit
        stored = self.model.text_encoder_stored != "bf16"  # loads as stored, nothing to quantize
        quant = None if scheme == "bf16" or stored else (lambda block: quantize_block(block, scheme))
        # bf16 streams its blocks through the GPU (lossless at about one block of memory); 4/8-bit load whole.
        tokenizer, model = load_text_encoder(self.folder.umt5, device=self.device, quantize=quant,
                                             stream=scheme == "bf16")
        try:
            out = [t.to("cpu", torch.float32) for t in encode_text(tokenizer, model, prompts)]
        finally:
            del model
            release_cached_memory()
        if cache is not None:
            cache.put(prompts, out)
        return out

    def encode_clip(self, image: torch.Tensor) -> torch.Tensor:
        """CLIP ViT-H/14 features of the reference (1, 257, 1280); the tower is released after use."""
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        model = load_clip(self.folder.clip, dtype=dtype, device=self.device)
        try:
            return encode_image(model, image[None]).to("cpu", torch.float32)
        finally:
            del model
            release_cached_memory()

    def vae(self, tile: int | Tiling | None) -> WanVAE:
        """The VAE on the device with the tiling asked for (square tiles of `tile` pixels, 0 or None untiled; loaded
        once, kept in RAM between uses)."""
        if self._vae is None:
            self._vae = load_vae(self.folder.vae, device="cpu")
        self._vae.set_tiling(tile or None)
        return self._vae.to(self.device)

    def park_vae(self) -> None:
        """Send the VAE back to RAM so the DiT steps have the GPU to themselves."""
        if self._vae is not None:
            self._vae.to("cpu")
            release_cached_memory()

    def with_memory(self, memory: MemorySettings) -> "Pipeline":
        """The same loaded model under other memory settings (profile, budget, attention, VAE tiles): runs that
        compare plans need not load the DiT again. The device and the DiT's placement on disk stay."""
        model = self.model.with_text_encoder(memory.text_encoder)
        return Pipeline(self.folder, self.dit, model, dataclasses.replace(memory, device=str(self.device)),
                        self.device, self.loras, self.ranks)

    def make_plan(self, height: int, width: int, frames: int, extra_refs: int = 0, split: Split = Split(),
                  gpu: DeviceMemory | None = None) -> Plan | None:
        """The memory plan of this rank for one segment of this size (with `extra_refs` extra references) on this
        machine (`gpu`: the GPU as the driver reports it now unless given): its share of the tokens
        (`split.sequence`) and of the host's RAM (ranks on one host share it). On CPU there is nothing to plan
        unless a profile is forced (the streamer then runs with synchronous copies: how the tests check profiles)."""
        if self.device.type != "cuda" and self.memory.profile is None and gpu is None:
            return None
        from .offload import card
        from .offload.planner import available_ram, plan

        gpu = gpu or card.detect(self.device) or DeviceMemory(total=0, free=0, context=0)  # CPU: no GPU to fit
        m = self.model
        return plan(m.config, height, width, frames, gpu, available_ram() // self.ranks.local_world,
                    profile=self.memory.profile, vram_budget=self.memory.vram_budget, weights=m.dit_scheme,
                    text_encoder=m.text_encoder, mappable=m.mappable, extra_refs=extra_refs,
                    sequence_split=split.sequence, vae_tile=self.memory.vae_tile, attention=self.memory.attention)

    @property
    def vae_dtype(self) -> torch.dtype | None:
        """The VAE decode's autocast precision: fp32 (None: the weights') unless bf16 is asked for. bf16 decodes
        faster, but its error against fp32 is above the seams of the large tiles the planner now picks, so it is not
        the default (RESULTS.md, issue 23)."""
        choice = self.memory.vae_dtype or "fp32"
        return torch.bfloat16 if choice == "bf16" else None

    # ---- generation --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        inputs: InputFiles | Inputs,
        prompt: str = "",
        negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
        settings: GenerationSettings | None = None,
        *,
        output: str | Path | None = None,
        keep_frames: bool = True,
        progress: Progress | None = None,
        recorder: PhaseRecorder | None = None,
        on_latents: Callable[[int, torch.Tensor], None] | None = None,
        **setting_fields: object,
    ) -> Result:
        """Generate a video from `inputs` (the four files and any extra references, or `Inputs` already read), as
        many frames as the driving video has. `settings` (or its fields as keywords: `steps=8`, `size="704p"`, ...)
        say what to make; `negative_prompt` is upstream's empty string unless given. With `output`, frames stream
        into an H.264 mp4, encoded on a worker thread behind the run (write_behind.py) and written atomically (no
        partial file on error or Ctrl-C).

        `progress` shows the phases; `recorder` (a `profiling.PhaseRecorder`) times them; `on_latents(segment,
        latents)` sees each segment's final latents (tests compare profiles with it).

        Under several ranks (distributed.py) every rank calls this alike; rank 0 alone writes `output` and shows
        `progress`."""
        settings = settings or GenerationSettings()
        if setting_fields:
            settings = settings.with_changes(**setting_fields)
        s = settings
        split = self.ranks.split(self.memory.parallel, s.uses_cfg, self.model.config.num_heads)
        if not split.is_main:
            output, progress = None, None
        timer = recorder if recorder is not None else PhaseRecorder(self.device)
        make_scheduler(s.solver, s.steps, s.shift)  # the shift must suit the solver: checked before heavy work
        warnings = [w for w in (s.preset_warning([lora.name for lora, _ in self.loras]),) if w is not None]
        step_cache = StepCache(s.cache, s.cache_threshold, store_device="cpu")
        tasks = PhaseProgress(progress)
        with timer("inputs"), tasks.phase("reading the inputs"):
            if not isinstance(inputs, Inputs):
                inputs = load_inputs(inputs, size=s.size, frames=s.frames, replace=s.replace)
        total_frames = inputs.frames
        segments = cond.segment_plan(total_frames, s.segment_len, s.segment_overlap)
        # the last segment may reach past the video (4k+1 frames): the last driving frame repeated, output dropped
        padded = cond.frames_to_generate(total_frames)
        inputs = dataclasses.replace(inputs, pose=cond.pad_frames(inputs.pose, padded),
                                     mask_video=cond.pad_frames(inputs.mask_video, padded))
        h, w = inputs.size
        fps = s.fps or inputs.fps
        mem_plan = self.make_plan(h, w, segments[0][1] - segments[0][0], len(inputs.additional_refs), split)

        with ExitStack() as stack:
            placement = stack.enter_context(DitPlacement(
                self.dit, self.device, mem_plan, self.memory.attention,
                self.model.shard_files if self.model.mappable else (), on_fallback=timer.note))
            with timer("text encoder"), tasks.phase("umT5 text encoder"):
                contexts = self.encode_prompts([prompt, negative_prompt] if s.uses_cfg else [prompt])
            # The DiT's host side (its streamed blocks read into pinned RAM and page-locked) is built on a worker
            # thread while CLIP and the VAE encode hold the GPU, where the RAM plan allows it
            # (`Plan.overlap_placement`); the device side waits for it below. Not beside umT5, which streams its own
            # weights from the files: the two reads slowed each other (RESULTS.md). On any error or Ctrl-C the stack
            # stops the worker.
            if mem_plan is not None and mem_plan.overlap_placement:
                placement.prepare(tasks.beside("DiT to pinned RAM, beside the encoders"))
            with timer("clip"), tasks.phase("CLIP image encoder"):
                clip_fea = self.encode_clip(inputs.image)
            with timer("vae encode"), tasks.phase("VAE encode"):
                # every reference view alone, as a one-frame video (the extra ones too: SPEC section 6); composited on
                # black only with --composite-reference (ComfyUI's variant; upstream encodes them as given)
                composite = s.replace and s.composite_reference
                views = [cond.composite_on_black(image, mask) if composite else image
                         for image, mask in [(inputs.image, inputs.ref_mask), *inputs.additional_refs]]
                vae = self.vae(None)
                ref_latents, *extra_latents = (_encode(vae, view[:, None], self.device, self.memory.vae_tile)
                                               for view in views)
                pose_latents = [_encode(vae, inputs.pose[:, a:b], self.device, self.memory.vae_tile)
                                for a, b in segments]
                self.park_vae()
            extras = None
            if extra_latents:
                extras = (torch.cat(extra_latents, dim=2),
                          cond.additional_ref_mask_channels([mask for _, mask in inputs.additional_refs])[None])
            dit_dtype = self.dit.dtype
            kept: list[torch.Tensor] = []
            step_seconds: list[float] = []
            decode_fallbacks: list[str] = []
            writer = stack.enter_context(media.VideoWriter(output, fps, (h, w))) if output is not None else None
            writes, write_note = None, None
            if writer is not None:  # entered after the writer: on an error it stops before the file is discarded
                tell = tasks.beside("writing the mp4, beside the run")
                shown = (lambda n: tell(f"{n} of {total_frames} frames", n, total_frames)) if tell else None
                # one segment's decoded groups (of 4 frames) may wait, so a tiled decode's frames are encoded while
                # the next segment runs
                writes = stack.enter_context(WriteBehind(writer.write_rgb, s.segment_len // 4 + 1, shown))
            with timer("dit placement"), tasks.phase("placing the DiT"):
                placement.apply()
            if placement.host_side is not None:
                timer.beside("dit placement (host side)", placement.host_side.seconds, placement.host_side.waited)
            with timer("conditions"):
                ctx = [self.dit.embed_context(c[None].to(self.device, dit_dtype), clip_fea.to(self.device, dit_dtype))
                       for c in contexts]
            history_pixels: torch.Tensor | None = None
            steps_task = tasks.add("denoising", total=s.steps * len(segments))
            for k, (start, end) in enumerate(segments):
                hist_lat = None
                if history_pixels is not None:
                    with timer("vae encode"):
                        hist_lat = _encode(self.vae(None), history_pixels, self.device, self.memory.vae_tile)
                        self.park_vae()
                with timer("conditions"):
                    conditions = _segment_conditions(inputs, start, end, ref_latents, extras, pose_latents[k],
                                                     hist_lat, s.replace).to(self.device, dit_dtype)
                generator = torch.Generator().manual_seed(s.seed + k)
                shape = (1, LATENT_CHANNELS, cond.latent_frames(end - start), *ref_latents.shape[-2:])
                latents = torch.randn(shape, generator=generator, dtype=torch.float32)
                sampler = make_scheduler(s.solver, s.steps, s.shift, generator=generator)
                step_cache.begin(s.steps)
                if k > 0:
                    with timer("dit placement"), tasks.phase("placing the DiT"):
                        placement.apply()
                for t in sampler.timesteps:
                    t0 = time.perf_counter()
                    with timer("dit steps"):
                        if hist_lat is not None:
                            latents[:, :, : hist_lat.shape[2]] = hist_lat
                        v = self._velocity_with_fallback(placement, step_cache, latents, t, conditions, ctx,
                                                         s.guidance, dit_dtype, split)
                        latents = sampler.step(v, t, latents)
                    step_seconds.append(time.perf_counter() - t0)
                    tasks.advance(steps_task, step_seconds=sum(step_seconds))
                if hist_lat is not None:
                    latents[:, :, : hist_lat.shape[2]] = hist_lat
                if on_latents is not None:
                    on_latents(k, latents.clone())
                with timer("dit release"):
                    placement.release()
                drop = s.segment_overlap if k > 0 else 0
                stop = min(end, total_frames) - start  # frames past the driving video are padding
                decode_cut = _decode_cut(placement.plan, self.memory.vae_tile)
                with timer("vae decode"), tasks.phase(f"VAE decode (segment {k + 1}/{len(segments)}, frames)",
                                                      total=stop - drop) as decode_task:
                    tail = None  # the last frames decoded: the next segment's clean history
                    for group in self._decode_segment(decode_cut, placement.plan, latents, drop, stop,
                                                      decode_fallbacks, timer.note):
                        if writes is not None:  # in 8 bits before it waits: a float segment would be 4x the RAM
                            writes.put(media.to_uint8(group))
                        if keep_frames:
                            kept.append(group.cpu())
                        tail = (group if tail is None else torch.cat([tail, group], dim=1))[:, -s.segment_overlap:]
                        tasks.advance(decode_task, group.shape[1])
                    self.park_vae()
                    history_pixels = tail.cpu() if tail is not None and k + 1 < len(segments) else None
            if writer is not None:
                with timer("video write"), tasks.phase("finishing the mp4"):
                    writes.finish()
                    writer.close()
                timer.beside("video write (beside the run)", writes.seconds, writes.waited)
                write_note = f"encoded in {writes.seconds:.1f} s beside the run, {writes.waited:.1f} s of it waited for"
            final_plan, fallbacks, attention = placement.plan, placement.fallbacks, placement.kernels.attention
            streamers_built, placement_note = placement.streamers_built, placement.overlap_note
        run = dict(size=f"{w}x{h}", frames=total_frames, segments=len(segments), dit=self.model.dit_scheme,
                   text_encoder=self.model.text_encoder, device=str(self.device), attention=attention,
                   parallel=split.describe(),
                   vae_decode=f"{decode_cut.describe(h, w)}, "
                              f"{'bf16' if self.vae_dtype is torch.bfloat16 else 'fp32'}")
        if write_note is not None:
            run["video_write"] = write_note
        if inputs.additional_refs:
            run["extra_references"] = len(inputs.additional_refs)
        if final_plan is not None:
            run.update(profile=final_plan.profile.name, resident_blocks=final_plan.resident_blocks,
                       plan=final_plan.reason, streamers_built=streamers_built, dit_placement=placement_note)
        if fallbacks or decode_fallbacks:
            run["out_of_memory_fallbacks"] = "; ".join([*fallbacks, *decode_fallbacks])
        if s.cache != "off":
            run["cache"] = f"{s.cache}: {step_cache.stats}"
        recorded = {k: v for k, v in dataclasses.asdict(s).items() if k not in run}
        return Result(torch.cat(kept, dim=1) if keep_frames else None, total_frames, fps, (h, w), timer.seconds,
                      step_seconds, timer.peaks, {**recorded, **run}, warnings + inputs.warnings,
                      Path(output) if output is not None else None)

    def _decode_segment(self, cut: DecodeCut, plan: Plan | None, latents: torch.Tensor, drop: int, stop: int,
                        fallbacks: list[str], note: Callable[[str], None]) -> Iterator[torch.Tensor]:
        """The segment's decoded frame groups (`_decode`). On CUDA out-of-memory the decode starts again in the
        profile's tiles by frame, skipping the frames already delivered (written frames stay; later ones may differ
        at the new tiles' seams): the predicted cut should fit, but a run must not be lost to a misjudged decode."""
        delivered = 0
        while True:
            try:
                for group in _decode(self.vae(cut.tiling), latents, drop + delivered, stop, self.device,
                                     self.vae_dtype, cut.by_frame):
                    delivered += group.shape[1]
                    yield group
                return
            except torch.cuda.OutOfMemoryError:
                pass  # recovered below: inside this clause the error's traceback still holds the decode's tensors
            release_cached_memory()
            tiles = from_setting(plan.profile.vae_tile) if plan is not None and plan.vae_tile is None else None
            h, w = latents.shape[-2] * 8, latents.shape[-1] * 8
            lighter = DecodeCut(tiles, by_frame=True)
            if tiles is None or lighter == cut or tiles.covers(h, w):
                raise out_of_memory()
            what = f"VAE decode {cut.describe(h, w)} -> {lighter.describe(h, w)} after {delivered} frames"
            fallbacks.append(what)
            note(what)
            cut = lighter

    def _velocity_with_fallback(self, placement: DitPlacement, *args) -> torch.Tensor:
        """One step's velocity; on CUDA out-of-memory the DiT is re-placed under a lighter plan and the same step
        runs again (finished steps and segments are kept: the sampler has not moved)."""
        while True:
            try:
                return self._velocity(placement, *args)
            except torch.cuda.OutOfMemoryError:
                pass  # recovered below: inside this clause the error's traceback still holds the step's activations
            release_cached_memory()
            if not placement.fallback():
                raise out_of_memory()

    def _velocity(self, placement: DitPlacement, cache: StepCache, latents: torch.Tensor, t: torch.Tensor,
                  conditions: Conditions, ctx: list[torch.Tensor], guidance: float, dtype: torch.dtype,
                  split: Split) -> torch.Tensor:
        """One DiT evaluation per CFG branch (batch 1 each; under a CFG split, this rank's branch, the other's
        output exchanged), combined on CPU in fp32. `conditions` are already on the device in the DiT's dtype."""
        x = latents.to(self.device, dtype)
        tt = torch.full((1,), float(t), device=self.device)
        kernels = dataclasses.replace(placement.kernels, split=split.tokens)
        outs = []
        for i in split.branches(len(ctx)):
            with cache.branch(("cond", "uncond")[i]):
                outs.append(self.dit.forward_with_context(x, tt, ctx[i], conditions, kernels, cache).float())
        outs = [o.cpu() for o in split.exchange(outs)]
        return cfg(outs[0], outs[1], guidance) if len(outs) == 2 else outs[0]


def _encode(vae: WanVAE, video: torch.Tensor, device: torch.device, vae_tile: int | None) -> torch.Tensor:
    """(3, T, H, W) in [-1, 1] -> normalised latents (1, 16, Tl, H/8, W/8) on CPU, fp32. In `--vae-tile`'s tiles
    when given (pixels, 0 = untiled), else in the tiles the input's size alone decides (`encode_tiling`: untiled up
    to 704p's reference and pose video), so the latents are the same on every card and plan."""
    _, frames, h, w = video.shape
    vae.set_tiling(from_setting(vae_tile) if vae_tile is not None else encode_tiling(frames, h, w))
    return vae.encode(video[None].to(device)).cpu()


def _decode_cut(plan: Plan | None, vae_tile: int | None) -> DecodeCut:
    """The decode's cut: the plan's (the quickest that fits the card, or `--vae-tile`: planner.decode_cut); without
    a plan (CPU), `--vae-tile` or untiled, four frames at a time."""
    return plan.vae_decode if plan is not None else DecodeCut(from_setting(vae_tile))


def _decode(vae: WanVAE, latents: torch.Tensor, drop: int, stop: int, device: torch.device,
            dtype: torch.dtype | None, by_frame: bool) -> Iterator[torch.Tensor]:
    """Decoded frame groups (3, t, H, W) on the device of the segment's frames drop .. stop - 1: the first `drop`
    frames (segment overlap) and those from `stop` on (padding past the driving video) left out. They stay there
    until made 8-bit: a float group is 4x the bytes to copy, and the host thread copying and converting it is a
    thread not queueing the next group's decode."""
    seen = 0
    for group in vae.decode_frames(latents.to(device), dtype, by_frame):
        group = group[0].float()
        n = group.shape[1]
        if seen + n > drop and seen < stop:
            yield group[:, max(0, drop - seen) : stop - seen]
        seen += n


def _segment_conditions(inputs: Inputs, start: int, end: int, ref_latents: torch.Tensor,
                        extras: tuple[torch.Tensor, torch.Tensor] | None, pose_latents: torch.Tensor,
                        hist_latents: torch.Tensor | None, replace: bool) -> Conditions:
    """Batch-1 DiT conditions of one segment (CPU, fp32). `extras`: the extra references' latents and masks,
    the same for every segment and both CFG branches."""
    tl = cond.latent_frames(end - start)
    h, w = ref_latents.shape[-2:]
    hist = None
    if hist_latents is not None:
        hist = cond.history_mask(tl, h, w, history_latents=hist_latents.shape[2])[None]
    return Conditions(
        pose_latents=pose_latents,
        driving_masks=cond.driving_mask_channels(inputs.mask_video[:, start:end])[None],
        ref_latents=ref_latents,
        ref_masks=cond.reference_mask_channels(inputs.ref_mask, tl)[None],
        replace=replace,
        history_mask=hist,
        additional_ref_latents=extras[0] if extras else None,
        additional_ref_masks=extras[1] if extras else None,
    )


def parse_device(device: str | torch.device | None) -> torch.device:
    """`--device` (default: cuda when PyTorch sees a GPU, else cpu) as a torch.device, checked."""
    if device is None:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown --device {device!r}; use cuda, cuda:N or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but PyTorch sees no CUDA GPU")
    return device


