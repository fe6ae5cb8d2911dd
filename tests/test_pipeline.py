"""End to end on a tiny synthetic checkpoint: animation, replacement, segments, solvers, profiles, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from scail2_lite import media
from scail2_lite.cli import app
from scail2_lite.errors import UserError
from scail2_lite.inputs import InputFiles
from scail2_lite.pipeline import Pipeline
from scail2_lite.settings import GenerationSettings
from scail2_lite.synth import synth

SIZE = (128, 128)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return synth(tmp_path_factory.mktemp("ckpt") / "scail2", scale="tiny", fmt="sat", seed=0)


@pytest.fixture(scope="module")
def pipe(folder) -> Pipeline:
    return Pipeline.from_pretrained(folder, device="cpu")


def inputs(folder: Path) -> dict:
    d = folder / "inputs"
    return dict(image=d / "ref.png", mask_image=d / "ref_mask.png", pose=d / "driving.mp4",
                mask_video=d / "driving_mask.mp4")


def files(folder: Path) -> InputFiles:
    return InputFiles(**inputs(folder))


def run(pipe: Pipeline, folder: Path, output: Path | None = None, **settings):
    """Generate on the synthetic inputs with `settings` changed from a small default; the segments' latents."""
    latents: list[torch.Tensor] = []
    base = GenerationSettings(size=SIZE, steps=2, seed=3)
    result = pipe(files(folder), "a person dancing", settings=base, output=output,
                  on_latents=lambda k, z: latents.append(z), **settings)
    return result, latents


def test_animation_writes_video(pipe, folder, tmp_path):
    out = tmp_path / "anim.mp4"
    result, latents = run(pipe, folder, output=out)
    assert result.frames.shape == (3, 17, *SIZE)
    assert result.frames.abs().max() <= 1.0
    assert len(latents) == 1 and latents[0].shape == (1, 16, 5, 16, 16)
    video, fps = media.read_video(out)
    assert video.shape == (3, 17, *SIZE) and fps == 16
    media.write_video(tmp_path / "inline.mp4", result.frames, fps=16)  # encoded behind the run = encoded in line
    assert torch.equal(video, media.read_video(tmp_path / "inline.mp4")[0])
    assert result.settings["segments"] == 1 and not result.warnings
    assert "video write" in result.seconds  # the wait for the encoder, a phase of its own
    assert result.settings["video_write"].startswith("encoded in")


def test_same_seed_same_video_and_solvers_differ(pipe, folder):
    _, a = run(pipe, folder, solver="unipc")
    _, b = run(pipe, folder, solver="unipc")
    _, c = run(pipe, folder, solver="dpm++")
    assert torch.equal(a[0], b[0])
    assert not torch.equal(a[0], c[0])
    assert torch.isfinite(c[0]).all()


def test_replacement_mode_and_background_warnings(pipe, folder):
    anim, za = run(pipe, folder)
    repl, zr = run(pipe, folder, replace=True)
    assert repl.frames.shape == anim.frames.shape
    assert not torch.equal(za[0], zr[0])
    # The synthetic masks are drawn for animation: replacement mode must say they look wrong.
    assert any("replacement mode expects it on" in w for w in repl.warnings)


@pytest.mark.parametrize("composite", [False, True])
def test_replacement_reference_is_encoded_as_given_unless_composited(pipe, folder, monkeypatch, composite):
    """Upstream VAE-encodes the reference as given; `composite_reference` (ComfyUI's) blacks out its background."""
    import dataclasses

    import scail2_lite.pipeline as pipeline
    from scail2_lite.conditioning import composite_on_black
    from scail2_lite.inputs import load_inputs

    read = load_inputs(files(folder), size=SIZE, replace=True)
    white = (read.ref_mask > 0.9).all(dim=0, keepdim=True)  # a replacement-mode mask: the figures on black
    read = dataclasses.replace(read, ref_mask=torch.where(white, -1.0, read.ref_mask))
    encoded = []
    original = pipeline._encode
    monkeypatch.setattr(pipeline, "_encode", lambda vae, video, device, tile: encoded.append(video) or original(
        vae, video, device, tile))
    settings = GenerationSettings(size=SIZE, steps=1, replace=True, composite_reference=composite, preset="lightx2v")
    result = pipe(read, "a person dancing", settings=settings)
    composited = composite_on_black(read.image, read.ref_mask)
    assert not torch.equal(composited, read.image)
    assert torch.equal(encoded[0][:, 0], composited if composite else read.image)
    # A distill preset without its LoRA says so in the result (the CLI also prints it before loading).
    assert any("--preset lightx2v" in w and "no LoRA is loaded" in w for w in result.warnings)


