"""Loading a state dict into a module built on the meta device, tensors used in place."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from ..errors import UserError


def assign_state_dict(model: nn.Module, sd: Mapping[str, Tensor], what: str) -> None:
    """Strict load into a meta-device model with `assign=True`, so the (mmapped) tensors are used in place."""
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or extra:
        raise UserError(f"{what}: state dict does not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, tensor in sd.items():
        want = expected[name]
        if tuple(want.shape) != tuple(tensor.shape):
            raise UserError(f"{what}: {name} has shape {tuple(tensor.shape)}, expected {tuple(want.shape)}")
    model.load_state_dict(dict(sd), strict=True, assign=True)
