"""Issue 5 on the full-size synthetic model: quantize peak RAM and speed, DiT FP8/INT8 forward fidelity, umT5 4-bit.

Run on the GPU machine (H100 80 GB, ~60 GB free disk, 16 cores), one call, ~6-8 minutes:
    PYTHONUNBUFFERED=1 python benchmarks/bench_fidelity.py
Proof run of the same code at tiny sizes on a CPU (~1 minute):
    python benchmarks/bench_fidelity.py --tiny
Prints progress lines with elapsed seconds and a markdown table per stage; with $OUT set, writes
$OUT/fidelity.json after every stage (a timeout keeps what finished).

Stages (the umT5 stage runs on the GPU while CPU workers write the synthetic DiT):
1. The 14B DiT in Wan format, bf16, 1 GiB shards (the bytes `synth.write_dit` writes; see `_synthfull.py`), then
   `quantize.store.write_quantized` on `formats.iter_tensors` (the CLI's quantize path without its forward
   check) in a child process per scheme, whose own peak RSS (VmHWM) is the RAM figure. Target <= 8 GB.
2. bf16 reference forward vs the FP8 and INT8 folders loaded with `load_dit` (automatic tensor-core path, then
   weight-only "dequant"), and with the non-block Linears / patch-embedding convs also fake-quantized, to show
   what keeping them in bf16 is worth. Inputs: random latents, binary masks, t=700, text (1, 64, 4096), CLIP
   (1, 257, 1280), seed fixed. Target <= 3% relative error. Per-layer weight errors come from the writer.
3. umT5-XXL (5.7 B parameters, `synth`'s heavy-tailed recipe drawn on the GPU) in bf16 vs NF4 (bitsandbytes) and
   INT8 (quanto) from `quantize_text_encoder`, rotated (the default) and plain, and vs the bf16 weights times
   (1 + 1% noise): random token ids, per-prompt mean token cosine. Target >= 0.99.
The quantized and source folders go to a temporary directory under --workdir (default: the system temp dir),
the fp8 folder is deleted before int8 is written (disk), everything is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

T0 = float(os.environ.get("BENCH_FIDELITY_T0") or time.time())  # the quantize child logs on the parent's clock
GB = 1e9
NON_BLOCK_LINEARS = ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
                     "time_projection.1", "img_emb.proj.1", "img_emb.proj.3", "head.head")
PATCH_CONVS = ("patch_embedding", "patch_embedding_pose", "patch_embedding_mask")
TARGET_RAM_GB, TARGET_REL_ERR, TARGET_COS = 8.0, 0.03, 0.99
UMT5_HEADER = ["umT5", "backend", "worst prompt's token-mean cosine vs bf16", "worst rel. error", ">= 0.99"]


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between --tiny (CPU proof) and the full run; the code path is the same."""

    tiny: bool
    device: str
    frames: int
    height: int
    width: int
    text_tokens: int
    shard_bytes: int
    workers: int
    umt5_layers: int | None
    prompt_lengths: tuple[int, ...]
    seed: int = 0

    @property
    def config(self):
        from scail2_lite.config import PRESETS
        from scail2_lite.synth import tiny_config

        return tiny_config() if self.tiny else PRESETS["scail2-14b"]


class Results:
    """The JSON record, rewritten (temporary name, rename) after every stage."""

    def __init__(self, path: Path | None) -> None:
        self.path, self.data = path, {}

    def put(self, key: str, value) -> None:
        self.data[key] = value
        if self.path is not None:
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            tmp.replace(self.path)


