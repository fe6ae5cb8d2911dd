"""Several processes make one video (distributed.py) with gloo on CPU: the latents are those of one process, bit for
bit (every op outside self-attention is per token, self-attention per head, the CFG exchange copies values), for the
CFG split, Ulysses over 2 and 4 ranks and both combined, in animation and replacement, with streaming on.

The workers are forked (no second import of torch) and each scenario runs inside one process group."""

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
from safetensors.torch import load_file

from scail2_lite.distributed import Ranks, shares
from scail2_lite.errors import UserError
from scail2_lite.inputs import InputFiles
from scail2_lite.config import DiTConfig
from scail2_lite.offload.planner import block_bytes, nonblock_bytes, plan
from scail2_lite.pipeline import Pipeline
from scail2_lite.settings import MemorySettings
from scail2_lite.synth import synth

from test_golden import GOLDEN, SETTINGS


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files(folder: Path) -> InputFiles:
    inputs = folder / "inputs"
    return InputFiles(inputs / "ref.png", inputs / "ref_mask.png", inputs / "driving.mp4", inputs / "driving_mask.mp4")


def _worker(rank: int, world: int, port: int, folder: Path, out: Path, runs: list[tuple[str, str, str | None, float]]):
    """Each run: (name, parallel mode, profile, guidance); writes `out/name.rank.pt` (latents per segment)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for name, mode, profile, guidance in runs:
            pipe = Pipeline.from_pretrained(folder, MemorySettings(device="cpu", profile=profile, prompt_cache=False,
                                                                   parallel=mode))
            latents: list[torch.Tensor] = []
            result = pipe(_files(folder), "a person dancing", "", SETTINGS.with_changes(
                replace=name.startswith("replace"), guidance=guidance), output=out / f"{name}.{rank}.mp4",
                on_latents=lambda k, z: latents.append(z))
            torch.save({"latents": latents, "parallel": result.settings["parallel"],
                        "output": str(result.output)}, out / f"{name}.{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(world: int, folder: Path, out: Path, runs: list) -> None:
    mp.start_processes(_worker, args=(world, _port(), folder, out, runs), nprocs=world, start_method="fork")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return synth(tmp_path_factory.mktemp("dist") / "scail2", scale="tiny", fmt="sat", seed=0)


def _check(out: Path, name: str, world: int, parallel: str, golden_mode: str | None) -> list[torch.Tensor]:
    """Every rank holds the same latents; only rank 0 wrote the video; those latents are returned."""
    runs = [torch.load(out / f"{name}.{r}.pt") for r in range(world)]
    assert runs[0]["parallel"] == parallel
    for r in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0]["latents"], r["latents"]))
    assert (out / f"{name}.0.mp4").is_file() and runs[0]["output"] == str(out / f"{name}.0.mp4")
    assert not any((out / f"{name}.{r}.mp4").exists() for r in range(1, world)) and runs[1]["output"] == "None"
    if golden_mode is not None:
        golden = load_file(GOLDEN)
        for k, z in enumerate(runs[0]["latents"]):
            assert torch.equal(z, golden[f"{golden_mode}.{k}"]), f"{name} segment {k}"
    return runs[0]["latents"]


def test_two_ranks_cfg_and_ulysses_equal_one_process(folder, tmp_path):
    _spawn(2, folder, tmp_path, [("animate_cfg", "cfg", "8gb", 5.0), ("replace_ulysses", "ulysses", "layers", 5.0),
                                 ("animate_auto_nocfg", "auto", None, 1.0)])
    _check(tmp_path, "animate_cfg", 2, "cfg 2 over 2 ranks", "animate")
    _check(tmp_path, "replace_ulysses", 2, "ulysses 2 over 2 ranks", "replace")
    # guidance 1: auto runs Ulysses (nothing to split by CFG); the reference is this process alone
    got = _check(tmp_path, "animate_auto_nocfg", 2, "ulysses 2 over 2 ranks", None)
    alone: list[torch.Tensor] = []
    pipe = Pipeline.from_pretrained(folder, device="cpu", prompt_cache=False)
    pipe(_files(folder), "a person dancing", "", SETTINGS.with_changes(guidance=1.0),
         on_latents=lambda k, z: alone.append(z))
    assert all(torch.equal(a, b) for a, b in zip(got, alone))


def test_four_ranks_cfg_times_ulysses_and_ulysses_equal_one_process(folder, tmp_path):
    _spawn(4, folder, tmp_path, [("replace_auto", "auto", "16gb", 5.0), ("animate_ulysses", "ulysses", "lowram", 5.0)])
    _check(tmp_path, "replace_auto", 4, "cfg 2 x ulysses 2 over 4 ranks", "replace")
    _check(tmp_path, "animate_ulysses", 4, "ulysses 4 over 4 ranks", "animate")


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
    one, two = (plan(config, 704, 1280, 81, 10**12, 10**12, profile="resident", weights="fp8", sequence_split=n)
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
           "--mask-video", str(files.mask_video), "--width", "128", "--height", "128", "--steps", "1",
           "--frames", "5", "--device", "cpu", "--no-prompt-cache", "-o", str(out), *args]
    return subprocess.run(cli, capture_output=True, text=True, timeout=300, env=env)


def test_torchrun_cli_one_writer_and_one_error_line(folder, tmp_path):
    ok = _torchrun(folder, tmp_path / "out.mp4", "--parallel", "cfg", "--guidance", "3")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (tmp_path / "out.mp4").is_file() and ok.stderr.count("scail2-lite generate") == 1
    assert "cfg 2 over 2 ranks" in ok.stderr
    bad = _torchrun(folder, tmp_path / "bad.mp4", "--parallel", "cfg", "--guidance", "1")
    assert bad.returncode != 0 and not (tmp_path / "bad.mp4").exists()
    assert bad.stderr.count("error: --parallel cfg splits the two CFG branches") == 1, bad.stderr[-3000:]
