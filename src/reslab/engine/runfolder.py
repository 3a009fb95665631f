"""A run folder is held by one run at a time, and cleared of the temporary files that a
killed run leaves behind.

The hold is an OS file lock (``flock``) on ``.lock`` in the folder, taken for the whole run:
the kernel releases it when the holding process ends, however it ends, so a crashed run never
leaves a folder locked. The file holds the holder's process id, which a second run names.
"""

from __future__ import annotations

import fcntl
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from reslab.engine.checkpoint import TEMPORARY_GLOB
from reslab.engine.loop import caught_signals
from reslab.errors import Interrupted, ReslabError

LOCK_NAME = ".lock"


@contextmanager
def hold_run_folder(folder: str | Path) -> Iterator[list[str]]:
    """Hold ``folder`` for the ``with`` block; yields the names of the stale temporary files
    removed from it (:func:`clear_temporaries`). A folder another live run holds is a
    ``ReslabError`` naming that run's process id."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise ReslabError(
            f"cannot write the run folder {folder} ({error.strerror or error}); "
            "pass --out with a writable folder"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ReslabError(
                f"run folder {folder} is in use by another reslab run (PID {holder}); wait "
                "for it to end, or pass another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield clear_temporaries(folder)
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def held_run(folder: Path | None, say: Callable[[str], None]) -> Iterator[None]:
    """A training run's outer block: ``folder`` held (rank 0's; None on the other ranks), the
    temporary files a killed run left reported through ``say``, and SIGINT / SIGTERM caught
    throughout. The loop's own signal hook stops a run mid-way; a signal that comes after
    the loop lets the results, plots and summary be written, then ends the run with its
    status (:class:`Interrupted`)."""
    with ExitStack() as stack:
        if folder is not None:
            removed = stack.enter_context(hold_run_folder(folder))
            if removed:
                say(f"removed what a killed run left in {folder}: {', '.join(removed)}")
        caught = stack.enter_context(caught_signals())
        yield
    if caught[0]:
        raise Interrupted(
            f"{signal.Signals(caught[0]).name} arrived as the run ended; it finished first: "
            f"its results are in {folder or 'the run folder'}",
            128 + caught[0],
        )


def clear_temporaries(folder: Path) -> list[str]:
    """Remove the temporary files of :func:`reslab.engine.checkpoint.atomic_write` from
    ``folder``: while the folder is held, none can belong to a write in progress, so each is
    what a killed run left. Returns their names."""
    removed = []
    for path in sorted(folder.glob(TEMPORARY_GLOB)):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def is_bookkeeping(path: Path) -> bool:
    """Whether ``path`` is the lock file, which does not make a folder a run's."""
    return path.name == LOCK_NAME
