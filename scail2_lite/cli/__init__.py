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
    """Turn UserError (and Ctrl-C) into one red line and a non-zero exit instead of a traceback. Under several
    ranks (torchrun) the first rank to fail says why, whatever the error, and the others stay quiet."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .. import distributed

        try:
            return fn(*args, **kwargs)
        except (UserError, QuantizeError) as e:
            _say(distributed.claim_failure(), f"[red]error:[/red] {e}")
            raise typer.Exit(UserError.exit_code) from None
        except KeyboardInterrupt:
            _say(distributed.is_main_process(), "[yellow]interrupted[/yellow]")
            raise typer.Exit(130) from None
        except Exception as e:
            if not distributed.in_group():
                raise
            _say(distributed.claim_failure(), f"[red]error:[/red] {distributed.failure_prefix()}"
                 f"{type(e).__name__}: {e}".replace("\n", " "))
            raise typer.Exit(1) from None

    return wrapper


def _say(shown: bool, line: str) -> None:
    """One line on stderr, also from a rank whose console is otherwise quiet."""
    if shown:
        console.quiet = False
        console.print(line, highlight=False, soft_wrap=True)


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