def test_segments_carry_history(pipe, folder):
    result, latents = run(pipe, folder, segment_len=9, segment_overlap=5)
    assert result.settings["segments"] == 3 and len(latents) == 3
    assert result.frames.shape[1] == 17  # 9 + (9 - 5) + (9 - 5)
    assert all(z.shape[2] == 3 for z in latents)
    # Segment 2 starts from segment 1's last 5 output frames, VAE-encoded into its first 2 latent frames.
    history = pipe.vae(None).encode(result.frames[:, 4:9][None])
    assert torch.allclose(latents[1][:, :, :2], history, atol=1e-5)


def test_guidance_one_runs_one_branch(pipe, folder, monkeypatch):
    calls = []
    original = pipe.dit.forward_with_context

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(pipe.dit, "forward_with_context", counting)
    run(pipe, folder, steps=3, guidance=1.0, solver="lcm")
    assert len(calls) == 3
    calls.clear()
    run(pipe, folder, steps=3)
    assert len(calls) == 6


def extra_refs(folder: Path) -> tuple[tuple[Path, Path], ...]:
    from scail2_lite.synth import EXTRA_REFERENCES

    return tuple((folder / "inputs" / image, folder / "inputs" / mask) for image, mask in EXTRA_REFERENCES)


def test_extra_references_shared_by_every_segment_and_branch(pipe, folder, monkeypatch):
    """Each extra view is VAE-encoded alone, its mask compressed alone; the same two tensors reach every DiT call
    (2 segments x 2 CFG branches); the video changes, its length does not."""
    from scail2_lite import conditioning

    seen = []
    original = pipe.dit.forward_with_context

    def spying(x, t, context, cond, *args, **kwargs):
        seen.append(cond)
        return original(x, t, context, cond, *args, **kwargs)

    monkeypatch.setattr(pipe.dit, "forward_with_context", spying)
    size = (64, 64)
    base = GenerationSettings(size=size, steps=1, seed=3, frames=9, segment_len=5, segment_overlap=1)
    plain = pipe(files(folder), "a person dancing", settings=base)
    seen.clear()
    multi = pipe(InputFiles(**inputs(folder), additional_refs=extra_refs(folder)), "a person dancing",
                 settings=base)
    assert len(seen) == 2 * 2 and multi.settings["extra_references"] == 2 and multi.warnings == plain.warnings
    vae = pipe.vae(None)
    pictures = [media.resize_crop(media.read_image(p), size) for p, _ in extra_refs(folder)]
    colours = [media.resize_crop(media.read_image(m), size) for _, m in extra_refs(folder)]
    latents = torch.cat([vae.encode(p[None, :, None]) for p in pictures], dim=2)
    masks = torch.stack([conditioning.compress_mask(m[:, None])[:, 0] for m in colours], dim=1)[None]
    assert latents.shape == (1, 16, 2, 8, 8) and masks.shape == (1, 28, 2, 8, 8)
    for cond in seen:
        dtype = cond.additional_ref_latents.dtype
        assert torch.equal(cond.additional_ref_latents, latents.to(dtype))
        assert torch.equal(cond.additional_ref_masks, masks.to(dtype))
    assert multi.frames.shape == plain.frames.shape == (3, 9, *size)
    assert (multi.frames - plain.frames).abs().max() > 1e-3


