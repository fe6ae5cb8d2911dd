"""`scail2-lite quantize` as a function: a checkpoint of any format -> a self-contained quantized folder.

The runtime side of quantization: it reads with `formats`, merges LoRAs with `lora`, streams into
`quantize.store.write_quantized`, copies the other components under their download names (so `ModelFolder` finds
them), then measures the result with the real loaders (DiT forward and umT5 embeddings vs bf16).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from . import formats
from .encoders import CLIP_FILE, UMT5_DIR
from .errors import UserError
from .loader import comfy_8bit_scheme
from .lora import LoRA, LoraFile, as_lora_file, resolve_loras
from .quantize.comfy import export_comfy, from_comfy_fp8
from .quantize.comfy_quant import from_comfy_quant
from .quantize.linear import check_compute
from .quantize.report import FidelityReport, compare
from .quantize.schemes import QuantizeError, check_scheme
from .quantize.store import PreQuantized, fingerprint, is_quantized_folder, write_quantized
from .quantize.text_encoder import quantize_block, text_encoder_backend
from .vae import VAE_FILE

COMPONENTS = (VAE_FILE, CLIP_FILE, UMT5_DIR)
# Reference copies for the checks must fit beside the quantized model: skip them above this share of free memory.
_CHECK_MEMORY_SHARE = 1 / 3.5


def quantize_checkpoint(
    src: str | Path,
    out: str | Path,
    *,
    dit: str = "fp8",
    text_encoder: str = "nf4",
    compute: str | None = None,
    loras: Sequence[LoraFile | tuple[str | Path, float]] = (),
    export: str | None = None,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = print,
) -> FidelityReport:
    """Quantize `src`'s DiT to `dit` (fp8, int8, bf16), record the umT5 scheme applied at load, merge `loras`
    (`LoraFile`s or (path, strength) pairs) in fp32 first, and return the fidelity report (also saved as `fidelity.json` in `out`). `progress(done, total)`
    counts source bytes. Bad input raises UserError before anything is written."""
    src, out = Path(src), Path(out)
    try:
        check_scheme(dit)
        text_encoder_backend(text_encoder, "cpu")
        if compute is not None and dit != "bf16":
            check_compute(compute, dit)
        if export not in (None, "comfy") or (export == "comfy" and dit != "fp8"):
            raise UserError("--export comfy is the only export and needs --dit fp8")
        if out.exists() and not force:
            raise UserError(f"output {out} already exists; pass --force to replace it")
        fmt = formats.detect_format(src)
        if fmt == "quantized" or is_quantized_folder(src):
            raise UserError(f"{src} is already quantized; quantize from the original checkpoint")
        dit_file = formats.find_dit(src)
        shapes = formats.read_shapes(src)
        config, _ = formats.read_config(src, shapes)
        formats.check_keys(shapes, config, src)
        specs = [as_lora_file(x) for x in loras]
        mapped = _load_loras(specs, config, log)
        root = src if src.is_dir() else dit_file.parent
        parts = {name: root / name for name in COMPONENTS if (root / name).exists()}
        if len(parts) < len(COMPONENTS):
            log(f"note: {root} lacks {len(COMPONENTS) - len(parts)} of {', '.join(COMPONENTS)}; the output will hold "
                "only what was found")
        sources = _dit_files(dit_file)
        total = sum(p.stat().st_size for p in sources)
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done = min(total, done + n)  # merged LoRA tensors are fp32: more bytes than the source held
            if progress is not None:
                progress(done, total)

        tensors: Iterable = formats.iter_tensors(src)
        if fmt == "comfy-fp8_scaled":
            tensors = from_comfy_fp8(tensors)
        elif comfy_8bit_scheme(fmt):
            tensors = from_comfy_quant(tensors, dit, measure=True)
        if mapped:
            tensors = _merged(tensors, mapped)
        result = write_quantized(
            tensors, out, dit, config=config.to_dict(), sources=sources, expected_shapes=formats.wan_shapes(config),
            copy_files=parts, force=force, progress=advance,
            text_encoder={"scheme": text_encoder, "file": UMT5_DIR, "stored": "bf16",
                          "quantized_at_load": text_encoder != "bf16"},
            loras=[_lora_record(spec, lo) for spec, (lo, _) in zip(specs, mapped)],
        )
        if progress is not None:
            progress(total, total)
        report = FidelityReport(dit, result.weight_errors, result.kept_if_quantized, text_encoder_scheme=text_encoder)
        try:  # the folder is complete and valid by now: a check that cannot run is noted, not fatal
            if comfy_8bit_scheme(fmt) is None:  # against the bf16 source: an 8-bit source has none
                report.dit_forward = _dit_check(src, out, config, compute, mapped, log)
            if text_encoder != "bf16" and UMT5_DIR in parts:
                report.text_encoder_backend, report.text_encoder = _text_encoder_check(out / UMT5_DIR, text_encoder,
                                                                                       log)
        except torch.cuda.OutOfMemoryError:
            log("note: fidelity check skipped (CUDA out of memory)")
        if export == "comfy":
            comfy_path = out.parent / f"{out.name}.comfy_fp8_scaled.safetensors"
            report.comfy_export_errors = export_comfy(out, comfy_path)
            log(f"wrote {comfy_path}")
    except QuantizeError as e:
        raise UserError(str(e)) from None
    report.save(out)
    return report


def _dit_files(dit_file: Path) -> list[Path]:
    """The files holding the DiT tensors (the shards of an index), for the progress total and fingerprints."""
    return formats.index_files(dit_file) if dit_file.name.endswith(".index.json") else [dit_file]


def _load_loras(specs: Sequence[LoraFile], config, log: Callable[[str], None]) -> list[tuple[LoRA, float]]:
    """(LoRA, strength) pairs mapped onto the DiT of `config`: shape mismatches fail here, before anything is
    written; each LoRA's match report is logged."""
    shapes = {k: torch.Size(v) for k, v in formats.wan_shapes(config).items()}
    loras = resolve_loras(specs, shapes)
    for lo, strength in loras:
        log(lo.report(strength))
    return loras


