"""Atomic file writes: a file is written to a temporary name beside it, flushed to disk and
renamed over the old one, so a kill at any moment leaves the old file or the new one, never
half of one. Every file whiteboard writes goes through here."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


@contextmanager
def atomic_output(path: Path) -> Iterator[tuple[BinaryIO, Path]]:
    """Yields (a binary handle, its temporary path) for ``path``: on leaving the block the
    data is made durable and renamed into place; an exception in the block removes the
    temporary file and leaves ``path`` as it was. The temporary name is ``.<name>.*.tmp``
    (a run directory removes stale ones of its own files when it opens)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle, Path(tmp)
            handle.flush()
            # mkstemp makes the file private (0600); a written file gets the permissions any
            # new file would (0666 less the umask), as open() would have given it.
            os.fchmod(handle.fileno(), 0o666 & ~umask())
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_output(path) as (handle, _):
        handle.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
