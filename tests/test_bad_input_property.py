"""Property test (a seeded loop, so CI runs the same cases every time): malformed files and flags thrown at
`generate`, `quantize`, `inspect` and `synth` on the tiny demo checkpoint. Whatever the case: exit code 0 or 2,
never a traceback, no file left behind but a complete output, every input byte for byte unchanged."""

from __future__ import annotations

import hashlib
import random
import shutil
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from scail2_lite.cli import app
from scail2_lite.synth import cached_demo_folder

CASES = 40
SEED = 21


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def junk_files(folder: Path, rng: random.Random) -> dict[str, Path]:
    """Malformed inputs of every kind a user might pass by mistake."""
    folder.mkdir()
    made = {
        "empty.png": b"",
        "text.png": b"hello, not a picture",
        "truncated.png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00",
        "empty.mp4": b"",
        "text.mp4": b"ftyp but not really a video",
        "random.mp4": rng.randbytes(4096),
        "random.pt": rng.randbytes(2048),
        "pickle.pt": b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.",
        "huge_header.safetensors": struct.pack("<Q", 2**62) + b"{}",
        "bad_json.safetensors": struct.pack("<Q", 10) + b"{not json}",
        "short.safetensors": b"\x01\x02",
        "weird[red] name[bold].png": rng.randbytes(64),
    }
    for name, data in made.items():
        (folder / name).write_bytes(data)
    (folder / "dir.mp4").mkdir()
    return {name: folder / name for name in [*made, "dir.mp4"]}


def generate_case(rng: random.Random, model: Path, junk: dict[str, Path], out: Path) -> list[str]:
    i = model / "inputs"
    files = {"--image": i / "ref.png", "--mask-image": i / "ref_mask.png", "--pose": i / "driving.mp4",
             "--mask-video": i / "driving_mask.mp4"}
    flags = {"--width": "64", "--height": "64", "--steps": "1", "--device": "cpu"}
    bad_flags = [("--steps", "-3"), ("--width", "100"), ("--size", "999p"), ("--seed", str(2**70)),
                 ("--solver", "heun"), ("--cache", "always"), ("--vram-budget", "0"), ("--frames", "2"),
                 ("--guidance", "nan"), ("--shift", "-1"), ("--lora", "missing.safetensors:abc"),
                 ("--profile", "nope"), ("--attention", "magic"), ("--vae-tile", "-5"), ("--segment-len", "3"),
                 ("--text-encoder", "q3"), ("--preset", "slow")]
    kind = rng.choice(["file", "flag", "output", "both"])
    if kind in ("file", "both"):
        flag = rng.choice(list(files))
        files[flag] = rng.choice(list(junk.values()))
    if kind in ("flag", "both"):
        flag, value = rng.choice(bad_flags)
        flags[flag] = value
    if kind == "output":
        out = rng.choice([files["--pose"], model, junk["dir.mp4"], out.with_suffix(".txt"), i])
    args = ["generate", str(model)]
    for flag, value in {**files, **flags}.items():
        args += [flag, str(value)]
    return args + ["-o", str(out)]


def quantize_case(rng: random.Random, model: Path, junk: dict[str, Path], out: Path) -> list[str]:
    src = rng.choice([model, *[junk[n] for n in ("random.pt", "pickle.pt", "huge_header.safetensors",
                                                  "bad_json.safetensors", "short.safetensors")]])
    dit = "fp8" if src != model else rng.choice(["fp4", "int4", "bf8"])
    target = rng.choice([out, src, model / "inputs", model.parent])
    return ["quantize", str(src), "-o", str(target), "--dit", dit, "--text-encoder", "bf16"] + (
        ["--force"] if rng.random() < 0.5 else [])


def inspect_case(rng: random.Random, model: Path, junk: dict[str, Path], out: Path) -> list[str]:
    return ["inspect", str(rng.choice([*junk.values(), out, model / "inputs"]))]


def synth_case(rng: random.Random, model: Path, junk: dict[str, Path], out: Path) -> list[str]:
    bad = rng.choice([["--scale", "huge"], ["--format", "gguf"], ["-o", str(model / "inputs")],
                      ["-o", str(junk["text.png"])], ["-o", str(model)], ["--scale", "full", "--format", "sat"]])
    return ["synth", "-o", str(out), *bad]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    copy = tmp_path_factory.mktemp("property") / "model"
    shutil.copytree(cached_demo_folder(), copy)
    return copy


def test_malformed_inputs_and_flags(model, tmp_path):
    rng = random.Random(SEED)
    junk = junk_files(tmp_path / "junk", rng)
    work = tmp_path / "work"
    work.mkdir()
    inputs_before, junk_before = digest(model), digest(tmp_path / "junk")
    makers = [generate_case, quantize_case, inspect_case, synth_case]
    for n in range(CASES):
        out = work / f"out{n}.mp4" if n % 4 == 0 else work / f"out{n}"
        args = makers[n % 4](rng, model, junk, out)
        res = CliRunner().invoke(app, args)
        context = f"case {n}: {' '.join(args)}\n{res.output}"
        assert res.exit_code in (0, 2), context
        assert res.exception is None or isinstance(res.exception, SystemExit), context
        assert "Traceback" not in res.output, context
        if res.exit_code == 2:
            assert res.output.count("error:") == 1, context
            assert list(work.iterdir()) == [], context  # a refused run leaves nothing, not even a hidden file
        for p in list(work.iterdir()):  # a run that succeeded left only its complete output
            assert not p.name.startswith("."), context
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        assert digest(model) == inputs_before and digest(tmp_path / "junk") == junk_before, context
