"""Planner: profile files and their validation, choices for a table of (VRAM, RAM, size) cases, monotonic
predictions, the OOM fallback order; and the attention backend switch the profiles select."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from scail2_lite import attention as attn
from scail2_lite.config import SIZES, DiTConfig
from scail2_lite.errors import UserError
from scail2_lite.offload import planner
from scail2_lite.offload.card import CUDA_CONTEXT, DESKTOP_RESERVE, DeviceMemory, card_bytes
from scail2_lite.offload.planner import (
    PHASES, available_ram, block_activation_stages, block_bytes, decode_cost, decode_cut, decode_tilings, lighter,
    list_profiles, load_profile, plan, predict, reserved_bytes, tokens, unit_bytes, vae_decode_bytes, vae_encode_bytes,
)
from scail2_lite.vae_tiles import ENCODE_TILE, ENCODE_WHOLE_MAX_BYTES, DecodeCut, Tiling, encode_bytes, encode_tiling

C14 = DiTConfig.preset("scail2-14b")
GB = 10**9


def card(gb: float) -> DeviceMemory:
    """A card of `gb` GB as sold (GiB), nothing of ours on it yet."""
    return DeviceMemory.card(card_bytes(gb))

GOOD = """description = "test"
speed_rank = 5
resident_blocks = "auto"
prefetch = 1
stream_unit = "block"
weight_source = "pinned"
vae_tile = 256
ffn_chunk = 8192
attn_chunk = 8192
attention = "sdpa"
"""


def test_token_counts_match_the_spec() -> None:
    assert tokens(C14, *SIZES["512p"], 81) == 48_832
    assert tokens(C14, *SIZES["704p"], 81) == 95_920
    assert block_bytes(C14, "bf16") == pytest.approx(0.81e9, rel=0.01)
    assert block_bytes(C14, "fp8") == pytest.approx(0.40e9, rel=0.02)


def test_extra_references_add_one_reference_frame_of_tokens_each() -> None:
    """SPEC section 6: +1,792 tokens per extra reference at 512p (+3.7%), +3,520 at 704p; every step carries them."""
    for size, base, per_ref in (("512p", 48_832, 1_792), ("704p", 95_920, 3_520)):
        assert tokens(C14, *SIZES[size], 81, extra_refs=1) - base == per_ref
        assert tokens(C14, *SIZES[size], 81, extra_refs=3) - base == 3 * per_ref
        assert per_ref / base == pytest.approx(0.037, abs=0.001)
    plain = plan(C14, *SIZES["704p"], 81, card(24), 64 * GB, profile="24gb", weights="fp8")
    multi = plan(C14, *SIZES["704p"], 81, card(24), 64 * GB, profile="24gb", weights="fp8", extra_refs=2)
    assert multi.extra_refs == 2 and multi.tokens == plain.tokens + 2 * 3_520
    assert multi.phases["dit_step"].vram > plain.phases["dit_step"].vram
    assert multi.phases["vae_decode"].vram == plain.phases["vae_decode"].vram  # the VAE never sees them
    assert lighter(multi) is None or lighter(multi).extra_refs == 2
    with pytest.raises(UserError, match="extra references"):
        tokens(C14, *SIZES["512p"], 81, extra_refs=-1)


def test_shipped_profiles_load_and_share_the_numerics() -> None:
    profiles = list_profiles()
    assert {p.name for p in profiles} >= {"resident", "24gb", "16gb", "12gb", "8gb", "lowram"}
    assert [p.speed_rank for p in profiles] == sorted(p.speed_rank for p in profiles)
    # Profiles may only move data: everything that changes numbers is the same in all of them.
    numerics = {(p.ffn_chunk, p.attn_chunk, p.attention, p.vae_tile) for p in profiles}
    assert len(numerics) == 1


@pytest.mark.parametrize(
    "size,weights,vram,ram,expected,resident",
    [
        ("512p", "bf16", 80, 64, "resident", 40),
        ("704p", "bf16", 80, 64, "resident", 40),
        ("704p", "fp8", 24, 64, "24gb", None),
        ("704p", "bf16", 24, 64, "24gb", None),
        ("704p", "fp8", 16, 64, "24gb", None),
        ("704p", "fp8", 12, 32, "24gb", None),
        ("704p", "fp8", 16, 16, "lowram", 0),  # pinned blocks do not fit 16 GB of RAM
        ("512p", "bf16", 16, 16, "lowram", 0),
        ("512p", "fp8", 24, 16, "resident", 40),  # the 8-bit model fits a 24 GB card whole
        ("704p", "fp8", 8.5, 64, "layers", 0),  # one block slot is too much: layer streaming
    ],
)
def test_choices_for_a_table_of_machines(size, weights, vram, ram, expected, resident) -> None:
    p = plan(C14, *SIZES[size], 81, card(vram), ram * GB, weights=weights)
    assert p.profile.name == expected and p.fits
    if resident is not None:
        assert p.resident_blocks == resident
    assert p.peak_vram_reserved <= card_bytes(vram) - CUDA_CONTEXT - DESKTOP_RESERVE and p.peak_ram <= ram * GB
    assert p.peak_process_total <= card_bytes(vram) - DESKTOP_RESERVE  # what NVML will show fits the card
    assert set(p.phases) == set(PHASES)


def test_auto_resident_blocks_are_the_most_that_fit() -> None:
    p = plan(C14, *SIZES["704p"], 81, card(16), 64 * GB, weights="fp8")
    assert 0 < p.resident_blocks < 40
    more = predict(p.profile, C14, *SIZES["704p"], 81, p.resident_blocks + 1, "fp8", decode=p.vae_decode)
    assert max(m.reserved for m in more.values()) > p.vram_budget >= p.peak_vram_reserved


def test_vram_budget_caps_and_nothing_fitting_is_a_clear_error() -> None:
    free = plan(C14, *SIZES["704p"], 81, card(80), 64 * GB, weights="fp8")
    capped = plan(C14, *SIZES["704p"], 81, card(80), 64 * GB, vram_budget=card_bytes(12), weights="fp8")
    assert capped.peak_vram_reserved <= card_bytes(12) - CUDA_CONTEXT - DESKTOP_RESERVE < free.peak_vram_reserved
    with pytest.raises(UserError, match="no profile fits 704x1280x81"):
        plan(C14, *SIZES["704p"], 81, card(4), 64 * GB)


def test_forced_profile_is_used_even_when_it_does_not_fit() -> None:
    p = plan(C14, *SIZES["704p"], 81, card(12), 64 * GB, profile="resident")
    assert p.profile.name == "resident" and not p.fits and "--profile" in p.reason


def test_predictions_grow_with_resolution_and_frames() -> None:
    prof = load_profile("12gb")
    sizes = [(256, 448, 81), (512, 896, 41), (512, 896, 81), (704, 1280, 81), (704, 1280, 161)]
    peaks = [predict(prof, C14, h, w, f, 0, "fp8") for h, w, f in sizes]
    for phase in ("dit_step", "vae_decode"):
        values = [p[phase].vram for p in peaks]
        assert values == sorted(values) and values[0] < values[-1]


def test_fallback_order_gets_strictly_lighter_and_ends() -> None:
    current = plan(C14, *SIZES["704p"], 81, card(80), 64 * GB, weights="fp8")
    chain = [current]
    while (nxt := lighter(chain[-1])) is not None:
        assert nxt.peak_vram_reserved <= 0.8 * chain[-1].peak_vram_reserved
        assert nxt.quantization == "fp8"
        chain.append(nxt)
    assert len(chain) >= 3 and chain[0].profile.name == "resident"
    assert chain[-1].peak_vram_reserved < 0.5 * chain[0].peak_vram_reserved and chain[-1].streamed_blocks > 30


@pytest.mark.parametrize(
    "edit,message",
    [
        (("prefetch = 1", "prefetch = -1"), "'prefetch' must be an integer"),
        (("prefetch = 1", 'prefetch = "1"'), "'prefetch' must be an integer"),
        (('weight_source = "pinned"', 'weight_source = "disk"'), "'weight_source' must be one of"),
        (('attention = "sdpa"', 'attention = "xformers"'), "'attention' must be one of"),
        (('resident_blocks = "auto"', 'resident_blocks = "some"'), "'resident_blocks' must be"),
        (("vae_tile = 256\n", ""), "missing field 'vae_tile'"),
        (("vae_tile = 256", "vae_tile = 256\ncolor = 1"), "unknown field 'color'"),
        (("prefetch = 1", "prefetch = = 1"), "not valid TOML"),
    ],
)
def test_bad_profile_files_name_the_file_and_field(tmp_path, edit, message) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(GOOD.replace(*edit))
    with pytest.raises(UserError, match=message) as info:
        load_profile(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_layer_streaming_needs_pinned_ram(tmp_path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(GOOD.replace('stream_unit = "block"', 'stream_unit = "layer"').replace('"pinned"', '"mmap"'))
    with pytest.raises(UserError, match="pinned"):
        load_profile(path)


@pytest.mark.parametrize("weights", ["bf16", "fp8"])
@pytest.mark.parametrize("size", ["512p", "704p"])
def test_layer_streaming_holds_one_square_weight_at_the_attention(size: str, weights: str) -> None:
    """At 512p-704p the attention is the block's peak: layer streaming holds v there (and the small tensors of
    every block), where one slot holds a whole block."""
    one_slot, layers = load_profile("8gb"), load_profile("layers")
    slot = predict(one_slot, C14, *SIZES[size], 81, 0, weights)["dit_step"].vram
    layer = predict(layers, C14, *SIZES[size], 81, 0, weights)["dit_step"].vram
    units = unit_bytes(C14, weights)
    assert slot - layer == block_bytes(C14, weights) - units["self_attn.v"] - C14.num_layers * units["rest"]
    assert units["self_attn.v"] == pytest.approx(C14.dim**2 * (2 if weights == "bf16" else 1), rel=0.01)


def test_custom_profile_file_and_unknown_name(tmp_path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(GOOD)
    assert load_profile(path).name == "mine"
    with pytest.raises(UserError, match="unknown profile 'nope'"):
        load_profile("nope")


def test_available_ram_is_reported() -> None:
    assert available_ram() > 0


def test_attention_backend_is_an_argument() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 16, 2, 8, generator=g) for _ in range(3))
    ref = attn.attention(q, k, v)
    torch.testing.assert_close(attn.attention(q, k, v, attn.resolve("math")), ref)
    assert not hasattr(attn, "set_backend")  # no process-wide state: the caller's Kernels carry the backend
    with pytest.raises(UserError, match="unknown attention backend"):
        attn.resolve("xformers")


def test_sage_backend_missing_or_cpu_is_a_user_error() -> None:
    try:
        import sageattention  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install"):
            attn.resolve("sage")
    else:
        with pytest.raises(UserError, match="CUDA"):
            attn.attention(*(torch.randn(1, 4, 1, 64) for _ in range(3)), attn.resolve("sage"))


def test_tiny_model_plans_too() -> None:
    tiny = dataclasses.replace(DiTConfig.preset("tiny"), num_layers=4)
    p = plan(tiny, 64, 64, 5, card(8), 16 * GB)
    assert p.profile.name == "resident" and p.resident_blocks == 4


def test_weights_that_cannot_be_mapped_never_get_a_disk_streaming_profile() -> None:
    low_ram = plan(C14, *SIZES["704p"], 81, card(16), 12 * GB, weights="fp8")
    assert low_ram.profile.weight_source == "mmap"
    with pytest.raises(UserError, match="no profile fits"):
        plan(C14, *SIZES["704p"], 81, card(16), 12 * GB, weights="fp8", mappable=False)


def test_ram_follows_where_the_blocks_live() -> None:
    """From a quantized folder the blocks cost RAM only once pinned (or two blocks of staging when read from disk);
    a DiT that cannot be mapped (LoRAs merged, other formats) sits in RAM whole in every phase."""
    size = SIZES["704p"]
    mapped = {p: plan(C14, *size, 81, card(16), 64 * GB, profile=p, weights="fp8") for p in ("8gb", "lowram")}
    whole = {p: plan(C14, *size, 81, card(16), 64 * GB, profile=p, weights="fp8", mappable=False) for p in ("8gb",)}
    blk = block_bytes(C14, "fp8")
    pinned, disk = mapped["8gb"].phases, mapped["lowram"].phases
    assert pinned["dit_step"].ram - disk["dit_step"].ram == (C14.num_layers - 2) * blk
    assert disk["text_encoder"].ram < disk["dit_step"].ram  # the staging ring comes with the placement
    # 64 GB: the pinned buffer fills beside CLIP and the VAE encode, after umT5 (not the mapped profile's staging:
    # nothing to read early)
    assert mapped["8gb"].overlap_placement and not mapped["lowram"].overlap_placement
    assert pinned["clip"].ram - disk["clip"].ram == C14.num_layers * blk
    assert pinned["text_encoder"].ram == disk["text_encoder"].ram
    assert whole["8gb"].phases["text_encoder"].ram - disk["text_encoder"].ram == C14.num_layers * blk
    assert mapped["8gb"].peak_ram <= 24 * GB and mapped["lowram"].peak_ram <= 12 * GB


def test_placement_overlaps_the_encoders_only_where_ram_allows() -> None:
    """The DiT's host side is built beside CLIP and the VAE encode only when RAM holds the pinned buffer then too:
    those phases carry it, its VRAM and its choice of blocks do not change; one byte less RAM than that and the
    placement waits for the encoders, as before. Nothing to overlap when no block streams from pinned RAM."""
    size, frames = SIZES["704p"], 17  # short segments: few decoded frames, so the encoders set the overlapped peak
    profile = load_profile("8gb")
    plain = predict(profile, C14, *size, frames, 0, "fp8")
    early = predict(profile, C14, *size, frames, 0, "fp8", overlap=True)
    host = C14.num_layers * block_bytes(C14, "fp8")
    for phase in ("clip", "vae_encode"):
        assert early[phase].ram - plain[phase].ram == host and early[phase].vram == plain[phase].vram
    assert early["text_encoder"] == plain["text_encoder"]  # umT5 runs first, alone
    assert all(early[p] == plain[p] for p in ("dit_step", "vae_decode"))
    need = max(m.ram for m in early.values())
    assert need > max(m.ram for m in plain.values())
    roomy = plan(C14, *size, frames, card(16), need, profile="8gb", weights="fp8")
    tight = plan(C14, *size, frames, card(16), need - 1, profile="8gb", weights="fp8")
    decode = roomy.vae_decode  # the plan's decode tiles (the largest that fit), not the profile's
    assert roomy.overlap_placement and roomy.fits
    assert roomy.phases == predict(profile, C14, *size, frames, 0, "fp8", decode=decode, overlap=True)
    assert not tight.overlap_placement and tight.fits
    assert tight.phases == predict(profile, C14, *size, frames, 0, "fp8", decode=decode)
    assert (roomy.resident_blocks, roomy.peak_vram_reserved) == (tight.resident_blocks, tight.peak_vram_reserved)
    for name in ("lowram", "resident"):
        assert not plan(C14, *size, frames, card(80), 512 * GB, profile=name, weights="fp8").overlap_placement
    # a DiT that cannot be mapped is in RAM anyway: copying it into the pinned buffer early costs nothing more
    whole = plan(C14, *size, frames, card(16), 512 * GB, profile="8gb", weights="fp8", mappable=False)
    assert whole.overlap_placement
    assert whole.phases == predict(profile, C14, *size, frames, 0, "fp8", mappable=False,
                                   decode=whole.vae_decode)


def test_budget_is_the_cards_total_less_context_and_desktop() -> None:
    """`--vram-budget` is a card's total: the context and a desktop reserve come off it; the free memory the driver
    reports caps it too, and a context that already exists is not taken twice."""
    sixteen = card_bytes(16)
    assert DeviceMemory.card(sixteen).allocator_budget() == sixteen - CUDA_CONTEXT - DESKTOP_RESERVE
    h100 = DeviceMemory(total=card_bytes(80), free=card_bytes(79), context_in_use=CUDA_CONTEXT)
    assert h100.allocator_budget(sixteen) == sixteen - CUDA_CONTEXT - DESKTOP_RESERVE
    assert h100.allocator_budget() == card_bytes(79) - DESKTOP_RESERVE
    made = DeviceMemory(total=sixteen, free=10 * GB, context_in_use=int(1.0e9))
    assert made.allocator_budget() == 10 * GB - (CUDA_CONTEXT - int(1.0e9)) - DESKTOP_RESERVE
    busy = DeviceMemory(total=sixteen, free=6 * GB)  # a desktop and another program already hold 10 GB
    assert busy.allocator_budget(sixteen) == 6 * GB - CUDA_CONTEXT - DESKTOP_RESERVE
    assert DeviceMemory(total=0, free=0).allocator_budget() == 0


def test_plan_reports_the_process_total_as_nvml_will_show_it() -> None:
    gpu = DeviceMemory(total=card_bytes(16), free=card_bytes(15), context_in_use=int(1.2e9), context=int(1.4e9))
    p = plan(C14, *SIZES["704p"], 81, gpu, 64 * GB, weights="fp8")
    assert p.vram_budget == gpu.allocator_budget() and p.outside_allocator == int(1.4e9)
    for name, mem in p.phases.items():
        assert mem.reserved >= mem.vram and p.process_total(name) == mem.reserved + int(1.4e9)
    assert p.peak_process_total <= card_bytes(15) + int(1.2e9) - DESKTOP_RESERVE


def test_smaller_free_memory_gives_a_lighter_plan() -> None:
    """The same card with a desktop holding 3 GB: fewer resident blocks (or a lighter profile)."""
    idle = plan(C14, *SIZES["704p"], 81, card(16), 64 * GB, weights="fp8")
    desktop = plan(C14, *SIZES["704p"], 81, DeviceMemory(total=card_bytes(16), free=card_bytes(16) - 3 * GB),
                   64 * GB, weights="fp8")
    assert desktop.peak_vram_reserved < idle.peak_vram_reserved and desktop.fits


def test_704p_needs_more_than_an_8gb_card_beside_a_desktop() -> None:
    """The layer-streamed 704p steps (6.7 GB allocated) plus the CUDA context leave an 8 GiB card less than the
    desktop reserve; without a desktop (a headless card) they fit."""
    with pytest.raises(UserError, match="no profile fits 704x1280x81.*CUDA context"):
        plan(C14, *SIZES["704p"], 81, card(8), 64 * GB, weights="fp8")
    headless = plan(C14, *SIZES["704p"], 81, DeviceMemory.card(card_bytes(8), desktop=0), 64 * GB, weights="fp8")
    assert headless.profile.name == "layers" and headless.peak_process_total <= card_bytes(8)


def test_an_8bit_attention_peaks_below_sdpa_in_the_self_attention_alone() -> None:
    """fp8/int8 free each bf16 input once its 8-bit copy exists: q, k, v and one copy (7 bytes per element) against
    SDPA's q, k, v and output (8); the projections before them (h, q, k and a chunk's temporaries) bound both."""
    n, d = tokens(C14, *SIZES["704p"], 81), C14.dim
    sdpa = block_activation_stages(C14, n, 8192, 8192, "sdpa")
    for backend in attn.CONVERTING:
        eight = block_activation_stages(C14, n, 8192, 8192, backend)
        assert {k: b for k, b in eight.items() if k != "self_attn"} == {k: b for k, b in sdpa.items()
                                                                         if k != "self_attn"}
        assert 0 < sdpa["self_attn"] - eight["self_attn"] <= n * d
    no_chunk = block_activation_stages(C14, n, 8192, 0, "sdpa")["self_attn"]  # one-shot projections: 6 + 16 bytes
    assert no_chunk > sdpa["self_attn"]


def test_704p_fits_an_8gb_card_beside_a_desktop_under_an_8bit_attention(monkeypatch) -> None:
    """On a GPU where `auto` (or --attention) runs fp8 or int8, the layer-streamed 704p steps fit an 8 GiB card less
    the desktop reserve; the plan carries the backend it counted, and a fallback keeps it (same numbers)."""
    monkeypatch.setattr(planner, "resolve_attention", lambda name: "int8" if name == "auto" else name)
    for asked in (None, "int8", "fp8"):
        p = plan(C14, *SIZES["704p"], 81, card(8), 64 * GB, weights="fp8", attention=asked)
        assert p.profile.name == "layers" and p.fits and p.attention == (asked or "int8")
        assert p.peak_process_total <= card_bytes(8) - DESKTOP_RESERVE
    with pytest.raises(UserError, match="no profile fits 704x1280x81"):
        plan(C14, *SIZES["704p"], 81, card(8), 64 * GB, weights="fp8", attention="sdpa")
    roomy = plan(C14, *SIZES["704p"], 81, card(16), 64 * GB, weights="fp8")
    assert roomy.attention == "int8" and lighter(roomy).attention == "int8"


# ---- the VAE decode's tiles ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,gib,expected", [
    ("704p", 12, "704x432 px tiles (4)"), ("704p", 16, "704x576 px tiles (3)"),
    ("704p", 24, "untiled, by frame"), ("704p", 32, "untiled"), ("512p", 8, "512x408 px tiles (3)"),
    ("512p", 12, "untiled, by frame"), ("512p", 16, "untiled"),
])
def test_decode_cut_is_the_quickest_that_fits_the_budget(size: str, gib: int, expected: str) -> None:
    """The DiT is off the GPU while the VAE decodes: its cut is the one of least predicted cost whose reserved peak
    fits the allocator's budget; every quicker cut does not fit. By frame only where it makes the decode untiled
    (measured on the H100: untiled by frame 8.7 s against two strips 10.3 s; two strips by frame 12.6 s against
    three strips 11.1 s)."""
    h, w = SIZES[size]
    p = plan(C14, h, w, 81, card(gib), 64 * GB, weights="fp8")
    cut = p.vae_decode
    assert cut.describe(h, w) == expected
    assert p.phases["vae_decode"].reserved <= p.vram_budget
    assert p.phases["vae_decode"].vram == vae_decode_bytes(h, w, 81, cut.tiling, cut.by_frame)
    quicker = [DecodeCut(t, b) for t in decode_tilings(h, w, p.profile.vae_tile) for b in (False, True)
               if decode_cost(h, w, DecodeCut(t, b)) < decode_cost(h, w, cut)]
    assert all(reserved_bytes("vae_decode", vae_decode_bytes(h, w, 81, c.tiling, c.by_frame)) > p.vram_budget
               for c in quicker)
    assert quicker or cut == DecodeCut()  # nothing is quicker than untiled, four frames at a time
    # the same card and size always give the same cut (the decode's numbers depend on it)
    assert plan(C14, h, w, 81, card(gib), 64 * GB, weights="fp8").vae_decode == cut


def test_decode_cost_orders_the_measured_decodes() -> None:
    """RESULTS.md (H100, 704p x 81, 2026-12-07), seconds of each decode in the same run: the predicted cost puts
    them in the measured order."""
    h, w = SIZES["704p"]
    measured = {(None, False): 7.08, (None, True): 8.74, (2, False): 10.26, (3, False): 11.13, (5, False): 11.90,
                (2, True): 12.63, (3, True): 13.53, (5, True): 14.95}
    cost = {k: decode_cost(h, w, DecodeCut(Tiling.strips(h, w, k[0]) if k[0] else None, k[1])) for k in measured}
    assert sorted(measured, key=measured.get) == sorted(cost, key=cost.get)


def test_decode_prefers_strips_to_a_larger_square_that_decodes_more() -> None:
    """A 512 px square is a larger tile than three strips at 512p but makes two rows over a 512 px high frame
    (1.6x the pixels against 1.23x): with room for the square, the three strips win (and over two strips by frame)."""
    h, w = SIZES["512p"]
    square, three = Tiling.square(512), Tiling.strips(h, w, 3)
    assert square.largest_tile(h, w) > three.largest_tile(h, w)
    assert square.decoded_pixels(h, w) > three.decoded_pixels(h, w)
    budget = reserved_bytes("vae_decode", vae_decode_bytes(h, w, 81, square))
    assert budget < reserved_bytes("vae_decode", vae_decode_bytes(h, w, 81, Tiling.strips(h, w, 2)))
    assert decode_cut(h, w, 81, budget, 256) == DecodeCut(three)


def test_decode_candidates_go_from_untiled_to_the_profiles_tiles() -> None:
    h, w = SIZES["704p"]
    found = decode_tilings(h, w, 256)
    areas = [t.largest_tile(h, w) if t is not None else h * w for t in found]
    assert found[0] is None and found[-1] == Tiling.square(256)
    assert areas == sorted(areas, reverse=True) and len(set(found)) == len(found)
    assert all(t is None or not t.covers(h, w) for t in found)
    assert decode_tilings(h, w, 0) == []  # an untiled profile: nothing to choose


def test_decode_falls_back_to_the_profiles_tiles_by_frame_without_room() -> None:
    prof = load_profile("8gb")
    assert decode_cut(*SIZES["704p"], 81, 0, prof.vae_tile) == DecodeCut(Tiling.square(256), by_frame=True)
    assert decode_cut(*SIZES["704p"], 81, 0, 0) == DecodeCut(None, by_frame=True)
    assert decode_cut(128, 128, 17, 0, 256).tiling is None  # a tile covering the frame is no tiling


def test_decode_model_matches_the_measurements() -> None:
    """RESULTS.md (H100, 704p x 81, cuDNN's heuristics, 2026-12-07): allocated peaks four frames at a time and by
    frame, untiled and in strips, within 3% of the prediction; the reserved peaks under the predicted reserve."""
    h, w = SIZES["704p"]
    for strips, by_frame, allocated, reserved in ((None, False, 18.21, 22.73), (None, True, 13.98, 17.63),
                                                  (2, False, 12.39, 15.73), (2, True, 9.55, 12.01),
                                                  (3, False, 8.54, 10.72), (3, True, 6.63, 8.20),
                                                  (5, False, 5.35, 6.69), (5, True, 4.21, 5.35)):
        predicted = vae_decode_bytes(h, w, 81, Tiling.strips(h, w, strips) if strips else None, by_frame)
        assert predicted == pytest.approx(allocated * GB, rel=0.03)
        assert reserved_bytes("vae_decode", predicted) > reserved * GB
    # the decode streams latent frames: only the latents grow with the frame count
    untiled = vae_decode_bytes(h, w, 81, None)
    assert 0 < vae_decode_bytes(h, w, 321, None) - untiled < 0.3 * GB


def test_encode_tiles_follow_the_input_alone() -> None:
    """The reference and the half-size pose video are encoded untiled at 512p and 704p, a later segment's full-size
    history frames in 256 px tiles; the planner counts the largest of them with its input, the same on every card."""
    for size in ("512p", "704p"):
        h, w = SIZES[size]
        assert encode_tiling(1, h, w) is None and encode_tiling(81, h // 2, w // 2) is None
        assert encode_tiling(5, h, w) == Tiling.square(ENCODE_TILE)
        assert encode_bytes(5, h, w, None) > ENCODE_WHOLE_MAX_BYTES >= encode_bytes(1, h, w, None)
    h, w = SIZES["704p"]
    largest = max(encode_bytes(1, h, w, None) + 3 * h * w * 4,
                  encode_bytes(81, h // 2, w // 2, None) + 3 * 81 * h * w)
    assert vae_encode_bytes(h, w, 81) == 126_900_000 * 4 + largest
    assert 3.9 * GB < vae_encode_bytes(h, w, 81) < 4.2 * GB
    phases = {plan(C14, h, w, 81, card(gib), 64 * GB, weights="fp8").phases["vae_encode"].vram for gib in (12, 16, 24)}
    assert phases == {vae_encode_bytes(h, w, 81)}


def test_vae_tile_overrides_the_vae_choices() -> None:
    h, w = SIZES["704p"]
    for tile, expected in ((0, DecodeCut(None, True)), (256, DecodeCut(Tiling.square(256))),
                           (512, DecodeCut(Tiling.square(512)))):
        p = plan(C14, h, w, 81, card(16), 64 * GB, weights="fp8", vae_tile=tile)
        assert p.vae_decode == expected and p.vae_tile == tile
        assert p.phases["vae_decode"].vram == vae_decode_bytes(h, w, 81, expected.tiling, expected.by_frame)
        assert p.phases["vae_encode"].vram == vae_encode_bytes(h, w, 81, tile)
    # untiled 704p does not fit a 16 GiB card: forced, the DiT's plan stays the one that fits and the plan says so
    auto = plan(C14, h, w, 81, card(16), 64 * GB, weights="fp8")
    forced = plan(C14, h, w, 81, card(16), 64 * GB, weights="fp8", vae_tile=0)
    assert not forced.fits and "--vae-tile" in forced.reason
    assert (forced.profile, forced.resident_blocks) == (auto.profile, auto.resident_blocks)
    vae = ("vae_encode", "vae_decode")
    assert {k: v for k, v in forced.phases.items() if k not in vae} == {
        k: v for k, v in auto.phases.items() if k not in vae}
    retry = lighter(plan(C14, h, w, 81, card(24), 64 * GB, weights="fp8", vae_tile=256))
    assert retry is None or retry.vae_decode == DecodeCut(Tiling.square(256))
