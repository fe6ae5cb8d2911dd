"""DiT placement beside the encoders (offload/placement.py `HostSide`): the streamed blocks are read into pinned RAM
on a worker thread while other work runs, with the same numbers as a placement done at once; the worker's errors
surface in the main thread as they are (a UserError: one line, exit 2); Ctrl-C or SIGTERM stops it at its next
block and leaves the model whole; a RAM plan without room for the early buffer places after the encoders."""

from __future__ import annotations

import copy
import dataclasses
import gc
import threading
import weakref
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from scail2_lite.blocks import Kernels
from scail2_lite.cli import app
from scail2_lite.config import DiTConfig
from scail2_lite.errors import UserError
from scail2_lite.formats import WeightFiles
from scail2_lite.inputs import InputFiles
from scail2_lite.loader import load_dit
from scail2_lite.model import Conditions, SCAIL2Model
from scail2_lite.offload import host, planner
from scail2_lite.offload.card import DeviceMemory
from scail2_lite.offload.placement import DitPlacement
from scail2_lite.outputs import Terminated
from scail2_lite.pipeline import Pipeline
from scail2_lite.profiling import PhaseRecorder
from scail2_lite.settings import GenerationSettings
from scail2_lite.synth import synth

WORKER = "scail2-dit-host-side"
FILL = "scail2-fill"  # the pinned buffer's reading threads (host.READ_THREADS)
LAYERS = 4


def worker_alive() -> bool:
    return any(t.name == WORKER or t.name.startswith(FILL) for t in threading.enumerate() if t.is_alive())


def off_the_main_thread(reads: list[tuple[str, float]]) -> bool:
    """Whether every read ran on the pinned buffer's reading threads."""
    return bool(reads) and all(name.startswith(FILL) for name, _ in reads)


@pytest.fixture
def reads(monkeypatch) -> list[tuple[str, float]]:
    """Every tensor read from weight files: (thread name, when)."""
    seen: list[tuple[str, float]] = []
    real = WeightFiles.read_into

    def read_into(self, key, out):
        seen.append((threading.current_thread().name, time.perf_counter()))
        return real(self, key, out)

    monkeypatch.setattr(WeightFiles, "read_into", read_into)
    return seen


def failing_reads(monkeypatch, error: BaseException) -> None:
    def read_into(self, key, out):
        raise error

    monkeypatch.setattr(WeightFiles, "read_into", read_into)


# ---- the placement alone, on a small model saved to a file --------------------------------------------------------


def _model() -> SCAIL2Model:
    torch.manual_seed(0)
    model = SCAIL2Model(dataclasses.replace(DiTConfig.preset("tiny"), num_layers=LAYERS, clip_dim=32)).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial biases and norms, so a wrong weight always shows
            p.normal_(0, 0.2)
    return model


@torch.no_grad()
def _run(model: SCAIL2Model, kernels: Kernels) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    cond = Conditions(r(1, 16, 2, 4, 4), r(1, 28, 2, 4, 4), r(1, 16, 1, 8, 8), r(1, 28, 3, 8, 8))
    return model(r(1, 16, 2, 8, 8), torch.tensor([700.0]), r(1, 5, model.config.text_dim),
                 r(1, 257, model.config.clip_dim), cond, kernels)


def _plan(model: SCAIL2Model, resident: int) -> planner.Plan:
    p = planner.plan(model.config, 64, 64, 5, DeviceMemory(0, 0, 0), 1 << 50, profile="16gb")
    return dataclasses.replace(p, resident_blocks=resident)


def test_the_blocks_run_the_attention_their_plan_was_counted_for() -> None:
    """The planner resolves the attention (`--attention`, else the profile's) and counts its memory; the placement runs
    that backend, and a placement without a plan the one it was given."""
    model = _model()
    planned = planner.plan(model.config, 64, 64, 5, DeviceMemory(0, 0, 0), 1 << 50, profile="16gb", attention="math")
    assert planned.attention == "math"
    assert DitPlacement(model, torch.device("cpu"), planned, attention="math").kernels.attention == "math"
    assert _plan(model, 0).attention == "sdpa"  # the profile's auto, on a machine without a GPU
    assert DitPlacement(model, torch.device("cpu"), None, attention="flash").kernels.attention == "flash"


