"""outputs.py and what every command promises about files: nothing written onto an input, nothing of the user's
deleted, nothing half-written (errors, Ctrl-C, SIGTERM, a full disk), places checked before the work, the user's
umask, one-line errors. The tiny demo checkpoint (made once per session) is the model throughout."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from scail2_lite import outputs
from scail2_lite.cli import app
from scail2_lite.errors import UserError
from scail2_lite.media import VideoWriter
from scail2_lite.synth import cached_demo_folder


SCAIL2_LITE = [sys.executable, "-c", "from scail2_lite.cli import main; main()"]


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def tree_hash(path: Path) -> str:
    """Names and bytes of every file under `path` (or of `path`)."""
    h = hashlib.sha256()
    for p in sorted([path] if path.is_file() else path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path.parent)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def model() -> Path:
    return cached_demo_folder()


def gen_args(model: Path, out: Path, *extra: str) -> list[str]:
    i = model / "inputs"
    return ["generate", model, "--image", i / "ref.png", "--mask-image", i / "ref_mask.png", "--pose",
            i / "driving.mp4", "--mask-video", i / "driving_mask.mp4", "--width", "64", "--height", "64", "--steps",
            "1", "--device", "cpu", "-o", out, *extra]


# ---- the module -------------------------------------------------------------------------------------------------


def test_check_separate_refuses_same_inside_and_containing(tmp_path):
    (tmp_path / "in").mkdir()
    f = tmp_path / "in" / "a.mp4"
    f.write_bytes(b"x")
    os.link(f, tmp_path / "hard.mp4")
    for out, word in ((f, "is the"), (tmp_path / "hard.mp4", "is the"), (tmp_path / "in" / "sub", "is inside"),
                      (tmp_path, "contains")):
        with pytest.raises(UserError, match=word):
            outputs.check_separate({"-o": out}, {"--pose": f if word != "is inside" else tmp_path / "in"})
    outputs.check_separate({"-o": tmp_path / "b.mp4", "--x": None}, {"--pose": f, "--y": None})


def test_targets_are_checked_before_the_work(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        outputs.check_file_target(tmp_path / "d", "-o")
    with pytest.raises(UserError, match="does not exist"):
        outputs.check_file_target(tmp_path / "nope" / "x.mp4", "-o")
    with pytest.raises(UserError, match=r"not enough disk space in .*need about .* free"):
        outputs.check_file_target(tmp_path / "x.mp4", "-o", needed=10**18)
    (tmp_path / "d" / "user.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists and is not empty"):
        outputs.check_folder_target(tmp_path / "d", "-o")
    with pytest.raises(UserError, match="--force replaces only those"):
        outputs.check_folder_target(tmp_path / "d", "-o", replace=True, ours=lambda p: False, what="thing")
    outputs.check_folder_target(tmp_path / "d", "-o", replace=True, ours=lambda p: True)
    assert outputs.format_bytes(187_008) == "187.0 kB" and outputs.format_bytes(12) == "12 bytes"


def test_new_folder_swaps_only_when_complete_and_files_follow_the_umask(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with outputs.new_folder(dest) as staging:
            (staging / "new.txt").write_text("new")
            raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (dest / "old.txt").exists()
    previous = os.umask(0o027)
    try:
        with outputs.new_folder(dest) as staging:
            (staging / "new.txt").write_text("new")
        with VideoWriter(tmp_path / "v.mp4", 16, (16, 16)) as w:
            w.write(torch.zeros(3, 2, 16, 16))
    finally:
        os.umask(previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "v.mp4"]
    assert [p.name for p in dest.iterdir()] == ["new.txt"]
    assert dest.stat().st_mode & 0o777 == 0o750  # mkdtemp alone gives 0700
    assert (tmp_path / "v.mp4").stat().st_mode & 0o777 == 0o640  # mkstemp alone gives 0600


# ---- generate -----------------------------------------------------------------------------------------------------


def test_generate_never_writes_onto_an_input_and_checks_outputs_first(model, tmp_path, monkeypatch):
    from scail2_lite.pipeline import Pipeline

    def no_loading(*a, **k):
        raise AssertionError("loaded the model before the outputs were checked")

    monkeypatch.setattr(Pipeline, "from_pretrained", no_loading)
    before = tree_hash(model)
    (tmp_path / "dir.mp4").mkdir()
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "mine.png").write_bytes(b"x")
    cases = {
        "is the --pose input": gen_args(model, model / "inputs" / "driving.mp4"),
        "is inside the MODEL input": gen_args(model, model / "out.mp4"),
        "is a folder": gen_args(model, tmp_path / "dir.mp4"),
        "already exists and is not empty": gen_args(model, tmp_path / "o.mp4", "--save-frames", tmp_path / "frames"),
        "contains the MODEL input": gen_args(model, tmp_path / "o.mp4", "--save-frames", model.parent),
    }
    for message, args in cases.items():
        res = cli(*args)
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
    assert tree_hash(model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.mp4", "frames"]


def test_messages_are_one_line_and_name_the_real_problem(model, tmp_path):
    res = cli(  # a path with rich markup in it, shown literally
    *[a if a != model / "inputs" / "ref.png" else tmp_path / "x[/red][bold].png"
                for a in gen_args(model, tmp_path / "o.mp4")])
    assert res.exit_code == 2 and "x[/red][bold].png: file not found" in res.output, res.output
    res = cli(*gen_args(model, tmp_path / "o.mp4", "--seed", str(2**64)))
    assert res.exit_code == 2 and "--seed must be between" in res.output
    res = cli(*gen_args(model, tmp_path / "o.mp4", "--lora", f"{model}/loras/peft.safetensors:abc"))
    assert res.exit_code == 2 and "'abc' is not a strength" in res.output
    res = cli(*gen_args(model, tmp_path / "o.mp4", "--frames", "0"))
    assert res.exit_code == 2 and "--frames must be at least 5" in res.output
    res = cli("demo", "--steps", "0", "-o", tmp_path / "d.mp4")
    assert res.exit_code == 2 and "--steps must be at least 1" in res.output
    res = cli("inspect", model)
    assert res.exit_code == 0 and " k)" in res.output and "0.00 B" not in res.output, res.output
    assert "[default: 81]" in cli("profile", "--help").output  # escaped, not eaten as markup


# ---- quantize -----------------------------------------------------------------------------------------------------


def test_quantize_is_all_or_nothing_and_force_replaces_only_ours(model, tmp_path, monkeypatch):
    from scail2_lite import quantize_checkpoint as qc

    src = tmp_path / "src"
    shutil.copytree(model, src)
    before = tree_hash(src)
    for out, force in ((src, True), (src / "q", False), (tmp_path, True)):  # equal, inside, containing
        res = cli("quantize", src, "-o", out, "--text-encoder", "bf16", *(["--force"] if force else []))
        assert res.exit_code == 2 and "input" in res.output, res.output
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    res = cli("quantize", src, "-o", user, "--text-encoder", "bf16", "--force")
    assert res.exit_code == 2 and "not a scail2-lite quantized folder" in res.output
    assert (user / "notes.txt").read_text() == "mine" and tree_hash(src) == before

    q = tmp_path / "q"
    res = cli("quantize", src, "-o", q, "--text-encoder", "bf16", "--export", "comfy")
    assert res.exit_code == 0, res.output
    assert (q / "fidelity.json").is_file() and (q / "q.comfy_fp8_scaled.safetensors").is_file()  # inside
    assert oct(q.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    done = tree_hash(q)

    def interrupted(*a, **k):  # Ctrl-C during the fidelity check, after the DiT is written
        raise KeyboardInterrupt

    monkeypatch.setattr(qc, "_dit_check", interrupted)
    res = cli("quantize", src, "-o", q, "--text-encoder", "bf16", "--force")
    assert res.exit_code == 130 and tree_hash(q) == done  # the complete old folder stays
    res = cli("quantize", src, "-o", tmp_path / "q2", "--text-encoder", "bf16")
    assert res.exit_code == 130 and not (tmp_path / "q2").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "src", "user"]  # no hidden leftovers

    # a damaged quantized folder is one line, not a traceback
    bad = tmp_path / "bad"
    shutil.copytree(q, bad)
    shard = next(bad.glob("dit-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    manifest = json.loads((bad / "manifest.json").read_text())
    from scail2_lite.loader import load_dit

    with pytest.raises(UserError, match="truncated or corrupt"):
        load_dit(bad)
    first = next(iter(manifest["dit"]["tensors"]))
    manifest["dit"]["tensors"][first]["scheme"] = "fp4"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="fp4"):
        load_dit(bad)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- synth, SIGTERM, a full disk ---------------------------------------------------------------------------------


def test_synth_refuses_to_overwrite_user_files(tmp_path):
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "ref.png").write_bytes(b"my photo")
    res = cli("synth", "-o", tmp_path)
    assert res.exit_code == 2 and "already exists and is not empty" in res.output
    assert (tmp_path / "inputs" / "ref.png").read_bytes() == b"my photo"


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_sigterm_cleans_up_and_exits_143(tmp_path):
    """A real SIGTERM to a real process, while it writes: exit 143, no hidden staging folder left."""
    proc = subprocess.Popen([*SCAIL2_LITE, "synth", "-o", str(tmp_path / "s")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not any(p.name.endswith(".partial") for p in tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 143, output
    assert "terminated" in output and "Traceback" not in output
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("fmt", ["sat", "wan"])
def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, fmt):
    """A file-size limit makes every write past 64 kB fail as a full disk would (EFBIG instead of ENOSPC)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    proc = subprocess.run([*SCAIL2_LITE, "synth", "-o", str(tmp_path / "s"), "--format",
                           fmt], capture_output=True, text=True, preexec_fn=limit, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "writing" not in line]
    assert lines[-1].startswith("error:") and "Traceback" not in proc.stderr, proc.stderr
    assert _leftovers(tmp_path) == []


def test_generate_full_disk_after_the_work_is_one_line(model, tmp_path):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 1024, 2 * 1024))

    args = [str(a) for a in gen_args(model, tmp_path / "o.mp4")]
    proc = subprocess.run([*SCAIL2_LITE, *args, "--no-prompt-cache"], capture_output=True,
                          text=True, preexec_fn=limit, cwd=tmp_path, timeout=600,
                          env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert [p for p in tmp_path.iterdir() if p.name != "cache"] == []
