"""Block streaming on CPU: streamed forward == resident forward bit for bit, fixed slots, clean detach, mmap source."""

from __future__ import annotations

import copy
import dataclasses
import gc
import weakref

import pytest
import torch
from safetensors.torch import save_file

from scail2_lite.config import DiTConfig
from scail2_lite.errors import UserError
from scail2_lite.blocks import Kernels
from scail2_lite.formats import WeightFiles
from scail2_lite.model import Conditions, SCAIL2Model
from scail2_lite.quantize.linear import swap_linears
from scail2_lite.quantize.schemes import is_quantized_name
from scail2_lite.offload.layout import ResidentSet
from scail2_lite.offload.profiles import StreamUnit, WeightSource
from scail2_lite.offload.streamer import BlockStreamer, StreamConfig

LAYERS = 5


def _model(scheme: str = "bf16") -> SCAIL2Model:
    torch.manual_seed(0)
    config = dataclasses.replace(DiTConfig.preset("tiny"), num_layers=LAYERS, clip_dim=32)
    model = SCAIL2Model(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial biases and norms, so a wrong weight always shows
            p.normal_(0, 0.2)
    if scheme != "bf16":
        names = {n[: -len(".weight")]: scheme for n, _ in model.named_parameters() if is_quantized_name(n)}
        swap_linears(model, names)
    return model


def _inputs(config: DiTConfig) -> tuple:
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = r(1, 16, 2, 8, 8)
    cond = Conditions(r(1, 16, 2, 4, 4), r(1, 28, 2, 4, 4), r(1, 16, 1, 8, 8), r(1, 28, 3, 8, 8))
    return x, torch.tensor([700.0]), r(1, 5, config.text_dim), r(1, 257, config.clip_dim), cond


@torch.no_grad()
def _run(model: SCAIL2Model, kernels: Kernels = Kernels()) -> torch.Tensor:
    return model(*_inputs(model.config), kernels)


@pytest.mark.parametrize("scheme", ["bf16", "fp8", "int8"])
@pytest.mark.parametrize("resident,prefetch", [(0, 0), (0, 1), (2, 1), (1, 2), (0, 7), (LAYERS, 1)])
def test_streamed_forward_is_bit_exact(scheme: str, resident: int, prefetch: int) -> None:
    model = _model(scheme)
    expected = _run(model)
    with BlockStreamer(model, "cpu", StreamConfig(resident_blocks=resident, prefetch=prefetch)) as streamer:
        for _ in range(3):
            assert torch.equal(_run(model), expected)
        assert streamer.num_slots == min(prefetch + 1, LAYERS - resident)
    assert torch.equal(_run(model), expected)  # and after detach


def test_weights_run_from_fixed_slots_and_copies_are_counted() -> None:
    model = _model()
    seen: list[set[int]] = []

    def record(module, args, output):
        seen[-1].add(module.ffn[0].weight.data_ptr())

    handles = [b.register_forward_hook(record) for b in model.blocks]
    with BlockStreamer(model, "cpu", StreamConfig(resident_blocks=1, prefetch=1)) as streamer:
        slot_ptrs = {s.data_ptr() for s in streamer.strategy.slots}
        slot_ranges = [(s.data_ptr(), s.data_ptr() + s.numel()) for s in streamer.strategy.slots]
        for forward in range(3):
            seen.append(set())
            _run(model)
            assert {s.data_ptr() for s in streamer.strategy.slots} == slot_ptrs
            streamed = seen[-1] - {model.blocks[0].ffn[0].weight.data_ptr()}
            assert len(streamed) == 2 and all(any(a <= p < b for a, b in slot_ranges) for p in streamed)
            # 4 streamed blocks per forward, plus the first block of the next forward prefetched at the end.
            assert streamer.copies == 4 * (forward + 1) + 1
        # Between forwards no module points into a slot.
        assert not any(any(a <= p.data_ptr() < b for a, b in slot_ranges) for p in model.parameters())
    for h in handles:
        h.remove()


@pytest.mark.parametrize("chunk", [None, 7])
def test_one_slot_copies_the_next_head_while_the_ffn_runs(chunk: int | None) -> None:
    """prefetch 0: the next block's head (attention, norms, modulation) is already in the slot when a block's FFN
    starts (synchronous copies on the CPU show it), its FFN after the block; the output is unchanged."""
    model = _model()
    kernels = Kernels(attn_chunk=chunk or 0, ffn_chunk=chunk or 0)
    expected = _run(model, kernels)
    heads = [b.self_attn.q.weight.detach().clone() for b in model.blocks]
    tails = [b.ffn[0].weight.detach().clone() for b in model.blocks]
    seen: list[bool] = []

    def during_ffn(j: int):
        def hook(module, args):
            block = model.blocks[j]
            seen.append(torch.equal(block.self_attn.q.weight, heads[(j + 1) % LAYERS])
                        and torch.equal(block.ffn[0].weight, tails[j]))
        return hook

    with BlockStreamer(model, "cpu", StreamConfig(prefetch=0)) as streamer:
        assert streamer.split and streamer.num_slots == 1
        handles = [b.ffn.register_forward_pre_hook(during_ffn(j)) for j, b in enumerate(model.blocks)]
        for _ in range(2):
            assert torch.equal(_run(model, kernels), expected)
        assert seen and all(seen)
        assert streamer.copies == 1 + 2 * LAYERS  # block 0's head, then one head per FFN
        for h in handles:
            h.remove()


@pytest.mark.parametrize("scheme", ["bf16", "fp8", "int8"])
@pytest.mark.parametrize("resident,chunk", [(0, None), (0, 7), (2, 7), (LAYERS - 1, None)])
def test_layer_streaming_is_bit_exact(scheme: str, resident: int, chunk: int | None) -> None:
    model = _model(scheme)
    kernels = Kernels(attn_chunk=chunk or 0, ffn_chunk=chunk or 0)
    expected = _run(model, kernels)
    with BlockStreamer(model, "cpu", StreamConfig(resident_blocks=resident, unit="layer")) as streamer:
        assert streamer.layers and streamer.num_slots == 0
        for forward in range(3):
            assert torch.equal(_run(model, kernels), expected)
            # one copy per streamed block, plus the next forward's first unit fetched at the end
            assert streamer.copies == (LAYERS - resident) * (forward + 1) + 1
    assert torch.equal(_run(model, kernels), expected)


@pytest.mark.parametrize("chunk", [None, 7])
def test_layer_streaming_holds_one_unit_at_the_attention(monkeypatch: pytest.MonkeyPatch, chunk: int | None) -> None:
    """During the self-attention only o (fetched after v returned) is on the device; the small tensors outside the
    units stay there; the FFN runs beside the next block's q; the units' modules read their own weights."""
    import scail2_lite.blocks as blocks_module

    model = _model()
    kernels = Kernels(attn_chunk=chunk or 0, ffn_chunk=chunk or 0)
    expected = _run(model, kernels)
    streamer = BlockStreamer(model, "cpu", StreamConfig(unit="layer"))
    host = (streamer.host.buffer.data_ptr(), streamer.host.buffer.data_ptr() + streamer.host.buffer.numel())
    on_host = lambda t: host[0] <= t.data_ptr() < host[1]  # noqa: E731
    attention_calls: list[tuple] = []
    ffn_calls: list[tuple] = []
    running = [0]
    real = blocks_module.self_attention

    def spy(qkv, backend):
        j = running[0]
        block = model.blocks[j]
        attention_calls.append((set(streamer.strategy.held), on_host(block.self_attn.v.weight),
                                on_host(block.modulation), on_host(block.self_attn.norm_q.weight)))
        return real(qkv, backend)

    def at_ffn(j: int):
        def hook(module, args):
            ffn_calls.append((j, set(streamer.strategy.held), on_host(model.blocks[j].ffn[0].weight)))
        return hook

    def at_block(j: int):
        def hook(module, args):
            running[0] = j
        return hook

    monkeypatch.setattr(blocks_module, "self_attention", spy)
    handles = [b.register_forward_pre_hook(at_block(j)) for j, b in enumerate(model.blocks)]
    handles += [b.ffn.register_forward_pre_hook(at_ffn(j)) for j, b in enumerate(model.blocks)]
    with streamer:
        assert torch.equal(_run(model, kernels), expected)
    assert attention_calls == [({(j, 3)}, True, False, False) for j in range(LAYERS)]
    assert {j for j, _, _ in ffn_calls} == set(range(LAYERS))
    assert all(held == {(j, 5), ((j + 1) % LAYERS, 0)} and not there for j, held, there in ffn_calls)
    for h in handles:
        h.remove()


def test_blocks_that_fit_the_ring_are_copied_once() -> None:
    model = _model()
    with BlockStreamer(model, "cpu", StreamConfig(resident_blocks=3, prefetch=1)) as streamer:
        for _ in range(3):
            _run(model)
        assert streamer.copies == 2


def test_detach_removes_every_hook() -> None:
    model = _model()
    streamer = BlockStreamer(model, "cpu", StreamConfig(resident_blocks=1, prefetch=1))
    assert any(b._forward_pre_hooks for b in model.blocks)
    streamer.detach()
    streamer.detach()
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in model.blocks)
    assert streamer.strategy.slots == []