WRECKED = 0.5


@pytest.fixture
def saved(tmp_path) -> tuple[SCAIL2Model, torch.Tensor, Path]:
    """(a copy of the model whose blocks but the first are set to WRECKED, the original's output, its weights file): a
    placed model giving the original's output can only have read its streamed blocks from the file."""
    model = _model()
    expected = _run(model, DitPlacement(model, torch.device("cpu"), _plan(model, 0)).kernels)
    path = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    wrecked = copy.deepcopy(model)
    with torch.no_grad():
        for b in wrecked.blocks[1:]:
            for t in [*b.parameters(), *b.buffers()]:
                t.fill_(WRECKED)
    return wrecked, expected, path


@pytest.mark.parametrize("resident", [0, 1])
def test_host_side_built_on_the_worker_gives_the_same_numbers(saved, reads, resident: int) -> None:
    wrecked, expected, path = saved
    with DitPlacement(wrecked, torch.device("cpu"), _plan(wrecked, resident), weight_files=[path]) as placement:
        seen: list[tuple[str, int, int]] = []
        placement.prepare(lambda what, done, total: seen.append((what, done, total)))
        job = placement.host_side
        job._thread.join()  # here: the encoders would run
        # the streamed blocks are read on the worker, the resident ones are not read before `apply`
        assert off_the_main_thread(reads)
        assert seen[-1][1] == seen[-1][2] == LAYERS - resident and seen[-1][0].startswith("done in")
        assert [done for what, done, _ in seen if what.startswith("reading")] == list(range(1, LAYERS - resident + 1))
        placement.apply()
        assert job.seconds > 0 and job.waited >= 0 and placement.streamers_built == 1
        assert torch.equal(_run(wrecked, placement.kernels), expected)
        assert placement.overlap_note.startswith("host side beside the encoders")
    assert not worker_alive()


def test_a_model_held_in_ram_is_copied_by_the_worker() -> None:
    """No weight files (a .pth checkpoint, LoRAs merged): the worker copies the model's own tensors."""
    model = _model()
    with DitPlacement(model, torch.device("cpu"), _plan(model, 0)) as placement:
        expected = _run(model, placement.kernels)
        placement.prepare()
        placement.apply()
        assert placement.host_side.seconds is not None and placement.streamer.host_bytes > 0
        assert torch.equal(_run(model, placement.kernels), expected)


@pytest.mark.parametrize("error", [UserError("the shard went away"), OSError(5, "Input/output error")])
def test_the_workers_error_is_raised_by_apply(saved, monkeypatch, error) -> None:
    wrecked, _, path = saved
    failing_reads(monkeypatch, error)
    with DitPlacement(wrecked, torch.device("cpu"), _plan(wrecked, 0), weight_files=[path]) as placement:
        placement.prepare()
        with pytest.raises(type(error)) as caught:
            placement.apply()
        assert caught.value is error and not worker_alive()


@pytest.mark.parametrize("threads", [1, 2])
def test_close_stops_the_worker_at_its_next_block_and_the_model_stays_whole(saved, reads, monkeypatch,
                                                                             threads: int) -> None:
    """Stopped while reading, the fill finishes the blocks being read (READ_THREADS at the most), starts no other,
    and leaves every block whole."""
    wrecked, expected, path = saved
    monkeypatch.setattr(host, "READ_THREADS", threads)
    real = WeightFiles.read_into
    monkeypatch.setattr(WeightFiles, "read_into", lambda self, key, out: time.sleep(0.01) or real(self, key, out))
    placement = DitPlacement(wrecked, torch.device("cpu"), _plan(wrecked, 0), weight_files=[path])
    with placement:
        placement.prepare()
        while not reads:  # the worker is reading the first block: an error or Ctrl-C now leaves the `with`
            time.sleep(0.001)
    assert not worker_alive()
    per_block = len(wrecked.blocks[0].state_dict())
    assert 0 < len(reads) <= per_block * threads < per_block * LAYERS  # it stopped after the blocks it was reading
    # every tensor is whole: read from the file, or still the one it was (never a view of unread bytes)
    original = load_file(path)
    for name, t in wrecked.blocks.state_dict(prefix="blocks.").items():
        assert torch.equal(t, original[name]) or bool((t == WRECKED).all()), name
    with DitPlacement(wrecked, torch.device("cpu"), _plan(wrecked, 0), weight_files=[path]) as again:
        again.apply()  # and a later placement (no worker this time) reads them all
        assert torch.equal(_run(wrecked, again.kernels), expected)


