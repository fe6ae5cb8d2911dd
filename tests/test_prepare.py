"""prepare: masks from real photos composited onto moving backgrounds (truth known), identities through a
crossing, replacement and reframing, extra references, lossless masks, the folder contract, bad input, and
`generate --inputs` end to end on the tiny checkpoint. Needs the `prepare` and `test` extras."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from scail2_lite import conditioning, media
from scail2_lite.cli import app
from scail2_lite.errors import UserError
from scail2_lite.prepare import Mode, PrepareSettings, composite, read_inputs
from scail2_lite.prepare import masks as mk
from scail2_lite.prepare.folder import generate_files, new_folder
from scail2_lite.prepare.footage import EvenSample, frame_files
from scail2_lite.prepare.framing import fit_reference
from scail2_lite.prepare.palette import IDENTITIES, backgrounds
from scail2_lite.prepare.run import prepare
from scail2_lite.prepare.tracking import UNMATCHED, _assign
from scail2_lite.synth import synth

BLUE, RED = (0, 0, 255), (255, 0, 0)


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def write_video(path: Path, frames: np.ndarray, fps: float = 16) -> Path:
    media.write_video(path, torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1, fps=fps)
    return path


def rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def colours(picture: np.ndarray) -> set[tuple[int, ...]]:
    packed = picture.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], dtype=np.int32)
    return {(int(v) >> 16, int(v) >> 8 & 255, int(v) & 255) for v in np.unique(packed)}


def is_colour(picture: np.ndarray, colour) -> np.ndarray:
    return (picture == np.array(colour, dtype=np.uint8)).all(axis=-1)


def mask_frames(prepared) -> list[np.ndarray]:
    return [rgb(p) for p in frame_files(prepared.mask_video)]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """Composites on disk: references and driving videos, as a user would hand them over."""
    d = tmp_path_factory.mktemp("src")
    for name in composite.PEOPLE:
        picture, _ = composite.reference(name)
        Image.fromarray(picture).save(d / f"{name}.png")
    Image.fromarray(composite.pair()[0]).save(d / "pair.png")
    Image.fromarray(composite.photo("rocket")).save(d / "empty.png")
    return d


@pytest.fixture(scope="module")
def dancing() -> composite.Footage:
    return composite.dancing("grace_hopper", size=(360, 640), frames=25)


@pytest.fixture(scope="module")
def animated(src, dancing, tmp_path_factory):
    """One `prepare` run (animation, one person): its folder and the footage's truth."""
    out = tmp_path_factory.mktemp("runs") / "anim"
    video = write_video(src / "dancing.mp4", dancing.frames)
    return prepare(PrepareSettings(out=out, image=src / "astronaut.png", video=video))


def test_palette_is_the_models_planes():
    """Each identity colour lands in exactly its own one of the model's 7 planes, in training order."""
    assert [rgb for _, rgb in IDENTITIES] == [(0, 0, 255), (255, 0, 0), (0, 255, 0), (255, 0, 255), (0, 255, 255),
                                               (255, 255, 0)]
    plane_index = {name: i for i, (name, _) in enumerate(conditioning.PLANES)}
    for name, colour in IDENTITIES:
        image = torch.tensor(colour, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 1, 8, 8) / 127.5 - 1
        planes = conditioning.compress_mask(image)[:7, 0, 0, 0]
        assert planes.tolist() == [1.0 if i == plane_index[name] else 0.0 for i in range(7)]
    assert backgrounds(False) == ((255, 255, 255), (0, 0, 0)) and backgrounds(True) == ((0, 0, 0), (255, 255, 255))


def test_masks_match_truth_on_real_photos(animated, dancing, src):
    """Targets: IoU >= 0.90 on the reference, >= 0.85 averaged over the driving frames (mediapipe)."""
    truth = composite.reference("astronaut")[1]
    ref_iou = iou(is_colour(rgb(animated.mask_image), BLUE), truth)
    frames = mask_frames(animated)
    driving = [iou(is_colour(m, BLUE), t[0]) for m, t in zip(frames, dancing.truth)]
    assert ref_iou >= 0.90, ref_iou
    assert np.mean(driving) >= 0.85 and min(driving) >= 0.80, driving
    # The second photo as a reference, through the same segmenter path.
    other = prepare_reference_iou(src / "grace_hopper.png", composite.reference("grace_hopper")[1])
    assert other >= 0.90, other


