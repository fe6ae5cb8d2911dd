"""Issue 24 deliverables 4 and 7: DiT steps over 1, 2 and 4 GPUs with each split, against one GPU.

Per world size N (1, 2, 4; at most the GPUs present) the script spawns N ranks (its own launcher: one call measures
every N; torchrun is the user's launcher, these are the same collectives), each building the same full-width DiT
(`--blocks` of the 40 blocks, synthetic weights drawn on its GPU, Linears in `--scheme`) and the same 704p x 81
inputs (seeded), then per split of that N:
  cfg      (N even, guidance 5) the CFG branches on two halves of the ranks; for N = 4 each half also splits its
           tokens over 2 ranks by Ulysses: the "both" split, cfg 2 x ulysses 2
  ulysses  guidance 5 (both branches on every rank) and guidance 1 (the CFG-1 fast preset's case)
one warm-up velocity (kernels, cuDNN graphs, Triton), then `--steps` UniPC steps timed, the velocity computed as
`Pipeline._velocity` does (this rank's branches, `Split.exchange`, `sampling.cfg` in fp32 on the CPU). Recorded:
s/step (min over the timed steps; the x40/B column scales the block stack to the full model: the blocks are all
alike and embedding/unembedding cost under 1%), peak allocated per rank, and the final latents against one GPU's
with the same guidance (torch.equal, relative error; every rank's latents must be identical, checked by hash).
Then per N > 1 the all-to-all of one block's Ulysses traffic (q, k, v to heads and the output back: 4 exchanges of
tokens/N x 5120 bf16 per rank) timed with NCCL's default transport (NVLink on the device) and again with
`NCCL_P2P_DISABLE=1` (through host memory, as on consumer cards without peer-to-peer) for the README's PCIe 4.0
x16 estimate (~80 ms per block at N = 2).

Multi-GPU run (deliverable 7, one call, ~3-5 minutes with the default 10 blocks on 4 H100s):
    PYTHONUNBUFFERED=1 PYTHONPATH=$PWD python benchmarks/bench_parallel.py
One GPU (NCCL refuses two ranks on one GPU, "Duplicate GPU detected"): `--share-gpu` runs the ranks with gloo, all
on cuda:0 (gloo stages CUDA tensors through the host), N = 1 and 2. It proves the GPU path (fp8 attention's
all-reduced scales, FP8 Linears on token shares, the exchanges) gives one GPU's latents; its times are not
speed-ups (two ranks share one GPU) and its all-to-all is gloo's:
    PYTHONUNBUFFERED=1 PYTHONPATH=$PWD python benchmarks/bench_parallel.py --share-gpu
CPU proof (tiny DiT, gloo, N = 1, 2, 4; tests/test_bench_parallel.py runs it):
    python benchmarks/bench_parallel.py --tiny
Prints a markdown table; writes $OUT/parallel.json (or ./parallel.json) after every N, so a timeout keeps what
finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from scail2_lite.attention import resolve
from scail2_lite.blocks import CLIP_TOKENS, Kernels
from scail2_lite.config import SIZES, DiTConfig
from scail2_lite.distributed import Ranks, Split, shares
from scail2_lite.formats import wan_shapes
from scail2_lite.model import LATENT_CHANNELS, Conditions, SCAIL2Model
from scail2_lite.quantize.linear import swap_linears
from scail2_lite.quantize.report import compare
from scail2_lite.quantize.schemes import is_quantized_name, kept_dtype
from scail2_lite.sampling import cfg, make_scheduler
from scail2_lite.synth import synth_tensor, tiny_config

GB = 1e9
SEED = 0
GUIDANCE = 5.0
SHIFT = 5.0
CHUNK = 8192  # the resident profile's attn_chunk / ffn_chunk
A2A_REPEATS = 5
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class Setup:
    tiny: bool
    share_gpu: bool
    blocks: int
    steps: int
    size: tuple[int, int]  # (height, width)
    frames: int
    scheme: str
    attention: str
    workdir: str

    @property
    def cuda(self) -> bool:
        return not self.tiny

    @property
    def backend(self) -> str:
        return "nccl" if self.cuda and not self.share_gpu else "gloo"

    def config(self) -> DiTConfig:
        base = tiny_config() if self.tiny else DiTConfig.preset("scail2-14b")
        return dataclasses.replace(base, num_layers=self.blocks)


def runs_for(world: int) -> list[tuple[str, float]]:
    """(parallel mode, guidance) per run of a world size: see the module docstring."""
    if world == 1:
        return [("off", GUIDANCE), ("off", 1.0)]
    return ([("cfg", GUIDANCE)] if world % 2 == 0 else []) + [("ulysses", GUIDANCE), ("ulysses", 1.0)]


def build_model(s: Setup, device: torch.device) -> nn.Module:
    """The DiT of `s.config()` with synth's weights drawn on `device` (same on every rank), Linears in s.scheme."""
    config = s.config()
    with torch.device("meta"):
        model = SCAIL2Model(config)
    state = {k: synth_tensor(k, shape, SEED, "dit", device=device).to(kept_dtype(k))
             for k, shape in wan_shapes(config).items()}
    model.load_state_dict(state, assign=True)
    del state
    if s.scheme != "bf16":
        names = {m: s.scheme for m, mod in model.named_modules()
                 if isinstance(mod, nn.Linear) and is_quantized_name(f"{m}.weight")}
        swap_linears(model, names)
    return model.eval()


