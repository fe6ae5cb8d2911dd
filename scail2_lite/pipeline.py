"""The SCAIL-2 pipeline (SPEC section 4): encoders -> conditioning -> denoising steps -> VAE decode, in segments.

One code path for the Python API and the CLI:

    pipe = Pipeline.from_pretrained("SCAIL-2/")          # or a quantized folder
    result = pipe(image="ref.png", mask_image="ref_mask.png", pose="driving.mp4", mask_video="mask.mp4",
                  prompt="a person dancing", output="out.mp4")

Memory order, so that a 16 GB card never holds two big things at once: umT5 runs and is released, then CLIP,
then the VAE encodes the conditions (and stays, it is small), then the DiT runs every step of a segment, then the
VAE decodes that segment straight into the video writer. CFG branches run one after the other with batch 1:
it bounds activation memory and makes the numbers independent of the memory profile.
"""

from __future__ import annotations

import gc
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch
from rich.progress import Progress

from . import conditioning as cond
from . import media
from .attention import get_backend
from .config import (
    DEFAULT_FPS,
    DEFAULT_GUIDANCE,
    DEFAULT_SHIFT,
    DEFAULT_STEPS,
    SEGMENT_LEN,
    SEGMENT_OVERLAP,
)
from .encoders import CLIP_FILE, UMT5_DIR, encode_image, encode_text, load_clip, load_text_encoder
from .errors import UserError
from .formats import FilePages
from .profiling import PhaseRecorder
from .sampling import cfg, make_scheduler
from .streamer import BlockStreamer, resident_tensors
from .vae import VAE_FILE, WanVAE, load_vae

if TYPE_CHECKING:
    from .planner import Plan
    from .stepcache import StepCache

# SCAIL-2's released sampler (sample_video.py) uses an empty negative prompt, not Wan's long Chinese one.
DEFAULT_NEGATIVE_PROMPT = ""


@dataclass
class Inputs:
    """Everything a generation needs from the user's files, resized and validated (tensors in [-1, 1])."""

    image: torch.Tensor  # (3, H, W) reference, at output size
    ref_mask: torch.Tensor  # (3, H, W)
    pose: torch.Tensor  # (3, T, H/2, W/2) driving video at half size
    mask_video: torch.Tensor  # (3, T, H/2, W/2)
    fps: float
    warnings: list[str] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.image.shape[-2:])  # type: ignore[return-value]

    @property
    def frames(self) -> int:
        return self.pose.shape[1]


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


