"""A run directory's file names, and the claim a training run holds on the directory.

A training run claims its directory for its whole life with an exclusive ``flock`` on the
directory itself: a second run into the same directory is refused at once, and the
operating system releases the claim when its holder exits or is killed, so a crashed run
never leaves a stale lock behind. Claiming also checks up front that the directory can be
written (rather than after the training time has been spent) and removes the temporary
files that a kill during an atomic write left behind.
"""

from __future__ import annotations

import errno
import json
import fcntl
import os
import re
import tempfile
from pathlib import Path

from whiteboard.errors import WhiteboardError

CONFIG = "config.json"
VOCAB = "vocab.json"
MODEL = "model.safetensors"
TRAINING_STATE = "training_state.safetensors"
METRICS = "metrics.jsonl"
#: Every file a run writes; ``--overwrite`` removes these and nothing else.
RUN_FILES = (CONFIG, VOCAB, MODEL, TRAINING_STATE, METRICS)

# files.atomic_write_bytes writes ".<name>.<random>.tmp" beside <name>.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp$")


class RunDirectoryClaim:
    """An exclusive claim on a run directory, held while the context is open."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> "RunDirectoryClaim":
        self._created = not self.run_dir.exists()
        _make_directory(self.run_dir)
        fd = os.open(self.run_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WhiteboardError(
                f"{self.run_dir} is in use by another whiteboard training run; wait for it to end "
                "(or stop it), or choose another --run-dir"
            ) from None
        self._fd = fd
        try:
            _check_writable(self.run_dir)
            remove_stale_temporaries(self.run_dir)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, exc_type=None, *exc) -> None:
        if self._fd is not None:
            # A run that failed before writing anything leaves no folder it made behind.
            if exc_type is not None and self._created and not any(self.run_dir.iterdir()):
                self.run_dir.rmdir()
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None


def _make_directory(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise WhiteboardError(f"{run_dir} is a file, not a run directory; choose another --run-dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise WhiteboardError(f"cannot create the run directory {run_dir}: a part of its path is a file") from None
    except OSError as exc:
        raise WhiteboardError(f"cannot create the run directory {run_dir}: {exc.strerror}") from None


def _check_writable(run_dir: Path) -> None:
    """Write and remove a probe file: a read-only directory or a full disk is found now."""
    try:
        fd, probe = tempfile.mkstemp(dir=run_dir, prefix=".write-probe.", suffix=".tmp")
        try:
            os.write(fd, b"0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        reason = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror
        raise WhiteboardError(f"cannot write in the run directory {run_dir}: {reason}") from None


def remove_stale_temporaries(run_dir: Path) -> list[str]:
    """Remove what a kill during an atomic write of a run file left behind; returns the names."""
    removed = []
    for path in Path(run_dir).iterdir():
        match = _TEMPORARY.match(path.name)
        if match and (match["name"] in RUN_FILES or match["name"] == "write-probe") and path.is_file():
            path.unlink()
            removed.append(path.name)
    return removed


def run_files_in(run_dir: Path) -> list[str]:
    """The names of the files and folders in a run directory (hidden ones included)."""
    run_dir = Path(run_dir)
    return sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []


def remove_run_files(run_dir: Path) -> None:
    """What ``--overwrite`` removes: a run's own files; anything else in the folder stays."""
    for name in RUN_FILES:
        (Path(run_dir) / name).unlink(missing_ok=True)


def fresh_or_same_run(config_json: str, run_dir: Path, overwrite: bool, log) -> bool:
    """For a new run: True where ``run_dir`` holds a resumable run of this very config (it
    is continued), False where the directory is empty (or emptied by ``overwrite``)."""
    present = run_files_in(run_dir)
    if not present:
        return False
    if overwrite:
        log(f"--overwrite: replacing the run in {run_dir}")
        remove_run_files(run_dir)
        leftover = run_files_in(run_dir)
        if leftover:
            log(f"kept what is not a whiteboard run file: {', '.join(leftover)}")
        return False
    saved = _saved_config(run_dir)
    if (run_dir / TRAINING_STATE).exists() and saved == json.loads(config_json):
        log(f"{run_dir} holds this run (same config): continuing it")
        return True
    what = "a run with another config" if saved is not None else f"other files ({', '.join(present[:5])})"
    raise WhiteboardError(
        f"{run_dir} is not empty: it holds {what}. Choose another --run-dir, continue a run with "
        f"--resume {run_dir}, or pass --overwrite to replace it"
    )


def _saved_config(run_dir: Path) -> dict | None:
    try:
        saved = json.loads((run_dir / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None
