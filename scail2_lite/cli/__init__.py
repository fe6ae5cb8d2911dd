"""The `scail2-lite` command line: thin Typer commands over the Python API, errors as one line + exit 2.

Rooms: `checkpoints` (inspect, synth, quantize), `generate` (generate, demo), `profile` (memory plans and runs).
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import UserError
from ..outputs import Terminated, interruptible
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
    """Every command's guarantee: bad input (UserError) and any OS error (full disk, read-only folder, ...) are
    one red line and exit 2, Ctrl-C exits 130 and SIGTERM 143, all after the clean-up of what was being written
    (`outputs.interruptible` turns SIGTERM into an interrupt for the command's duration). Under several ranks
    (torchrun) the first rank to fail says why, whatever the error, and the others stay quiet."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .. import distributed

        try:
            with interruptible():
                return fn(*args, **kwargs)
        except (UserError, QuantizeError) as e:
            if distributed.claim_failure():
                error(str(e))
            raise typer.Exit(UserError.exit_code) from None
        except OSError as e:
            error(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e))
            raise typer.Exit(UserError.exit_code) from None
        except Terminated:
            console.print("[yellow]terminated[/yellow]")
            raise typer.Exit(Terminated.exit_code) from None
        except KeyboardInterrupt:
            if distributed.is_main_process():
                console.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130) from None
        except Exception as e:
            if not distributed.in_group():
                raise
            if distributed.claim_failure():
                error(f"{distributed.failure_prefix()}{type(e).__name__}: {e}".replace("\n", " "))
            raise typer.Exit(1) from None

    return wrapper


def warn(message: str) -> None:
    """One yellow 'warning:' line of user-facing text (not markup)."""
    console.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False, soft_wrap=True)


def error(message: str) -> None:
    """One red 'error:' line, also from a rank whose console is otherwise quiet; the message is the user's text
    (paths may hold brackets), never markup."""
    console.quiet = False
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


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
