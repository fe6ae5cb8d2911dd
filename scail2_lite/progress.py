"""Progress of a generation as rich tasks that tell the truth: one task per phase, finished when the phase ends;
the denoising bar's rate counts the time spent in steps only (`step_seconds` field), not the VAE decodes between
segments; decoding shows frames. Work on another thread beside the phases (the DiT's host side beside the encoders)
has its own task, which says what it is doing, so an overlap shows as one."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.progress import Progress, TaskID


class PhaseProgress:
    """A thin adapter over an optional rich `Progress` (None: the Python API without a display)."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress

    @contextmanager
    def phase(self, description: str, total: int | None = None) -> Iterator[TaskID | None]:
        """A task for one phase (a spinner when `total` is None); marked complete when the block ends normally."""
        if self.progress is None:
            yield None
            return
        task = self.progress.add_task(description, total=total)
        yield task
        self.progress.update(task, total=total or 1, completed=total or 1)

    def add(self, description: str, total: int) -> TaskID | None:
        """A task that outlives one block (the denoising bar across segments)."""
        return self.progress.add_task(description, total=total, step_seconds=0.0) if self.progress else None

    def advance(self, task: TaskID | None, amount: float = 1, **fields: float) -> None:
        if self.progress is not None and task is not None:
            self.progress.update(task, advance=amount, **fields)

    def beside(self, description: str) -> Callable[[str, int, int], None] | None:
        """A task for work on another thread while the phases run (rich's `Progress` takes updates from any thread):
        the returned callback `(what it is doing, done, total)` moves it; complete when done reaches total."""
        if self.progress is None:
            return None
        progress = self.progress
        task = progress.add_task(f"{description}: starting", total=None)

        def tell(what: str, done: int, total: int) -> None:
            progress.update(task, description=f"{description}: {what}", completed=done, total=total)

        return tell