def load_inputs(
    image: str | Path,
    mask_image: str | Path,
    pose: str | Path,
    mask_video: str | Path,
    *,
    size: str | tuple[int, int] = "512p",
    frames: int | None = None,
    replace: bool = False,
) -> Inputs:
    """Read and resize the user's files. Rules (SPEC section 4): aspect-preserving resize then center crop;
    reference bicubic at output size, its mask nearest (colours stay pure); driving video and its mask area-
    resized to half the output size. A preset size (512p/704p) follows the driving video's orientation."""
    ref = media.read_image(image)
    ref_mask = media.read_image(mask_image)
    if ref.shape != ref_mask.shape:
        raise UserError(
            f"the reference mask is {ref_mask.shape[2]}x{ref_mask.shape[1]} but the image is "
            f"{ref.shape[2]}x{ref.shape[1]}: they must have the same size"
        )
    drive_hw = media.video_size(pose)
    h, w = media.output_size(size, drive_hw)
    half = (h // 2, w // 2)
    driving, fps = media.read_video(pose, size=half, mode="area", max_frames=frames)
    masks, _ = media.read_video(mask_video, size=half, mode="nearest", max_frames=frames)
    if driving.shape[1] != masks.shape[1]:
        raise UserError(
            f"the driving video has {driving.shape[1]} frames but the mask video has {masks.shape[1]}: "
            "they must have the same frame count"
        )
    if driving.shape[1] < 5:
        raise UserError(f"the driving video needs at least 5 frames, got {driving.shape[1]}")
    ref = media.resize_crop(ref, (h, w), "bicubic")
    ref_mask = media.resize_crop(ref_mask, (h, w), "nearest")
    warnings = cond.check_mask(ref_mask, "reference", replace) + cond.check_mask(masks, "driving", replace)
    return Inputs(ref, ref_mask, driving, masks, fps or DEFAULT_FPS, warnings)


class Pipeline:
    """SCAIL-2 generation. Build with `from_pretrained`; call with the user's inputs."""

    def __init__(
        self,
        folder: ModelFolder,
        dit: torch.nn.Module,
        device: torch.device,
        *,
        text_encoder: str = "bf16",
        profile: str | None = None,
        vram_budget: int | None = None,
        attention: str | None = None,
        vae_tile: int | None = None,
        weight_files: Sequence[Path] = (),
    ) -> None:
        self.folder = folder
        self.dit = dit
        self.device = device
        self.text_encoder = text_encoder
        self.profile = profile
        self.vram_budget = vram_budget
        self.attention = attention
        self.vae_tile = vae_tile
        self.weight_files = list(weight_files)  # quantized shards the streamer may read blocks from
        self._vae: WanVAE | None = None

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.bfloat16,
        text_encoder: str | None = None,
        profile: str | None = None,
        vram_budget: int | None = None,
        attention: str | None = None,
        vae_tile: int | None = None,
        loras: Sequence[tuple[str | Path, float]] = (),
    ) -> "Pipeline":
        """Load a SCAIL-2 folder (official layout, or a `scail2-lite quantize` output).

        The DiT is loaded to CPU RAM; each call places it (all on the GPU, or streamed block by block) with the
        memory plan that fits the size asked for: `profile` forces one of `profiles/`, `vram_budget` (bytes) caps
        the VRAM the plan may use. The encoders are loaded when needed and released after use. `text_encoder`
        ("bf16", "int8", "nf4") defaults to what a quantized folder recorded, else bf16.
        """
        from .loader import load_dit, quantized_text_encoder
        from .quantize.text_encoder import text_encoder_backend

        folder = ModelFolder(Path(path))
        folder.check()
        device = parse_device(device)
        te = text_encoder or quantized_text_encoder(folder.root) or "bf16"
        text_encoder_backend(te, device)  # validates the scheme name before minutes of loading
        if profile is not None:
            from .planner import load_profile

            load_profile(profile)
        if attention is not None:
            from .attention import resolve

            resolve(attention)
        # On a GPU the blocks of a quantized folder stay in the mapped shards until placed (the streamer reads
        # them from the files, a resident placement copies them to the GPU): RAM holds only the non-block layers.
        # Not with LoRAs: they are merged into the RAM copy, the shards hold the weights without them.
        files = [] if loras else _weight_files(folder.root)
        dit = load_dit(folder.root, dtype=dtype, device="cpu", loras=loras,
                       map_blocks=device.type == "cuda" and bool(files))
        return cls(folder, dit, device, text_encoder=te, profile=profile, vram_budget=vram_budget,
                   attention=attention, vae_tile=vae_tile, weight_files=files)

    # ---- phases ------------------------------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str]) -> list[torch.Tensor]:
        """umT5 on the prompts; the encoder leaves memory before returning (11 GB in bf16)."""
        from .quantize.text_encoder import quantize_block

        scheme = self.text_encoder
        quant = None if scheme == "bf16" else (lambda block: quantize_block(block, scheme))
        tokenizer, model = load_text_encoder(self.folder.umt5, device=self.device, quantize=quant)
        try:
            out = [t.to("cpu", torch.float32) for t in encode_text(tokenizer, model, prompts)]
        finally:
            del model
            _release()
        return out

    def encode_clip(self, image: torch.Tensor) -> torch.Tensor:
        """CLIP ViT-H/14 features of the reference (1, 257, 1280); the tower is released after use."""
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        model = load_clip(self.folder.clip, dtype=dtype, device=self.device)
        try:
            return encode_image(model, image[None]).to("cpu", torch.float32)
        finally:
            del model
            _release()

    def vae(self, tile: int | None) -> WanVAE:
        """The VAE on the device with the tiling asked for (loaded once, kept in RAM between uses)."""
        if self._vae is None:
            self._vae = load_vae(self.folder.vae, device="cpu")
        self._vae.set_tiling(tile or None)
        return self._vae.to(self.device)

    def park_vae(self) -> None:
        """Send the VAE back to RAM so the DiT steps have the GPU to themselves."""
        if self._vae is not None:
            self._vae.to("cpu")
            _release()

    def make_plan(self, height: int, width: int, frames: int) -> "Plan | None":
        """The memory plan for one segment of this size on this machine. On CPU there is nothing to plan unless a
        profile is forced (the streamer then runs with synchronous copies: how the tests check profiles)."""
        if self.device.type != "cuda" and self.profile is None:
            return None
        from .planner import detect_memory, plan

        free, _, ram = detect_memory()
        quant = _dit_quantization(self.dit)
        te = {"bf16": "bf16", "int8": "int8", "nf4": "4bit"}[self.text_encoder]
        return plan(self.dit.config, height, width, frames, free, ram, profile=self.profile,
                    vram_budget=self.vram_budget, weights=quant, text_encoder=te,
                    mappable=bool(self.weight_files))

    # ---- generation --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        image: str | Path | Inputs,
        mask_image: str | Path | None = None,
        pose: str | Path | None = None,
        mask_video: str | Path | None = None,
        *,
        prompt: str = "",
        negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
        replace: bool = False,
        size: str | tuple[int, int] = "512p",
        frames: int | None = None,
        steps: int = DEFAULT_STEPS,
        shift: float = DEFAULT_SHIFT,
        guidance: float = DEFAULT_GUIDANCE,
        solver: str = "unipc",
        seed: int = 0,
        segment_len: int = SEGMENT_LEN,
        segment_overlap: int = SEGMENT_OVERLAP,
        output: str | Path | None = None,
        fps: float | None = None,
        keep_frames: bool = True,
        progress: Progress | None = None,
        cache: str = "off",
        cache_threshold: float | None = None,
        recorder=None,
        on_latents: Callable[[int, torch.Tensor], None] | None = None,
    ) -> Result:
        """Generate a video. Inputs are file paths (or an `Inputs` from `load_inputs`). With `output`, frames
        stream into an H.264 mp4 written atomically (no partial file on error or Ctrl-C). `guidance` 1 runs one
        DiT forward per step (no unconditional branch), as the few-step distilled LoRAs want.

        `cache` ("teacache", "magcache", "off") skips DiT forwards whose input barely changed (stepcache.py;
        `cache_threshold` overrides its default). `recorder` (a `profiling.PhaseRecorder`) times the phases;
        `on_latents(segment, latents)` sees each segment's final latents (tests compare profiles with it).
        """
        from .stepcache import StepCache

        timer = recorder if recorder is not None else PhaseRecorder(self.device)
        if steps < 1:
            raise UserError(f"--steps must be at least 1, got {steps}")
        make_scheduler(solver, steps, shift)  # validates the solver name and shift before any heavy work
        step_cache = StepCache(cache, cache_threshold, store_device="cpu")
        with timer("inputs"):
            if isinstance(image, Inputs):
                inputs = image
            else:
                if mask_image is None or pose is None or mask_video is None:
                    raise UserError("image, mask_image, pose and mask_video are all required")
                inputs = load_inputs(image, mask_image, pose, mask_video, size=size, frames=frames, replace=replace)
        plan_segments = cond.segment_plan(inputs.frames, segment_len, segment_overlap)
        total_frames = plan_segments[-1][1] - (len(plan_segments) - 1) * segment_overlap
        h, w = inputs.size
        fps = fps or inputs.fps
        mem_plan = self.make_plan(h, w, plan_segments[0][1] - plan_segments[0][0])
        vae_tile = self.vae_tile if self.vae_tile is not None else (mem_plan.profile.vae_tile if mem_plan else None)
        tasks = _Tasks(progress)

        with timer("text encoder"):
            tasks.phase("umT5 text encoder")
            use_cfg = guidance != 1.0
            contexts = self.encode_prompts([prompt, negative_prompt] if use_cfg else [prompt])
        with timer("clip"):
            tasks.phase("CLIP image encoder")
            clip_fea = self.encode_clip(inputs.image)
        with timer("vae encode"):
            tasks.phase("VAE encode (reference)")
            ref_image = cond.composite_on_black(inputs.image, inputs.ref_mask) if replace else inputs.image
            vae = self.vae(vae_tile)
            ref_latents = _encode(vae, ref_image[:, None], self.device)
            pose_latents = [_encode(vae, inputs.pose[:, a:b], self.device) for a, b in plan_segments]
            self.park_vae()
        dit_dtype = self.dit.dtype
        kept: list[torch.Tensor] = []
        step_seconds: list[float] = []
        with ExitStack() as stack:
            writer = stack.enter_context(media.VideoWriter(output, fps, (h, w))) if output is not None else None
            with timer("dit placement"):
                tasks.phase("placing the DiT")
                placement = stack.enter_context(DitPlacement(self.dit, self.device, mem_plan, self.attention,
                                                             self.weight_files))
            handle = step_cache.attach(self.dit)
            if handle is not None:
                stack.callback(handle.detach)
            ctx = [self.dit.embed_context(c[None].to(self.device, dit_dtype), clip_fea.to(self.device, dit_dtype))
                   for c in contexts]
            history_pixels: torch.Tensor | None = None
            steps_task = tasks.add("denoising", total=steps * len(plan_segments))
            for k, (start, end) in enumerate(plan_segments):
                hist_lat = None
                if history_pixels is not None:
                    with timer("vae encode"):
                        hist_lat = _encode(self.vae(vae_tile), history_pixels, self.device)
                        self.park_vae()
                seg = _segment_conditions(inputs, start, end, ref_latents, pose_latents[k], hist_lat)
                seg = {name: v.to(self.device, dit_dtype) if torch.is_tensor(v) else v for name, v in seg.items()}
                generator = torch.Generator().manual_seed(seed + k)
                latents = torch.randn(seg["shape"], generator=generator, dtype=torch.float32)
                sampler = make_scheduler(solver, steps, shift, generator=generator)
                step_cache.begin(steps)
                if k > 0:
                    with timer("dit placement"):
                        placement.apply()
                for t in sampler.timesteps:
                    t0 = time.perf_counter()
                    with timer("dit steps"):
                        if hist_lat is not None:
                            latents[:, :, : hist_lat.shape[2]] = hist_lat
                        v = self._velocity_with_fallback(placement, step_cache, latents, t, seg, ctx, replace,
                                                         guidance, dit_dtype)
                        latents = sampler.step(v, t, latents)
                    step_seconds.append(time.perf_counter() - t0)
                    tasks.advance(steps_task)
                if hist_lat is not None:
                    latents[:, :, : hist_lat.shape[2]] = hist_lat
                if on_latents is not None:
                    on_latents(k, latents.clone())
                with timer("dit placement"):
                    placement.release()
                with timer("vae decode"):
                    tasks.phase(f"VAE decode (segment {k + 1}/{len(plan_segments)})")
                    drop = segment_overlap if k > 0 else 0
                    tail = torch.empty(3, 0, h, w)  # the last frames decoded: the next segment's clean history
                    for group in _decode(self.vae(vae_tile), latents, drop, self.device):
                        if writer is not None:
                            writer.write(group)
                        if keep_frames:
                            kept.append(group)
                        tail = torch.cat([tail, group], dim=1)[:, -segment_overlap:]
                    self.park_vae()
                    history_pixels = tail if k + 1 < len(plan_segments) else None
            final_plan = placement.plan
            fallbacks = placement.fallbacks
        result_frames = torch.cat(kept, dim=1) if keep_frames else None
        settings = dict(size=f"{w}x{h}", frames=total_frames, segments=len(plan_segments), steps=steps, shift=shift,
                        guidance=guidance, solver=solver, seed=seed, replace=replace,
                        dit=_dit_quantization(self.dit), text_encoder=self.text_encoder, device=str(self.device),
                        attention=get_backend())
        if final_plan is not None:
            settings.update(profile=final_plan.profile.name, resident_blocks=final_plan.resident_blocks,
                            plan=final_plan.reason)
        if fallbacks:
            settings["out_of_memory_fallbacks"] = "; ".join(fallbacks)
        if cache != "off":
            settings["cache"] = f"{cache}: {step_cache.stats}"
        return Result(result_frames, total_frames, fps, (h, w), timer.seconds, step_seconds, timer.peaks,
                      settings, inputs.warnings, Path(output) if output is not None else None)

    def _velocity_with_fallback(self, placement: "DitPlacement", *args) -> torch.Tensor:
        """One step's velocity; on CUDA out-of-memory the DiT is re-placed under a lighter plan and the same step
        runs again (finished steps and segments are kept: the sampler has not moved)."""
        while True:
            try:
                return self._velocity(*args)
            except torch.cuda.OutOfMemoryError:
                _release()
                if not placement.fallback():
                    raise _out_of_memory() from None

    def _velocity(self, cache: "StepCache", latents: torch.Tensor, t: torch.Tensor, seg: dict,
                  ctx: list[torch.Tensor], replace: bool, guidance: float, dtype: torch.dtype) -> torch.Tensor:
        """One DiT evaluation per CFG branch (batch 1 each), combined on CPU in fp32. `seg` holds the segment's
        conditions already on the device in the DiT's dtype."""
        dev = self.device
        x = latents.to(dev, dtype)
        tt = torch.full((1,), float(t), device=dev)
        args = [seg[k] for k in ("pose", "driving_masks", "ref", "ref_masks")]
        hist = seg["history_mask"]
        outs = []
        for name, c in zip(("cond", "uncond"), ctx):
            with cache.branch(name):
                outs.append(self.dit.forward_with_context(x, *args, tt, c, replace, history_mask=hist).float().cpu())
        return cfg(outs[0], outs[1], guidance) if len(outs) == 2 else outs[0]