def with_noise(w: torch.Tensor, eps: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """w * (1 + eps n), n ~ N(0, 1) per element, in w's dtype: a per-weight error of eps whatever the format."""
    noise = torch.randn(w.shape, generator=gen, device=w.device)
    return (w.float() * noise.mul_(eps).add_(1.0)).to(w.dtype)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gpu_gb(device: str) -> float | None:
    return round(torch.cuda.memory_allocated() / GB, 2) if device == "cuda" else None


# ---------------------------------------------------------------- quantize child (own process, own peak RSS)


def peak_rss_bytes() -> int:
    """VmHWM of this process (Linux), else ru_maxrss (KiB on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def quantize_child(src: Path, out: Path, scheme: str, stats: Path) -> None:
    """`scail2-lite quantize` minus its forward check: stream the source through write_quantized, save the weight
    errors as the CLI does (FidelityReport beside the manifest), report wall time and peak RSS."""
    from scail2_lite import formats
    from scail2_lite.quantize.report import FidelityReport
    from scail2_lite.quantize.store import write_quantized

    index = json.loads(src.read_text())
    files = [src.parent / f for f in sorted(set(index["weight_map"].values()))]
    total = sum(f.stat().st_size for f in files)
    shapes = formats.read_shapes(src)
    config, _ = formats.read_config(src, shapes)
    done, next_mark, start = 0, 0.1, time.perf_counter()

    def progress(n: int) -> None:
        nonlocal done, next_mark
        done += n
        if done >= next_mark * total:
            log(f"  quantize {scheme}: {done / GB:.1f}/{total / GB:.1f} GB, "
                f"{done / GB / (time.perf_counter() - start):.2f} GB/s, RSS peak {peak_rss_bytes() / GB:.2f} GB")
            next_mark = (math.floor(done / total * 10) + 1) / 10

    result = write_quantized(formats.iter_tensors(src), out, scheme, config=config.to_dict(), sources=files,
                             expected_shapes=formats.wan_shapes(config), force=True, progress=progress)
    wall = time.perf_counter() - start
    FidelityReport(scheme, result.weight_errors, result.kept_if_quantized).save(out)
    out_bytes = sum(p.stat().st_size for p in out.glob("dit-*.safetensors"))
    stats.write_text(json.dumps({"scheme": scheme, "wall_s": wall, "source_bytes": total, "output_bytes": out_bytes,
                                 "peak_rss_bytes": peak_rss_bytes(), "threads": torch.get_num_threads()}))


def run_quantize(src: Path, out: Path, scheme: str, res: Results) -> dict:
    """Quantize in a child process; returns its stats plus the weight-error summary of its fidelity.json."""
    stats = out.parent / f"{out.name}.stats.json"
    log(f"quantize {scheme}: child process")
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "BENCH_FIDELITY_T0": str(T0)}
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--quantize-child", str(src), str(out), scheme,
                    str(stats)], check=True, env=env)
    s = json.loads(stats.read_text())
    s["child_wall_s"] = time.perf_counter() - start
    s["gb_per_s"] = s["source_bytes"] / s["wall_s"] / GB
    report = json.loads((out / "fidelity.json").read_text())
    s["weight_error_by_kind"] = report["weight_error_by_kind"]
    s["kept_if_quantized"] = report["kept_if_quantized"]
    res.put(f"quantize_{scheme}", s)
    log(f"quantize {scheme}: {s['wall_s']:.0f} s, {s['gb_per_s']:.2f} GB/s, peak RSS {s['peak_rss_bytes'] / GB:.2f} GB")
    print(table(["scheme", "source GB", "output GB", "write_quantized s", "GB/s", "peak RSS GB", "<= 8 GB"],
                [quant_row(s)]), flush=True)
    return s


def quant_row(s: dict) -> list:
    peak = s["peak_rss_bytes"] / GB
    return [s["scheme"], f"{s['source_bytes'] / GB:.1f}", f"{s['output_bytes'] / GB:.1f}", f"{s['wall_s']:.0f}",
            f"{s['gb_per_s']:.2f}", f"{peak:.2f}", "yes" if peak <= TARGET_RAM_GB else "NO"]


# ---------------------------------------------------------------- DiT forward fidelity


def dit_inputs(sz: Sizes, device: str) -> dict:
    """Random latents and binary masks at (frames, height, width) pixels, t=700, random text and CLIP features."""
    c = sz.config
    g = torch.Generator().manual_seed(sz.seed)
    lat_t, h, w = (sz.frames - 1) // 4 + 1, sz.height // 8, sz.width // 8

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    def mask(*shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=g) > 0.5).float().to(device)

    from scail2_lite.model import Conditions

    x = randn(1, 16, lat_t, h, w)
    cond = Conditions(pose_latents=randn(1, 16, lat_t, h // 2, w // 2),
                      driving_masks=mask(1, c.mask_dim, lat_t, h // 2, w // 2), ref_latents=randn(1, 16, 1, h, w),
                      ref_masks=mask(1, c.mask_dim, 1 + lat_t, h, w))
    return dict(x=x, t=torch.tensor([700.0], device=device), context=randn(1, sz.text_tokens, c.text_dim),
                clip_fea=randn(1, 257, c.clip_dim), cond=cond)


def token_count(sz: Sizes) -> int:
    lat_t, h, w = (sz.frames - 1) // 4 + 1, sz.height // 16, sz.width // 16
    return h * w + lat_t * h * w + lat_t * (h // 2) * (w // 2)


@torch.no_grad()
def forward(model, inputs: dict, device: str, repeat: int = 1) -> tuple[torch.Tensor, float]:
    """(output float32, seconds of the last run); with repeat 2 the first run warms kernels and autotuning."""
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        out = model(**inputs)
        sync(device)
        seconds = time.perf_counter() - start
    return out.float(), seconds


def fake_quantize(model, names: tuple[str, ...], scheme: str) -> dict[str, float]:
    """Replace these layers' weights by quantize -> dequantize (per output channel, convs flattened) in place."""
    from scail2_lite.quantize.schemes import quantize_dequantize, relative_error

    errors = {}
    for name in names:
        w = model.get_submodule(name).weight
        flat = w.detach().reshape(w.shape[0], -1)
        approx = quantize_dequantize(flat, scheme).to(w.dtype)
        errors[name] = relative_error(flat, approx)
        w.data.copy_(approx.view_as(w))
    return errors


def set_compute(model, compute: str | None) -> None:
    from scail2_lite.quantize.linear import QuantLinear

    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.compute = compute


def forward_rows(scheme_label: str, path_label: str, cmp: dict, seconds: float) -> list:
    ok = "yes" if cmp["rel_error"] <= TARGET_REL_ERR else "NO"
    return [scheme_label, path_label, f"{cmp['rel_error']:.4f}", f"{cmp['cosine']:.5f}", f"{seconds:.2f}", ok]


def quantized_forward(folder: Path, scheme: str, ref: torch.Tensor, inputs: dict, sz: Sizes, res: Results,
                      rows: list) -> None:
    """Load a quantized folder next to the bf16 model; automatic path, dequant path, then fake-quantize what is
    kept in bf16 (non-block Linears, then also the patch-embedding convs) to measure what keeping it is worth."""
    from scail2_lite.loader import load_dit
    from scail2_lite.quantize.linear import choose_compute
    from scail2_lite.quantize.report import compare

    device = sz.device
    start = time.perf_counter()
    model = load_dit(folder, device=device)
    load_s = time.perf_counter() - start
    auto = choose_compute(device, scheme)
    log(f"{scheme}: loaded in {load_s:.1f} s (GPU allocated {gpu_gb(device)} GB), automatic compute path {auto}")
    record: dict = {"load_s": load_s, "auto_compute": auto, "gpu_allocated_gb": gpu_gb(device)}
    try:
        out, sec = forward(model, inputs, device, repeat=2)
    except Exception as e:  # a failing kernel path must not lose the other measurements of this one GPU call
        record["auto"] = {"error": f"{type(e).__name__}: {e}"}
        rows.append([scheme, f"{auto} (auto)", "error", "", "", str(e).splitlines()[0][:100] if str(e) else ""])
        log(f"{scheme} {auto}: FAILED {record['auto']['error'][:300]}")
        path = "dequant"
    else:
        record["auto"] = {**compare(ref, out), "forward_s": sec}
        rows.append(forward_rows(scheme, f"{auto} (auto)", record["auto"], sec))
        log(f"{scheme} {auto}: rel {record['auto']['rel_error']:.4f} cos {record['auto']['cosine']:.5f} ({sec:.2f} s)")
        path = auto
    if auto != "dequant":
        set_compute(model, "dequant")
        out, sec = forward(model, inputs, device)
        record["dequant"] = {**compare(ref, out), "forward_s": sec}
        rows.append(forward_rows(scheme, "dequant", record["dequant"], sec))
        log(f"{scheme} dequant: rel {record['dequant']['rel_error']:.4f} ({sec:.2f} s)")
        set_compute(model, None if path == auto else "dequant")
    auto = path  # the variants below run on the path that worked
    errs = fake_quantize(model, NON_BLOCK_LINEARS, scheme)
    out, sec = forward(model, inputs, device)
    record["plus_non_block_linears"] = {**compare(ref, out), "weight_errors": errs}
    rows.append(forward_rows(scheme, f"{auto}, + non-block Linears {scheme}", record["plus_non_block_linears"], sec))
    errs = fake_quantize(model, PATCH_CONVS, scheme)
    out, sec = forward(model, inputs, device)
    record["plus_non_block_and_patch"] = {**compare(ref, out), "weight_errors": errs}
    rows.append(forward_rows(scheme, f"{auto}, + non-block Linears + patch convs {scheme}",
                             record["plus_non_block_and_patch"], sec))
    log(f"{scheme} + kept layers quantized: rel {record['plus_non_block_linears']['rel_error']:.4f} / "
        f"{record['plus_non_block_and_patch']['rel_error']:.4f}")
    res.put(f"dit_forward_{scheme}", record)
    del model, out
    if device == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- umT5


def umt5_stage(sz: Sizes, res: Results) -> list:
    """bf16 umT5 vs NF4 and INT8 from quantize_text_encoder (rotated and plain) and vs 1% weight noise; returns
    markdown rows."""
    from scail2_lite.encoders import TEXT_LEN, build_umt5, umt5_config
    from scail2_lite.quantize.text_encoder import quantize_text_encoder, text_encoder_backend
    from scail2_lite.synth import umt5_tensors

    device = sz.device
    cfg = umt5_config("tiny" if sz.tiny else "full")
    if sz.umt5_layers is not None:
        cfg.num_layers = sz.umt5_layers

    def build():
        start = time.perf_counter()
        sd = umt5_tensors(cfg, sz.seed, device)
        params = sum(t.numel() for t in sd.values())
        model = build_umt5(sd)
        sync(device)
        log(f"umT5: {params / 1e9:.2f} B parameters, {cfg.num_layers} layers, built on {device} in "
            f"{time.perf_counter() - start:.1f} s")
        return model

    g = torch.Generator().manual_seed(sz.seed + 1)
    lengths = torch.tensor(sz.prompt_lengths)
    ids = torch.randint(3, cfg.vocab_size, (len(lengths), TEXT_LEN), generator=g)
    mask = (torch.arange(TEXT_LEN)[None] < lengths[:, None]).long()
    ids[torch.arange(len(lengths)), lengths - 1] = 1  # </s>
    ids = (ids * mask).to(device)  # pad id 0 after the prompt, as the tokenizer pads
    mask = mask.to(device)

    @torch.no_grad()
    def encode(model) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask).last_hidden_state.float()

    record: dict = {"layers": cfg.num_layers, "full_layers": umt5_config(
        "tiny" if sz.tiny else "full").num_layers, "prompt_lengths": list(sz.prompt_lengths),
        "weights": "synth recipe drawn on the device (synth.umt5_tensors)"}
    model = build()
    record["bf16_gpu_allocated_gb"] = gpu_gb(device)
    ref = encode(model)
    del model
    rows = []
    # (label, scheme, rotate); "noise" multiplies every block Linear weight by (1 + 0.01 n), n ~ N(0, 1): what a
    # 1% weight error costs this encoder, whatever the format
    variants = [("nf4", "nf4", True), ("nf4 plain", "nf4", False), ("int8", "int8", True),
                ("int8 plain", "int8", False), ("1% weight noise", None, False)]
    for label, scheme, rotate in variants:
        model = build()
        try:
            start = time.perf_counter()
            if scheme is None:
                backend = "bf16 + noise"
                with torch.no_grad():
                    gen = torch.Generator(device).manual_seed(sz.seed + 2)
                    for block in model.encoder.block:
                        for m in block.modules():
                            if isinstance(m, torch.nn.Linear):
                                m.weight.copy_(with_noise(m.weight, 0.01, gen))
            else:
                model = quantize_text_encoder(model, scheme, device, rotate=rotate)
                rotated = any(hasattr(m, "input_factors") for m in model.modules())
                backend = text_encoder_backend(scheme, device) + (" rotated" if rotated else "")
            sync(device)
            q_s = time.perf_counter() - start
            out = encode(model)
        except Exception as e:  # e.g. a bitsandbytes problem: keep the other variants' measurements
            record[label] = {"error": f"{type(e).__name__}: {e}"}
            rows.append([label, scheme, "error", "", str(e).splitlines()[0][:100]])
            log(f"umT5 {label}: FAILED {record[label]['error'][:300]}")
            model = None
            continue
        per_prompt = []
        for i, n in enumerate(sz.prompt_lengths):
            r, o = ref[i, :n], out[i, :n]
            per_prompt.append({"tokens": n, "token_mean_cosine": float(torch.nn.functional.cosine_similarity(
                r, o, dim=-1).mean()), "rel_error": float((o - r).norm() / r.norm())})
        worst = min(p["token_mean_cosine"] for p in per_prompt)
        worst_rel = max(p["rel_error"] for p in per_prompt)
        record[label] = {"backend": backend, "quantize_s": q_s, "gpu_allocated_gb": gpu_gb(device),
                         "per_prompt": per_prompt, "min_token_mean_cosine": worst}
        log(f"umT5 {label} ({backend}): {q_s:.1f} s, worst prompt token-mean cosine {worst:.5f}, rel {worst_rel:.4f}")
        rows.append([label, backend, f"{worst:.5f}", f"{worst_rel:.4f}", "yes" if worst >= TARGET_COS else "NO"])
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    res.put("umt5", record)
    print(table(UMT5_HEADER, rows), flush=True)
    return rows