@pytest.mark.parametrize("prefetch,unit", [(0, "block"), (1, "block"), (0, "layer")])
def test_forward_interrupted_inside_a_streamed_block_recovers(prefetch: int, unit: str) -> None:
    model = _model()
    expected = _run(model)

    def boom(module, args):  # after the streamer's own FFN hook: with one slot, block 3's head has replaced 2's
        raise RuntimeError("out of memory")

    with BlockStreamer(model, "cpu", StreamConfig(resident_blocks=0, prefetch=prefetch, unit=unit)) as streamer:
        handle = model.blocks[2].ffn.register_forward_pre_hook(boom)
        with pytest.raises(RuntimeError):
            _run(model)
        handle.remove()
        assert torch.equal(_run(model), expected)
        assert not streamer.layers or set(streamer.strategy.held) == {(0, 0)}


def _saved_then_wrecked(tmp_path, scheme: str) -> tuple[SCAIL2Model, torch.Tensor, object]:
    """(a copy of the model whose streamed blocks are zeroed, the original's output, its weights file): streamed
    output equal to the original's can only come from the file."""
    model = _model(scheme)
    expected = _run(model)
    path = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for b in fresh.blocks[1:]:
            for t in [*b.parameters(), *b.buffers()]:
                t.zero_()
    return fresh, expected, path