def prepare_reference_iou(path: Path, truth: np.ndarray) -> float:
    from scail2_lite.prepare.mediapipe_pose import MediapipeSegmenter

    picture = rgb(path)
    segmenter = MediapipeSegmenter.load()
    try:
        people = mk.people_in_image(segmenter.image(picture, 2), picture.shape[:2])
    finally:
        segmenter.close()
    assert len(people) == 1
    return iou(people[0], truth)


def test_folder_contract(animated, dancing):
    """Animation backgrounds, pure colours, frame count, the model's own checks pass, the driving video is the
    source byte for byte, and inputs.json names everything."""
    ref_mask = rgb(animated.mask_image)
    assert colours(ref_mask) == {BLUE, (255, 255, 255)}
    frames = mask_frames(animated)
    assert len(frames) == len(dancing.frames) == animated.frames
    assert all(colours(f) <= {BLUE, (0, 0, 0)} for f in frames)
    assert animated.pose.read_bytes() == Path(animated.record["sources"]["video"]).read_bytes()
    assert rgb(animated.image).shape == ref_mask.shape
    ref = media.read_image(animated.mask_image)
    video, _ = media.read_video(animated.mask_video)
    assert conditioning.check_mask(ref, "reference", replace=False) == []
    assert conditioning.check_mask(video, "driving", replace=False) == []
    assert (animated.folder / "preview.png").is_file() and animated.mode is Mode.ANIMATE
    ident = animated.record["identities"]
    assert [i["colour"] for i in ident] == ["blue"] and ident[0]["driving_box_first_frame"] is not None