def test_every_driving_frame_is_generated(pipe, folder, tmp_path):
    """11 driving frames in segments of 5 (upstream: 9 frames out): the last segment reaches 2 frames past the
    video (last driving frame repeated) and those are dropped; the segments before it are not touched."""
    out = tmp_path / "long.mp4"
    base = dict(size=(64, 64), steps=1, guidance=1.0, segment_len=5, segment_overlap=1)
    full, full_latents = run(pipe, folder, frames=13, **base)
    cut, cut_latents = run(pipe, folder, output=out, frames=11, **base)
    assert cut.num_frames == 11 and cut.frames.shape == (3, 11, 64, 64) and cut.settings["segments"] == 3
    assert media.read_video(out)[0].shape[1] == 11
    assert torch.equal(cut_latents[0], full_latents[0]) and torch.equal(cut_latents[1], full_latents[1])
    assert torch.equal(cut.frames[:, :9], full.frames[:, :9])


@pytest.mark.parametrize("profile", ["8gb", "layers", "16gb", "lowram"])
def test_profiles_change_no_numbers(folder, pipe, profile):
    _, reference = run(pipe, folder)
    streamed_pipe = Pipeline.from_pretrained(folder, device="cpu", profile=profile)
    result, streamed = run(streamed_pipe, folder)
    assert result.settings["profile"] == profile and result.settings["attention"] == "sdpa"  # auto, on the CPU
    assert torch.equal(reference[0], streamed[0])


@pytest.mark.parametrize("profile", [None, "8gb", "lowram"])
def test_a_run_leaves_no_tensor_in_a_reference_cycle(folder, tmp_path, profile):
    """`release_cached_memory` does not collect garbage (a full collection costs every call a walk over the whole
    process): that is sound only while the runtime frees what it drops as it drops it. A run in two segments with
    CFG, streamed or not, writing its mp4, with the collector off; then every unreachable object is kept and none
    may be a tensor."""
    import gc

    pipe = Pipeline.from_pretrained(folder, device="cpu", profile=profile)
    gc.collect()
    gc.disable()
    try:
        run(pipe, folder, output=tmp_path / "v.mp4", frames=17, segment_len=9, segment_overlap=5)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        cycled = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not cycled, [tuple(t.shape) for t in cycled]


@pytest.mark.parametrize("where", ["step", "decode", "placement"])
def test_out_of_memory_is_recovered_after_the_failed_calls_tensors_are_freed(where, monkeypatch) -> None:
    """Inside an `except` clause the error's traceback holds the failed call's frames and their tensors (a step's
    activations, a decode's groups, blocks being placed): the cache is released and the lighter plan or cut set up
    only once they are freed."""
    import weakref
    from types import SimpleNamespace

    from scail2_lite import pipeline as P
    from scail2_lite.offload.placement import DitPlacement
    from scail2_lite.vae_tiles import DecodeCut

    held: list[weakref.ref] = []
    alive_at_release: list[bool] = []

    def failing() -> torch.Tensor:
        activations = torch.ones(3, 4, 16, 16)
        held.append(weakref.ref(activations))
        if len(held) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return activations

    monkeypatch.setattr(P, "release_cached_memory", lambda: alive_at_release.append(held[0]() is not None))
    if where == "step":
        fake = SimpleNamespace(_velocity=lambda placement: failing())
        P.Pipeline._velocity_with_fallback(fake, SimpleNamespace(fallback=lambda: True))
    elif where == "placement":  # the placement's own retry: `close` releases, then the next lighter plan
        fake = SimpleNamespace(placed=False, _place=failing, _lighter=lambda: True,
                               close=lambda: alive_at_release.append(held[0]() is not None))
        DitPlacement.apply(fake)
        assert fake.placed
    else:
        monkeypatch.setattr(P, "_decode", lambda *args: iter([failing()]))
        fake = SimpleNamespace(vae=lambda tiles: tiles, device=torch.device("cpu"), vae_dtype=None)
        plan = SimpleNamespace(profile=SimpleNamespace(vae_tile=256), vae_tile=None)
        latents = torch.zeros(1, 16, 5, 2, 40)  # 16x320 px: two 256 px tiles
        list(P.Pipeline._decode_segment(fake, DecodeCut(), plan, latents, 0, 4, [], lambda _: None))
    assert alive_at_release == [False] and len(held) == 2


