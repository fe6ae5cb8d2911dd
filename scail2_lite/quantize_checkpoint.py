"""`scail2-lite quantize` as a function: a checkpoint of any format -> a self-contained quantized folder.

The runtime side of quantization: it reads with `formats`, merges LoRAs with `lora`, streams into
`quantize.store.write_quantized`, copies the other components under their download names (so `ModelFolder` finds
them), then measures the result with the real loaders (DiT forward and umT5 embeddings vs bf16).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from . import formats, outputs
from .encoders import CLIP_FILE, UMT5_DIR, UMT5_FILE, write_quantized_text_encoder
from .errors import UserError
from .loader import comfy_8bit_scheme
from .lora import LoRA, LoraFile, as_lora_file, resolve_loras
from .quantize.comfy import export_comfy, from_comfy_fp8
from .quantize.comfy_quant import from_comfy_quant
from .quantize.linear import check_compute
from .quantize.mixed import MixedPrecision, choose_layers, measure_sensitivity
from .quantize.report import FidelityReport, compare
from .quantize.schemes import QuantizeError, check_scheme, is_quantized_name
from .quantize.store import (
    PreQuantized,
    estimate_output_bytes,
    fingerprint,
    folder_bytes,
    is_quantized_folder,
    write_quantized,
)
from .quantize.text_encoder import text_encoder_backend
from .vae import VAE_FILE

COMPONENTS = (VAE_FILE, CLIP_FILE, UMT5_DIR)
# Reference copies for the checks must fit beside the quantized model: skip them above this share of free memory.
_CHECK_MEMORY_SHARE = 1 / 3.5
_SENSITIVITY_MEMORY_SHARE = 1 / 1.5  # only the bf16 model and one layer's copy


def quantize_checkpoint(
    src: str | Path,
    out: str | Path,
    *,
    dit: str = "fp8",
    text_encoder: str = "bf16",
    compute: str | None = None,
    loras: Sequence[LoraFile | tuple[str | Path, float]] = (),
    export: str | None = None,
    mixed: MixedPrecision = MixedPrecision(),
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = print,
) -> FidelityReport:
    """Quantize `src`'s DiT to `dit` (fp8, int8, bf16) and its umT5 to `text_encoder` (nf4 and int8 are stored
    quantized, block by block, in place of the bf16 file; bf16 is linked as downloaded), merge `loras`
    (`LoraFile`s or (path, strength) pairs) in fp32 first, and return the fidelity report (also saved as
    `fidelity.json` in `out`). `mixed` keeps some block Linears in int8 or bf16 (`quantize.mixed`; "sensitive"
    runs the per-Linear sensitivity pass on the bf16 DiT first). `progress(done, total)` counts source bytes.

    All or nothing: bad input raises UserError before anything is written; the folder (checks, fidelity.json and
    the ComfyUI export included) is built under a hidden name beside `out` and takes its place only when
    complete. `force` replaces an existing `out` only if it is a scail2-lite quantized folder, and only then."""
    src, out = Path(src), Path(out)
    try:
        check_scheme(dit)
        text_encoder_backend(text_encoder, "cpu")
        if compute is not None and dit != "bf16":
            check_compute(compute, dit)
        mixed.check_scheme(dit)
        if export not in (None, "comfy") or (export == "comfy" and dit != "fp8"):
            raise UserError("--export comfy is the only export and needs --dit fp8")
        fmt = formats.detect_format(src)
        if fmt == "quantized" or is_quantized_folder(src):
            raise UserError(f"{src} is already quantized; quantize from the original checkpoint")
        dit_file = formats.find_dit(src)
        root = src if src.is_dir() else dit_file.parent
        specs = [as_lora_file(x) for x in loras]
        outputs.check_separate({"-o": out}, {"SRC": src, "checkpoint folder": root,
                                             **{f"--lora {spec.path}": spec.path for spec in specs}})
        shapes = formats.read_shapes(src)
        config, _ = formats.read_config(src, shapes)
        formats.check_keys(shapes, config, src)
        mapped = _load_loras(specs, config, log)
        parts = {name: root / name for name in COMPONENTS if (root / name).exists()}
        if len(parts) < len(COMPONENTS):
            log(f"note: {root} lacks {len(COMPONENTS) - len(parts)} of {', '.join(COMPONENTS)}; the output will hold "
                "only what was found")
        expected = formats.wan_shapes(config)
        umt5_src = parts.pop(UMT5_DIR) if text_encoder != "bf16" and UMT5_DIR in parts else None
        needed = folder_bytes(expected, dit, parts, out.parent)
        if umt5_src is not None:  # written anew, smaller than the bf16 file: that size bounds it
            needed += sum(p.stat().st_size for p in umt5_src.iterdir() if p.is_file())
        if export == "comfy":
            needed += estimate_output_bytes(expected, dit)
        outputs.check_folder_target(out, "-o", needed, replace=force, ours=is_quantized_folder,
                                    what="scail2-lite quantized folder")
        kept, sensitivity = _choose_kept(src, config, dit, mixed, mapped, log)
        sources = _dit_files(dit_file)
        umt5_bytes = (umt5_src / UMT5_FILE).stat().st_size if umt5_src is not None else 0
        total = sum(p.stat().st_size for p in sources) + umt5_bytes
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
        with outputs.new_folder(out) as staging:
            umt5_stage = outputs.temporary_folder(out)
            try:
                if umt5_src is not None:
                    parts[UMT5_DIR] = umt5_stage
                    layers = _store_text_encoder(umt5_src, umt5_stage, text_encoder, umt5_bytes, advance, log)
                result = write_quantized(
                    tensors, staging, dit, config=config.to_dict(), sources=sources, expected_shapes=expected,
                    copy_files=parts, progress=advance,
                    text_encoder={"scheme": text_encoder, "file": UMT5_DIR,
                                  "stored": text_encoder if UMT5_DIR in parts else None,
                                  "quantized_at_load": False,
                                  **({"backend": text_encoder_backend(text_encoder, "cpu"), "blocks": layers}
                                     if umt5_src is not None else {})},
                    loras=[_lora_record(spec, lo) for spec, (lo, _) in zip(specs, mapped)],
                    layer_schemes=kept,
                )
            finally:
                shutil.rmtree(umt5_stage, ignore_errors=True)  # its files are linked into the folder by now
            if progress is not None:
                progress(total, total)
            report = FidelityReport(dit, result.weight_errors, result.kept_if_quantized,
                                    text_encoder_scheme=text_encoder, kept_layers=kept,
                                    mixed=dataclasses.asdict(mixed) if mixed.active else None,
                                    sensitivity=sensitivity)
            try:  # the folder is complete and valid by now: a check that cannot run is noted, not fatal
                if comfy_8bit_scheme(fmt) is None:  # against the bf16 source: an 8-bit source has none
                    report.dit_forward = _dit_check(src, staging, config, compute, mapped, log)
                if umt5_src is not None:
                    report.text_encoder_backend, report.text_encoder = _text_encoder_check(
                        umt5_src, staging / UMT5_DIR, text_encoder, log)
            except torch.cuda.OutOfMemoryError:
                log("note: fidelity check skipped (CUDA out of memory)")
            if export == "comfy":
                comfy_name = f"{out.name}.comfy_fp8_scaled.safetensors"
                report.comfy_export_errors = export_comfy(staging, staging / comfy_name)
            report.save(staging)
        if export == "comfy":
            log(f"wrote {out / comfy_name}")
    except QuantizeError as e:
        raise UserError(str(e)) from None
    return report


def _choose_kept(src: Path, config, dit: str, mixed: MixedPrecision, loras: Sequence[tuple[LoRA, float]],
                 log: Callable[[str], None]) -> tuple[dict[str, str], dict[str, float] | None]:
    """The block Linears `mixed` keeps (weight name -> int8 / bf16) and, for "sensitive", the per-Linear
    forward errors they were chosen by (one forward of the bf16 DiT per Linear, on a short random input)."""
    if not mixed.active:
        return {}, None
    sizes = {n.removesuffix(".weight"): math.prod(s) for n, s in formats.wan_shapes(config).items()
             if is_quantized_name(n)}
    sensitivity = None
    if mixed.strategy == "sensitive":
        from .loader import load_dit

        device = _check_device(sum(sizes.values()) * 2, log, "sensitivity", share=_SENSITIVITY_MEMORY_SHARE)
        if device is None:
            raise UserError("--keep sensitive runs the bf16 DiT once per Linear and it does not fit this machine's "
                            "GPU; use --keep edges")
        model = load_dit(src, dtype=torch.bfloat16, device=device, loras=loras)
        inputs = _check_inputs(config, device)
        log(f"measuring the sensitivity of {len(sizes)} Linears ({dit}, one forward each, on {device})")
        with torch.no_grad():
            sensitivity = measure_sensitivity(model, sizes, dit, lambda: model(*inputs))
        del model
    kept = choose_layers(mixed, sizes, sensitivity)
    share = sum(sizes[n.removesuffix(".weight")] for n in kept) / sum(sizes.values())
    log(f"keeping {len(kept)} Linears ({share:.1%} of the block Linear parameters) in {mixed.keep_as} "
        f"({mixed.strategy})")
    return kept, sensitivity


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


def _check_device(nbytes: int, log: Callable[[str], None], what: str, share: float = 0.0) -> str | None:
    """Where a reference check of `nbytes` of weights runs (the GPU if it has room, else the CPU for small
    models); None = skip it, with a note (the 14B model's checks are GPU benchmarks, see RESULTS.md)."""
    share = share or _CHECK_MEMORY_SHARE
    if torch.cuda.is_available() and nbytes < torch.cuda.mem_get_info()[0] * share:
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

    params = sum(torch.Size(s).numel() for s in formats.wan_shapes(config).values())
    device = _check_device(params * 3, log, "DiT forward")
    if device is None:
        return None
    inputs = _check_inputs(config, device)
    reference = load_dit(src, dtype=torch.bfloat16, device=device, loras=loras)(*inputs)
    quantized = load_dit(out, device=device, compute=compute)(*inputs)
    return compare(reference, quantized)


def _check_inputs(config, device: str) -> tuple:
    """One short random DiT input (2 latent frames of 8x8, t=700), fixed seed: the checks' and the sensitivity
    pass's forward."""
    from .model import Conditions

    g = torch.Generator().manual_seed(0)
    t_lat, h, w = 2, 8, 8

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    x = rand(1, 16, t_lat, h, w)
    cond = Conditions(rand(1, 16, t_lat, h // 2, w // 2), rand(1, 28, t_lat, h // 2, w // 2), rand(1, 16, 1, h, w),
                      rand(1, 28, 1 + t_lat, h, w))
    return (x, torch.tensor([700.0], device=device), rand(1, 16, config.text_dim), rand(1, 257, config.clip_dim),
            cond)


def _store_text_encoder(src: Path, dest: Path, scheme: str, nbytes: int, advance: Callable[[int], None],
                        log: Callable[[str], None]) -> int:
    """umT5 quantized to `scheme` into `dest`, block by block on the GPU when there is one (the GPU load path's
    arithmetic, so the codes are the ones loading the bf16 file there would make), else on the CPU; `advance`
    counts the bf16 file's bytes. Returns the number of blocks."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    log(f"quantizing umT5 to {scheme} ({text_encoder_backend(scheme, device)}, block by block on {device})")
    done = 0

    def block_done(i: int, n: int) -> None:
        nonlocal done
        step = nbytes * (i + 1) // n - done
        done += step
        advance(step)

    return len(write_quantized_text_encoder(src, dest, scheme, device, block_done)["blocks"])


@torch.no_grad()
def _text_encoder_check(source: Path, stored: Path, scheme: str,
                        log: Callable[[str], None]) -> tuple[str, dict] | tuple[None, None]:
    """umT5 embeddings of a few prompts: the stored `scheme` encoder vs the source's bf16 one, as the pipeline
    loads them."""
    from .encoders import encode_text, load_text_encoder

    weights = (source / UMT5_FILE).stat().st_size
    device = _check_device(weights * 2, log, "umT5")
    if device is None:
        return None, None
    prompts = ["a woman dancing in a sunlit studio", "a man walks towards the camera, waving"]
    tokenizer, model = load_text_encoder(source, device=device)
    reference = torch.cat(encode_text(tokenizer, model, prompts))
    del model
    quant = load_text_encoder(stored, device=device)[1]
    return text_encoder_backend(scheme, device), compare(reference, torch.cat(encode_text(tokenizer, quant, prompts)))