def test_mask_video_reads_back_exactly(animated):
    """The driving mask is lossless: generate's reader gets exactly the colours written (no chroma blur)."""
    video, _ = media.read_video(animated.mask_video)
    as_bytes = video.add(1).mul(127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    written = np.stack(mask_frames(animated))
    assert np.array_equal(as_bytes, written)
    assert is_colour(written, BLUE).sum() > 0.05 * is_colour(written, BLUE).size


def colour_of(mask_frame: np.ndarray, truth: np.ndarray) -> tuple | None:
    """The colour covering most of what a person shows, None when nobody's colour covers half of it."""
    counts = {c: int(is_colour(mask_frame, c)[truth].sum()) for c in (BLUE, RED)}
    best = max(counts, key=counts.get)
    return best if counts[best] > 0.5 * truth.sum() else None


@pytest.fixture(scope="module")
def crossing(src, tmp_path_factory):
    footage = composite.crossing()
    out = tmp_path_factory.mktemp("runs") / "cross"
    video = write_video(src / "crossing.mp4", footage.frames)
    return footage, prepare(PrepareSettings(out=out, image=src / "pair.png", video=video, people=2))


def test_two_people_crossing_never_swap(crossing):
    """Target: on two real people crossing, zero colour swaps outside the frames where they overlap; the
    identities are left to right in the reference (Grace Hopper blue, the astronaut red) and in frame 0."""
    footage, prepared = crossing
    ref = rgb(prepared.mask_image)
    ref_truth = composite.pair()[1]
    assert colour_of(ref, ref_truth[0]) == BLUE and colour_of(ref, ref_truth[1]) == RED
    swaps, checked = 0, 0
    for frame, truth, overlap in zip(mask_frames(prepared), footage.truth, footage.overlap):
        if overlap:
            continue
        checked += 1
        swaps += [colour_of(frame, truth[0]), colour_of(frame, truth[1])] != [BLUE, RED]
    assert checked >= 25 and swaps == 0


def test_order_and_masks_only_rerun(crossing):
    """--masks-only re-segments the folder's own copies (reference and video untouched) and --order 2,1 pairs
    the leftmost driving person with reference character 2 (red)."""
    footage, prepared = crossing
    before = {p: p.read_bytes() for p in (prepared.image, prepared.pose)}
    res = cli("prepare", "-o", prepared.folder, "--masks-only", "--order", "2,1")
    assert res.exit_code == 0, res.output
    again = read_inputs(prepared.folder)
    assert {p: p.read_bytes() for p in (again.image, again.pose)} == before
    first = mask_frames(again)[0]
    assert colour_of(first, footage.truth[0][0]) == RED and colour_of(first, footage.truth[0][1]) == BLUE
    assert again.record["people"] == 2 and not [p for p in prepared.folder.iterdir() if p.name.startswith(".")]


def test_replace_mode_picks_and_fits(src, tmp_path):
    """Replacement: reference mask on black, driving mask on white with only the chosen person painted (the
    reference's colour); the reframed reference puts the character at the driving person's height fraction."""
    footage = composite.crossing(frames=9)
    video = write_video(tmp_path / "cross9.mp4", footage.frames)
    res = cli("prepare", "--image", src / "grace_hopper.png", "--video", video, "-o", tmp_path / "rep",
              "--mode", "replace", "--replace-person", "2")
    assert res.exit_code == 0, res.output
    prepared = read_inputs(tmp_path / "rep")
    assert prepared.replace
    ref_mask = rgb(prepared.mask_image)
    assert colours(ref_mask) == {BLUE, (0, 0, 0)}
    first = mask_frames(prepared)[0]
    assert colours(first) == {BLUE, (255, 255, 255)}
    assert colour_of(first, footage.truth[0][1]) == BLUE and colour_of(first, footage.truth[0][0]) is None
    # Framing: the character's height fraction in the new reference equals the person's in the first frame.
    framing = prepared.record["framing"]
    char, target = mk.box(is_colour(ref_mask, BLUE)), mk.box(footage.truth[0][1])
    assert ref_mask.shape[1] / ref_mask.shape[0] == pytest.approx(footage.frames.shape[2] / footage.frames.shape[1],
                                                                  rel=0.02)
    assert (char[3] - char[1]) / ref_mask.shape[0] == pytest.approx((target[3] - target[1]) / footage.frames.shape[1],
                                                                    abs=0.04)
    assert framing["scale"] < 1
    ref, video_t = media.read_image(prepared.mask_image), media.read_video(prepared.mask_video)[0]
    assert conditioning.check_mask(ref, "reference", replace=True) == []
    assert conditioning.check_mask(video_t, "driving", replace=True) == []
    # The default pick (nearest to the reference's placement) is made and recorded.
    res = cli("prepare", "-o", tmp_path / "rep", "--masks-only")
    assert res.exit_code == 0, res.output
    assert read_inputs(tmp_path / "rep").record["identities"][0]["driving_person"] in (1, 2)


def test_extra_references(src, tmp_path, animated):
    """A character view gets its identity colour on black; a picture with nobody in it is a background
    reference, all white. generate takes them as its extra references, and their mask checks find nothing wrong."""
    video = animated.pose
    res = cli("prepare", "--image", src / "astronaut.png", "--video", video, "-o", tmp_path / "x", "--frames", "5",
              "--additional-ref-image", src / "grace_hopper.png", "--additional-ref-image", src / "empty.png")
    assert res.exit_code == 0, res.output
    prepared = read_inputs(tmp_path / "x")
    assert prepared.frames == 5 and len(mask_frames(prepared)) == 5
    (char, bg) = prepared.extra_references
    assert (char.kind, bg.kind) == ("character", "background")
    assert colours(rgb(char.mask)) == {BLUE, (0, 0, 0)}
    assert colours(rgb(bg.mask)) == {(255, 255, 255)}
    files, _, notes = generate_files(prepared.folder, None, None, None, None, False)
    assert files.additional_refs == ((char.image, char.mask), (bg.image, bg.mask)) and not notes
    for number, extra in enumerate(prepared.extra_references, start=1):
        assert conditioning.check_extra_mask(media.read_image(extra.mask), number) == []


def test_generate_files_rules(animated, tmp_path):
    files, replace, notes = generate_files(animated.folder, tmp_path / "mine.png", None, None, None, False)
    assert files.image == tmp_path / "mine.png" and files.pose == animated.pose and not replace and not notes
    with pytest.raises(UserError, match="--mask-image, --pose, --mask-video"):
        generate_files(None, tmp_path / "a.png", None, None, None, False)
    with pytest.raises(UserError, match="prepared for animation"):
        generate_files(animated.folder, None, None, None, None, True)
    with pytest.raises(UserError, match="no inputs.json"):
        generate_files(tmp_path, None, None, None, None, False)


@pytest.mark.parametrize("case", ["nobody", "two_for_one", "unreadable", "too_short", "exists", "onto_input"])
def test_bad_input_is_one_line_and_writes_nothing(src, animated, tmp_path, case):
    out = tmp_path / "out"
    image, video = src / "astronaut.png", animated.pose
    if case == "nobody":
        image = src / "empty.png"
    elif case == "two_for_one":
        image = src / "pair.png"
    elif case == "unreadable":
        video = tmp_path / "broken.mp4"
        video.write_bytes(b"not a video at all")
    elif case == "too_short":
        video = write_video(tmp_path / "short.mp4", composite.dancing("grace_hopper", (256, 256), 3).frames)
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "onto_input":
        out = video
    before = sorted((p.name, p.stat().st_size) for p in out.parent.iterdir())
    res = cli("prepare", "--image", image, "--video", video, "-o", out)
    assert res.exit_code == 2, res.output
    assert res.output.count("error:") == 1 and "Traceback" not in res.output
    assert sorted((p.name, p.stat().st_size) for p in out.parent.iterdir()) == before  # nothing half-written
    if case == "nobody":
        assert "no person found" in res.output
    if case == "two_for_one":
        assert "found 2 people" in res.output
    if case == "too_short":
        assert "at least 5" in res.output
    if case == "exists":
        assert (out / "keep.txt").read_text() == "mine"


def test_interrupt_and_sigterm_leave_nothing(src, animated, tmp_path, monkeypatch):
    from scail2_lite.prepare.tracking import IdentityTracker

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(IdentityTracker, "update", interrupted)
    res = cli("prepare", "--image", src / "astronaut.png", "--video", animated.pose, "-o", tmp_path / "o")
    assert res.exit_code == 130 and list(tmp_path.iterdir()) == []
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with new_folder(tmp_path / "t") as stage:
            (stage / "half.png").write_bytes(b"x")
            os.kill(os.getpid(), signal.SIGTERM)
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is handler


def test_prepare_then_generate_end_to_end(src, tmp_path):
    """prepare a folder, then `generate MODEL --inputs DIR` on the tiny synthetic checkpoint."""
    model = synth(tmp_path / "ckpt", scale="tiny", fmt="sat", seed=0)
    video = write_video(tmp_path / "d.mp4", composite.dancing("astronaut", (256, 256), 5).frames)
    res = cli("prepare", "--image", src / "grace_hopper.png", "--video", video, "-o", tmp_path / "in")
    assert res.exit_code == 0, res.output
    out = tmp_path / "out.mp4"
    res = cli("generate", model, "--inputs", tmp_path / "in", "--width", "128", "--height", "128", "--steps", "1",
              "--device", "cpu", "-o", out)
    assert res.exit_code == 0, res.output
    assert media.read_video(out)[0].shape[1] == 5


# ---- the pieces ------------------------------------------------------------------------------------------------


def test_assignment_is_optimal():
    """The tracker's assignment equals brute force over every injective matching (unmatched = UNMATCHED)."""
    import itertools

    rng = np.random.default_rng(0)
    for _ in range(50):
        t, d = rng.integers(1, 5), rng.integers(0, 5)
        cost = rng.uniform(0, 2.5, (t, d))
        cost[cost > UNMATCHED] = np.inf
        picks = _assign(cost)
        total = sum(UNMATCHED if j is None else cost[i, j] for i, j in enumerate(picks))
        assert len({j for j in picks if j is not None}) == sum(j is not None for j in picks)
        best = min(
            sum(UNMATCHED if j is None else cost[i, j] for i, j in enumerate(perm))
            for perm in itertools.product([None, *range(d)], repeat=t)
            if len({j for j in perm if j is not None}) == sum(j is not None for j in perm)
        )
        assert total == pytest.approx(best)


def test_clean_removes_speckles_fills_holes_keeps_gaps():
    mask = np.zeros((200, 200), dtype=bool)
    mask[20:180, 40:160] = True
    mask[60:64, 60:64] = False  # a pinhole: filled
    mask[100:170, 90:110] = False  # a gap open at the bottom edge of the body, like between legs: kept
    mask[100:150, 70:80] = False  # an enclosed but large gap (arm and body): kept
    mask[5:7, 5:7] = True  # a speckle: removed
    out = mk.clean(mask)
    assert out[61, 61] and not out[6, 6] and not out[120, 100] and not out[120, 75]


def test_fit_reference_matches_height_fraction():
    image = np.full((400, 300, 3), 90, dtype=np.uint8)
    person = np.zeros((400, 300), dtype=bool)
    person[0:400, 100:200] = True  # full-bleed portrait: the character spans the whole height
    fitted, masks, framing = fit_reference(image, [person], (100, 0, 200, 400), (300, 300, 500, 500), (500, 800),
                                           pad=(0, 0, 0))
    b = mk.box(masks[0])
    assert fitted.shape[1] / fitted.shape[0] == pytest.approx(800 / 500, rel=0.01)
    assert (b[3] - b[1]) / fitted.shape[0] == pytest.approx(0.4, abs=0.01)  # 200 of 500 px in the frame
    assert (b[0] + b[2]) / 2 / fitted.shape[1] == pytest.approx(0.5, abs=0.01) and b[3] == fitted.shape[0]
    assert (fitted[~masks[0]] == 0).mean() > 0.5  # padded with black


def test_even_sample_spreads_over_unknown_length():
    sample = EvenSample(4)
    for i in range(100):
        sample.offer(i, lambda i=i: i)
    picked = [i for i, _ in sample.pick(4)]
    assert picked[0] == 0 and picked[-1] >= 80 and len(picked) == 4


def test_segmenter_choice_says_what_to_install(tmp_path, monkeypatch):
    import scail2_lite.prepare.mediapipe_pose as mpp
    from scail2_lite.prepare.segmenter import open_segmenter

    monkeypatch.setattr(mpp, "mediapipe_problem", lambda: "mediapipe is not installed")
    settings = PrepareSettings(out=tmp_path / "o", image=tmp_path / "a.png", video=tmp_path / "v.mp4")
    with pytest.raises(UserError, match=r"not installed\): pip install 'scail2-lite\[prepare\]'.*facebook/sam3"):
        open_segmenter(settings)
    with pytest.raises(UserError, match="needs SAM3"):
        open_segmenter(PrepareSettings(out=tmp_path / "o", image=tmp_path / "a.png", video=tmp_path / "v.mp4",
                                       prompt_object="dog"))
    with pytest.raises(UserError, match="--order must list"):
        PrepareSettings(out=tmp_path / "o", image=tmp_path / "a.png", video=tmp_path / "v.mp4", people=2,
                        order=(1, 1))
    with pytest.raises(UserError, match="--people 1"):
        PrepareSettings(out=tmp_path / "o", image=tmp_path / "a.png", video=tmp_path / "v.mp4", people=2,
                        mode=Mode.REPLACE)


def test_inputs_json_is_plain_and_versioned(animated):
    data = json.loads((animated.folder / "inputs.json").read_text())
    assert data["format"] == "scail2-lite prepare" and data["version"] == 1
    assert data["backgrounds"] == {"reference_mask": "white", "driving_mask": "black"}
    assert data["files"]["driving_mask"] == "driving_mask"
