"""Memory planning: a per-phase model of peak VRAM and RAM, the choice of a plan, the OOM fallback.

Why a model rather than trial and error: a failed attempt at 704p costs minutes, and users must see before a run
where their memory goes (`scail2-lite profile`). The model counts what the runtime holds in each phase:
  text_encoder  umT5 weights (4-bit or bf16) + 512-token activations
  clip          CLIP ViT-H/14 visual tower (fp16) + 257-token activations
  vae_encode    VAE weights + the largest input's activations (4 frames at a time), untiled unless the input is
                too large for every card (`vae_tiles.encode_tiling`)
  dit_step      non-block layers + resident blocks + streaming slots + one block's activations at the token count
                (layer streaming: per stage of the block, its activations + the units held then)
  vae_decode    VAE weights + activations and causal cache of one tile (one latent frame -> 4 frames at a time, or
                one of them at a time by frame): the quickest cut that fits the budget (the DiT is off the GPU
                then), see `decode_cut`
The encoders leave the GPU after their phase. The DiT's
device weights are counted from the DiT phase on (the pipeline loads it after the encoders); the VAE leaves the
GPU during DiT steps. The DiT's host side (the streamed blocks read into their pinned buffer and page-locked: no
device memory) is built beside CLIP and the VAE encode when the RAM plan has room for it then
(`Plan.overlap_placement`), else after them. Activation coefficients are per-element byte counts of
`model.SCAIL2Block`'s forward; the VAE's are per output pixel. They are estimates until `scail2-lite profile --run`
measures them (issue 7).

The budget is the caching allocator's share of the card (card.py: the card or its free memory, minus the CUDA
context and a desktop reserve), and each phase's reserved bytes are its allocated peak plus the excess the
allocator was measured to keep in that phase, so a plan that fits also fits the card as NVML counts it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..attention import CONVERTING
from ..attention import resolve as resolve_attention
from ..config import SEGMENT_OVERLAP, DiTConfig
from ..errors import UserError
from ..vae_tiles import DecodeCut, Tiling, encode_bytes, encode_tiling, from_setting
from .card import DeviceMemory
from .profiles import Profile, StreamUnit, WeightSource, list_profiles, load_profile

GB = 1e9
PHASES: tuple[str, ...] = ("text_encoder", "clip", "vae_encode", "dit_step", "vae_decode")
QUANTIZATIONS: tuple[str, ...] = ("bf16", "fp8", "int8")

# Encoders (SPEC section 4): umT5-XXL encoder = 1.05 B embedding + 4.63 B linear parameters; CLIP ViT-H/14 visual.
# The token embedding stays in RAM (encoders.load_text_encoder); T5's FFN output projections `wo` stay bf16 in
# the bitsandbytes 4-bit encoder (quantize.text_encoder: T5 casts activations to wo's dtype), quanto's int8
# quantizes them too.
UMT5_EMBED_PARAMS = 256_384 * 4096
UMT5_LAYERS = 24
UMT5_LINEAR_PARAMS = UMT5_LAYERS * (4 * 4096 * 4096 + 3 * 4096 * 10240)
UMT5_WO_PARAMS = 24 * 4096 * 10240
NF4_BYTES_PER_PARAM = 0.5 + 4 / 64  # 4-bit codes + one fp32 absmax per 64 values
CLIP_PARAMS = 632_000_000
# Calibrated on the H100 runs of benchmarks/bench_pipeline.py (RESULTS.md, 2026-11-24): umT5 NF4 peaked at
# 4.19-4.44 GB, CLIP at 1.33-1.37 GB, tiled (256 px) VAE encode at 1.84-1.90 GB and decode at 2.08-2.13 GB.
# Loading the full umT5 file and encoding two 512-token prompts on the H200 (2026-12-04) peaked 0.52 GB above
# the loaded weights in bf16, NF4 and int8 alike (9.82, 4.44 and 5.19 GB).
ENCODER_ACTIVATIONS = 0.5 * GB
CLIP_ACTIVATIONS = 0.1 * GB
VAE_PARAMS = 126_900_000  # Wan2.1 VAE, run in fp32
# The decode, per output pixel of the largest tile, fp32 (it does not grow with the frame count: tiled or not, one
# latent frame is decoded at a time with a causal cache of 2 frames per convolution). Tensors, traced on CPU
# (benchmarks/bench_cards.py --parts trace: live tensors of `WanVAE.decode_frames`, full-width VAE): four frames at a
# time as diffusers runs the decoder, 19,500 B/px (19,640 at 64x64 px, 19,794 at 32x32: 19,486 + 616 per unit of
# 1/h + 1/w latent px, the padded copies); the 96-channel cache of 7 full-resolution convolutions, the 192-channel
# upsampling and one concatenated 6-frame conv input dominate. By frame (`WanVAE._decode_chunk`), 14,600 (14,658 at
# 64x64, 14,733 at 32x32): the caches are 9,460 of it, one frame's activations the rest. cuDNN's workspaces under
# its heuristics (the shipped setting) add 100-400 (H100, RESULTS.md 2026-12-07: 19.6-19.7 kB/px allocated four
# frames at a time, 14.9-15.0 by frame, weights and latents apart; under cuDNN's search they added 3,400).
VAE_DECODE_TENSOR_BYTES_PER_PIXEL = 19_500
VAE_DECODE_BY_FRAME_TENSOR_BYTES_PER_PIXEL = 14_600
VAE_DECODE_WORKSPACE_BYTES_PER_PIXEL = 400
# What a decode costs per pixel of the frame, relative to an untiled decode four frames at a time (H100, 704p x 81,
# RESULTS.md 2026-12-07): by frame 1.22-1.26x at every tiling (each frame copies its convolutions' cached frames
# again), tiles 1.24-1.30x per decoded pixel (smaller convolutions, the frames parked and blended on the host). The
# planner weighs a larger tile against these; measured on the H100 only, and what they decide there (by frame only
# where it makes the decode untiled) holds while a card's ratios stay on the same side.
VAE_DECODE_BY_FRAME_COST = 1.23
VAE_DECODE_TILED_COST = 1.25
VAE_DECODE_LATENT_COPIES = 3  # the segment's latents on the GPU: as given, denormalised, a tile's post_quant_conv
LATENT_CHANNELS = 16
VAE_DECODE_MAX_STRIPS = 8  # strips tried across the longer side before square tiles
VAE_DECODE_SQUARES = (512, 384)  # square tiles tried (pixels) before the profile's

# One block's forward (model.SCAIL2Block), bytes per element of (tokens x dim) unless noted:
RESIDUAL_BYTES = 4  # fp32 residual stream, alive for the whole forward
QKV_ATTN_BYTES = 8  # q, k, v and the attention output in bf16 (SDPA, sage)
# fp8/int8 (attention.CONVERTING) free each bf16 input once its 8-bit copy exists: q, k, v and the first copy
QKV_CONVERTED_BYTES = 7
QKV_PROJ_BYTES = 6  # h, q and k while k is projected (v is then projected into h's storage: blocks.SelfAttention)
OUT_PROJ_BYTES = 4  # the attention output and its projection by o, bf16
ATTN_CHUNK_BYTES = 16  # fp32 norm/modulation and q/k RMSNorm+RoPE temporaries per token of a chunk
CROSS_CHUNK_BYTES = 12  # fp32 norm3, bf16 q, two attention outputs, o
FFN_CHUNK_BYTES = 12  # fp32 norm2 + bf16 input/output per token of a chunk ...
FFN_INNER_BYTES = 4  # ... plus bf16 (tokens x ffn_dim) twice (Linear output, GELU output)
# int8 q and k plus v's fp16 copy, in part: bench_attention measured +1.47 GB at 704p and +0.74 GB at 512p.
SAGE_BYTES = 3
# Ulysses (distributed.py): a rank's q, k, v and attention output are exchanged one at a time, each through a send
# and a receive buffer of its share: two bf16 activations of the share beside the self-attention's.
ALL_TO_ALL_BYTES = 4
MODEL_DTYPE_BYTES = 2

# Caching allocator, per phase: (reserved - allocated) / allocated at the phase's peak, the most measured with
# expandable segments on the H100 (RESULTS.md, 2026-11-24/25 pipeline and `profile --run` tables): umT5 4.44 ->
# 4.57 GB, CLIP 1.33 -> 1.37, tiled VAE encode 1.90 -> 2.26, DiT steps 10.24 -> 10.87 (13.88 -> 14.34), tiled VAE
# decode 2.13 -> 2.59. The VAE's convolutions leave the most unused cache between frames: under cuDNN's heuristics
# the decode reserved 1.22-1.27x its allocated peak (capped and steady; 1.35x once, uncapped, on a first pass),
# RESULTS.md 2026-12-07.
RESERVED_OVER_ALLOCATED: dict[str, float] = {
    "text_encoder": 0.03, "clip": 0.03, "vae_encode": 0.19, "dit_step": 0.07, "vae_decode": 0.30,
}
BASE_RAM = 3.0 * GB  # Python, torch, CUDA libraries
# Copies of the decoded fp32 frames at the end of a run (the kept groups, their concatenation, the writer's or
# summary's conversion): 704p x 81 measured +3.0 GB over the DiT steps for 0.88 GB of frames.
DECODED_COPIES = 3
LIGHTER_FACTOR = 0.8  # a step that ran out of memory is retried under a plan predicted 20% lighter


# ---- sizes ----------------------------------------------------------------------------------------------------


def tokens(config: DiTConfig, height: int, width: int, frames: int, extra_refs: int = 0) -> int:
    """Packed sequence length `[extra refs | ref | video | pose]` for an output of height x width x frames with
    `extra_refs` extra references (SPEC sections 3 and 6: each adds one reference frame's tokens, +3.7% at 81
    frames)."""
    if height % 32 or width % 32 or height <= 0 or width <= 0:
        raise UserError(f"size {height}x{width} must be positive multiples of 32")
    if frames < 1 or (frames - 1) % 4:
        raise UserError(f"frames must be 4k+1 (1, 5, ..., 81), got {frames}")
    _, ph, pw = config.patch_size
    per_frame = (height // 8 // ph) * (width // 8 // pw)
    latent_frames = (frames - 1) // 4 + 1
    if extra_refs < 0:
        raise UserError(f"the number of extra references cannot be negative, got {extra_refs}")
    return (1 + extra_refs) * per_frame + latent_frames * per_frame + latent_frames * per_frame // 4


def _linear_bytes(fan_in: int, fan_out: int, quantization: str) -> int:
    """A block Linear: weight in the quantization (8-bit ones with an fp32 scale per row, int8 also an fp32
    factor per column), bias in bf16."""
    if quantization == "bf16":
        return fan_in * fan_out * 2 + fan_out * MODEL_DTYPE_BYTES
    smooth = fan_in * 4 if quantization == "int8" else 0
    return fan_in * fan_out + fan_out * 4 + smooth + fan_out * MODEL_DTYPE_BYTES


def unit_bytes(config: DiTConfig, quantization: str) -> dict[str, int]:
    """Bytes of each layer-streaming unit of a block (`SCAIL2Block.STREAM_UNITS`), and under "rest" of what stays
    outside them: the self-attention's q/k RMSNorms, norm3 (bf16) and the modulation table (fp32)."""
    d, f = config.dim, config.ffn_dim
    square = _linear_bytes(d, d, quantization)
    return {
        "self_attn.q": square, "self_attn.k": square, "self_attn.v": square, "self_attn.o": square,
        "cross_attn": 6 * square + 3 * d * MODEL_DTYPE_BYTES,
        "ffn": _linear_bytes(d, f, quantization) + _linear_bytes(f, d, quantization),
        "rest": 4 * d * MODEL_DTYPE_BYTES + 6 * d * 4,
    }