def make_inputs(s: Setup, config: DiTConfig) -> tuple[torch.Tensor, Conditions, list[tuple[torch.Tensor, ...]]]:
    """Initial latents (CPU fp32), conditions and the (cond, uncond) text + CLIP contexts, seeded (same on every
    rank). Shapes as the pipeline's for s.size x s.frames, animation mode."""
    g = torch.Generator().manual_seed(SEED)
    t, h, w = (s.frames - 1) // 4 + 1, s.size[0] // 8, s.size[1] // 8

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    latents = randn(1, LATENT_CHANNELS, t, h, w)
    cond = Conditions(randn(1, LATENT_CHANNELS, t, h // 2, w // 2),
                      torch.rand(1, config.mask_dim, t, h // 2, w // 2, generator=g),
                      randn(1, LATENT_CHANNELS, 1, h, w), torch.rand(1, config.mask_dim, 1 + t, h, w, generator=g))
    contexts = [randn(1, config.text_len, config.text_dim) for _ in range(2)]
    clip = randn(1, CLIP_TOKENS, config.clip_dim)
    return latents, cond, [(c, clip) for c in contexts]


def velocity(model: nn.Module, latents: torch.Tensor, t: torch.Tensor, cond: Conditions, ctx: list[torch.Tensor],
             guidance: float, split: Split, kernels: Kernels, device: torch.device) -> torch.Tensor:
    """`Pipeline._velocity` without the step cache: this rank's branches, exchanged, combined in fp32 on CPU."""
    x = latents.to(device, torch.bfloat16)
    tt = torch.full((1,), float(t), device=device)
    kernels = dataclasses.replace(kernels, split=split.tokens)
    outs = [model.forward_with_context(x, tt, ctx[i], cond, kernels).float() for i in split.branches(len(ctx))]
    outs = [o.cpu() for o in split.exchange(outs)]
    return cfg(outs[0], outs[1], guidance) if len(outs) == 2 else outs[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_split(s: Setup, model: nn.Module, ranks: Ranks, mode: str, guidance: float, inputs: tuple,
              kernels: Kernels) -> dict:
    """One run: warm-up velocity, then s.steps timed sampler steps; -> this rank's record (latents hash, seconds,
    peak) and, on rank 0, the final latents saved under the workdir."""
    device = ranks.device
    latents, cond, contexts = inputs
    config = model.config
    split = ranks.split(mode, guidance > 1, config.num_heads)
    n_ctx = 2 if guidance > 1 else 1
    with torch.no_grad():
        ctx = [model.embed_context(text.to(device, torch.bfloat16), clip.to(device, torch.bfloat16))
               for text, clip in contexts[:n_ctx]]
        cond = cond.to(device, torch.bfloat16)
        sampler = make_scheduler("unipc", s.steps, SHIFT, generator=torch.Generator().manual_seed(SEED))
        velocity(model, latents, sampler.timesteps[0], cond, ctx, guidance, split, kernels, device)  # warm-up
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = []
        for t in sampler.timesteps:
            t0 = time.perf_counter()
            v = velocity(model, latents, t, cond, ctx, guidance, split, kernels, device)
            latents = sampler.step(v, t, latents)
            seconds.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    tag = f"{ranks.world}_{mode}_{guidance:g}"
    if ranks.is_main:
        torch.save(latents, Path(s.workdir) / f"latents_{tag}.pt")
    return {"world": ranks.world, "mode": mode, "guidance": guidance, "split": split.describe() or "one process",
            "seconds": seconds, "peak_allocated": peak,
            "hash": hashlib.sha256(latents.numpy().tobytes()).hexdigest()[:16]}


def measure_all_to_all(s: Setup, config: DiTConfig, rank: int, world: int, device: torch.device) -> dict:
    """One block's Ulysses exchanges (q, k, v tokens -> heads, output heads -> tokens) at the full token count:
    ms per block (min of A2A_REPEATS), bytes each rank sends to the others, GB/s per rank and direction."""
    t, h, w = (s.frames - 1) // 4 + 1, s.size[0] // 16, s.size[1] // 16
    length = h * w + t * h * w + t * (h // 2) * (w // 2)  # reference frame + video + half-size pose tokens
    sizes = shares(length, world)
    n, heads, dim = sizes[rank], config.num_heads // world, config.head_dim
    send = torch.randn(world * n, 1, heads, dim, device=device).to(torch.bfloat16)
    recv = torch.empty(length, 1, heads, dim, device=device, dtype=torch.bfloat16)
    times = []
    for i in range(A2A_REPEATS + 1):
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(3):
            dist.all_to_all_single(recv, send, output_split_sizes=sizes, input_split_sizes=[n] * world)
        dist.all_to_all_single(send, recv, output_split_sizes=[n] * world, input_split_sizes=sizes)
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    sent = 4 * n * (world - 1) * heads * dim * 2  # what leaves this rank per block (its own head group stays)
    best = min(times)
    return {"tokens": length, "ms_per_block": round(best * 1e3, 2), "bytes_sent_per_rank": sent,
            "gb_per_s": round(sent / best / GB, 2)}


def _worker(rank: int, world: int, port: int, s: Setup, out: str, a2a_only: bool) -> None:
    # Forked CPU ranks stay on one thread: an OpenMP pool the parent used does not survive fork (a parallel region
    # in the child can hang), and the ranks share the cores anyway.
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world) if s.cuda else 1)
    device = torch.device("cuda", 0 if s.share_gpu else rank) if s.cuda else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(s.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=device if s.backend == "nccl" else None)
    try:
        config = s.config()
        records: list[dict] = []
        if not a2a_only:
            model = build_model(s, device)
            kernels = Kernels(resolve(s.attention), CHUNK, CHUNK)
            inputs = make_inputs(s, config)
            ranks = Ranks(rank, world, world, device)
            for mode, guidance in runs_for(world):
                record = run_split(s, model, ranks, mode, guidance, inputs, kernels)
                gathered: list = [None] * world
                dist.all_gather_object(gathered, record)
                if rank == 0:
                    record = {**record, "ranks_agree": len({r["hash"] for r in gathered}) == 1,
                              "peak_allocated": [r["peak_allocated"] for r in gathered]}
                    records.append(record)
                    log(f"N={world} {record['split']} g={guidance:g}: s/step {[round(x, 3) for x in record['seconds']]}")
        a2a = measure_all_to_all(s, config, rank, world, device) if world > 1 else None
        if rank == 0:
            Path(out).write_text(json.dumps({"runs": records, "all_to_all": a2a}))
    finally:
        dist.destroy_process_group()


def spawn(s: Setup, world: int, a2a_only: bool = False, env: dict[str, str] | None = None) -> dict:
    """Run `world` ranks (fork on CPU, spawn on CUDA); -> rank 0's record."""
    out = Path(s.workdir) / f"world{world}{'_a2a' if a2a_only else ''}.json"
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        mp.start_processes(_worker, args=(world, _port(), s, str(out), a2a_only), nprocs=world,
                           start_method="spawn" if s.cuda else "fork")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return json.loads(out.read_text())


def table(result: dict, blocks: int) -> str:
    rows = ["| GPUs | split | guidance | s/step | x40/B s/step | vs 1 GPU | peak alloc GB per rank | latents vs 1 "
            "GPU | ranks agree |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        peaks = "-" if r["peak_allocated"][0] is None else ", ".join(f"{p / GB:.2f}" for p in r["peak_allocated"])
        check = "identical" if r["equal"] else f"rel {r['rel_error']:.2e}, cos {r['cosine']:.6f}"
        rows.append(f"| {r['world']} | {r['split']} | {r['guidance']:g} | {r['s_per_step']:.3f} | "
                    f"{r['s_per_step'] * 40 / blocks:.2f} | {r['ratio']:.3f} | {peaks} | {check} | "
                    f"{'yes' if r['ranks_agree'] else 'NO'} |")
    rows += ["", "| GPUs | transport | tokens | ms per block (4 all-to-alls) | GB sent per rank | GB/s per rank |",
             "|---|---|---|---|---|---|"]
    for a in result["all_to_all"]:
        rows.append(f"| {a['world']} | {a['transport']} | {a['tokens']} | {a['ms_per_block']} | "
                    f"{a['bytes_sent_per_rank'] / GB:.3f} | {a['gb_per_s']} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU proof: tiny DiT, gloo")
    p.add_argument("--share-gpu", action="store_true", help="ranks with gloo all on cuda:0 (one-GPU machines)")
    p.add_argument("--worlds", default=None, help="world sizes, e.g. 1,2,4 (default: 1,2,4 up to the GPUs present; "
                   "1,2 with --share-gpu)")
    p.add_argument("--blocks", type=int, default=None, help="DiT blocks per forward (default 10; tiny: all 2)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--size", default="704p")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--scheme", default="fp8", choices=("bf16", "fp8", "int8"))
    p.add_argument("--attention", default="auto")
    a = p.parse_args(argv)
    if a.tiny:
        size, frames, blocks = (64, 96), 9, a.blocks or tiny_config().num_layers
        worlds = [1, 2, 4]
    else:
        if not torch.cuda.is_available():
            p.error("no CUDA GPU: use --tiny for the CPU proof")
        size, frames, blocks = SIZES[a.size], a.frames, a.blocks or 10
        gpus = torch.cuda.device_count()
        worlds = [1, 2] if a.share_gpu else [w for w in (1, 2, 4) if w <= gpus]
    if a.worlds:
        worlds = [int(w) for w in a.worlds.split(",")]
    out_dir = Path(os.environ.get("OUT", "."))
    with tempfile.TemporaryDirectory(prefix="bench_parallel_") as workdir:
        s = Setup(a.tiny, a.share_gpu, blocks, a.steps, size, frames, a.scheme, a.attention, workdir)
        device = "cpu (tiny)" if a.tiny else torch.cuda.get_device_name(0)
        result = {"device": device, "gpus": 0 if a.tiny else torch.cuda.device_count(), "torch": torch.__version__,
                  "command": sys.argv, "backend": s.backend, "blocks": blocks, "size": list(size), "frames": frames,
                  "scheme": a.scheme, "attention": a.attention, "runs": [], "all_to_all": []}
        log(f"{device}: worlds {worlds}, {blocks} blocks, {size[1]}x{size[0]}x{frames}, {a.scheme}, {s.backend}")
        one: dict[float, dict] = {}
        for world in worlds:
            try:
                got = spawn(s, world)
            except Exception as e:  # one world size failing (out of memory, a transport) leaves the others' figures
                result.setdefault("failed", {})[world] = f"{type(e).__name__}: {str(e)[-2000:]}"
                log(f"N={world} failed: {str(e)[-500:]}")
                _write(out_dir, result)
                continue
            for r in got["runs"]:
                latents = torch.load(Path(workdir) / f"latents_{world}_{r['mode']}_{r['guidance']:g}.pt")
                if world == 1:
                    one[r["guidance"]] = {"latents": latents, "s": min(r["seconds"])}
                base = one.get(r["guidance"])
                r["s_per_step"] = min(r["seconds"])
                r["ratio"] = r["s_per_step"] / base["s"] if base else float("nan")
                r["equal"] = bool(base and torch.equal(latents, base["latents"]))
                r.update(compare(base["latents"], latents) if base else {"rel_error": float("nan"), "cosine": 0.0})
                result["runs"].append(r)
            if got["all_to_all"]:
                result["all_to_all"].append({"world": world, "transport": s.backend, **got["all_to_all"]})
            if got["all_to_all"] and s.backend == "nccl":
                transport = "nccl, NCCL_P2P_DISABLE=1 (host memory)"
                try:
                    got = spawn(s, world, a2a_only=True, env={"NCCL_P2P_DISABLE": "1"})
                    result["all_to_all"].append({"world": world, "transport": transport, **got["all_to_all"]})
                except Exception as e:
                    result.setdefault("failed", {})[f"{world} {transport}"] = f"{type(e).__name__}: {str(e)[-2000:]}"
            _write(out_dir, result)
        print(table(result, blocks))
    return result


def _write(out_dir: Path, result: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "parallel.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
