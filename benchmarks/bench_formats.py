"""Issue 22: our weight formats side by side with the ones SCAIL-2 users run, on the same weights and inputs.

Run on the GPU machine (one call, about 3-4 minutes on an H100):
    PYTHONUNBUFFERED=1 python benchmarks/bench_formats.py
The same code at a small scale on a CPU (the test runs this, ~1 minute):
    python benchmarks/bench_formats.py --tiny
Prints a markdown table per model; with $OUT set also writes $OUT/formats.json after every variant.

Models: the full-size synthetic SCAIL-2 DiT (14B, `synth`'s heavy-tailed recipe drawn on the device) and umT5-XXL
(5.7B), then both again with a deliberately milder distribution (every block Linear weight replaced by a Gaussian
of the same standard deviation: no heavy tails, no outlier input columns), so a ranking that holds on both does not
come from one weight distribution. Every format is applied the same way: each block Linear's weight goes through
the format's quantize -> dequantize (`peer_formats.py` for the peers, `quantize.schemes` / the text encoder's
rotation for ours); everything else stays bf16. So this compares what each format stores, with its compute kernel
left out (ours at W8A8 is in RESULTS.md's earlier sections).

Per format: stored bits per block-Linear weight and GB, mean per-weight relative error, then
- DiT: the first of two unipc steps' model output vs bf16 (relative error, cosine), and the latents after the two
  steps vs bf16's (no guidance: one forward per step). Random latents, masks, text and CLIP features, seed fixed.
- umT5: the embeddings of eight real-looking prompts (token ids from a fixed word hash, as the synthetic
  vocabulary has no tokenizer), the token-mean cosine of the worst prompt and of all, and the relative error.
Mixed precision (issue 22 deliverable 2) rows: ours fp8 with 5% of the block-Linear parameters kept as bf16 or
int8, chosen as the first/last blocks or by the per-Linear sensitivity pass (`quantize.mixed`), measured on a short
sequence first.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peer_formats as P  # noqa: E402
from bench_fidelity import Results  # noqa: E402

T0 = time.time()
GB = 1e9
PROMPTS = (
    "a woman in a red dress dances in a sunlit studio, the camera slowly circles her",
    "a man walks toward the camera on a rainy street at night, neon signs reflect in the puddles",
    "an anime girl with long silver hair waves, soft pastel background",
    "a dancer spins on a wooden stage, spotlight, high detail, smooth motion",
    "an old man in a grey coat raises both arms and laughs",
    "a child jumps on a trampoline in the garden on a summer afternoon",
    "close-up of a person nodding and talking, office background, natural light",
    "a knight in silver armour draws his sword, cinematic lighting, dust in the air, 4k",
)


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def compare(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    r, o = ref.double().flatten(), out.double().flatten()
    return float((o - r).norm() / r.norm()), float(r @ o / (r.norm() * o.norm()))


@dataclass(frozen=True)
class Variant:
    """A row: a weight function per Linear (module name, weight -> dequantized) and its bits per weight."""

    label: str
    family: str  # "peer", "ours", "mixed"
    fn: Callable[[str, torch.Tensor], torch.Tensor]
    bits: Callable[[str, int, int], float]


def peer(name: str) -> Variant:
    f = P.PEER_FORMATS[name]
    return Variant(name, "peer", lambda n, w: f.fn(w), lambda n, o, i: f.bits(o, i))


def ours_dit(scheme: str) -> Variant:
    from scail2_lite.quantize.schemes import quantize_dequantize

    bits = {"fp8": (8, 32, 0), "int8": (8, 32, 32)}[scheme]
    return Variant(f"ours {scheme}", "ours", lambda n, w: quantize_dequantize(w, scheme),
                   lambda n, o, i: bits[0] + bits[1] / i + bits[2] / o)


def mixed(label: str, base: Variant, kept: dict[str, str]) -> Variant:
    """`base` except the Linears in `kept` (module name -> int8 or bf16)."""
    from scail2_lite.quantize.schemes import quantize_dequantize

    int8 = ours_dit("int8")

    def fn(n: str, w: torch.Tensor) -> torch.Tensor:
        k = kept.get(n)
        return base.fn(n, w) if k is None else (w.float() if k == "bf16" else quantize_dequantize(w, "int8"))

    def bits(n: str, o: int, i: int) -> float:
        k = kept.get(n)
        return base.bits(n, o, i) if k is None else (16.0 if k == "bf16" else int8.bits(n, o, i))

    return Variant(label, "mixed", fn, bits)


def within_budget(variants: list[Variant], budget_s: float, key: str, record: dict) -> Iterator[Variant]:
    """The variants to run, in order, until `budget_s` seconds since start: each one skipped after that is logged
    and recorded as skipped."""
    for v in variants:
        if time.time() - T0 > budget_s:
            log(f"{key} {v.label}: skipped (time budget)")
            record["variants"][v.label] = {"skipped": "time budget"}
            continue
        yield v


def gguf_k_m(label: str, base: Callable[[torch.Tensor], torch.Tensor], base_bits: int, layers: int) -> Variant:
    """llama.cpp's Q4_K_M / Q5_K_M mix on T5: attn_v (SelfAttention.v) and ffn_down (DenseReluDense.wo) in Q6_K
    in the layers `use_more_bits` picks; every other Linear in the base K type."""
    def more(n: str) -> bool:
        m = re.search(r"block\.(\d+)\..*(SelfAttention\.v|DenseReluDense\.wo)$", n)
        return m is not None and P.use_more_bits(int(m.group(1)), layers)

    def fn(n: str, w: torch.Tensor) -> torch.Tensor:
        return P.q6_k(w) if more(n) else base(w)

    def bits(n: str, o: int, i: int) -> float:
        if i % P.QK_K:
            return 16.0
        return (P.BITS_Q6_K if more(n) else base_bits) / P.QK_K

    return Variant(label, "peer", fn, bits)


def ours_umt5(label: str, grid: Callable[[torch.Tensor], torch.Tensor], bits_fn, skip_wo: bool) -> Variant:
    """Our text-encoder recipe: column factors and the 64-column Hadamard rotation (`quantize.text_encoder`), the
    grid on the rotated weight, the inverse rotation folded back (what the forward pre-hook computes). NF4 as run
    on CUDA keeps T5's `wo` in bf16."""
    from scail2_lite.quantize.schemes import ROTATION_BLOCK, column_factors, rotate_columns, rotated_layout

    def fn(n: str, w: torch.Tensor) -> torch.Tensor:
        if skip_wo and n.endswith("wo"):
            return w.float()
        if w.shape[1] % ROTATION_BLOCK:
            return grid(w)
        c = column_factors(w)
        rot = grid(rotated_layout(w.float(), c))
        return rotate_columns(rot) * c

    def bits(n: str, o: int, i: int) -> float:
        if skip_wo and n.endswith("wo"):
            return 16.0
        return bits_fn(o, i) + (32 / o if i % ROTATION_BLOCK == 0 else 0)

    return Variant(label, "ours", fn, bits)


