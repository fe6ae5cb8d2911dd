"""umT5-XXL text encoder and CLIP ViT-H/14 image encoder from transformers, loaded from the files SCAIL-2 ships.

SCAIL-2 ships Wan's own checkpoints (Wan naming for umT5, open-clip naming for CLIP). Both architectures exist in
transformers (`UMT5EncoderModel`, `CLIPVisionModel`), so only the key converters and Wan's preprocessing rules
are written here. Configs are inferred from tensor shapes, so the real files and the tiny synthetic ones load
through one code path.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

from .errors import UserError
from .formats import FilePages
from .formats.assign import assign_state_dict
from .formats.pickles import load_pth
from .quantize.schemes import QuantizeError
from .quantize.store import place
from .quantize.text_encoder import (
    block_state,
    load_block,
    move_in_pieces,
    quantize_block,
    read_stored,
    read_stored_index,
    write_stored,
)

UMT5_DIR = "umt5-xxl"  # the umT5 folder of a SCAIL-2 download: weights + tokenizer files
UMT5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14-onlyvisual.pth"
TEXT_LEN = 512
# Vocabulary of the tiny synthetic umT5 (the synthetic tokenizer must have at most this many ids).
TINY_VOCAB = 4096
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 224

# ---------------------------------------------------------------------------------------------- umT5

_UMT5_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_UMT5_BLOCK_INV = {v: k for k, v in _UMT5_BLOCK.items()}


def umt5_config(scale: str) -> UMT5Config:
    """umT5-XXL encoder ("full") or the tiny test geometry whose d_model matches the tiny DiT's text_dim (48)."""
    if scale == "full":
        dims = dict(vocab_size=256384, d_model=4096, d_ff=10240, num_heads=64, d_kv=64, num_layers=24)
    elif scale == "tiny":
        dims = dict(vocab_size=TINY_VOCAB, d_model=48, d_ff=96, num_heads=4, d_kv=12, num_layers=2)
    else:
        raise UserError(f"unknown umT5 scale {scale!r}; choose full or tiny")
    return _umt5(**dims)


def _umt5(**dims: int) -> UMT5Config:
    return UMT5Config(
        **dims,
        num_decoder_layers=0,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",  # gelu_new = GELU with tanh, as Wan's T5 FFN gate
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        is_encoder_decoder=False,
    )


