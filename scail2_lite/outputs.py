"""Where results go, and how they get there, for every command.

Before the work: each output is resolved against each input (the same path, inside one, or containing one is
an error), its place is checked (the folder exists and takes a file, nothing of another kind is in the way, the
disk has room for an estimate of what will be written). During the work: files and folders are built under a
hidden temporary name beside their destination, with the user's umask, and renamed into place only when
complete; an error, Ctrl-C or SIGTERM removes what was being built and nothing else. An existing folder is
replaced only when the caller says it is one of ours, and only after the new one is complete.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping

from .errors import UserError

SPACE_MARGIN = 1.05  # filesystems round up to blocks and keep metadata: ask for 5% more than the estimate


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be so the same clean-up runs; the CLI exits 128 + 15."""

    exit_code = 143


@contextmanager
def interruptible() -> Iterator[None]:
    """For the duration, SIGTERM raises `Terminated` (a KeyboardInterrupt) in the main thread, so every
    `finally` and temporary-file clean-up runs when killed politely. The previous handler comes back afterwards.
    Elsewhere than the main thread signals are not ours to take: nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def format_bytes(n: float) -> str:
    """Bytes for messages: GB, MB or kB (1000-based, as disks are sold), never '0.0 GB' for a small file."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


# ---------------------------------------------------------------- checks before the work


def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_separate(outputs: Mapping[str, str | Path | None], inputs: Mapping[str, str | Path | None]) -> None:
    """Every output apart from every input: not the same path (symlinks and hard links followed), not inside
    it, not containing it. Keys name the flags in the message (e.g. '-o', '--pose'); None values are skipped."""
    for out_flag, out in outputs.items():
        if out is None:
            continue
        o = Path(out).resolve()
        given = {flag: src for flag, src in inputs.items() if src is not None}
        for in_flag, src in given.items():  # the same file first: the most precise message
            if _same(o, Path(src).resolve()):
                raise UserError(f"{out_flag} {out} is the {in_flag} input; choose another output")
        for in_flag, src in given.items():
            i = Path(src).resolve()
            if i in o.parents:
                raise UserError(f"{out_flag} {out} is inside the {in_flag} input {src}; choose an output "
                                "outside it")
            if o in i.parents:
                raise UserError(f"{out_flag} {out} contains the {in_flag} input {src}; choose an output that "
                                "does not hold your inputs")


def _probe_writable(folder: Path, flag: str, target: Path) -> None:
    """Create and remove a file in `folder`: the honest test (os.access says yes to root on a read-only mount)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".scail2-lite-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{flag} {target}: cannot write in {folder} ({e.strerror or e})") from None


def check_space(folder: Path, needed: int, flag: str, target: Path) -> None:
    """Refuse when the filesystem of `folder` has less than `needed` bytes (plus a margin) free."""
    free = shutil.disk_usage(folder).free
    if free < needed * SPACE_MARGIN:
        raise UserError(f"{flag} {target}: not enough disk space in {folder} (need about "
                        f"{format_bytes(needed * SPACE_MARGIN)}, {format_bytes(free)} free)")


def check_file_target(path: str | Path, flag: str, needed: int = 0) -> Path:
    """A file output's place, before the work: its folder exists and is writable with `needed` bytes free, and
    `path` is not a folder. An existing file is replaced at the end (atomically)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise UserError(f"{flag} {path}: folder {path.parent} does not exist")
    _probe_writable(path.parent, flag, path)
    check_space(path.parent, needed, flag, path)
    return path


def check_folder_target(path: str | Path, flag: str, needed: int = 0, *, replace: bool = False,
                        ours: Callable[[Path], bool] | None = None, what: str = "folder") -> Path:
    """A folder output's place, before the work: new or empty, or (with `replace`) one that `ours` recognises
    as written by us; its parent exists and is writable with `needed` bytes free (the new folder is complete
    before the old one goes, so both fit at once)."""
    path = Path(path)
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        if not path.is_dir():
            raise UserError(f"{flag} {path} is a file; give a folder name")
        if not replace or ours is None:
            hint = "; pass --force to replace it" if ours is not None else "; choose a new or empty folder"
            raise UserError(f"{flag} {path} already exists and is not empty{hint}")
        if not ours(path):
            raise UserError(f"{flag} {path} is not a {what}; --force replaces only those, so nothing of yours is "
                            "deleted: choose a new folder")
    if not path.parent.is_dir():
        raise UserError(f"{flag} {path}: folder {path.parent} does not exist")
    _probe_writable(path.parent, flag, path)
    check_space(path.parent, needed, flag, path)
    return path


# ---------------------------------------------------------------- writing under a temporary name


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temporary_file(dest: Path) -> Path:
    """A new empty hidden file beside `dest` (same suffix, so encoders pick the format), with the permissions
    an ordinary `open` would give (mkstemp's are 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=f".part{dest.suffix}", dir=dest.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


def temporary_folder(dest: Path) -> Path:
    """A new empty hidden folder beside `dest`, with the permissions `mkdir` would give (mkdtemp's are 0700)."""
    tmp = tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    os.chmod(tmp, 0o777 & ~_umask())
    return Path(tmp)


@contextmanager
def new_file(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `dest` to write; it becomes `dest` when the block ends normally, and is
    removed on any error, Ctrl-C or SIGTERM."""
    dest = Path(dest)
    with interruptible():
        tmp = temporary_file(dest)
        try:
            yield tmp
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


@contextmanager
def new_folder(dest: str | Path) -> Iterator[Path]:
    """Yield a hidden staging folder beside `dest`; when the block ends normally it takes `dest`'s place (an
    existing `dest` was allowed by `check_folder_target`: it is moved aside, then deleted, only once the new one
    is in place); on any error, Ctrl-C or SIGTERM the staging folder is removed and `dest` is untouched."""
    dest = Path(dest)
    with interruptible():
        staging = temporary_folder(dest)
        try:
            yield staging
            swap_in(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def swap_in(staging: Path, dest: Path) -> None:
    """Rename `staging` to `dest`. An empty `dest` folder is replaced; any other existing `dest` is renamed
    aside first and deleted after the new one is in place (a failure between leaves both, never neither)."""
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()
    if not dest.exists():
        os.replace(staging, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
    os.replace(dest, old / dest.name)
    os.replace(staging, dest)
    shutil.rmtree(old, ignore_errors=True)