@pytest.mark.parametrize("scheme", ["bf16", "fp8"])
def test_mmap_source_streams_from_the_file(tmp_path, scheme: str) -> None:
    fresh, expected, path = _saved_then_wrecked(tmp_path, scheme)
    config = StreamConfig(resident_blocks=1, prefetch=1, source="mmap")
    with BlockStreamer(fresh, "cpu", config, weights=path) as streamer:
        assert streamer.host_bytes == 0
        for _ in range(2):
            assert torch.equal(_run(fresh), expected)


def test_bad_arguments_are_user_errors(tmp_path) -> None:
    model = _model()
    with pytest.raises(UserError, match="resident_blocks"):
        BlockStreamer(model, "cpu", StreamConfig(resident_blocks=LAYERS + 1))
    with pytest.raises(UserError, match="prefetch"):
        BlockStreamer(model, "cpu", StreamConfig(prefetch=-1))
    with pytest.raises(UserError, match="mmap"):
        BlockStreamer(model, "cpu", StreamConfig(source="mmap"))
    with pytest.raises(UserError, match="stream unit"):
        BlockStreamer(model, "cpu", StreamConfig(unit="leaf"))
    with pytest.raises(UserError, match="pinned"):
        BlockStreamer(model, "cpu", StreamConfig(source="mmap", unit="layer"), weights=tmp_path / "x.safetensors")
    plain = _model()
    for block in plain.blocks:
        block.STREAM_UNITS = (("self_attn.nothing", None),)
    with pytest.raises(UserError, match="STREAM_UNITS"):
        BlockStreamer(plain, "cpu", StreamConfig(unit="layer"))
    path = tmp_path / "partial.safetensors"
    save_file({"blocks.1.modulation": torch.zeros(1, 6, 3)}, str(path))
    with pytest.raises(UserError, match="blocks.1.modulation"):
        BlockStreamer(_model(), "cpu", StreamConfig(resident_blocks=1, source="mmap"), weights=path)
    with pytest.raises(UserError, match="missing"):
        BlockStreamer(_model(), "cpu", StreamConfig(resident_blocks=2, source="mmap"), weights=path)


@pytest.mark.parametrize("source,prefetch,unit", [("pinned", 1, "block"), ("mmap", 1, "block"),
                                                  ("pinned", 0, "block"), ("pinned", 0, "layer")])
def test_weights_come_from_the_files_and_suspend_resume_keeps_them(tmp_path, source: str, prefetch: int,
                                                                    unit: str) -> None:
    fresh, expected, path = _saved_then_wrecked(tmp_path, "fp8")
    config = StreamConfig(resident_blocks=1, prefetch=prefetch, source=source, unit=unit)
    with BlockStreamer(fresh, "cpu", config, weights=path) as streamer:
        assert streamer.split == (prefetch == 0 and unit == "block")
        assert torch.equal(_run(fresh), expected)
        streamer.suspend()
        assert streamer.strategy.slots == [] and not any(b._forward_pre_hooks for b in fresh.blocks)
        assert not any(m._forward_pre_hooks or m._forward_hooks for m in fresh.modules())
        assert streamer.layers == (unit == "layer") and not streamer.layers or streamer.strategy.held == {}
        streamer.resume()
        assert torch.equal(_run(fresh), expected)


