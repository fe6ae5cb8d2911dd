"""The house's import rules (ARCHITECTURE: data flows one way): lower rooms never import higher ones, read from the
source with `ast`, lazy imports inside functions included. A rule broken here is a design change: argue it in the
ARCHITECTURE notes, then change the table."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Installed names (pyproject's package-dir): quantize/ is scail2_lite.quantize
SOURCES = {"scail2_lite": ROOT / "scail2_lite", "scail2_lite.quantize": ROOT / "quantize"}

MODEL_ROOMS = ("model", "blocks", "rope", "attention", "attention_fp8", "attention_int8", "fused")
# room (a module or package prefix) -> what it must never import (prefixes under scail2_lite, or top-level packages)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    **{f"scail2_lite.{room}": ("scail2_lite.offload", "scail2_lite.pipeline", "scail2_lite.loader",
                               "scail2_lite.formats", "scail2_lite.encoders", "scail2_lite.vae", "scail2_lite.lora",
                               "scail2_lite.settings", "scail2_lite.profiling", "scail2_lite.stepcache",
                               "scail2_lite.distributed", "scail2_lite.prepare", "scail2_lite.synth",
                               "scail2_lite.cli", "typer") for room in MODEL_ROOMS},
    "scail2_lite.formats": ("scail2_lite.loader", "scail2_lite.model", "scail2_lite.offload", "scail2_lite.pipeline",
                            "scail2_lite.settings", "scail2_lite.prepare", "scail2_lite.synth", "scail2_lite.cli",
                            "typer"),
    "scail2_lite.offload": ("scail2_lite.pipeline", "scail2_lite.settings", "scail2_lite.prepare",
                            "scail2_lite.synth", "scail2_lite.cli", "typer"),
    "scail2_lite.prepare": ("scail2_lite.pipeline", "scail2_lite.offload", "scail2_lite.model", "scail2_lite.loader",
                            "scail2_lite.cli", "typer"),
    "scail2_lite.pipeline": ("scail2_lite.cli", "typer"),
}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def imports(name: str, path: Path) -> set[str]:
    """Absolute names of everything `path` (module `name`) imports, at any depth of the code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import x` names module x
    return out


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_the_house_has_the_rooms_the_rules_name() -> None:
    found = modules()
    for room in FORBIDDEN:
        assert any(under(m, room) for m in found), f"rule for a room that does not exist: {room}"


@pytest.mark.parametrize("name", sorted(modules()))
def test_imports_flow_one_way(name: str) -> None:
    path = modules()[name]
    imported = imports(name, path)
    broken = []
    if under(name, "scail2_lite.quantize"):  # the library underneath: never the runtime
        broken += [i for i in imported if under(i, "scail2_lite") and not under(i, "scail2_lite.quantize")]
    if not under(name, "scail2_lite.cli"):
        broken += [i for i in imported if under(i, "scail2_lite.cli") or under(i, "typer")]
    for room, forbidden in FORBIDDEN.items():
        if under(name, room):
            broken += [i for i in imported for f in forbidden if under(i, f)]
    assert not broken, f"{path.relative_to(ROOT)} imports {sorted(set(broken))}"


def test_the_rule_reader_sees_relative_and_lazy_imports(tmp_path: Path) -> None:
    source = tmp_path / "x.py"
    source.write_text("from ..pipeline import Pipeline\n\ndef f():\n    from . import streamer\n    import typer\n")
    assert imports("scail2_lite.offload.x", source) >= {"scail2_lite.pipeline", "scail2_lite.offload.streamer",
                                                         "typer"}