# ---------------------------------------------------------------- main


def weight_tables(quant: dict[str, dict]) -> str:
    """Per-layer-kind weight error for each scheme, then the kept-high tensors' error if they were quantized."""
    schemes = list(quant)
    kinds = sorted({k for s in quant.values() for k in s["weight_error_by_kind"]})
    rows = []
    for k in kinds:
        row = [k, quant[schemes[0]]["weight_error_by_kind"][k]["layers"]]
        for s in schemes:
            e = quant[s]["weight_error_by_kind"][k]
            row += [f"{e['mean']:.4f}", f"{e['max']:.4f}"]
        rows.append(row)
    head = ["layer kind", "layers"] + [f"{s} {m}" for s in schemes for m in ("mean", "max")]
    kept_names = sorted({n for s in quant.values() for n in s["kept_if_quantized"]})
    kept_rows = [[n, f"{quant[schemes[0]]['kept_if_quantized'][n]['bytes'] / 1e6:.1f}"]
                 + [f"{quant[s]['kept_if_quantized'][n]['error']:.4f}" for s in schemes] for n in kept_names]
    return (table(head, rows) + "\n\nKept in bf16 (2-D tensors), error if they were quantized:\n\n"
            + table(["tensor", "MB (source)"] + schemes, kept_rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny config on the CPU: proves the logic in ~1 minute")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()), help="where the temp folders go")
    ap.add_argument("--frames", type=int, default=None, help="video frames of the DiT input (default 33; tiny 5)")
    ap.add_argument("--umt5-layers", type=int, default=None, help="umT5 layers (default all 24)")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="synthetic writers")
    ap.add_argument("--skip", default="", help="comma list of stages to skip: umt5, dit")
    ap.add_argument("--schemes", default="fp8,int8", help="DiT schemes, in order (comma list)")
    ap.add_argument("--json", type=Path, default=None, help="JSON output (default $OUT/fidelity.json if $OUT set)")
    ap.add_argument("--quantize-child", nargs=4, metavar=("SRC", "OUT", "SCHEME", "STATS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quantize_child:
        src, out, scheme, stats = args.quantize_child
        quantize_child(Path(src), Path(out), scheme, Path(stats))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below on `timeout`
    if args.tiny:
        sz = Sizes(True, "cpu", args.frames or 5, 64, 64, 16, 64 * 1024, min(args.workers, 2), args.umt5_layers,
                   (5, 9, 16))
    else:
        if not torch.cuda.is_available():
            raise SystemExit("the full run needs a CUDA GPU; use --tiny on a CPU")
        sz = Sizes(False, "cuda", args.frames or 33, 512, 896, 64, 2**30, args.workers, args.umt5_layers,
                   (24, 77, 160, 512))
    json_path = args.json or (Path(os.environ["OUT"]) / "fidelity.json" if os.environ.get("OUT") else None)
    res = Results(json_path)
    skip = set(filter(None, args.skip.split(",")))
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if sz.device == "cuda" else "cpu",
           "cpus": os.cpu_count(), "tiny": sz.tiny, "frames": sz.frames, "size": [sz.height, sz.width],
           "dit_tokens": token_count(sz)}
    res.put("env", env)
    log(f"env {env}")
    tables: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="scail2-fidelity-", dir=args.workdir))
    writer = None
    try:
        if "dit" not in skip:
            writer = start_dit_write(sz, work, res)
        if "umt5" not in skip:
            try:
                rows = umt5_stage(sz, res)
                tables.append(table(UMT5_HEADER, rows))
            except Exception:  # the DiT stages (already writing in the background) still run
                log("umT5 stage FAILED:\n" + traceback.format_exc())
                res.put("umt5", {"error": traceback.format_exc(limit=3)})
        if writer is not None:
            tables[:0] = dit_stages(sz, work, writer, res, [s for s in args.schemes.split(",") if s])
    finally:
        if writer is not None:
            writer.cancel()
        shutil.rmtree(work, ignore_errors=True)
        log(f"removed {work}")
    print("\n## Results\n", flush=True)
    print("\n\n".join(tables), flush=True)
    log("done")