# ---- in the pipeline: beside the encoders -------------------------------------------------------------------------

SETTINGS = GenerationSettings(size=(64, 64), frames=13, steps=1, seed=3, segment_len=9, segment_overlap=5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return synth(tmp_path_factory.mktemp("ckpt") / "scail2", scale="tiny", fmt="sat", seed=0)


@pytest.fixture(scope="module")
def quantized(folder, tmp_path_factory) -> Path:
    """FP8 blocks in safetensors shards: the pinned buffer is read straight from them, as from the real download."""
    out = tmp_path_factory.mktemp("q") / "q"
    res = CliRunner().invoke(app, ["quantize", str(folder), "-o", str(out), "--dit", "fp8", "--text-encoder", "bf16"])
    assert res.exit_code == 0, res.output
    return out


def ram(monkeypatch, available: int) -> None:
    monkeypatch.setattr(planner, "available_ram", lambda: available)


def generate(pipe: Pipeline, folder: Path, recorder: PhaseRecorder | None = None):
    d = folder / "inputs"
    latents: list[torch.Tensor] = []
    result = pipe(InputFiles(d / "ref.png", d / "ref_mask.png", d / "driving.mp4", d / "driving_mask.mp4"),
                  "a person dancing", settings=SETTINGS, recorder=recorder, on_latents=lambda k, z: latents.append(z))
    return result, latents


def test_overlap_on_and_off_give_the_same_latents(quantized, folder, reads, monkeypatch) -> None:
    """Beside CLIP and the VAE encode where RAM allows; after them, with the same latents, where the plan's RAM has
    room for the buffer only once the encoders are gone (two segments: the second resumes the streamer the worker
    built)."""
    ram(monkeypatch, 1 << 50)
    pipe = Pipeline.from_pretrained(quantized, device="cpu", profile="16gb", prompt_cache=False)
    recorder = PhaseRecorder("cpu")
    overlapped, early = generate(pipe, folder, recorder)
    assert overlapped.settings["dit_placement"].startswith("host side beside the encoders")
    assert off_the_main_thread(reads)
    placing = next(start for name, start, _ in recorder.intervals if name == "dit placement")
    assert max(t for _, t in reads) - recorder._t0 < placing  # read before the main thread reached the placement
    umt5_done = next(end for name, _, end in recorder.intervals if name == "text encoder")
    assert min(t for _, t in reads) - recorder._t0 >= umt5_done  # not beside umT5, which reads its own file
    beside = recorder.to_json()["background"]["dit placement (host side)"]
    assert beside["seconds"] > 0 and 0 <= beside["waited"] <= recorder.seconds["dit placement"]
    assert overlapped.settings["streamers_built"] == 1 and not worker_alive()

    reads.clear()
    p = pipe.make_plan(64, 64, 9)
    plain = planner.predict(p.profile, p.config, p.height, p.width, p.frames, p.resident_blocks, p.quantization,
                            p.text_encoder, p.mappable)
    ram(monkeypatch, max(m.ram for m in plain.values()))  # room for the plan, not for the buffer beside the encoders
    after, late = generate(pipe, folder)
    assert after.settings["dit_placement"] == "after the encoders" and after.settings["profile"] == "16gb"
    assert off_the_main_thread(reads) and not worker_alive()  # read by the placement's own fill, after the encoders
    assert len(early) == len(late) == 2
    assert all(torch.equal(a, b) for a, b in zip(early, late))


def test_cli_says_the_workers_error_in_one_line(quantized, folder, tmp_path, monkeypatch) -> None:
    ram(monkeypatch, 1 << 50)
    failing_reads(monkeypatch, UserError("the shard went away"))
    d = folder / "inputs"
    out = tmp_path / "o.mp4"
    res = CliRunner().invoke(app, [
        "generate", str(quantized), "--image", str(d / "ref.png"), "--mask-image", str(d / "ref_mask.png"), "--pose",
        str(d / "driving.mp4"), "--mask-video", str(d / "driving_mask.mp4"), "--width", "64", "--height", "64",
        "--frames", "9", "--steps", "1", "--device", "cpu", "--profile", "16gb", "--no-prompt-cache", "-o", str(out)])
    assert res.exit_code == 2, res.output
    assert "the shard went away" in res.output and "Traceback" not in res.output
    assert not out.exists() and not worker_alive()


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, Terminated])
def test_ctrl_c_during_the_encoders_stops_the_worker(quantized, folder, reads, monkeypatch, interrupt) -> None:
    ram(monkeypatch, 1 << 50)
    monkeypatch.setattr(host, "READ_THREADS", 1)  # the tiny model streams only two blocks
    pipe = Pipeline.from_pretrained(quantized, device="cpu", profile="16gb", prompt_cache=False)
    slow = WeightFiles.read_into
    monkeypatch.setattr(WeightFiles, "read_into", lambda self, key, out: time.sleep(0.01) or slow(self, key, out))

    def clip_interrupted(image):  # (the worker starts after umT5, beside CLIP and the VAE encode)
        deadline = time.monotonic() + 60
        while not reads:  # the worker is reading
            assert time.monotonic() < deadline, "the worker did not start beside CLIP"
            time.sleep(0.001)
        raise interrupt

    monkeypatch.setattr(pipe, "encode_clip", clip_interrupted)
    with pytest.raises(interrupt):
        generate(pipe, folder)
    streamed = sum(len(b.state_dict()) for b in pipe.dit.blocks[pipe.make_plan(64, 64, 9).resident_blocks:])
    assert not worker_alive() and 0 < len(reads) < streamed  # joined, having stopped before the end


