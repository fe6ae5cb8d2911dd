"""Several processes make one video (distributed.py) with gloo on CPU: the latents are those of one process, bit for
bit (every op outside self-attention is per token, self-attention per head, the CFG exchange copies values), for the
CFG split, Ulysses and both combined, in animation and replacement (two segments: history carried), with streaming
on; the DiT forward with Ulysses over 2 and 4 ranks (uneven shares, token chunks, a block streamer) likewise.

The workers are fresh processes (`_spawn` says why not forks) and each scenario runs inside one process group."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scail2_lite import attention_fp8, attention_int8
from scail2_lite.blocks import Kernels
from scail2_lite.distributed import Ranks, shares
from scail2_lite.errors import UserError
from scail2_lite.inputs import InputFiles
from scail2_lite.config import DiTConfig
from scail2_lite.offload.planner import block_bytes, nonblock_bytes, plan
from scail2_lite.pipeline import Pipeline
from scail2_lite.settings import MemorySettings
from scail2_lite.model import SCAIL2Model
from scail2_lite.offload.streamer import BlockStreamer, StreamConfig
from scail2_lite.synth import synth, tiny_config

from conftest import run_model
from test_golden import SETTINGS


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files(folder: Path) -> InputFiles:
    inputs = folder / "inputs"
    return InputFiles(inputs / "ref.png", inputs / "ref_mask.png", inputs / "driving.mp4", inputs / "driving_mask.mp4")


# Small enough for 2 shared cores (the VAE dominates): two segments of 5 frames (history carried), 2 steps, CFG.
SMALL = SETTINGS.with_changes(size=(64, 64), frames=9, segment_len=5, segment_overlap=1)


def _generate(pipe: Pipeline, folder: Path, name: str, guidance: float, output: Path | None = None):
    latents: list[torch.Tensor] = []
    result = pipe(_files(folder), "a person dancing", "", SMALL.with_changes(
        replace=name.startswith("replace"), guidance=guidance), output=output, on_latents=lambda k, z: latents.append(z))
    return latents, result


def _worker(rank: int, world: int, port: int, folder: Path, out: Path, runs: list[tuple[str, str, str | None, float]]):
    """Each run: (name, parallel mode, profile, guidance); writes `out/name.rank.pt` (latents per segment)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        _model_forward(rank, world, out)
        _fp8_heads(rank, world, out)
        for name, mode, profile, guidance in runs:
            pipe = Pipeline.from_pretrained(folder, MemorySettings(device="cpu", profile=profile, prompt_cache=False,
                                                                   parallel=mode))
            latents, result = _generate(pipe, folder, name, guidance, out / f"{name}.{rank}.mp4")
            torch.save({"latents": latents, "parallel": result.settings["parallel"],
                        "output": str(result.output)}, out / f"{name}.{rank}.pt")
    finally:
        dist.destroy_process_group()