def umt5_config_from_state_dict(sd: Mapping[str, Tensor]) -> UMT5Config:
    """Geometry from a Wan-named umT5 state dict's shapes (max distance 128 is not visible in shapes: Wan's value)."""
    try:
        vocab, d_model = sd["token_embedding.weight"].shape
        buckets, heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
        inner = sd["blocks.0.attn.q.weight"].shape[0]
        d_ff = sd["blocks.0.ffn.fc1.weight"].shape[0]
    except KeyError as exc:
        raise UserError(f"not a Wan umT5 encoder state dict (no {exc.args[0]})") from None
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    cfg = _umt5(vocab_size=vocab, d_model=d_model, d_ff=d_ff, num_heads=heads, d_kv=inner // heads, num_layers=layers)
    cfg.relative_attention_num_buckets = buckets
    return cfg


def umt5_wan_to_hf(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Wan T5 encoder names -> `UMT5EncoderModel` names. Tensors are shared, not copied."""
    out: dict[str, Tensor] = {}
    for key, t in sd.items():
        if key == "token_embedding.weight":
            out["shared.weight"] = t
            out["encoder.embed_tokens.weight"] = t  # tied to `shared` in transformers
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = t
        elif (m := re.fullmatch(r"blocks\.(\d+)\.(.+)", key)) and m.group(2) in _UMT5_BLOCK:
            out[f"encoder.block.{m.group(1)}.{_UMT5_BLOCK[m.group(2)]}"] = t
        else:
            raise UserError(f"unexpected key in umT5 checkpoint: {key}")
    return out


def umt5_hf_to_wan(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of `umt5_wan_to_hf` (writes Wan-format checkpoints, e.g. the synthetic ones)."""
    out: dict[str, Tensor] = {}
    for key, t in sd.items():
        if key == "shared.weight":
            out["token_embedding.weight"] = t
        elif key == "encoder.embed_tokens.weight":
            continue  # tied copy of shared.weight
        elif key == "encoder.final_layer_norm.weight":
            out["norm.weight"] = t
        elif (m := re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", key)) and m.group(2) in _UMT5_BLOCK_INV:
            out[f"blocks.{m.group(1)}.{_UMT5_BLOCK_INV[m.group(2)]}"] = t
        else:
            raise UserError(f"unexpected key in UMT5EncoderModel state dict: {key}")
    return out


def build_umt5(sd_wan: Mapping[str, Tensor]) -> UMT5EncoderModel:
    """A `UMT5EncoderModel` built on the meta device and filled with the given tensors in place."""
    config = umt5_config_from_state_dict(sd_wan)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    assign_state_dict(model, umt5_wan_to_hf(sd_wan), "umT5")
    return model.eval()


def load_text_encoder(
    folder: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    quantize: Callable[[nn.Module], None] | None = None,
    stream: bool = False,
) -> tuple[object, nn.Module]:
    """(tokenizer, encoder) from a `umt5-xxl/` folder: Wan weights file + tokenizer files, no hub access; or, in a
    quantized folder made with `--text-encoder nf4|int8`, the blocks stored already quantized
    (`stored_text_encoder`), which load as they are (`quantize` and `stream` do not apply to them).

    `stream` (bf16 only): the encoder blocks stay in RAM and each one's weights visit `device` only during its
    own forward (`stream_blocks`): lossless at about one block of GPU memory instead of the whole 9.8 GB.

    `quantize` is the hook for 4- and 8-bit weights (`scail2_lite.quantize.text_encoder.quantize_block`): it
    quantizes one encoder block in place once that block is on `device` in bf16, so the full-precision encoder
    never reaches the GPU whole. The model moves block by block, giving the file's pages back as it goes
    (`FilePages`).
    """
    folder = Path(folder)
    stored = stored_text_encoder(folder)
    weights = folder / UMT5_FILE
    if stored is None and not weights.is_file():
        raise UserError(f"umT5 weights missing: expected {weights}")
    if stored is not None and quantize is not None:
        raise UserError(f"{folder} stores umT5 already quantized ({stored}); it is not quantized again")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the umT5 tokenizer from {folder}: {str(exc).splitlines()[0]}") from None
    if stored is not None:
        return tokenizer, _load_stored(folder, device)
    model: nn.Module = build_umt5(load_pth(weights))
    pages = FilePages([weights])

    # The 256k x 4096 token embedding (2.1 GB) stays in RAM: a lookup of a few hundred rows costs nothing on the
    # CPU, and `encode_text` hands the encoder embeddings instead of ids. It is set aside while the rest moves.
    embedding = model.get_input_embeddings()
    model.set_input_embeddings(nn.Embedding(1, 1))  # placeholder while the rest moves
    if stream and quantize is None and torch.device(device).type != "cpu":
        model = stream_blocks(model.to(dtype=dtype), device)
    else:
        after_each = pages.drop if torch.device(device).type != "cpu" else lambda: None
        model = move_in_pieces(model.to(dtype=torch.bfloat16 if quantize else dtype), device, after_each, quantize)
    model.set_input_embeddings(embedding.to(dtype=next(model.encoder.final_layer_norm.parameters()).dtype))
    return tokenizer, model


def stored_text_encoder(folder: str | Path) -> str | None:
    """The scheme a umT5 folder stores its encoder quantized in (nf4, int8), None for the bf16 download file."""
    try:
        index = read_stored_index(folder)
    except QuantizeError as e:
        raise UserError(str(e)) from None
    return None if index is None else index["scheme"]


def _load_stored(folder: Path, device: str | torch.device) -> nn.Module:
    """The encoder from its stored quantized blocks: built on the meta device, each block read onto `device`
    and rebuilt from its codes (`quantize.text_encoder.load_block`), the token embedding kept in RAM."""
    index = read_stored_index(folder)
    dims = dict(index["config"])
    buckets = dims.pop("relative_attention_num_buckets")
    config = _umt5(**dims)
    config.relative_attention_num_buckets = buckets
    with torch.device("meta"):
        model = UMT5EncoderModel(config).to(torch.bfloat16).eval()
    try:
        for block, name in zip(model.encoder.block, index["blocks"]):
            load_block(block, read_stored(folder, name, device), index["scheme"], device)
        rest = read_stored(folder, index["rest"])
    except QuantizeError as e:
        raise UserError(str(e)) from None
    norm = model.encoder.final_layer_norm
    norm.weight = nn.Parameter(rest["encoder.final_layer_norm.weight"].to(device), requires_grad=False)
    model.set_input_embeddings(nn.Embedding.from_pretrained(rest["shared.weight"], freeze=True))
    return model


def write_quantized_text_encoder(src: str | Path, dest: str | Path, scheme: str,
                                 device: str | torch.device = "cpu",
                                 progress: Callable[[int, int], None] | None = None) -> dict:
    """Store the bf16 umT5 of the folder `src` quantized to `scheme` (nf4, int8) in the folder `dest`, with its
    tokenizer files: each block is moved to `device`, quantized exactly as the loader's hook does
    (`quantize_block`: on the GPU the GPU load path's arithmetic, on the CPU the CPU's) and written before the
    next is read, so RAM holds about one block beyond the mapped file. `progress`: as `write_stored`'s.
    Returns the stored index (`quantize.text_encoder.write_stored`)."""
    src, dest = Path(src), Path(dest)
    weights = src / UMT5_FILE
    if not weights.is_file():
        raise UserError(f"umT5 weights missing: expected {weights}")
    dest.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.name != UMT5_FILE:
            place(path, dest / path.name)
    model = build_umt5(load_pth(weights))
    pages = FilePages([weights])
    c = model.config
    dims = dict(vocab_size=c.vocab_size, d_model=c.d_model, d_ff=c.d_ff, num_heads=c.num_heads, d_kv=c.d_kv,
                num_layers=c.num_layers, relative_attention_num_buckets=c.relative_attention_num_buckets)

    def blocks():
        for i in range(len(model.encoder.block)):
            block = model.encoder.block[i].to(device=device, dtype=torch.bfloat16)
            quantize_block(block, scheme)
            yield block_state(block)
            model.encoder.block[i] = nn.Module()  # let the quantized block and its bf16 pages go
            pages.drop()

    rest = {"shared.weight": model.shared.weight.to(torch.bfloat16),
            "encoder.final_layer_norm.weight": model.encoder.final_layer_norm.weight.to(torch.bfloat16)}
    try:
        return write_stored(dest, scheme, dims, blocks(), rest, progress)
    except QuantizeError as e:
        raise UserError(str(e)) from None


def stream_blocks(model: nn.Module, device: str | torch.device) -> nn.Module:
    """Keep `model`'s encoder blocks in RAM and give each block's parameters a `device` copy only for the length of
    its own forward (a pre-hook copies them in, a hook points them back at the RAM tensors, and the device copies
    are freed). Everything else moves to `device`. The arithmetic is the resident model's, on the same device, so
    the output is bit-identical; GPU memory holds one block (~0.45 GB for umT5-XXL) plus activations. The token
    embedding is the caller's (`encode_text` looks it up where it lives)."""
    device = torch.device(device)
    blocks = model.encoder.block
    model.encoder.block = nn.ModuleList()  # moved without the blocks, put back below
    model.to(device)
    model.encoder.block = blocks
    for block in blocks:
        host = {name: p.data for name, p in block.named_parameters()}

        def bring(module: nn.Module, args, host=host) -> None:
            for name, p in module.named_parameters():
                p.data = host[name].to(device, non_blocking=True)

        def send_back(module: nn.Module, args, output, host=host) -> None:
            for name, p in module.named_parameters():
                p.data = host[name]

        block.register_forward_pre_hook(bring)
        block.register_forward_hook(send_back)
    return model


def _clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: unescape HTML entities (twice, as Wan does) and collapse whitespace."""
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def encode_text(tokenizer, model: nn.Module, prompts: list[str], text_len: int = TEXT_LEN) -> list[Tensor]:
    """Per prompt, the encoder states of its real tokens (L_i, d_model): padded to `text_len`, masked, trimmed."""
    batch = tokenizer(
        [_clean_prompt(p) for p in prompts],
        padding="max_length",
        truncation=True,
        max_length=text_len,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    device = model.encoder.final_layer_norm.weight.device
    embedding = model.get_input_embeddings()
    embeds = embedding(batch["input_ids"].to(embedding.weight.device)).to(device)
    mask = batch["attention_mask"].to(device)
    states = model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    lengths = mask.sum(dim=1).tolist()
    return [s[:n] for s, n in zip(states, lengths)]


# ---------------------------------------------------------------------------------------------- CLIP

_CLIP_BLOCK = {
    "attn.proj": "self_attn.out_proj",
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "mlp.0": "mlp.fc1",
    "mlp.2": "mlp.fc2",
}
_CLIP_BLOCK_INV = {v: k for k, v in _CLIP_BLOCK.items()}
# In the file but not part of the vision tower SCAIL-2 uses (projection head, contrastive temperature).
_CLIP_UNUSED = ("visual.head", "log_scale")


def clip_config(scale: str) -> CLIPVisionConfig:
    """open-clip ViT-H/14 visual tower ("full") or a tiny one that still yields 257 tokens at 224 px."""
    if scale == "full":
        return _clip(hidden=1280, layers=32, heads=16, mlp=5120, image=CLIP_SIZE, patch=14)
    if scale == "tiny":
        return _clip(hidden=64, layers=2, heads=4, mlp=256, image=CLIP_SIZE, patch=14)
    raise UserError(f"unknown CLIP scale {scale!r}; choose full or tiny")


def _clip(hidden: int, layers: int, heads: int, mlp: int, image: int, patch: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image,
        patch_size=patch,
        hidden_act="gelu",  # open-clip ViT-H uses exact (erf) GELU, not CLIP's quick_gelu
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
    )


def _clip_heads(width: int) -> int:
    """Head count is not visible in shapes: ViT-H/14 uses head_dim 80; the tiny test towers use head_dim 16."""
    return width // 80 if width % 80 == 0 else max(1, width // 16)


def clip_config_from_state_dict(sd: Mapping[str, Tensor]) -> CLIPVisionConfig:
    """Geometry from an open-clip (`visual.*`) state dict's shapes."""
    try:
        width = sd["visual.pre_norm.weight"].shape[0]
        patch = sd["visual.patch_embedding.weight"].shape[-1]
        positions = sd["visual.pos_embedding"].shape[-2]
        mlp = sd["visual.transformer.0.mlp.0.weight"].shape[0]
    except KeyError as exc:
        raise UserError(f"not an open-clip visual state dict (no {exc.args[0]})") from None
    side = math.isqrt(positions - 1)
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("visual.transformer."))
    return _clip(hidden=width, layers=layers, heads=_clip_heads(width), mlp=mlp, image=side * patch, patch=patch)


def clip_openclip_to_hf(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """open-clip visual names -> `CLIPVisionModel` names; text tower, head and log_scale are dropped.

    `post_norm` is kept as `post_layernorm` so the HF model loads strictly; `hidden_states[-2]` never uses it.
    """
    out: dict[str, Tensor] = {}
    for key, t in sd.items():
        if not key.startswith("visual.") or key in _CLIP_UNUSED:
            continue
        name = key[len("visual.") :]
        if name == "cls_embedding":
            out["embeddings.class_embedding"] = t.reshape(-1)
        elif name == "pos_embedding":
            out["embeddings.position_embedding.weight"] = t.reshape(-1, t.shape[-1])
        elif name == "patch_embedding.weight":
            out["embeddings.patch_embedding.weight"] = t
        elif m := re.fullmatch(r"(pre|post)_norm\.(weight|bias)", name):
            out[f"{'pre_layrnorm' if m.group(1) == 'pre' else 'post_layernorm'}.{m.group(2)}"] = t
        elif m := re.fullmatch(r"transformer\.(\d+)\.attn\.to_qkv\.(weight|bias)", name):
            for part, chunk in zip("qkv", t.chunk(3, dim=0)):
                out[f"encoder.layers.{m.group(1)}.self_attn.{part}_proj.{m.group(2)}"] = chunk
        elif (m := re.fullmatch(r"transformer\.(\d+)\.(.+)\.(weight|bias)", name)) and m.group(2) in _CLIP_BLOCK:
            out[f"encoder.layers.{m.group(1)}.{_CLIP_BLOCK[m.group(2)]}.{m.group(3)}"] = t
        else:
            raise UserError(f"unexpected key in CLIP checkpoint: {key}")
    return out


def clip_hf_to_openclip(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of `clip_openclip_to_hf` (open-clip shapes restored, q/k/v fused into to_qkv).

    `visual.head` and `log_scale` are not part of the vision tower and are not produced here.
    """
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, t in sd.items():
        name = key.removeprefix("vision_model.")  # transformers 4 wrapped the tower
        if name == "embeddings.class_embedding":
            out["visual.cls_embedding"] = t.reshape(1, 1, -1)
        elif name == "embeddings.position_embedding.weight":
            out["visual.pos_embedding"] = t.unsqueeze(0)
        elif name == "embeddings.patch_embedding.weight":
            out["visual.patch_embedding.weight"] = t
        elif name == "embeddings.position_ids":
            continue
        elif m := re.fullmatch(r"(pre_layrnorm|post_layernorm)\.(weight|bias)", name):
            out[f"visual.{'pre' if m.group(1) == 'pre_layrnorm' else 'post'}_norm.{m.group(2)}"] = t
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", name):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = t
        elif (m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)) and (
            m.group(2) in _CLIP_BLOCK_INV
        ):
            out[f"visual.transformer.{m.group(1)}.{_CLIP_BLOCK_INV[m.group(2)]}.{m.group(3)}"] = t
        else:
            raise UserError(f"unexpected key in CLIPVisionModel state dict: {key}")
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise UserError(f"CLIP layer {layer}: incomplete q/k/v {kind}")
        out[f"visual.transformer.{layer}.attn.to_qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out


def build_clip(sd_openclip: Mapping[str, Tensor]) -> CLIPVisionModel:
    """A `CLIPVisionModel` built on the meta device and filled with the given open-clip tensors in place."""
    config = clip_config_from_state_dict(sd_openclip)
    with torch.device("meta"):
        model = CLIPVisionModel(config)
    hf = clip_openclip_to_hf(sd_openclip)
    embeddings = model.embeddings
    # position_ids is a non-persistent buffer: not in any file, so it is rebuilt here rather than left on meta.
    embeddings.register_buffer(
        "position_ids", torch.arange(embeddings.num_positions).unsqueeze(0), persistent=False
    )
    assign_state_dict(model, hf, "CLIP")
    return model.eval()


def load_clip(
    path: str | Path, dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu"
) -> CLIPVisionModel:
    """The CLIP vision tower from Wan's open-clip file, in `dtype` (upstream runs it in fp16)."""
    model = build_clip(load_pth(path))
    return model.to(device=device, dtype=dtype)


def clip_preprocess(image: Tensor) -> Tensor:
    """Wan's CLIP input: bicubic squash to 224x224 (no crop, no antialias) of a [-1,1] image, then CLIP mean/std."""
    if image.ndim != 4 or image.shape[1] != 3:
        raise UserError(f"CLIP expects images shaped (B, 3, H, W); got {tuple(image.shape)}")
    # float64: torch's float32 bicubic kernel is off by up to 1e-5 from exact; the input is one small image.
    x = F.interpolate(image.double(), size=(CLIP_SIZE, CLIP_SIZE), mode="bicubic", align_corners=False)
    x = x.mul(0.5).add(0.5).float()
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def encode_image(model: CLIPVisionModel, image: Tensor) -> Tensor:
    """(B, 257, hidden): states after the next-to-last block, no post-norm (`hidden_states[-2]`), as Wan uses.

    `image` is in [-1, 1], any size; it is preprocessed here.
    """
    p = next(model.parameters())
    pixels = clip_preprocess(image.to(p.device)).to(p.dtype)
    return model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