# ---------------------------------------------------------------- applying a variant


class Swapper:
    """Holds the original block-Linear weights and applies / undoes a variant in place."""

    def __init__(self, model: torch.nn.Module, names: list[str], keep_on: str) -> None:
        self.model, self.names = model, names
        self.saved = {n: model.get_submodule(n).weight.detach().to(keep_on, copy=True) for n in names}

    @torch.no_grad()
    def apply(self, v: Variant) -> dict:
        errs, bits, params = [], 0.0, 0
        for n in self.names:
            weight = self.model.get_submodule(n).weight
            src = self.saved[n].to(weight.device)
            approx = v.fn(n, src)
            errs.append(float((approx.float() - src.float()).norm() / src.float().norm()))
            weight.copy_(approx.to(weight.dtype))
            o, i = weight.shape
            bits += v.bits(n, o, i) * o * i
            params += o * i
        return {"weight_rel_error": sum(errs) / len(errs), "weight_rel_error_max": max(errs),
                "bits_per_weight": bits / params, "linear_gb": bits / 8 / GB, "linear_params": params}

    @torch.no_grad()
    def restore(self) -> None:
        for n in self.names:
            self.model.get_submodule(n).weight.copy_(self.saved[n])

    @torch.no_grad()
    def make_milder(self, seed: int) -> None:
        """Every block Linear -> Gaussian of the same std (the second, milder distribution); the saved copies
        follow, so later variants start from the mild weights."""
        g = torch.Generator(device=self.model.get_submodule(self.names[0]).weight.device).manual_seed(seed)
        for n in self.names:
            weight = self.model.get_submodule(n).weight
            std = float(weight.float().std())
            weight.copy_(torch.randn(weight.shape, generator=g, device=weight.device).mul_(std))
            self.saved[n].copy_(weight)