def test_a_later_call_fills_the_only_pinned_buffer(quantized, folder, monkeypatch) -> None:
    """Once a run ends, the streamed blocks of a DiT mapped from the shards are the shards' views again and the
    pinned buffer is freed: a later call (the Python API again, `with_memory`, a benchmark's next case) never holds
    two while its own fills (10-16 GB each for the 14B in FP8). Same latents every call."""
    ram(monkeypatch, 1 << 50)
    pipe = Pipeline.from_pretrained(quantized, device="cpu", profile="16gb", prompt_cache=False)
    pipe.dit = load_dit(quantized, map_blocks=True)  # as on a GPU: the blocks stay in the mapped shards
    mapped = {n: t.data_ptr() for n, t in pipe.dit.blocks.state_dict(keep_vars=True).items()}
    buffers: list[weakref.ref] = []
    real = host.PinnedHost.__init__

    def init(self, *args, **kwargs) -> None:
        real(self, *args, **kwargs)
        buffers.append(weakref.ref(self.buffer.untyped_storage()))

    monkeypatch.setattr(host.PinnedHost, "__init__", init)
    reference: list[torch.Tensor] = []
    for run in (pipe, pipe, pipe.with_memory(pipe.memory.with_changes(profile="8gb"))):
        buffers.clear()
        result, latents = generate(run, folder)
        gc.collect()
        assert result.settings["dit_placement"].startswith("host side beside the encoders")
        assert len(buffers) == 1 and buffers[0]() is None
        assert {n: t.data_ptr() for n, t in pipe.dit.blocks.state_dict(keep_vars=True).items()} == mapped
        reference = reference or latents
        assert len(latents) == 2 and all(torch.equal(a, b) for a, b in zip(reference, latents))