def block_bytes(config: DiTConfig, quantization: str) -> int:
    """Bytes of one DiT block (quantize/schemes.py's rule: Linear weights quantized, the rest bf16 or fp32)."""
    return sum(unit_bytes(config, quantization).values())


def nonblock_bytes(config: DiTConfig) -> int:
    """Bytes of everything outside the blocks (embeddings, time MLPs, head), kept in bf16 and always resident."""
    c = config
    patch = 4  # 1 x 2 x 2 kernel
    params = (
        2 * (c.in_dim * patch * c.dim + c.dim) + c.mask_dim * patch * c.dim + c.dim
        + c.text_dim * c.dim + c.dim + c.dim * c.dim + c.dim
        + c.freq_dim * c.dim + c.dim + c.dim * c.dim + c.dim
        + c.dim * 6 * c.dim + 6 * c.dim
        + 2 * c.clip_dim + c.clip_dim * c.clip_dim + c.clip_dim + c.clip_dim * c.dim + c.dim + 2 * c.dim
        + c.dim * c.out_dim * patch + c.out_dim * patch
    )
    return params * MODEL_DTYPE_BYTES + 2 * c.dim * 4


def block_activation_stages(config: DiTConfig, n_tokens: int, ffn_chunk: int, attn_chunk: int,
                            attention: str) -> dict[str, int]:
    """Peak transient bytes of each stage of one block's forward at `n_tokens` (batch 1: CFG branches run one after
    the other), the fp32 residual stream and the context included: the self-attention (q, k, v and its output),
    its output projection, the cross-attention and the FFN (both over token chunks)."""
    d, f, n = config.dim, config.ffn_dim, n_tokens
    ca = min(attn_chunk or n, n)
    cf = min(ffn_chunk or n, n)
    attend = QKV_CONVERTED_BYTES if attention in CONVERTING else QKV_ATTN_BYTES
    stages = {
        # the projections (h, q, k and a chunk's float32 temporaries), or the attention (q, k, v and its output or
        # the first 8-bit copy)
        "self_attn": max(attend * n, QKV_PROJ_BYTES * n + ATTN_CHUNK_BYTES * ca) * d
        + (SAGE_BYTES * n * d if attention == "sage" else 0),
        "self_out": OUT_PROJ_BYTES * n * d,
        "cross": CROSS_CHUNK_BYTES * ca * d,
        "ffn": FFN_CHUNK_BYTES * cf * d + FFN_INNER_BYTES * cf * f,
    }
    context = (257 + config.text_len) * d * MODEL_DTYPE_BYTES * 3  # context, its k/v for text and image
    return {name: RESIDUAL_BYTES * n * d + b + context for name, b in stages.items()}