# ---------------------------------------------------------------- DiT


def dit_inputs(config, frames: int, height: int, width: int, device: str, seed: int) -> dict:
    from scail2_lite.model import Conditions

    g = torch.Generator().manual_seed(seed)
    lat_t, h, w = (frames - 1) // 4 + 1, height // 8, width // 8

    def randn(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g).to(device)

    def mask(*s: int) -> torch.Tensor:
        return (torch.rand(*s, generator=g) > 0.5).float().to(device)

    cond = Conditions(pose_latents=randn(1, 16, lat_t, h // 2, w // 2),
                      driving_masks=mask(1, config.mask_dim, lat_t, h // 2, w // 2), ref_latents=randn(1, 16, 1, h, w),
                      ref_masks=mask(1, config.mask_dim, 1 + lat_t, h, w))
    return dict(noise=randn(1, 16, lat_t, h, w), context=randn(1, 64, config.text_dim),
                clip_fea=randn(1, 257, config.clip_dim), cond=cond)


@torch.no_grad()
def two_steps(model, inp: dict, steps: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(first model output, latents after `steps` unipc steps), no guidance."""
    from scail2_lite.sampling import make_scheduler
    from scail2_lite.settings import GenerationSettings

    sampler = make_scheduler("unipc", steps, GenerationSettings().shift)
    x, first = inp["noise"].clone(), None
    for t in sampler.timesteps:
        tt = torch.tensor([float(t)], device=x.device)
        v = model(x, tt, inp["context"], inp["clip_fea"], inp["cond"])
        first = v.float() if first is None else first
        x = sampler.step(v, t, x)
    return first, x.float()


def block_linears(model) -> list[str]:
    from scail2_lite.quantize.schemes import is_quantized_name

    return [n.removesuffix(".weight") for n, _ in model.named_parameters() if is_quantized_name(n)]


def dit_stage(args, res: Results, device: str, milder: bool, config) -> list:
    try:
        return _dit_stage(args, res, device, milder, config)
    finally:
        free(device)


def free(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _dit_stage(args, res: Results, device: str, milder: bool, config) -> list:
    from _synthfull import device_dit
    from scail2_lite.quantize.mixed import MixedPrecision, choose_layers, measure_sensitivity

    key = "dit_mild" if milder else "dit"
    model = device_dit(config, args.seed, device)
    names = block_linears(model)
    sw = Swapper(model, names, device if device == "cpu" or args.keep_on_device else "cpu")
    if milder:
        sw.make_milder(args.seed + 7)
    inp = dit_inputs(config, args.frames, args.height, args.width, device, args.seed)
    ref_first, ref_lat = two_steps(model, inp)
    log(f"{key}: {len(names)} block Linears, bf16 reference done")
    sizes = {n: model.get_submodule(n).weight.numel() for n in names}
    sens = None
    if not milder:
        short = dit_inputs(config, 1, args.sens_height, args.sens_width, device, args.seed + 1)
        t = torch.tensor([900.0], device=device)
        run = lambda: model(short["noise"], t, short["context"], short["clip_fea"], short["cond"])  # noqa: E731
        start = time.perf_counter()
        sens = measure_sensitivity(model, names, "fp8", run)
        log(f"sensitivity pass: {len(names)} Linears in {time.perf_counter() - start:.1f} s")
        kinds: dict[str, list[float]] = {}
        for n, e in sens.items():
            kinds.setdefault(re.sub(r"^blocks\.\d+\.", "", n), []).append(e)
        by_block: dict[int, float] = {}
        for n, e in sens.items():
            b = int(n.split(".")[1])
            by_block[b] = by_block.get(b, 0.0) + e
        res.put("sensitivity_fp8", {"short_input": [1, args.sens_height, args.sens_width],
                                    "seconds": time.perf_counter() - start, "per_linear": sens,
                                    "mean_by_kind": {k: sum(v) / len(v) for k, v in kinds.items()},
                                    "sum_by_block": by_block})
    base = ours_dit("fp8")
    variants = [peer(n) for n in P.PEER_FORMATS if n != "bf16"] + [base, ours_dit("int8")]
    share = args.keep_share
    for strategy in ("edges", "sensitive") if not milder else ():  # mixed precision: on the recipe model
        for keep_as in ("bf16", "int8"):
            chosen = choose_layers(MixedPrecision(strategy, keep_as, share), sizes, sens)
            kept = {n.removesuffix(".weight"): s for n, s in chosen.items()}
            variants.append(mixed(f"ours fp8 + {strategy} {keep_as} ({share:.0%})", base, kept))
    rows, record = [], {"tokens": None, "variants": {}}
    for v in within_budget(variants, args.budget_s, key, record):
        start = time.perf_counter()
        stats = sw.apply(v)
        first, lat = two_steps(model, inp)
        sw.restore()
        fwd, cos = compare(ref_first, first)
        lat_err, lat_cos = compare(ref_lat, lat)
        stats.update(forward_rel_error=fwd, forward_cosine=cos, latents_rel_error=lat_err, latents_cosine=lat_cos,
                     seconds=time.perf_counter() - start, family=v.family)
        record["variants"][v.label] = stats
        res.put(key, record)
        log(f"{key} {v.label}: w {stats['weight_rel_error']:.4f} fwd {fwd:.4f} lat {lat_err:.4f} "
            f"({stats['seconds']:.1f} s)")
        rows.append([v.label, f"{stats['bits_per_weight']:.2f}", f"{stats['linear_gb']:.2f}",
                     f"{stats['weight_rel_error']:.4f}", f"{fwd:.4f}", f"{cos:.5f}", f"{lat_err:.4f}",
                     f"{lat_cos:.5f}"])
    return rows


DIT_HEADER = ["format", "bits/weight", "block Linears GB", "weight rel. err", "forward rel. err", "forward cos",
              "2-step latents rel. err", "latents cos"]
UMT5_HEADER = ["format", "bits/weight", "block Linears GB", "weight rel. err", "embeddings rel. err",
               "worst prompt cos", "mean prompt cos"]


# ---------------------------------------------------------------- umT5


def prompt_ids(vocab: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Real-looking prompts as token ids: each word split in pieces of at most 4 characters (about
    sentencepiece's count on English), each piece hashed to an id; </s> (1) closes, pad 0."""
    seqs = []
    for p in PROMPTS:
        pieces = [w[i:i + 4] for w in re.findall(r"\w+|[^\w\s]", p.lower()) for i in range(0, len(w), 4)]
        seqs.append([3 + int(hashlib.sha256(s.encode()).hexdigest(), 16) % (vocab - 3) for s in pieces] + [1])
    n = max(map(len, seqs))
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    return ids.to(device), mask.to(device)


def umt5_stage(args, res: Results, device: str, milder: bool, cfg) -> list:
    try:
        return _umt5_stage(args, res, device, milder, cfg)
    finally:
        free(device)


def _umt5_stage(args, res: Results, device: str, milder: bool, cfg) -> list:
    from scail2_lite.encoders import build_umt5
    from scail2_lite.synth import umt5_tensors

    key = "umt5_mild" if milder else "umt5"
    model = build_umt5(umt5_tensors(cfg, args.seed, device)).to(device)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".block." in n]
    sw = Swapper(model, names, device)
    if milder:
        sw.make_milder(args.seed + 11)
    ids, mask = prompt_ids(cfg.vocab_size, device)

    @torch.no_grad()
    def encode() -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask).last_hidden_state.float()

    ref = encode()
    layers = cfg.num_layers
    variants = [peer("comfy fp8_scaled"), peer("gguf Q8_0"),
                gguf_k_m("gguf Q5_K_M", P.q5_k, P.BITS_Q5_K, layers),
                gguf_k_m("gguf Q4_K_M", P.q4_k, P.BITS_Q4_K, layers),
                peer("bnb nf4"), peer("quanto int8 (WanGP)"),
                ours_umt5("ours int8 (rotated quanto int8)", P.quanto_int8, lambda o, i: 8 + 16 / i, False),
                ours_umt5("ours nf4 (rotated, wo bf16: as run)", P.nf4, lambda o, i: 4.5, True),
                ours_umt5("ours nf4 (rotated, every Linear)", P.nf4, lambda o, i: 4.5, False)]
    rows, record = [], {"prompts": list(PROMPTS), "tokens": mask.sum(1).tolist(), "variants": {}}
    lengths = mask.sum(1).tolist()
    for v in within_budget(variants, args.budget_s, key, record):
        start = time.perf_counter()
        stats = sw.apply(v)
        out = encode()
        sw.restore()
        cos = [float(torch.nn.functional.cosine_similarity(ref[i, :n], out[i, :n], dim=-1).mean())
               for i, n in enumerate(lengths)]
        rel = float(torch.cat([(out[i, :n] - ref[i, :n]).flatten() for i, n in enumerate(lengths)]).norm()
                    / torch.cat([ref[i, :n].flatten() for i, n in enumerate(lengths)]).norm())
        stats.update(embeddings_rel_error=rel, worst_prompt_cosine=min(cos), mean_prompt_cosine=sum(cos) / len(cos),
                     seconds=time.perf_counter() - start, family=v.family)
        record["variants"][v.label] = stats
        res.put(key, record)
        log(f"{key} {v.label}: w {stats['weight_rel_error']:.4f} emb {rel:.4f} worst cos {min(cos):.5f}")
        rows.append([v.label, f"{stats['bits_per_weight']:.2f}", f"{stats['linear_gb']:.2f}",
                     f"{stats['weight_rel_error']:.4f}", f"{rel:.4f}", f"{min(cos):.5f}",
                     f"{sum(cos) / len(cos):.5f}"])
    return rows


# ---------------------------------------------------------------- main


def small_configs():
    """The --tiny geometry: every width a multiple of 256, so each format runs its real code path."""
    from scail2_lite.config import DiTConfig
    from scail2_lite.encoders import _umt5

    dit = DiTConfig(dim=256, ffn_dim=512, freq_dim=64, text_dim=256, num_heads=2, num_layers=2, clip_dim=256)
    return dit, _umt5(vocab_size=4096, d_model=256, d_ff=512, num_heads=4, d_kv=64, num_layers=2)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="small models on the CPU (the test)")
    ap.add_argument("--frames", type=int, default=None, help="DiT frames (default 5; tiny 5)")
    ap.add_argument("--keep-share", type=float, default=0.05, help="mixed precision: share of Linear params kept")
    ap.add_argument("--budget-s", type=float, default=220.0, help="start no new variant after this many seconds")
    ap.add_argument("--skip", default="", help="comma list: umt5, dit, mild")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("the full run needs a CUDA GPU; use --tiny on a CPU")
    from scail2_lite.config import PRESETS
    from scail2_lite.encoders import umt5_config

    if args.tiny:
        dit_cfg, umt5_cfg = small_configs()
        args.frames, args.height, args.width, args.sens_height, args.sens_width = args.frames or 5, 64, 64, 32, 32
    else:
        dit_cfg, umt5_cfg = PRESETS["scail2-14b"], umt5_config("full")
        args.frames, args.height, args.width, args.sens_height, args.sens_width = args.frames or 5, 512, 896, 128, 224
    args.keep_on_device = device == "cuda" and torch.cuda.get_device_properties(0).total_memory > 70e9
    out = args.json or (Path(os.environ["OUT"]) / "formats.json" if os.environ.get("OUT") else None)
    res = Results(out)
    skip = set(filter(None, args.skip.split(",")))
    lat_t, h, w = (args.frames - 1) // 4 + 1, args.height // 16, args.width // 16
    tokens = h * w + lat_t * h * w + lat_t * (h // 2) * (w // 2)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "tiny": args.tiny, "dit_tokens": tokens, "frames": args.frames, "size": [args.height, args.width],
           "keep_share": args.keep_share}
    res.put("env", env)
    log(f"env {env}")
    tables = {}
    if device == "cuda":
        P.ROWS = 8192
    # most important first: a stage cut by the time budget loses the least
    if "dit" not in skip:
        tables[f"DiT, synthetic recipe, {tokens} tokens"] = (DIT_HEADER, dit_stage(args, res, device, False, dit_cfg))
    if "umt5" not in skip:
        tables["umT5, synthetic recipe (heavy tails, outlier columns)"] = (
            UMT5_HEADER, umt5_stage(args, res, device, False, umt5_cfg))
        if "mild" not in skip:
            tables["umT5, milder distribution (Gaussian)"] = (UMT5_HEADER, umt5_stage(args, res, device, True,
                                                                                     umt5_cfg))
    if "dit" not in skip and "mild" not in skip:
        tables[f"DiT, milder distribution (Gaussian), {tokens} tokens"] = (DIT_HEADER,
                                                                          dit_stage(args, res, device, True, dit_cfg))
    for title, (header, rows) in tables.items():
        print(f"\n{title}:\n\n{table(header, rows)}", flush=True)
    log("done")
    return res.data


if __name__ == "__main__":
    main()