def _encode(vae: WanVAE, video: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(3, T, H, W) in [-1, 1] -> normalised latents (1, 16, Tl, H/8, W/8) on CPU, fp32."""
    return vae.encode(video[None].to(device)).cpu()


def _decode(vae: WanVAE, latents: torch.Tensor, drop: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Decoded frame groups (3, t, H, W) on CPU, the first `drop` frames (segment overlap) left out."""
    seen = 0
    for group in vae.decode_frames(latents.to(device)):
        group = group[0].float().cpu()
        n = group.shape[1]
        if seen + n > drop:
            yield group[:, max(0, drop - seen):]
        seen += n


def _dit_quantization(model: torch.nn.Module) -> str:
    """"fp8", "int8" or "bf16": what the DiT's block Linears hold (the planner sizes blocks by it)."""
    from .quantize.linear import QuantLinear

    for module in model.blocks[0].modules():
        if isinstance(module, QuantLinear):
            return module.scheme
    return "bf16"


def _weight_files(root: Path) -> list[Path]:
    """The quantized folder's DiT shards (block weights the streamer can map from disk); none for other formats,
    whose tensors need converting on the way in."""
    from .quantize.store import is_quantized_folder, read_manifest

    if not is_quantized_folder(root):
        return []
    return [root / f for f in read_manifest(root)["dit"]["files"]]


class DitPlacement:
    """Where the DiT runs during one generation: wholly on the device, or streamed block by block as a planner
    `Plan` says. `fallback()` re-places it under the next lighter plan after a CUDA out-of-memory error. Only data
    moves (same weights, same kernels, batch 1), so the numbers do not depend on the plan."""

    def __init__(self, model: torch.nn.Module, device: torch.device, plan: "Plan | None" = None,
                 attention: str | None = None, weight_files: Sequence[Path] = ()) -> None:
        self.model, self.device, self.plan = model, device, plan
        self.attention = attention
        self.weight_files = list(weight_files)
        self.streamer = None
        self.placed = False
        self.fallbacks: list[str] = []
        self._saved: list[tuple[torch.nn.Module, str, bool, torch.Tensor]] = []

    def __enter__(self) -> "DitPlacement":
        self.apply()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def apply(self) -> None:
        """Put the DiT where the plan says (no-op when it is there already); a plan that runs out of CUDA memory
        while placing falls back to the next lighter one."""
        while not self.placed:
            try:
                self._place()
                self.placed = True
            except torch.cuda.OutOfMemoryError:
                self.close()
                if not self._lighter():
                    raise _out_of_memory() from None

    def _place(self) -> None:
        from .attention import set_backend
        from .planner import configure_blocks

        if self.plan is not None:
            configure_blocks(self.model, self.plan)
        if self.attention is not None:
            set_backend(self.attention)
        plan = self.plan
        resident = len(self.model.blocks) if plan is None else plan.resident_blocks
        # What moves to the device is remembered, so `release` re-points it instead of copying it back (mapped
        # blocks stay mapped, and RAM gains no second copy of the model).
        self._saved = resident_tensors(self.model, self.model.blocks[resident:])
        # Resident blocks move one at a time and the mapped shards' pages are given back after each, so RAM never
        # holds their file pages beside the pinned buffer.
        pages = FilePages(self.weight_files)
        if self.streamer is not None:  # a later segment under the same plan: the host side is still in place
            self.streamer.resume()
            pages.drop()
            return
        for block in self.model.blocks[:resident]:
            block.to(self.device)
            pages.drop()
        if plan is None or plan.streamed_blocks == 0:
            self.model.to(self.device)
        else:
            source = plan.profile.weight_source if self.weight_files else "pinned"
            self.streamer = BlockStreamer(self.model, self.device, resident_blocks=plan.resident_blocks,
                                          prefetch=plan.profile.prefetch, source=source,
                                          weights=self.weight_files or None, unit=plan.profile.stream_unit)
        pages.drop()

    def release(self) -> None:
        """Give the GPU back (the VAE decodes a 704p segment in about as much memory as the DiT steps take). A
        streamer is only suspended: the next segment under the same plan reuses its pinned buffer."""
        self.placed = False
        if self.streamer is not None:
            self.streamer.suspend()
        for owner, name, is_param, tensor in self._saved:
            if is_param:
                owner._parameters[name].data = tensor
            else:
                owner._buffers[name] = tensor
        self._saved = []
        _release()

    def close(self) -> None:
        """Release, and unpin the streamer's host buffer for good."""
        self.release()
        if self.streamer is not None:
            self.streamer.detach()
            self.streamer = None

    def fallback(self) -> bool:
        """Re-place the DiT under the next lighter plan; False when there is none."""
        self.close()
        if not self._lighter():
            return False
        self.apply()
        return True

    def _lighter(self) -> bool:
        from .planner import lighter

        new = lighter(self.plan) if self.plan is not None else None
        if new is None:
            return False
        self.fallbacks.append(f"{self.plan.profile.name} -> {new.profile.name}")
        self.plan = new
        return True


def _segment_conditions(inputs: Inputs, start: int, end: int, ref_latents: torch.Tensor, pose_latents: torch.Tensor,
                        hist_latents: torch.Tensor | None) -> dict:
    """Batch-1 DiT inputs of one segment (CPU, fp32)."""
    tl = cond.latent_frames(end - start)
    h, w = ref_latents.shape[-2:]
    hist = None
    if hist_latents is not None:
        hist = cond.history_mask(tl, h, w, history_latents=hist_latents.shape[2])[None]
    return {
        "shape": (1, 16, tl, h, w),
        "pose": pose_latents,
        "driving_masks": cond.driving_mask_channels(inputs.mask_video[:, start:end])[None],
        "ref": ref_latents,
        "ref_masks": cond.reference_mask_channels(inputs.ref_mask, tl)[None],
        "history_mask": hist,
    }


def _out_of_memory() -> UserError:
    return UserError("CUDA ran out of memory and no lighter memory profile is left; try a smaller --size, fewer "
                     "--frames per segment, or FP8 weights (scail2-lite quantize)")


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


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _Tasks:
    """Thin adapter over an optional rich Progress: one spinner line per phase, one bar for the steps."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self._phase = None

    def phase(self, description: str) -> None:
        if self.progress is None:
            return
        if self._phase is None:
            self._phase = self.progress.add_task(description, total=None)
        else:
            self.progress.update(self._phase, description=description)

    def add(self, description: str, total: int):
        return self.progress.add_task(description, total=total) if self.progress is not None else None

    def advance(self, task) -> None:
        if self.progress is not None:
            self.progress.advance(task)