def start_dit_write(sz: Sizes, work: Path, res: Results):
    """Check the disk for the source plus one quantized copy, then start the background writer (or skip)."""
    from _synthfull import ParallelDiTWriter
    from scail2_lite.formats import wan_shapes
    from scail2_lite.quantize.store import estimate_output_bytes

    shapes = wan_shapes(sz.config)
    src_bytes = sum(math.prod(s) for s in shapes.values()) * 2
    need = src_bytes + 1.05 * max(estimate_output_bytes(shapes, s) for s in ("fp8", "int8")) + 2**30
    free = shutil.disk_usage(work).free
    res.put("disk", {"workdir": str(work), "free_bytes": free, "needed_bytes": need})
    if free < need:
        log(f"DiT stages skipped: {work} has {free / GB:.1f} GB free, need {need / GB:.1f} GB (use --workdir)")
        return None
    log(f"writing the synthetic DiT ({src_bytes / GB:.1f} GB bf16) with {sz.workers} workers into {work}")
    return ParallelDiTWriter(work / "src", sz.config, sz.seed, torch.bfloat16, sz.shard_bytes, sz.workers)


def dit_stages(sz: Sizes, work: Path, writer, res: Results, schemes: list[str]) -> list[str]:
    """Stages 1 and 2; returns their markdown tables."""
    from scail2_lite.loader import load_dit
    from scail2_lite.quantize.report import compare

    if writer.done_count() < len(writer.futures):
        log(f"waiting for the synthetic DiT ({writer.done_count()}/{len(writer.futures)} shards written)")
    src, nbytes, write_s = writer.result()
    res.put("synth_write", {"bytes": nbytes, "seconds": write_s, "workers": sz.workers, "shards": len(writer.files)})
    log(f"synthetic DiT written: {nbytes / GB:.1f} GB in {write_s:.0f} s (overlapping the umT5 stage)")
    device = sz.device
    quant: dict[str, dict] = {}
    rows: list[list] = []
    ref_model = ref = inputs = None
    for scheme in schemes:
        folder = work / f"q-{scheme}"
        quant[scheme] = run_quantize(src, folder, scheme, res)
        if ref_model is None:
            start = time.perf_counter()
            ref_model = load_dit(src, dtype=torch.bfloat16, device=device)
            log(f"bf16 DiT loaded in {time.perf_counter() - start:.1f} s (GPU allocated {gpu_gb(device)} GB)")
            inputs = dit_inputs(sz, device)
            ref, sec = forward(ref_model, inputs, device, repeat=2)
            res.put("dit_forward_bf16", {"tokens": token_count(sz), "forward_s": sec,
                                         "output_rms": float(ref.pow(2).mean().sqrt())})
            log(f"bf16 forward: {token_count(sz)} tokens, {sec:.2f} s")
            rows.append(["bf16", "reference", "0", "1", f"{sec:.2f}", ""])
        quantized_forward(folder, scheme, ref, inputs, sz, res, rows)
        shutil.rmtree(folder)
    errs = fake_quantize(ref_model, NON_BLOCK_LINEARS, "fp8")
    out, sec = forward(ref_model, inputs, device)
    cmp = compare(ref, out)
    res.put("dit_forward_bf16_non_block_fp8", {**cmp, "weight_errors": errs})
    rows.append(forward_rows("bf16 blocks", "non-block Linears fp8 only", cmp, sec))
    del ref_model
    shutil.rmtree(src.parent)
    quant_table = table(["scheme", "source GB", "output GB", "write_quantized s", "GB/s", "peak RSS GB", "<= 8 GB"],
                        [quant_row(s) for s in quant.values()])
    synth = res.data["synth_write"]
    synth_line = (f"Synthetic source: {synth['bytes'] / GB:.1f} GB bf16 in {synth['shards']} shards, written in "
                  f"{synth['seconds']:.0f} s by {synth['workers']} processes (concurrently with the umT5 stage).")
    fwd = table(["DiT", "compute", "rel. error vs bf16", "cosine", "forward s", "<= 3%"], rows)
    fwd_title = f"DiT forward, {token_count(sz)} tokens ({sz.frames} frames {sz.height}x{sz.width}), t=700:"
    print(fwd_title + "\n\n" + fwd, flush=True)
    return [quant_table + "\n\n" + synth_line, weight_tables(quant), fwd_title + "\n\n" + fwd]


if __name__ == "__main__":
    main()
