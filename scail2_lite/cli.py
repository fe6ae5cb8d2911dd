"""The `scail2-lite` command line: thin Typer commands over the Python API, errors as one line + exit 2."""

from __future__ import annotations

import functools
import sys
from typing import Callable

import typer
from rich.console import Console

from .errors import UserError

app = typer.Typer(
    name="scail2-lite",
    help="Run SCAIL-2 character animation on consumer GPUs: quantize, generate, profile.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def user_errors(fn: Callable) -> Callable:
    """Turn UserError (and Ctrl-C) into one red line and a non-zero exit instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130) from None

    return wrapper


def main() -> None:
    app(prog_name="scail2-lite")


if __name__ == "__main__":
    sys.exit(main())