def test_stream_config_takes_strings_for_its_enums() -> None:
    config = StreamConfig(resident_blocks=2, prefetch=0, source="pinned", unit="layer")
    assert config.source is WeightSource.PINNED and config.unit is StreamUnit.LAYER
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.prefetch = 1  # type: ignore[misc]


def test_resident_set_places_block_by_block_and_restores_the_originals() -> None:
    model = _model()
    named = dict([*model.named_parameters(), *model.named_buffers()])
    data = {n: t.data for n, t in named.items()}
    resident = ResidentSet(model, list(model.blocks[2:]))
    calls = []
    resident.place(torch.device("cpu"), between=lambda: calls.append(1))
    resident.place(torch.device("cpu"), between=lambda: calls.append(1))  # placed already: nothing moves
    assert len(calls) == 2 + 1  # after each resident block, then after the layers outside the blocks
    for t in named.values():  # what a device would do: every tensor replaced by a copy
        t.data = t.data.clone()
    resident.restore()
    streamed = ("blocks.2.", "blocks.3.", "blocks.4.")
    assert all((named[n].data.data_ptr() == d.data_ptr()) != n.startswith(streamed) for n, d in data.items())


def _mapped(tmp_path, scheme: str) -> tuple[SCAIL2Model, torch.Tensor, object]:
    """(the model with every block tensor a view of its saved file, as `load_dit(map_blocks=True)` leaves a quantized
    folder's, its output, the file)."""
    model = _model(scheme)
    expected = _run(model)
    path = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    files = WeightFiles([path])
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.startswith("blocks."):
            t.data = files.view(name)
    return model, expected, path


def _addresses(model: SCAIL2Model) -> dict[str, int]:
    return {n: t.data_ptr() for n, t in [*model.blocks.named_parameters(), *model.blocks.named_buffers()]}


@pytest.mark.parametrize("prefetch,unit", [(1, "block"), (0, "block"), (0, "layer")])
def test_detach_points_mapped_blocks_back_at_the_file_and_frees_the_buffer(tmp_path, prefetch: int, unit: str) -> None:
    """A second placement in the same process must not hold two pinned buffers while the new one fills: once
    detached, no streamed tensor points into the old buffer (they are the file's views again) and it is freed."""
    model, expected, path = _mapped(tmp_path, "fp8")
    before = _addresses(model)
    for _ in range(2):  # a second streamer over the same model: same numbers, and its buffer freed as well
        streamer = BlockStreamer(model, "cpu", StreamConfig(resident_blocks=1, prefetch=prefetch, unit=unit),
                                 weights=path)
        buffer = weakref.ref(streamer.host.buffer.untyped_storage())
        assert _addresses(model) != before and torch.equal(_run(model), expected)
        streamer.detach()
        assert _addresses(model) == before  # the resident block and the streamed ones: the file's views
        del streamer
        gc.collect()
        assert buffer() is None


def test_a_fill_stopped_half_way_points_the_filled_blocks_back_at_the_file(tmp_path) -> None:
    model, expected, path = _mapped(tmp_path, "fp8")
    before = _addresses(model)
    buffers = []

    def stop(n: int) -> None:
        if n == 2:  # blocks 1 and 2 are in the buffer: Ctrl-C
            buffers.append(weakref.ref(next(model.blocks[2].parameters()).untyped_storage()))
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        BlockStreamer(model, "cpu", StreamConfig(resident_blocks=1), weights=path, on_block=stop)
    gc.collect()
    assert _addresses(model) == before and buffers[0]() is None
    with BlockStreamer(model, "cpu", StreamConfig(resident_blocks=1), weights=path):
        assert torch.equal(_run(model), expected)


def test_a_model_held_in_ram_keeps_its_buffer_for_the_next_streamer_of_the_same_plan() -> None:
    """Its blocks' only copy is the buffer: the next streamer under the same plan takes it over rather than copy it
    into a second one (both would be in RAM until the last block is in); another plan copies, with the same numbers."""
    model = _model("fp8")
    expected = _run(model)
    config = StreamConfig(resident_blocks=1, prefetch=1)
    with BlockStreamer(model, "cpu", config) as first:
        buffer = first.host.buffer.data_ptr()
    for resident, same in [(1, True), (1, True), (2, False), (2, True), (1, False)]:
        with BlockStreamer(model, "cpu", dataclasses.replace(config, resident_blocks=resident)) as streamer:
            assert (streamer.host.buffer.data_ptr() == buffer) == same
            buffer = streamer.host.buffer.data_ptr()
            assert torch.equal(_run(model), expected)
    assert torch.equal(_run(model), expected)