def layer_stream_held(config: DiTConfig, quantization: str) -> dict[str, int]:
    """Weights on the device during each stage under layer streaming (LayerUnits): v alone at the attention (o
    is fetched when v returns), o and the fetched cross-attention, the cross-attention and the fetched FFN, the
    FFN and the next block's q."""
    u = unit_bytes(config, quantization)
    return {"self_attn": u["self_attn.v"], "self_out": u["self_attn.o"] + u["cross_attn"],
            "cross": u["cross_attn"] + u["ffn"], "ffn": u["ffn"] + u["self_attn.q"]}


def vae_encode_inputs(height: int, width: int, frames: int) -> dict[str, tuple[int, int, int]]:
    """(frames, height, width) of what a run of height x width x `frames` per segment encodes: the reference frame,
    the segment's pose video at half size, a later segment's SEGMENT_OVERLAP history frames."""
    return {"reference": (1, height, width), "pose video": (frames, height // 2, width // 2),
            "history frames": (SEGMENT_OVERLAP, height, width)}


def vae_encode_bytes(height: int, width: int, frames: int, vae_tile: int | None = None) -> int:
    """Peak allocated bytes of the VAE encode: the weights and the largest of a run's encodes (`vae_encode_inputs`)
    with its fp32 input, each in `--vae-tile`'s tiles when given (pixels, 0 = untiled), else in those
    `encode_tiling` gives it."""

    def one(f: int, h: int, w: int) -> int:
        tiling = from_setting(vae_tile) if vae_tile is not None else encode_tiling(f, h, w)
        return 3 * f * h * w * 4 + encode_bytes(f, h, w, tiling)

    return VAE_PARAMS * 4 + max(one(*size) for size in vae_encode_inputs(height, width, frames).values())


def vae_decode_bytes(height: int, width: int, frames: int, tiling: Tiling | None, by_frame: bool = False) -> int:
    """Peak allocated bytes of the VAE decode of a height x width x frames segment in `tiling` (None: untiled),
    `by_frame` or four frames at a time: the weights, the largest tile's activations and cache, the latents."""
    tile = tiling.largest_tile(height, width) if tiling is not None else height * width
    per_pixel = VAE_DECODE_BY_FRAME_TENSOR_BYTES_PER_PIXEL if by_frame else VAE_DECODE_TENSOR_BYTES_PER_PIXEL
    latent_frames = (frames - 1) // 4 + 1
    latents = VAE_DECODE_LATENT_COPIES * LATENT_CHANNELS * 4 * latent_frames * (height // 8) * (width // 8)
    return VAE_PARAMS * 4 + tile * (per_pixel + VAE_DECODE_WORKSPACE_BYTES_PER_PIXEL) + latents


def decode_cost(height: int, width: int, cut: DecodeCut) -> float:
    """A decode's time relative to an untiled one four frames at a time: the pixels it decodes (overlaps counted),
    times VAE_DECODE_TILED_COST when tiled and VAE_DECODE_BY_FRAME_COST by frame."""
    tiling = cut.tiling
    cost = tiling.decoded_pixels(height, width) / (height * width) * VAE_DECODE_TILED_COST if tiling else 1.0
    return cost * (VAE_DECODE_BY_FRAME_COST if cut.by_frame else 1.0)


def decode_tilings(height: int, width: int, fallback: int) -> list[Tiling | None]:
    """The decode tilings the planner may choose for a height x width frame, largest tile first: untiled, strips
    across the longer side (2 .. VAE_DECODE_MAX_STRIPS), squares of VAE_DECODE_SQUARES pixels, then the profile's
    `fallback` square (pixels; 0: untiled only). Tilings no larger than the fallback's tile are left out."""
    base = from_setting(fallback)
    floor = base.largest_tile(height, width) if base is not None else height * width
    found: list[Tiling | None] = [None]
    found += [Tiling.strips(height, width, n) for n in range(2, VAE_DECODE_MAX_STRIPS + 1)]
    found += [Tiling.square(t) for t in VAE_DECODE_SQUARES]
    seen, out = set(), []
    for t in sorted(found, key=lambda t: -(t.largest_tile(height, width) if t else height * width)):
        area = t.largest_tile(height, width) if t else height * width
        key = None if t is None or t.covers(height, width) else t
        if area > floor and key not in seen:
            seen.add(key)
            out.append(key)
    return out + ([base] if base is not None and not base.covers(height, width) else [])


def decode_cut(height: int, width: int, frames: int, budget: int, fallback: int) -> DecodeCut:
    """The decode's cut: of the tilings (`decode_tilings`), four frames at a time or by frame, those whose predicted
    reserved peak fits `budget` (the allocator's bytes: the DiT is off the GPU while the VAE decodes), the one of
    least `decode_cost` (the larger tile on a tie); else the profile's `fallback` square tiles (pixels, 0 =
    untiled) by frame. So by frame only where it lets a larger tile fit and that pays (at 704p: untiled on 24 GB
    instead of two strips, not two strips on 16 GB instead of three); and three strips (1.23x the pixels) over a
    larger 512 px square that makes two rows on a 512 px high frame (1.6x)."""
    fitting = [cut for t in decode_tilings(height, width, fallback) for cut in (DecodeCut(t), DecodeCut(t, True))
               if decode_fits(height, width, frames, budget, cut)]
    if fitting:
        return min(fitting, key=lambda cut: decode_cost(height, width, cut))
    base = from_setting(fallback)
    return DecodeCut(None if base is None or base.covers(height, width) else base, by_frame=True)


def forced_cut(height: int, width: int, frames: int, budget: int, tiling: Tiling | None) -> DecodeCut:
    """`--vae-tile`'s tiling, four frames at a time where that fits `budget`, else by frame."""
    return DecodeCut(tiling, by_frame=not decode_fits(height, width, frames, budget, DecodeCut(tiling)))


def decode_fits(height: int, width: int, frames: int, budget: int, cut: DecodeCut) -> bool:
    """Whether the decode's predicted reserved peak in `cut` fits `budget` (the allocator's bytes)."""
    return reserved_bytes("vae_decode", vae_decode_bytes(height, width, frames, cut.tiling, cut.by_frame)) <= budget


TEXT_ENCODERS: tuple[str, ...] = ("nf4", "int8", "bf16")  # quantize.text_encoder's scheme names


def umt5_bytes(text_encoder: str) -> int:
    """GPU bytes of umT5's weights while encoding: bf16 streams its blocks (encoders.stream_blocks), so one
    block plus the block being dropped; 4/8-bit encoders are resident whole."""
    if text_encoder == "bf16":
        return 2 * (UMT5_LINEAR_PARAMS // UMT5_LAYERS) * 2
    if text_encoder == "nf4":
        return int(UMT5_WO_PARAMS * 2 + (UMT5_LINEAR_PARAMS - UMT5_WO_PARAMS) * NF4_BYTES_PER_PARAM)
    return int(UMT5_LINEAR_PARAMS * (1 + 4 / 4096))  # int8 + per-row scale


# ---- plans ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhaseMemory:
    vram: int  # predicted peak allocated bytes
    ram: int  # predicted peak process RAM bytes
    reserved: int = 0  # predicted peak reserved bytes (the allocated peak plus the allocator's measured excess)


def reserved_bytes(phase: str, vram: int) -> int:
    """A phase's predicted reserved bytes for `vram` allocated at its peak."""
    return int(vram * (1 + RESERVED_OVER_ALLOCATED[phase]))


@dataclass(frozen=True)
class Plan:
    """A profile resolved for one run: how many blocks stay resident, and the predicted memory of every phase."""

    profile: Profile
    config: DiTConfig
    height: int
    width: int
    frames: int
    quantization: str
    text_encoder: str
    resident_blocks: int
    tokens: int
    phases: dict[str, PhaseMemory]
    vram_budget: int  # bytes the caching allocator may reserve (DeviceMemory.allocator_budget)
    ram_available: int
    reason: str
    mappable: bool = True  # blocks read from the quantized shards (not held in RAM between uses)
    extra_refs: int = 0  # extra references (multi-reference): their tokens are in `tokens`
    outside_allocator: int = 0  # what NVML shows beyond the allocator's reserved bytes (the CUDA context)
    sequence_split: int = 1  # ranks sharing the tokens (Ulysses): this plan is one rank's
    vae_decode: DecodeCut = DecodeCut()  # the decode's tiles and whether by frame, see `decode_cut`
    vae_tile: int | None = None  # `--vae-tile` when given (pixels, 0 = untiled): the decode's tiles are then these
    overlap_placement: bool = False  # the DiT's host side is built beside the encoders (`overlapped`)
    attention: str = "sdpa"  # the self-attention backend the blocks run, resolved on this machine

    @property
    def streamed_blocks(self) -> int:
        return self.config.num_layers - self.resident_blocks

    @property
    def peak_vram(self) -> int:
        return max(p.vram for p in self.phases.values())

    @property
    def peak_vram_reserved(self) -> int:
        """What the caching allocator will hold at the peak (the figure a VRAM budget must cover)."""
        return max(p.reserved for p in self.phases.values())

    def process_total(self, phase: str) -> int:
        """The process's total in a phase as NVML will show it: reserved plus the context (0 off the GPU)."""
        return self.phases[phase].reserved + self.outside_allocator if self.outside_allocator else 0

    @property
    def peak_process_total(self) -> int:
        return max(self.process_total(p) for p in self.phases)

    @property
    def peak_ram(self) -> int:
        return max(p.ram for p in self.phases.values())

    @property
    def fits(self) -> bool:
        return self.peak_vram_reserved <= self.vram_budget and self.peak_ram <= self.ram_available


def predict(
    profile: Profile, config: DiTConfig, height: int, width: int, frames: int, resident_blocks: int, quantization: str,
    text_encoder: str = "nf4", mappable: bool = True, extra_refs: int = 0, sequence_split: int = 1,
    decode: DecodeCut | str = "profile", overlap: bool = False, vae_tile: int | None = None,
    attention: str = "sdpa",
) -> dict[str, PhaseMemory]:
    """Peak VRAM and RAM of each phase for a profile with a resolved number of resident blocks; the VAE decodes in
    the `decode` cut ("profile": the profile's square tiles, four frames at a time) and encodes in `vae_tile` px squares
    (`--vae-tile`, 0 = untiled; None: `vae_encode_bytes`'s rule). `attention`: the resolved self-attention backend
    (an 8-bit one that converts its inputs peaks lower than SDPA).

    RAM (resident set, file pages included): the non-block layers; the blocks only when they cannot be read from
    a quantized folder's shards (`mappable` False: the whole DiT stays in RAM, the pinned buffer replacing the
    streamed blocks' copies); else the pinned buffer of the streamed blocks (or the two-block staging ring of
    disk-mapped profiles) once the DiT is placed, and already while the encoders run with `overlap` (the buffer
    fills beside them: `overlapped`).

    Under a sequence split of N ranks (Ulysses) each rank's blocks hold 1/N of the tokens (its self-attention: all
    tokens with 1/N of the heads, the same bytes) plus the all-to-all buffers; weights are the same on every rank."""
    n = -(-tokens(config, height, width, frames, extra_refs) // sequence_split)
    blk = block_bytes(config, quantization)
    streamed = config.num_layers - resident_blocks
    stages = block_activation_stages(config, n, profile.ffn_chunk, profile.attn_chunk, attention)
    if sequence_split > 1:
        stages["self_attn"] += ALL_TO_ALL_BYTES * n * config.dim
    if profile.stream_unit is StreamUnit.LAYER and streamed:
        held = layer_stream_held(config, quantization)
        streaming = streamed * unit_bytes(config, quantization)["rest"]
        act = max(b + held[stage] for stage, b in stages.items())
    else:
        streaming = min(profile.prefetch + 1, streamed) * blk
        act = max(stages.values())
    umt5, clip = umt5_bytes(text_encoder), CLIP_PARAMS * 2
    dit_device = nonblock_bytes(config) + resident_blocks * blk + streaming
    rest = BASE_RAM + nonblock_bytes(config)
    if not mappable:  # (a disk-mapped profile then streams from pinned RAM too)
        rest, host = rest + config.num_layers * blk, 0
    elif profile.weight_source is WeightSource.PINNED:
        host = streamed * blk
    else:
        host = 2 * blk if streamed else 0
    frames_ram = DECODED_COPIES * 3 * frames * height * width * 4  # decoded video in fp32 before writing
    ram = rest + host
    # umT5's mapped bf16 file: moved to the GPU block by block, each block's pages given back (formats.FilePages).
    umt5_file = UMT5_LINEAR_PARAMS * 2 // UMT5_LAYERS
    cut = DecodeCut(from_setting(profile.vae_tile)) if decode == "profile" else decode
    vae_dec = vae_decode_bytes(height, width, frames, cut.tiling, cut.by_frame)
    # The encoders run before the first placement: no pinned buffer yet, unless it fills beside CLIP and the VAE
    # encode (`overlap`; counted whole in both: it may be full before CLIP ends), after umT5 has left RAM. Not the
    # mapped profiles' staging ring: it is allocated by the device side, after the encoders.
    early = host if overlap and host_side_overlaps(profile, streamed, mappable) else 0
    phases = {
        "text_encoder": PhaseMemory(umt5 + ENCODER_ACTIVATIONS, int(rest + umt5_file)),
        "clip": PhaseMemory(clip + CLIP_ACTIVATIONS, int(rest + early + clip)),
        # The pipeline encodes before placing the DiT and releases the DiT before decoding: the VAE runs alone.
        # First segment: before the first placement (a later segment's encode holds the host buffer, as its steps do).
        "vae_encode": PhaseMemory(vae_encode_bytes(height, width, frames, vae_tile), int(rest + early)),
        "dit_step": PhaseMemory(dit_device + act, int(ram)),
        "vae_decode": PhaseMemory(vae_dec, int(ram + frames_ram)),
    }
    return {k: PhaseMemory(int(v.vram), int(v.ram), reserved_bytes(k, int(v.vram))) for k, v in phases.items()}


def host_side_overlaps(profile: Profile, streamed_blocks: int, mappable: bool) -> bool:
    """Whether a placement has host work worth a worker thread beside the encoders: reading the streamed blocks into
    a pinned buffer and page-locking it (pinned source; a DiT that cannot be mapped always streams from pinned RAM).
    Blocks mapped from disk are read at each use and resident blocks go straight to the device: nothing to do early."""
    return streamed_blocks > 0 and (profile.weight_source is WeightSource.PINNED or not mappable)


def overlapped(plain: Plan) -> Plan:
    """`plain` with its DiT host side built beside the encoders (`Plan.overlap_placement`) when that is worth doing and
    the RAM plan still holds: the encoder phases then carry the pinned buffer too (`predict`'s `overlap`). Only on
    RAM: VRAM is the same either way (page-locking takes no device memory, the device side still waits for the
    encoders to leave the GPU). A plan whose RAM holds the buffer only after the encoders have gone (a 32 GB
    machine under a pinned profile at short segments) or that does not fit RAM at all places after the encoders,
    as before: RAM the plan did not count is swap, slower than the seconds an overlap saves."""
    if not host_side_overlaps(plain.profile, plain.streamed_blocks, plain.mappable):
        return plain
    p = plain
    phases = predict(p.profile, p.config, p.height, p.width, p.frames, p.resident_blocks, p.quantization,
                     p.text_encoder, p.mappable, p.extra_refs, p.sequence_split, p.vae_decode, overlap=True,
                     vae_tile=p.vae_tile, attention=p.attention)
    candidate = dataclasses.replace(p, phases=phases, overlap_placement=True)
    return candidate if candidate.peak_ram <= candidate.ram_available else plain


def resolve(
    profile: Profile, config: DiTConfig, height: int, width: int, frames: int, vram_budget: int, ram_available: int,
    weights: str = "bf16", reason: str = "", text_encoder: str = "nf4", mappable: bool = True, extra_refs: int = 0,
    outside_allocator: int = 0, sequence_split: int = 1, vae_tile: int | None = None, attention: str | None = None,
) -> Plan:
    """The plan for one profile; `resident_blocks = "auto"` becomes the most blocks that fit the budget. The VAE
    encodes and decodes in `vae_tile` square tiles when given (pixels, 0 = untiled: `--vae-tile`), else it encodes
    by each input's size (`vae_encode_bytes`) and decodes in the quickest cut that fits the budget
    (`decode_cut`). `attention`: the backend asked for (`--attention`; None: the profile's), resolved here: what
    the blocks will run, so that the plan counts its memory."""
    quant = weights
    backend = resolve_attention(attention or profile.attention)
    n = tokens(config, height, width, frames, extra_refs)
    auto = decode_cut(height, width, frames, int(vram_budget), profile.vae_tile)
    forced = vae_tile is not None

    def make(resident: int, why: str, decode: DecodeCut, tile: int | None) -> Plan:
        phases = predict(profile, config, height, width, frames, resident, quant, text_encoder, mappable, extra_refs,
                         sequence_split, decode, vae_tile=tile, attention=backend)
        return overlapped(Plan(profile, config, height, width, frames, quant, text_encoder, resident, n, phases,
                               int(vram_budget), int(ram_available), why, mappable, extra_refs, int(outside_allocator),
                               sequence_split, decode, tile, attention=backend))

    def final(resident: int) -> Plan:
        """The plan with the VAE's tiles as `--vae-tile` says (which the DiT's blocks never depend on)."""
        if forced:
            cut = forced_cut(height, width, frames, int(vram_budget), from_setting(vae_tile))
            return make(resident, reason, cut, vae_tile)
        return make(resident, reason, auto, None)

    if profile.resident_blocks == "all":
        return final(config.num_layers)
    if profile.resident_blocks != "auto":
        return final(min(int(profile.resident_blocks), config.num_layers))
    # Resident blocks only add VRAM and remove RAM, so the count that fits is found by bisection.
    lo, hi = 0, config.num_layers
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if make(mid, reason, auto, None).fits:
            lo = mid
        else:
            hi = mid - 1
    return final(lo)


def plan(
    config: DiTConfig,
    height: int,
    width: int,
    frames: int,
    device: DeviceMemory,
    ram_bytes: int,
    profile: str | Path | Profile | None = None,
    vram_budget: int | None = None,
    weights: str = "bf16",
    text_encoder: str = "nf4",
    mappable: bool = True,
    extra_refs: int = 0,
    sequence_split: int = 1,
    vae_tile: int | None = None,
    attention: str | None = None,
) -> Plan:
    """The fastest profile that fits the GPU `device` (card.py; `vram_budget`: the card's total when smaller,
    `--vram-budget`) and `ram_bytes` of RAM.

    `weights` / `text_encoder`: the quantization of the loaded DiT and of umT5. `mappable`: whether the DiT's
    blocks can be memory-mapped from disk (our quantized folder); if not, profiles that stream from the mapped
    file are left out. With `profile` given the plan uses it even if it does not fit (`plan.fits` says so).
    `extra_refs`: extra references, whose tokens every DiT step carries. `sequence_split`: ranks sharing the
    tokens (the plan is one rank's; the caller divides the host's RAM among its ranks). `vae_tile`: `--vae-tile`
    (pixels, 0 = untiled), else the decode's cut is the quickest that fits (`decode_cut`). `attention`:
    `--attention` (None: each profile's), resolved for this machine."""
    if weights not in QUANTIZATIONS:
        raise UserError(f"unknown DiT quantization {weights!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if text_encoder not in TEXT_ENCODERS:
        raise UserError(f"unknown text encoder quantization {text_encoder!r}; choose one of {', '.join(TEXT_ENCODERS)}")
    budget = device.allocator_budget(vram_budget)
    outside = device.outside_allocator
    if profile is not None:
        chosen = profile if isinstance(profile, Profile) else load_profile(profile)
        return resolve(chosen, config, height, width, frames, budget, ram_bytes, weights, "chosen by --profile",
                       text_encoder, mappable, extra_refs, outside, sequence_split, vae_tile, attention)
    candidates = [p for p in list_profiles() if mappable or p.weight_source is not WeightSource.MMAP]
    for p in candidates:
        # chosen with the decode's tiles that fit: `--vae-tile` applies to the chosen plan (and may not fit)
        result = resolve(p, config, height, width, frames, budget, ram_bytes, weights, "", text_encoder, mappable,
                         extra_refs, outside, sequence_split, attention=attention)
        if result.fits:
            faster = [c.name for c in candidates if c.speed_rank < p.speed_rank]
            why = "fastest profile" if not faster else f"fastest that fits ({', '.join(faster)} need more memory)"
            if vae_tile is not None:
                result = resolve(p, config, height, width, frames, budget, ram_bytes, weights, "", text_encoder,
                                 mappable, extra_refs, outside, sequence_split, vae_tile, attention)
                why += "" if result.fits else "; the VAE in --vae-tile's tiles does not fit"
            return dataclasses.replace(result, reason=why)
    lightest = min(
        (resolve(p, config, height, width, frames, budget, ram_bytes, weights, "", text_encoder, mappable, extra_refs,
                 outside, sequence_split, attention=attention)
         for p in candidates),
        key=lambda r: (r.peak_vram_reserved > budget, r.peak_ram > ram_bytes, r.peak_vram_reserved),
    )
    raise UserError(
        f"no profile fits {height}x{width}x{frames}: the lightest ({lightest.profile.name}) needs "
        f"{lightest.peak_vram_reserved / GB:.1f} GB VRAM and {lightest.peak_ram / GB:.1f} GB RAM, "
        f"have {budget / GB:.1f} GB (the card less {outside / GB:.2f} GB of CUDA context and a "
        f"{device.desktop / GB:.1f} GB desktop reserve) and {ram_bytes / GB:.1f} GB"
    )


def lighter(current: Plan) -> Plan | None:
    """The plan to retry a step that ran out of CUDA memory under: the fastest shipped profile (or the same one
    with fewer resident blocks) predicted to need at most LIGHTER_FACTOR of the current plan's VRAM; None when
    nothing lighter exists. Same DiT quantization and attention backend: a retry changes no numbers."""
    budget = int(current.peak_vram_reserved * LIGHTER_FACTOR)
    for p in list_profiles():
        candidate = resolve(p, current.config, current.height, current.width, current.frames, budget,
                            current.ram_available, current.quantization,
                            f"fallback after out of memory under {current.profile.name}", current.text_encoder,
                            current.mappable, current.extra_refs, current.outside_allocator, current.sequence_split,
                            current.vae_tile, current.attention)
        if candidate.fits:
            return candidate
    return None


def available_ram() -> int:
    """Available RAM in bytes (psutil, else /proc/meminfo)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0