def _model_inputs() -> tuple[SCAIL2Model, dict[str, torch.Tensor]]:
    """The tiny DiT and inputs whose 285 tokens split unevenly over 2 and 4 ranks."""
    torch.manual_seed(0)
    config = tiny_config()
    model = SCAIL2Model(config).eval()
    t, h, w = 3, 12, 20
    return model, {
        "x": torch.randn(1, 16, t, h, w), "t": torch.tensor([700.0]), "context": torch.randn(1, 7, config.text_dim),
        "clip_fea": torch.randn(1, 257, config.clip_dim), "pose_latents": torch.randn(1, 16, t, h // 2, w // 2),
        "driving_masks": torch.rand(1, config.mask_dim, t, h // 2, w // 2),
        "ref_latents": torch.randn(1, 16, 1, h, w), "ref_masks": torch.rand(1, config.mask_dim, 1 + t, h, w),
    }


def _model_forward(rank: int, world: int, out: Path) -> None:
    """The DiT forward with this rank's Ulysses share, animation and replacement, with a block streamer."""
    model, inputs = _model_inputs()
    ranks = Ranks(rank, world)
    split = ranks.split("ulysses", True, model.config.num_heads)
    with BlockStreamer(model, "cpu", StreamConfig(resident_blocks=1, prefetch=0)):
        got = [run_model(model, inputs, replace, Kernels(attn_chunk=40, ffn_chunk=30, split=split.tokens))
               for replace in (False, True)]
    torch.save(got, out / f"model.{rank}.pt")


def _qkv(heads: int = 8) -> list[torch.Tensor]:
    """q, k, v (1, 96, heads, 64) bf16 whose heads differ in magnitude (a per-rank absmax would differ)."""
    g = torch.Generator().manual_seed(1)
    gain = torch.linspace(0.5, 4.0, heads)[None, None, :, None]
    return [(torch.randn(1, 96, heads, 64, generator=g) * gain + 0.3).bfloat16() for _ in range(3)]


def _fp8_heads(rank: int, world: int, out: Path) -> None:
    """The fp8 backend's numerics (`emulate`: the kernel's scales and roundings) on this rank's heads, as after
    Ulysses' all-to-all: with the group, and without it (a rank's own per-tensor scales)."""
    q, k, v = (t.chunk(world, dim=2)[rank] for t in _qkv())
    torch.save({"group": attention_fp8.emulate(q, k, v, dist.group.WORLD),
                "alone": attention_fp8.emulate(q, k, v)}, out / f"fp8.{rank}.pt")


def _check_fp8_heads(out: Path, world: int) -> None:
    """Ranks' heads put together are one process's fp8 attention, bit for bit; a rank's own scales would not be."""
    parts = [torch.load(out / f"fp8.{r}.pt") for r in range(world)]
    one = attention_fp8.emulate(*_qkv())
    assert torch.equal(torch.cat([p["group"] for p in parts], dim=2), one)
    assert not torch.equal(torch.cat([p["alone"] for p in parts], dim=2), one)


def test_int8_attention_is_per_head():
    """The int8 backend (and sage: per block and head) has no scale across heads: Ulysses' 1/N of the heads
    compute what one process computes for them."""
    q, k, v = _qkv()
    one = attention_int8.attention_reference(q, k, v)
    parts = [attention_int8.attention_reference(*(t[:, :, h : h + 4] for t in (q, k, v))) for h in (0, 4)]
    assert torch.equal(torch.cat(parts, dim=2), one)


def _spawn(world: int, folder: Path, out: Path, runs: list) -> None:
    # Fresh processes, not forks: this process has run FFmpeg (the fixture's videos), and PyAV 18's forked children
    # hung in their first decode.
    mp.start_processes(_worker, args=(world, _port(), folder, out, runs), nprocs=world, start_method="spawn")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return synth(tmp_path_factory.mktemp("dist") / "scail2", scale="tiny", fmt="sat", seed=0)


@pytest.fixture(scope="module")
def alone(folder) -> dict[tuple[str, float], list[torch.Tensor]]:
    """Latents of this process alone, the references: (mode, guidance) -> latents per segment."""
    pipe = Pipeline.from_pretrained(folder, device="cpu", prompt_cache=False, parallel="off")
    return {(name, g): _generate(pipe, folder, name, g)[0] for name, g in (("animate", 5.0), ("replace", 5.0))}


def _check(out: Path, name: str, world: int, parallel: str, expected: list[torch.Tensor]) -> None:
    """Every rank holds the latents of one process, bit for bit; only rank 0 wrote the video."""
    runs = [torch.load(out / f"{name}.{r}.pt") for r in range(world)]
    assert runs[0]["parallel"] == parallel
    for r in runs:
        assert len(r["latents"]) == len(expected) == 2
        assert all(torch.equal(a, b) for a, b in zip(r["latents"], expected)), name
    assert (out / f"{name}.0.mp4").is_file() and runs[0]["output"] == str(out / f"{name}.0.mp4")
    assert not any((out / f"{name}.{r}.mp4").exists() for r in range(1, world)) and runs[1]["output"] == "None"
    model, inputs = _model_inputs()
    for replace in (False, True):
        expected_model = run_model(model, inputs, replace)
        for r in range(world):
            assert torch.equal(torch.load(out / f"model.{r}.pt")[replace], expected_model), (r, replace)


def test_two_ranks_cfg_and_ulysses_equal_one_process(folder, alone, tmp_path):
    _spawn(2, folder, tmp_path, [("animate_cfg", "cfg", "8gb", 5.0), ("replace_ulysses", "ulysses", "layers", 5.0)])
    _check(tmp_path, "animate_cfg", 2, "cfg 2 over 2 ranks", alone["animate", 5.0])
    _check_fp8_heads(tmp_path, 2)
    _check(tmp_path, "replace_ulysses", 2, "ulysses 2 over 2 ranks", alone["replace", 5.0])


def test_four_ranks_cfg_times_ulysses_equal_one_process(folder, alone, tmp_path):
    _spawn(4, folder, tmp_path, [("replace_auto", "auto", "lowram", 5.0)])
    _check(tmp_path, "replace_auto", 4, "cfg 2 x ulysses 2 over 4 ranks", alone["replace", 5.0])
    _check_fp8_heads(tmp_path, 4)


def test_shares_are_even_and_cover_the_sequence():
    assert shares(10, 4) == [3, 3, 2, 2] and shares(8, 2) == [4, 4] and sum(shares(95_920, 5)) == 95_920


def test_alone_every_split_but_off_and_auto_says_how_to_launch(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ranks = Ranks.join("auto", torch.device("cpu"))
    assert ranks.world == 1 and ranks.split("auto", True, 40).describe() is None
    for mode in ("cfg", "ulysses"):
        with pytest.raises(UserError, match="torchrun"):
            ranks.split(mode, True, 40)
    with pytest.raises(UserError, match="--parallel"):
        MemorySettings(parallel="ring")


def test_splits_that_cannot_be_made_are_one_line():
    three, two = Ranks(0, 3), Ranks(0, 2)
    with pytest.raises(UserError, match="does not divide"):
        three.split("ulysses", True, 40)
    with pytest.raises(UserError, match="guidance 1"):
        two.split("cfg", False, 40)
    with pytest.raises(UserError, match="even number"):
        three.split("cfg", True, 40)


def test_planner_plans_one_rank_share_of_the_activations():
    config = DiTConfig.preset("scail2-14b")
    from scail2_lite.offload.card import DeviceMemory

    gpu = DeviceMemory.card(10**12)
    one, two = (plan(config, 704, 1280, 81, gpu, 10**12, profile="resident", weights="fp8", sequence_split=n)
                for n in (1, 2))
    weights = nonblock_bytes(config) + config.num_layers * block_bytes(config, "fp8")
    act1, act2 = (p.phases["dit_step"].vram - weights for p in (one, two))
    assert two.sequence_split == 2 and 0.5 * act1 < act2 < 0.7 * act1  # half the tokens, plus all-to-all buffers
    assert two.phases["text_encoder"] == one.phases["text_encoder"]  # weights and encoders are every rank's


def _torchrun(folder: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    files = _files(folder)
    cli = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_port()),
           shutil.which("scail2-lite", path=str(Path(sys.executable).parent)), "generate", str(folder),
           "--image", str(files.image), "--mask-image", str(files.mask_image), "--pose", str(files.pose),
           "--mask-video", str(files.mask_video), "--width", "64", "--height", "64", "--steps", "1",
           "--frames", "5", "--device", "cpu", "--no-prompt-cache", "-o", str(out), *args]
    return subprocess.run(cli, capture_output=True, text=True, timeout=300, env=env)


def test_torchrun_cli_one_writer_and_one_error_line(folder, tmp_path):
    ok = _torchrun(folder, tmp_path / "out.mp4", "--parallel", "cfg", "--guidance", "3")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (tmp_path / "out.mp4").is_file() and ok.stderr.count("scail2-lite generate") == 1
    assert "cfg 2 over 2 ranks" in " ".join(ok.stderr.split())
    bad = _torchrun(folder, tmp_path / "bad.mp4", "--parallel", "cfg", "--guidance", "1")
    assert bad.returncode != 0 and not (tmp_path / "bad.mp4").exists()
    ours = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "--parallel cfg splits the two CFG branches" in ours[0], bad.stderr[-3000:]
