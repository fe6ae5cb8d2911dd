"""Memory profiles: the TOML files in `profiles/` (or the user's), read and validated in one place."""

from __future__ import annotations

import dataclasses
import enum
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..attention import BACKENDS
from ..errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


class StreamUnit(str, enum.Enum):
    """What one streamed transfer holds: a whole block (a ring of `prefetch + 1` block slots) or one layer."""

    BLOCK = "block"
    LAYER = "layer"


class WeightSource(str, enum.Enum):
    """Where streamed blocks are read from: a pinned RAM buffer, or the quantized shards mapped from disk."""

    PINNED = "pinned"
    MMAP = "mmap"


@dataclass(frozen=True)
class Profile:
    """A memory profile (one TOML file in `profiles/`). `speed_rank`: lower runs faster; plans try profiles in
    that order and `lighter` walks it towards the lighter ones."""

    name: str
    description: str
    speed_rank: int
    resident_blocks: int | str  # a number, "auto" (the most that fit) or "all"
    prefetch: int
    stream_unit: StreamUnit
    weight_source: WeightSource
    vae_tile: int  # the VAE decode's smallest tiles (pixels per side, 0 = untiled): its last resort, see planner
    ffn_chunk: int  # tokens per FFN chunk, 0 = one shot
    attn_chunk: int  # tokens per chunk of the per-token work around attention, 0 = one shot
    attention: str


_CHOICES: dict[str, tuple[str, ...]] = {
    "stream_unit": tuple(u.value for u in StreamUnit),
    "weight_source": tuple(s.value for s in WeightSource),
    "attention": BACKENDS,
}
_INTS: dict[str, tuple[int, int]] = {
    "speed_rank": (0, 1000), "prefetch": (0, 8), "vae_tile": (0, 4096), "ffn_chunk": (0, 1 << 20),
    "attn_chunk": (0, 1 << 20),
}


def parse_profile(data: dict[str, Any], name: str, where: str) -> Profile:
    """Validate a profile's fields; every problem is a one-line UserError naming `where` and the field."""
    fields = [f.name for f in dataclasses.fields(Profile) if f.name != "name"]
    for key in data:
        if key not in fields:
            raise UserError(f"{where}: unknown field {key!r} (fields: {', '.join(fields)})")
    for key in fields:
        if key not in data:
            raise UserError(f"{where}: missing field {key!r}")
    if not isinstance(data["description"], str):
        raise UserError(f"{where}: field 'description' must be a string")
    for key, choices in _CHOICES.items():
        if data[key] not in choices:
            raise UserError(f"{where}: field {key!r} must be one of {', '.join(choices)}, got {data[key]!r}")
    for key, (lo, hi) in _INTS.items():
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise UserError(f"{where}: field {key!r} must be an integer in {lo}..{hi}, got {value!r}")
    resident = data["resident_blocks"]
    if not (resident in ("auto", "all") or (isinstance(resident, int) and not isinstance(resident, bool) and resident >= 0)):
        raise UserError(f"{where}: field 'resident_blocks' must be a number >= 0, \"auto\" or \"all\", got {resident!r}")
    if data["stream_unit"] == "layer" and data["weight_source"] != "pinned":
        raise UserError(f"{where}: stream_unit \"layer\" streams from pinned RAM: set weight_source = \"pinned\"")
    data = dict(data, stream_unit=StreamUnit(data["stream_unit"]), weight_source=WeightSource(data["weight_source"]))
    return Profile(name=name, **data)


def load_profile(name_or_path: str | Path) -> Profile:
    """A shipped profile by name (`16gb`) or a TOML file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise UserError(f"{path}: profile file not found")
        text, where, name = path.read_text(), str(path), path.stem
    else:
        resource = resources.files("scail2_lite.profiles") / f"{name_or_path}.toml"
        if not resource.is_file():
            names = ", ".join(p.name for p in list_profiles())
            raise UserError(f"unknown profile {str(name_or_path)!r}; choose one of {names} or give a .toml path")
        text, where, name = resource.read_text(), f"profiles/{name_or_path}.toml", str(name_or_path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{where}: not valid TOML ({e})") from None
    return parse_profile(data, name, where)


def list_profiles() -> list[Profile]:
    """The shipped profiles, fastest first."""
    files = sorted(f.name for f in resources.files("scail2_lite.profiles").iterdir() if f.name.endswith(".toml"))
    return sorted((load_profile(f[: -len(".toml")]) for f in files), key=lambda p: (p.speed_rank, p.name))
