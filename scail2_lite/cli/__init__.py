"""The `scail2-lite` command line: thin Typer commands over the Python API, errors as one line + exit 2.

Rooms: `checkpoints` (inspect, synth, quantize), `generate` (generate, demo), `profile` (memory plans and runs).
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import typer
from rich.console import Console

from ..errors import UserError
from ..quantize.schemes import QuantizeError

app = typer.Typer(
    name="scail2-lite",
    help="Run SCAIL-2 character animation on consumer GPUs: quantize, generate, profile.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
# diffusers and transformers import optional backends that log load failures irrelevant to us (torchao's CUDA
# extensions, bitsandbytes' CPU kernels download): keep the terminal for our own messages.
_NOISY = ("torchao", "bitsandbytes", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")
for _noisy in _NOISY:
    logging.getLogger(_noisy).setLevel(logging.ERROR)


def user_errors(fn: Callable) -> Callable:
    """Turn UserError (and Ctrl-C) into one red line and a non-zero exit instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, QuantizeError) as e:
            console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(UserError.exit_code) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130) from None

    return wrapper


def lora_args(loras: list[str], full_patches: bool = False) -> list:
    """`--lora PATH[:STRENGTH]` values (and `--lora-full-patches`) as `LoraFile`s."""
    from ..lora import LoraFile

    return [LoraFile.parse(a, full_patches) for a in loras]


LORA_FULL_PATCHES_HELP = ("also add a LoRA's full-tensor patches (.diff, diff_m, a diff_b without a low-rank pair) "
                          "where they fit, as ComfyUI does; by default only low-rank pairs and their diff_b are "
                          "merged, as upstream SCAIL-2 does (skipped keys are listed)")


def main() -> None:
    app(prog_name="scail2-lite")



from . import checkpoints, generate, prepare, profile  # noqa: E402,F401 (each module registers its commands on `app`)