def _merged(tensors: Iterable, loras: list) -> Iterator:
    """The tensor stream with the LoRA deltas added in fp32; merged tensors stay fp32 so the quantizer rounds once
    (8-bit ComfyUI sources are dequantized first)."""
    from .lora import lora_index, merge_tensor

    index = lora_index(loras)
    for name, item in tensors:
        if name in index:
            if isinstance(item, PreQuantized):
                item = item.dequantized()
            item = merge_tensor(name, item.float(), index)
        yield name, item


def _lora_record(spec: LoraFile, lo) -> dict:
    """The manifest's entry for a LoRA merged at quantization time."""
    return {**fingerprint(spec.path), "strength": spec.strength, "full_patches": spec.full_patches,
            "matched_keys": lo.matched_keys, "updates": len(lo.updates), "unmatched": lo.unmatched,
            "skipped": lo.skipped, "merged": "fp32, before quantization"}


def _check_device(nbytes: int, log: Callable[[str], None], what: str) -> str | None:
    """Where a reference check of `nbytes` of weights runs (the GPU if it has room, else the CPU for small
    models); None = skip it, with a note (the 14B model's checks are GPU benchmarks, see RESULTS.md)."""
    if torch.cuda.is_available() and nbytes < torch.cuda.mem_get_info()[0] * _CHECK_MEMORY_SHARE:
        return "cuda"
    if nbytes < 2e9:
        return "cpu"
    log(f"note: {what} check skipped (too large for this machine)")
    return None


@torch.no_grad()
def _dit_check(src: Path, out: Path, config, compute: str | None, loras: Sequence[tuple[LoRA, float]],
               log: Callable[[str], None]) -> dict | None:
    """One DiT forward on random conditioning: the quantized folder vs the bf16 source (same LoRAs merged)."""
    from .loader import load_dit
    from .model import Conditions

    params = sum(torch.Size(s).numel() for s in formats.wan_shapes(config).values())
    device = _check_device(params * 3, log, "DiT forward")
    if device is None:
        return None
    g = torch.Generator().manual_seed(0)
    t_lat, h, w = 2, 8, 8

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    x = rand(1, 16, t_lat, h, w)
    cond = Conditions(rand(1, 16, t_lat, h // 2, w // 2), rand(1, 28, t_lat, h // 2, w // 2), rand(1, 16, 1, h, w),
                      rand(1, 28, 1 + t_lat, h, w))
    inputs = (x, torch.tensor([700.0], device=device), rand(1, 16, config.text_dim), rand(1, 257, config.clip_dim),
              cond)
    reference = load_dit(src, dtype=torch.bfloat16, device=device, loras=loras)(*inputs)
    quantized = load_dit(out, device=device, compute=compute)(*inputs)
    return compare(reference, quantized)


@torch.no_grad()
def _text_encoder_check(folder: Path, scheme: str, log: Callable[[str], None]) -> tuple[str, dict] | tuple[None, None]:
    """umT5 embeddings of a few prompts, `scheme` vs bf16, as the pipeline loads them."""
    from .encoders import encode_text, load_text_encoder

    weights = sum(p.stat().st_size for p in folder.glob("*.pth"))
    device = _check_device(weights * 2, log, "umT5")
    if device is None:
        return None, None
    prompts = ["a woman dancing in a sunlit studio", "a man walks towards the camera, waving"]
    tokenizer, model = load_text_encoder(folder, device=device)
    reference = torch.cat(encode_text(tokenizer, model, prompts))
    del model
    quant = load_text_encoder(folder, device=device, quantize=lambda block: quantize_block(block, scheme))[1]
    return text_encoder_backend(scheme, device), compare(reference, torch.cat(encode_text(tokenizer, quant, prompts)))
