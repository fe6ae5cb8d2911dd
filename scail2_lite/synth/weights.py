"""Synthetic SCAIL-2 checkpoints in the real Hugging Face layout, the weights and their files.

Weights are deterministic from a seed (each tensor has its own generator, seeded from the seed and its name)
and look trained for quantization purposes: Student-t (4 degrees of freedom) values scaled like a trained init
(std ~ 1/sqrt(fan_in)) with a few input channels several times larger, norms near 1, small biases and
modulation. RAM cost of each output: the SAT `.pt` and the encoder `.pth` files go through `torch.save`, so the
whole file sits in RAM once (fine for tiny; at full scale umT5 takes 11 GB, CLIP 1.3 GB, and a SAT DiT would
take 65 GB, so it is refused); the Wan and ComfyUI safetensors are streamed one tensor at a time (RAM: the
largest tensor, 283 MB fp32 at full scale). Generation runs at about 64 M values/s on 2 busy CPU cores.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import torch

from ..config import WAN_NEGATIVE_PROMPT, PRESETS, DiTConfig
from ..errors import UserError
from ..formats import COMFY_PREFIX, SAT_FILE, wan_shapes

if TYPE_CHECKING:
    from transformers import UMT5Config


SCALES = ("tiny", "full")
DIT_FORMATS = ("sat", "wan", "comfy", "comfy-mxfp8", "comfy-int8_convrot")
UMT5_FILE = "umt5-xxl/models_t5_umt5-xxl-enc-bf16.pth"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14-onlyvisual.pth"
VAE_FILE = "Wan2.1_VAE.pth"
WAN_FILE = "dit.safetensors"
COMFY_FILE = "dit_comfy_fp16.safetensors"
COMFY_QUANT_FILE = "dit_comfy_{}.safetensors"  # Comfy-Org's 8-bit repacks: mxfp8, int8_convrot
SHARD_STEM = "diffusion_pytorch_model"
FULL_SHARD_BYTES = 5 * 2**30
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3",
              torch.int8: "I8", torch.uint8: "U8"}
Progress = Callable[[str], None]


def tiny_config() -> DiTConfig:
    """The tiny DiT preset with a 64-wide CLIP so the synthetic tiny CLIP tower plugs straight in."""
    return DiTConfig(**{**PRESETS["tiny"].to_dict(), "patch_size": PRESETS["tiny"].patch_size, "clip_dim": 64})


def dit_config(scale: str) -> DiTConfig:
    if scale not in SCALES:
        raise UserError(f"unknown scale {scale!r}; choose tiny or full")
    return tiny_config() if scale == "tiny" else PRESETS["scail2-14b"]


# ---------------------------------------------------------------- trained-looking values


def _generator(seed: int, name: str, device: torch.device | str = "cpu") -> torch.Generator:
    """Each tensor gets its own stream, so values do not depend on write order (streamed == in-memory)."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def _student_t(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Student-t with 4 degrees of freedom, unit variance: z / sqrt(chi2_4 / 4) with chi2_4 = 2 (E1 + E2) and
    E1 + E2 = -log(U1 U2) (two uniforms and a log are 3x faster than torch's exponential_)."""
    device = gen.device
    t = torch.randn(shape, generator=gen, device=device)
    u = torch.rand(shape, generator=gen, device=device).neg_().add_(1.0)  # (0, 1]
    u.mul_(torch.rand(shape, generator=gen, device=device).neg_().add_(1.0)).log_().neg_()  # E1 + E2
    return t.mul_(u.mul_(0.5).rsqrt_()).div_(math.sqrt(2.0))


_NORM = re.compile(r"(norm|gamma|img_emb\.proj\.[04]\.weight)")
# T5 folds attention's 1/sqrt(d_kv) into the query init (Mesh TF: q ~ (d_model * d_kv)^-1/2); without it a random
# umT5 has logits of std ~8 and is chaotic (any perturbation, quantization included, changes every output).
_T5_QUERY = re.compile(r"^blocks\.\d+\.attn\.q\.weight$")
_T5_D_KV = 64


def synth_tensor(name: str, shape: tuple[int, ...], seed: int, namespace: str = "dit",
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """One float32 tensor whose statistics depend on its role, read from its name and shape. Values depend on
    (seed, namespace, name) and on the device's generator: CPU values are the checkpoint files' values."""
    gen = _generator(seed, f"{namespace}/{name}", device)
    if name == "log_scale":
        return torch.tensor(math.log(1 / 0.07), device=device)
    t = _student_t(shape, gen)
    vector = math.prod(shape) == (shape[0] if shape else 1)
    if vector and _NORM.search(name) and not name.endswith("bias"):
        return t.mul_(0.1).add_(1.0)  # norm gains near 1
    if "modulation" in name:
        return t.mul_(1.0 / math.sqrt(shape[-1]))  # small, like Wan's randn / sqrt(dim) init
    if vector or not name.endswith("weight"):
        return t.mul_(0.02)  # biases, embeddings, positional tables
    fan_in = math.prod(shape[1:])
    t.mul_(1.0 / math.sqrt(fan_in))
    if namespace == "umt5" and _T5_QUERY.match(name):
        t.mul_(1.0 / math.sqrt(_T5_D_KV))
    n_out = max(1, shape[1] // 128)  # ~1% of input channels carry outliers, as in trained transformers
    cols = torch.randperm(shape[1], generator=gen, device=device)[:n_out]
    t[:, cols] *= 8.0
    return t


def dit_tensors(config: DiTConfig, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Wan-named DiT tensors (float32), one at a time, in the key contract's order."""
    for name, shape in wan_shapes(config).items():
        yield name, synth_tensor(name, shape, seed)


# ---------------------------------------------------------------- Wan -> SAT names (inverse of formats)


def wan_to_sat(sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Wan names -> the official SAT names with `model.diffusion_model.` prefix, fusing q/k/v, k/v, k_img/v_img."""
    p, out = COMFY_PREFIX, {}
    simple = {
        "patch_embedding": "mixins.patch_embed.proj", "patch_embedding_pose": "mixins.patch_embed.proj_pose",
        "patch_embedding_mask": "mixins.patch_embed.proj_mask", "head.head": "mixins.final_layer.linear",
        "text_embedding.0": "text_embedding.0", "text_embedding.2": "text_embedding.2",
        "time_embedding.0": "time_embed.0", "time_embedding.2": "time_embed.2",
        "time_projection.1": "adaln_projection.1",
    } | {f"img_emb.proj.{i}": f"clip_proj.proj.{i}" for i in (0, 1, 3, 4)}
    for wan, sat in simple.items():
        for s in ("weight", "bias"):
            out[f"{p}{sat}.{s}"] = sd[f"{wan}.{s}"]
    out[f"{p}mixins.final_layer.adaLN_modulation"] = sd["head.modulation"]
    for i in range(num_layers):
        b, layer, ada = f"blocks.{i}", f"{p}transformer.layers.{i}", f"{p}mixins.adaln_layer"
        for s in ("weight", "bias"):
            out[f"{layer}.attention.query_key_value.{s}"] = torch.cat([sd[f"{b}.self_attn.{x}.{s}"] for x in "qkv"])
            out[f"{layer}.attention.dense.{s}"] = sd[f"{b}.self_attn.o.{s}"]
            out[f"{layer}.cross_attention.query.{s}"] = sd[f"{b}.cross_attn.q.{s}"]
            out[f"{layer}.cross_attention.key_value.{s}"] = torch.cat([sd[f"{b}.cross_attn.{x}.{s}"] for x in "kv"])
            out[f"{layer}.cross_attention.dense.{s}"] = sd[f"{b}.cross_attn.o.{s}"]
            out[f"{layer}.post_cross_attention_layernorm.{s}"] = sd[f"{b}.norm3.{s}"]
            out[f"{layer}.mlp.dense_h_to_4h.{s}"] = sd[f"{b}.ffn.0.{s}"]
            out[f"{layer}.mlp.dense_4h_to_h.{s}"] = sd[f"{b}.ffn.2.{s}"]
            out[f"{ada}.clip_feature_key_value_list.{i}.{s}"] = torch.cat(
                [sd[f"{b}.cross_attn.k_img.{s}"], sd[f"{b}.cross_attn.v_img.{s}"]]
            )
        out[f"{ada}.adaLN_modulations.{i}"] = sd[f"{b}.modulation"]
        for sat, wan in (("query_layernorm_list", "self_attn.norm_q"), ("key_layernorm_list", "self_attn.norm_k"),
                         ("cross_query_layernorm_list", "cross_attn.norm_q"),
                         ("cross_key_layernorm_list", "cross_attn.norm_k"),
                         ("clip_feature_key_layernorm_list", "cross_attn.norm_k_img")):
            out[f"{ada}.{sat}.{i}.weight"] = sd[f"{b}.{wan}.weight"]
    return out


# ---------------------------------------------------------------- writers


def temporary_path(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp")


def write_safetensors(
    path: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]], tensors: Iterable[torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Stream tensors into a safetensors file: the header comes from `specs`, data is written one tensor at a
    time, so RAM holds only the current tensor (the safetensors library needs them all at once)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, shape, dtype in specs:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = temporary_path(path)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for (name, shape, dtype), t in zip(specs, tensors, strict=True):
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: shape {tuple(t.shape)} does not match its header {shape}")
            f.write(t.to(dtype).contiguous().view(torch.uint8).numpy().data)
    os.replace(tmp, path)


def _torch_save(obj: object, path: Path) -> None:
    tmp = temporary_path(path)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_dit(folder: Path, config: DiTConfig, fmt: str, seed: int, dtype: torch.dtype | None = None,
              shard_bytes: int | None = None, progress: Progress | None = None) -> Path:
    """Write the synthetic DiT in `fmt` (sat, wan, comfy) and return the path `load_dit` takes.

    sat: fp32 pickle `{"module": sd}` at model/1/ plus model/latest (all in RAM once). wan: Wan names, fp32 by
    default, one file or shards of `shard_bytes` with an index (streamed). comfy: `model.diffusion_model.`
    prefix, fp16 by default (streamed). comfy-mxfp8, comfy-int8_convrot: Comfy-Org's 8-bit repacks, block Linears
    in ComfyUI's comfy_quant convention, the rest bf16 (streamed, see `quantize.comfy_quant`).
    """
    folder = Path(folder)
    shapes = wan_shapes(config)
    if fmt == "sat":
        if sum(math.prod(s) for s in shapes.values()) * 4 > 4 * 2**30:
            raise UserError("a synthetic SAT DiT goes through torch.save (whole file in RAM); use --format wan "
                            "for the full scale (streamed, sharded)")
        sd = dict(dit_tensors(config, seed))
        if dtype is not None:
            sd = {k: v.to(dtype) for k, v in sd.items()}
        path = folder / "model" / "1" / SAT_FILE
        _torch_save({"module": wan_to_sat(sd, config.num_layers)}, path)
        (folder / "model" / "latest").write_text("1\n")
        return path
    if fmt in ("comfy-mxfp8", "comfy-int8_convrot"):
        return _write_comfy_quant(folder, config, fmt.removeprefix("comfy-"), seed, progress)
    if fmt not in ("wan", "comfy"):
        raise UserError(f"unknown DiT format {fmt!r}; choose one of {', '.join(DIT_FORMATS)}")
    dtype = dtype or (torch.float16 if fmt == "comfy" else torch.float32)
    prefix = COMFY_PREFIX if fmt == "comfy" else ""
    specs = [(prefix + name, shape, dtype) for name, shape in shapes.items()]
    names = list(shapes)

    def stream(part: list[int]) -> Iterator[torch.Tensor]:
        for i in part:
            if progress:
                progress(names[i])
            yield synth_tensor(names[i], shapes[names[i]], seed)

    groups: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, _) in enumerate(specs):
        nbytes = math.prod(shape) * dtype.itemsize
        if shard_bytes and groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += nbytes
    meta = {"format": "pt", "synthetic": "scail2-lite"}
    if len(groups) == 1:
        path = folder / (COMFY_FILE if fmt == "comfy" else WAN_FILE)
        write_safetensors(path, specs, stream(groups[0]), meta)
        return path
    weight_map, total = {}, 0
    for n, part in enumerate(groups, 1):
        shard = f"{SHARD_STEM}-{n:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(folder / shard, [specs[i] for i in part], stream(part), meta)
        for i in part:
            weight_map[specs[i][0]] = shard
            total += math.prod(specs[i][1]) * dtype.itemsize
    index = folder / f"{SHARD_STEM}.safetensors.index.json"
    tmp = temporary_path(index)
    tmp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    os.replace(tmp, index)
    return index


def _write_comfy_quant(folder: Path, config: DiTConfig, quant: str, seed: int, progress: Progress | None) -> Path:
    """One safetensors file as Comfy-Org's `mxfp8` / `int8_convrot` repacks are laid out: block Linears quantized
    in ComfyUI's comfy_quant convention (weight, weight_scale, comfy_quant per layer, `_quantization_metadata` in
    the header), every other tensor bf16, keys with the `model.diffusion_model.` prefix. Streamed: one layer in RAM."""
    from ..quantize.comfy_quant import (METADATA_KEY, comfy_quant_layout, comfy_quant_tensors, layer_config,
                                        quantization_metadata)
    from ..quantize.schemes import is_quantized_name

    shapes = wan_shapes(config)
    quantized = {name for name in shapes if is_quantized_name(name)}
    specs: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    for name, shape in shapes.items():
        parts = comfy_quant_layout(name, shape, quant) if name in quantized else {name: (shape, torch.bfloat16)}
        specs += [(COMFY_PREFIX + key, part_shape, dtype) for key, (part_shape, dtype) in parts.items()]
    layers = {COMFY_PREFIX + name.removesuffix(".weight"): layer_config(quant, shapes[name][1]) for name in quantized}

    def stream() -> Iterator[torch.Tensor]:
        for name, shape in shapes.items():
            if progress:
                progress(name)
            t = synth_tensor(name, shape, seed)
            yield from comfy_quant_tensors(name, t, quant).values() if name in quantized else (t,)

    path = folder / COMFY_QUANT_FILE.format(quant)
    write_safetensors(path, specs, stream(), {"format": "pt", "synthetic": "scail2-lite",
                                              METADATA_KEY: quantization_metadata(layers)})
    return path


# ---------------------------------------------------------------- encoders and VAE in their original naming


def _synth_from_module(build: Callable[[], torch.nn.Module], to_original: Callable[[dict], dict], seed: int,
                       namespace: str, dtype: torch.dtype,
                       device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Shapes from the transformers/diffusers module built on the meta device, names from the inverse converter,
    values from `synth_tensor` (so no random init is ever materialised)."""
    with torch.device("meta"):
        module = build()
    shapes = {k: tuple(v.shape) for k, v in to_original(module.state_dict()).items()}
    return {k: synth_tensor(k, s, seed, namespace, device).to(dtype) for k, s in shapes.items()}


def umt5_tensors(config: UMT5Config, seed: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A Wan-named bf16 umT5 state dict of any geometry: the file `write_encoders` writes, and the encoders that
    tests and benchmarks build without a file (drawn on a GPU: the same recipe, not the same values)."""
    from transformers import UMT5EncoderModel

    from ..encoders import umt5_hf_to_wan

    return _synth_from_module(lambda: UMT5EncoderModel(config), umt5_hf_to_wan, seed, "umt5", torch.bfloat16, device)


def write_encoders(folder: Path, scale: str, seed: int) -> None:
    """umT5 (bf16), CLIP visual tower + head + log_scale (fp16) and the Wan VAE (fp32), as the real files store them."""
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionModel

    from ..encoders import clip_config, clip_hf_to_openclip, umt5_config
    from ..vae import vae_config, vae_diffusers_to_wan

    umt5 = umt5_tensors(umt5_config(scale), seed)
    _torch_save(umt5, folder / UMT5_FILE)
    del umt5
    cfg = clip_config(scale)
    clip = _synth_from_module(lambda: CLIPVisionModel(cfg), clip_hf_to_openclip, seed, "clip", torch.float16)
    head = (cfg.hidden_size, 1024 if scale == "full" else 32)  # open-clip's projection, unused by SCAIL-2
    clip["visual.head"] = synth_tensor("visual.head", head, seed, "clip").half()
    clip["log_scale"] = synth_tensor("log_scale", (), seed, "clip")
    _torch_save(clip, folder / CLIP_FILE)
    vae = _synth_from_module(lambda: AutoencoderKLWan(**vae_config(scale)), vae_diffusers_to_wan, seed, "vae",
                             torch.float32)
    _torch_save(vae, folder / VAE_FILE)


# ---------------------------------------------------------------- tokenizer

_CORPUS = [
    "A young woman dances in a sunlit studio, her arms sweeping above her head.",
    "Two friends perform a synchronized hip hop routine on a city street at night.",
    "A man in a red jacket walks toward the camera and waves with his right hand.",
    "An anime girl with long blue hair spins slowly, her skirt flowing around her.",
    "A child jumps up and down on a green lawn, laughing, under a clear blue sky.",
    "A dancer in a white dress performs ballet turns on a wooden stage.",
    "The character raises both hands, steps to the left, then bows to the audience.",
    "A knight in silver armor swings a sword while the camera stays still.",
    "A cartoon cat stands on two legs and claps its paws to the rhythm.",
    "Close-up of a woman smiling and nodding while she talks, soft indoor light.",
    "High quality, detailed, realistic lighting, smooth natural motion, sharp focus.",
    "The person on the left dances, the person on the right claps and cheers.",
    "A robot walks across a futuristic hallway with glowing blue lights.",
    "An old man practices tai chi in a quiet park in the early morning.",
    "A figure skater glides across the ice and lifts one leg behind her.",
    "Character animation, full body, front view, plain background, 16 frames per second.",
    WAN_NEGATIVE_PROMPT,
    "bright colors, overexposed, static, blurred details, subtitles, worst quality, low quality, jpeg artifacts",
    "ugly, deformed, extra fingers, poorly drawn hands, poorly drawn face, fused fingers, messy background",
]


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A small umT5-style Unigram tokenizer (pad 0, eos 1, unk 2, appends </s>) that AutoTokenizer loads offline."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    special = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
    config = {"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 0, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))



# ---------------------------------------------------------------- LoRAs

LORA_DIR = "loras"
LORA_FILES = {"kohya": "kohya_lightx2v.safetensors", "peft": "peft.safetensors",
              "diffusers": "diffusers.safetensors", "comfy": "comfy.safetensors",
              "sat": "bias-aware-dpo-lora.pt", "wan": "scail2_dpo_converted.safetensors",
              "lightx2v": "lightx2v_I2V_14B_480p_cfg_step_distill.safetensors"}


def write_loras(folder: Path, config: DiTConfig, seed: int, rank: int = 4) -> dict[str, Path]:
    """One small LoRA per layout (LORA_FILES) for the DiT of `config`. "sat" is SCAIL-2's own DPO LoRA as the SAT
    trainer saves it (a torch pickle: the state dict under "module", beside the iteration and a NumPy RNG state),
    "wan" the same LoRA through upstream `convert_lora.py` (same seed, same deltas); "lightx2v" the distill LoRA
    as people have it (full patches and a 36-channel patch-embedding entry); the kohya one also carries
    LightX2V-style full deltas. Same seed, same low-rank deltas in kohya, peft, diffusers and comfy."""
    import numpy as np
    from safetensors.torch import save_file

    from ..lora import SAT_LORA_LINEARS, make_lightx2v_lora, make_synthetic_lora

    shapes = wan_shapes(config)
    paths = {}
    for fmt, name in LORA_FILES.items():
        if fmt == "lightx2v":
            state = make_lightx2v_lora(shapes, rank=rank, seed=seed)
        else:
            targets = SAT_LORA_LINEARS if fmt in ("sat", "wan") else None
            state = make_synthetic_lora(shapes, fmt, rank=rank, seed=seed, targets=targets,
                                        include_diffs=fmt == "kohya")
        if fmt == "sat":
            rng = np.random.RandomState(seed).get_state()  # SAT checkpoints carry one: needs NumPy's globals
            _torch_save({"module": state, "iteration": 1, "np_rng_state": rng}, folder / name)
        else:
            tmp = temporary_path(folder / name)
            save_file(state, str(tmp), metadata={"format": "pt", "synthetic": "scail2-lite"})
            os.replace(tmp, folder / name)
        paths[fmt] = folder / name
    return paths