def test_unknown_solver_is_user_error(pipe, folder):
    with pytest.raises(UserError, match="unknown solver"):
        run(pipe, folder, solver="heun")


# ---- the CLI: exit codes, one-line errors, no partial output ------------------------------------------------------


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def generate_args(folder: Path, out: Path, **over: str) -> list[str]:
    paths = {k: str(v) for k, v in inputs(folder).items()}
    paths.update(over)
    return ["generate", str(over.pop("model", folder)), "--image", paths["image"], "--mask-image",
            paths["mask_image"], "--pose", paths["pose"], "--mask-video", paths["mask_video"], "--width", "128",
            "--height", "128", "--steps", "1", "--device", "cpu", "-o", str(out)]


def test_cli_generate(folder, tmp_path):
    out = tmp_path / "cli.mp4"
    res = cli(*generate_args(folder, out), "--preview", "--save-frames", str(tmp_path / "frames"), "--vae-dtype",
              "bf16")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())  # rich wraps long lines to the terminal's width
    assert "outside" in text and "vae_decode untiled, bf16" in text
    assert out.is_file() and (tmp_path / "cli_preview.mp4").is_file()
    assert len(list((tmp_path / "frames").glob("*.png"))) == 17


def _short_video(path: Path, frames: int, size=(64, 64)) -> Path:
    media.write_video(path, torch.zeros(3, frames, *size), fps=16)
    return path


@pytest.mark.parametrize("case", ["missing", "mask_size", "frame_count", "too_short", "size32", "solver",
                                  "extra_unpaired", "extra_missing", "extra_mask_size", "vae_dtype"])
def test_cli_bad_input(folder, tmp_path, case):
    out = tmp_path / "bad.mp4"
    args = generate_args(folder, out)
    if case == "missing":
        args[args.index("--image") + 1] = str(tmp_path / "nope.png")
    elif case == "mask_size":
        Image.new("RGB", (40, 30), (0, 0, 255)).save(tmp_path / "m.png")
        args[args.index("--mask-image") + 1] = str(tmp_path / "m.png")
    elif case == "frame_count":
        args[args.index("--mask-video") + 1] = str(_short_video(tmp_path / "m.mp4", 9))
    elif case == "too_short":
        short = _short_video(tmp_path / "d.mp4", 3)
        args[args.index("--pose") + 1] = str(short)
        args[args.index("--mask-video") + 1] = str(short)
    elif case == "size32":
        args[args.index("--width") + 1] = "100"
    elif case == "solver":
        args += ["--solver", "heun"]
    elif case in ("extra_unpaired", "extra_missing", "extra_mask_size"):
        (image, mask), (image2, _) = extra_refs(folder)
        if case == "extra_mask_size":
            Image.new("RGB", (40, 30), (0, 0, 255)).save(tmp_path / "m.png")
            mask = tmp_path / "m.png"
        args += ["--additional-ref-image", str(image), "--additional-ref-mask", str(mask)]
        args += {"extra_unpaired": ["--additional-ref-image", str(image2)],
                 "extra_missing": ["--additional-ref-image", str(tmp_path / "nope.png"), "--additional-ref-mask",
                                   str(mask)], "extra_mask_size": []}[case]
    elif case == "vae_dtype":
        args += ["--vae-dtype", "fp16"]
    res = cli(*args)
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_cli_missing_component_names_the_file(folder, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(folder, partial, ignore=shutil.ignore_patterns("Wan2.1_VAE.pth"))
    res = cli(*generate_args(folder, tmp_path / "x.mp4", model=str(partial)))
    assert res.exit_code == 2 and "Wan2.1_VAE.pth" in res.output


def test_ctrl_c_leaves_no_partial_video(folder, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Pipeline, "_velocity", interrupted)
    out = tmp_path / "int.mp4"
    res = cli(*generate_args(folder, out))
    assert res.exit_code == 130
    assert not out.exists() and not list(tmp_path.glob("*.mp4*"))


def test_demo_command(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "demo.mp4"
    res = cli("demo", "-o", str(out), "--steps", "2", "--device", "cpu")
    assert res.exit_code == 0, res.output
    video, _ = media.read_video(out)
    assert video.shape[1] == 17
    res = cli("demo", "-o", str(tmp_path / "fast.mp4"), "--preset", "fast", "--device", "cpu")
    assert res.exit_code == 0 and "steps 4" in res.output and "guidance 1.0" in res.output
    res = cli("demo", "-o", str(tmp_path / "multi.mp4"), "--multi-ref", "--steps", "1", "--device", "cpu")
    assert res.exit_code == 0 and "extra_references 2" in res.output and "warning" not in res.output, res.output
    assert media.read_video(tmp_path / "multi.mp4")[0].shape[1] == 17


def test_quantized_folder_runs_and_streams_from_disk(folder, tmp_path):
    q = tmp_path / "q"
    res = cli("quantize", str(folder), "-o", str(q), "--dit", "int8", "--text-encoder", "bf16")
    assert res.exit_code == 0, res.output
    latents = []
    for profile in (None, "lowram"):  # lowram maps the blocks from the quantized shards on disk
        result, z = run(Pipeline.from_pretrained(q, device="cpu", profile=profile), folder)
        assert result.settings["dit"] == "int8"
        latents += z
    assert torch.equal(latents[0], latents[1])
    _, bf16 = run(Pipeline.from_pretrained(folder, device="cpu"), folder)
    assert (latents[0] - bf16[0]).norm() / bf16[0].norm() < 0.1


def test_step_cache_skips_forwards_and_off_changes_nothing(pipe, folder):
    _, reference = run(pipe, folder, steps=8)
    off, same = run(pipe, folder, steps=8, cache="off")
    assert torch.equal(reference[0], same[0]) and off.settings["cache"] == "off"
    cached, approx = run(pipe, folder, steps=8, cache="magcache", cache_threshold=10.0)
    assert "skipped" in cached.settings["cache"]
    assert not torch.equal(reference[0], approx[0])
    with pytest.raises(UserError, match="cache"):
        run(pipe, folder, cache="fastest")


def test_quantized_blocks_map_and_stream_once_across_segments(folder, tmp_path, monkeypatch):
    from scail2_lite.offload import placement as placement_module
    from scail2_lite.loader import load_dit

    q = tmp_path / "q"
    assert cli("quantize", str(folder), "-o", str(q), "--dit", "fp8", "--text-encoder", "bf16").exit_code == 0
    eager, mapped = load_dit(q), load_dit(q, map_blocks=True)
    for (name, a), b in zip(eager.state_dict().items(), mapped.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(UserError, match="map_blocks"):
        load_dit(folder, map_blocks=True)
    built = []
    real = placement_module.BlockStreamer
    monkeypatch.setattr(placement_module, "BlockStreamer", lambda *a, **kw: built.append(1) or real(*a, **kw))
    segments = dict(segment_len=9, segment_overlap=5)
    _, reference = run(Pipeline.from_pretrained(q, device="cpu"), folder, **segments)
    for profile in ("16gb", "lowram"):  # pinned buffer filled from the shards / blocks read from them per use
        built.clear()
        result, z = run(Pipeline.from_pretrained(q, device="cpu", profile=profile), folder, **segments)
        assert result.settings["segments"] == 3 and len(built) == 1  # suspended between segments, not rebuilt
        assert result.settings["streamers_built"] == 1
        assert all(torch.equal(a, b) for a, b in zip(reference, z))


def test_loras_merged_at_load_are_not_streamed_past(folder, tmp_path):
    """With a LoRA merged into the RAM copy, no profile may read the blocks back from the quantized shards."""
    from scail2_lite.synth import LORA_DIR, LORA_FILES

    q = tmp_path / "q"
    assert cli("quantize", str(folder), "-o", str(q), "--dit", "fp8", "--text-encoder", "bf16").exit_code == 0
    lora = [(folder / LORA_DIR / LORA_FILES["kohya"], 1.0)]
    _, plain = run(Pipeline.from_pretrained(q, device="cpu"), folder)
    _, merged = run(Pipeline.from_pretrained(q, device="cpu", loras=lora), folder)
    pipe = Pipeline.from_pretrained(q, device="cpu", profile="lowram", loras=lora)
    assert not pipe.model.mappable
    result, streamed = run(pipe, folder)
    assert result.settings["profile"] == "lowram"
    assert torch.equal(streamed[0], merged[0]) and not torch.equal(merged[0], plain[0])


def test_decode_out_of_memory_starts_again_in_the_profiles_tiles(monkeypatch) -> None:
    """A decode that runs out of CUDA memory in the planner's cut goes on in the profile's (256 px) tiles by frame
    from the first frame not yet delivered; without lighter tiles it is the one-line out-of-memory error."""
    from types import SimpleNamespace

    from scail2_lite import pipeline as P
    from scail2_lite.vae_tiles import DecodeCut, Tiling

    cuts = []

    def fake_decode(vae, latents, drop, stop, device, dtype, by_frame):
        cuts.append((vae, by_frame))
        for t in range(drop, stop, 4):
            if vae is None and t >= 8:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            yield torch.full((3, min(4, stop - t), 16, 16), float(t))

    monkeypatch.setattr(P, "_decode", fake_decode)
    fake = SimpleNamespace(vae=lambda tiles: tiles, device=torch.device("cpu"), vae_dtype=None)
    plan = SimpleNamespace(profile=SimpleNamespace(vae_tile=256), vae_tile=None)
    latents = torch.zeros(1, 16, 5, 2, 40)  # 16x320 px: two 256 px tiles
    fallbacks, notes = [], []
    groups = list(P.Pipeline._decode_segment(fake, DecodeCut(), plan, latents, 0, 17, fallbacks, notes.append))
    assert [g[0, 0, 0, 0].item() for g in groups] == [0, 4, 8, 12, 16]
    assert sum(g.shape[1] for g in groups) == 17
    assert fallbacks == notes == ["VAE decode untiled -> 256 px tiles (2), by frame after 8 frames"]
    assert cuts == [(None, False), (Tiling.square(256), True)]
    forced = SimpleNamespace(profile=SimpleNamespace(vae_tile=256), vae_tile=0)  # --vae-tile 0: nothing lighter
    with pytest.raises(UserError, match="ran out of memory"):
        list(P.Pipeline._decode_segment(fake, DecodeCut(), forced, latents, 0, 17, [], notes.append))
    tiled = DecodeCut(Tiling.square(256))
    assert list(P.Pipeline._decode_segment(fake, tiled, plan, latents, 0, 9, [], notes.append))


@pytest.mark.parametrize(("device", "asked", "expected"), [("cuda", None, None), ("cpu", None, None),
                                                         ("cuda", "bf16", torch.bfloat16), ("cpu", "bf16", torch.bfloat16)])
def test_vae_decode_precision_is_fp32_unless_bf16_is_asked_for(device, asked, expected):
    """bf16 decodes faster on a GPU but its error is above the large tiles' seams (issue 23): opt-in on every
    device."""
    from types import SimpleNamespace

    from scail2_lite.settings import MemorySettings

    fake = SimpleNamespace(memory=MemorySettings(vae_dtype=asked), device=torch.device(device))
    assert Pipeline.vae_dtype.fget(fake) is expected
